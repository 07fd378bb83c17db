"""`edgerun-bridge`: forward between MQTT topics and RabbitMQ exchanges."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys

from edgerun.cmdline import missing_module, require_extra
from edgerun.errors import ConfigError, EdgerunError, exit_with

from . import config

GC_THRESHOLD = 20_000  # allocations between collections of the youngest generation


def main(argv: list[str] | None = None) -> int:
    """The one place where the bridge's errors become exit codes (each class has its own)."""
    try:
        return _main(argv)
    except EdgerunError as exc:
        return exit_with(config.PROG, exc)


def _main(argv: list[str] | None) -> int:
    require_extra(config.PROG, "bridge")
    try:  # pika and prometheus_client, only once we know they are installed
        from prometheus_client import disable_created_metrics

        from .service import Bridge
    except ModuleNotFoundError as exc:  # installed without its metadata, say
        raise missing_module(exc, config.PROG, "bridge") from None
    cfg = config.load(argv, os.environ)
    try:
        bridge = Bridge(cfg)
    except OSError as exc:  # the metrics port is taken, say
        raise ConfigError(f"cannot listen on {cfg.metrics_address}:{cfg.metrics_port}: "
                          f"{exc.strerror}") from None
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
    # the link logs each broker error once, in a line; pika's own logs are per frame
    logging.getLogger("pika").setLevel(logging.WARNING if cfg.log_level == "DEBUG"
                                       else logging.CRITICAL)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: bridge.stop())
    # Each message makes a few short-lived, acyclic objects, and thousands are alive in
    # the windows: at the default threshold (700) the collector runs every few messages
    # and its older generations scan them all. Start-up's objects are frozen out of it.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    return bridge.run()


if __name__ == "__main__":
    sys.exit(main())
