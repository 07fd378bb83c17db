"""`edgerun-bridge`: forward between MQTT topics and RabbitMQ exchanges."""

from __future__ import annotations

import logging
import os
import signal
import sys

from prometheus_client import disable_created_metrics

from edgerun.errors import ConfigError, EdgerunError
from edgerun.settings import fail

from . import config
from .service import Bridge


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.load(argv, os.environ)
        bridge = Bridge(cfg)
    except (ConfigError, EdgerunError) as exc:
        fail(config.PROG, ConfigError(str(exc)))
    except OSError as exc:  # the metrics port is taken, say
        fail(config.PROG, ConfigError(f"cannot listen on {cfg.metrics_address}:"
                                      f"{cfg.metrics_port}: {exc.strerror}"))
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
    # the link logs each broker error once, in a line; pika's own logs are per frame
    logging.getLogger("pika").setLevel(logging.WARNING if cfg.log_level == "DEBUG"
                                       else logging.CRITICAL)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: bridge.stop())
    return bridge.run()


if __name__ == "__main__":
    sys.exit(main())
