"""`edgerun serve`: the service's entry point. The `edgerun` command (edgerun.cli) hands
`serve ...` here before it parses anything, so the client imports no server module."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Mapping

from edgerun.errors import EXIT_OK
from edgerun.scheduler.app import App
from edgerun.scheduler.settings import SERVE_OPTIONS, ServeSettings, load
from edgerun.settings import Parser, add_options


def build_parser() -> Parser:
    parser = Parser(prog="edgerun serve",
                    description="Run the scheduler service: dispatch, record, follow.")
    parser.add_argument("--config", metavar="FILE", help="TOML file with a [serve] table "
                        "(also EDGERUN_CONFIG)")
    add_options(parser, SERVE_OPTIONS)
    return parser


def main(argv: list[str], environ: Mapping[str, str]) -> int:
    """Errors propagate to the caller, which turns each into its exit code."""
    return serve(load(build_parser().parse_args(argv), environ))


def serve(settings: ServeSettings) -> int:
    """Run the service until SIGTERM or SIGINT."""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transitions", "pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # amqtt logs every client that vanishes (a killed agent) as an error with a traceback;
    # what matters reaches us as exceptions or as the agents' Last Will
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app = App(settings).start()
    try:
        stop.wait()
    finally:
        app.stop()
    return EXIT_OK
