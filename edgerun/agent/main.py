"""`edgerun-agent`: the entry point baked into discovery images."""

from __future__ import annotations

import logging
import os
import signal
import sys

from edgerun.errors import ConfigError, EdgerunError
from edgerun.settings import fail, proc_cmdline

from . import config
from .core import Agent


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.load(argv, os.environ, proc_cmdline())
        agent = Agent(cfg)
    except (ConfigError, EdgerunError) as exc:
        fail("edgerun-agent", ConfigError(str(exc)))
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
