"""`edgerun-agent`: the entry point baked into discovery images."""

from __future__ import annotations

import logging
import os
import signal
import sys

from edgerun.errors import EdgerunError, exit_with
from edgerun.settings import proc_cmdline

from . import config
from .core import Agent

PROG = "edgerun-agent"


def main(argv: list[str] | None = None) -> int:
    """The one place where the agent's errors become exit codes (each class has its own)."""
    try:
        cfg = config.load(argv, os.environ, proc_cmdline())
        agent = Agent(cfg)
    except EdgerunError as exc:
        return exit_with(PROG, exc)
    logging.basicConfig(level=cfg.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
