"""The scheduler's exception root and the errors the command line turns into exit codes."""

from __future__ import annotations

from edgerun.errors import EXIT_UNKNOWN, EXIT_UNREACHABLE, EXIT_USAGE, EdgerunError


class SchedulerError(EdgerunError):
    """Root of every error the scheduler raises on purpose."""


class StoreError(SchedulerError):
    """The SQLite store could not be opened, migrated or written."""

    exit_code = EXIT_USAGE  # serve: a --db to fix


class BrokerUnreachable(SchedulerError):
    """A broker (MQTT or AMQP) could not be reached; the message names its URL."""

    exit_code = EXIT_UNREACHABLE


class EmbeddedBrokerError(SchedulerError):
    """The embedded MQTT broker could not start (port taken, bad address)."""

    exit_code = EXIT_USAGE


class ListenError(SchedulerError):
    """The HTTP API cannot listen on the address it was given."""

    exit_code = EXIT_USAGE


class UnknownNode(SchedulerError):
    """A target names a node the registry has never seen."""

    exit_code = EXIT_UNKNOWN


class BadRequest(SchedulerError):
    """A dispatch, cancel or job request is malformed; the message says what to change."""

    exit_code = EXIT_USAGE


class NotFound(SchedulerError):
    """No task or job with that id."""

    exit_code = EXIT_UNKNOWN


class Conflict(BadRequest):
    """The request clashes with what exists: a task id taken, a task already finished."""
