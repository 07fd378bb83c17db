"""The errors only `edgerun serve` raises; the request errors it shares with its clients
are in edgerun.control.errors."""

from __future__ import annotations

from edgerun.control.errors import SchedulerError
from edgerun.errors import EXIT_USAGE


class StoreError(SchedulerError):
    """The SQLite store could not be opened, migrated or written."""

    exit_code = EXIT_USAGE  # serve: a --db to fix


class EmbeddedBrokerError(SchedulerError):
    """The embedded MQTT broker could not start (port taken, bad address)."""

    exit_code = EXIT_USAGE


class ListenError(SchedulerError):
    """The HTTP API cannot listen on the address it was given."""

    exit_code = EXIT_USAGE
