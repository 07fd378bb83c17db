"""The scheduler's exception root and the errors the command line turns into exit codes."""

from __future__ import annotations

from edgerun.errors import EdgerunError


class SchedulerError(EdgerunError):
    """Root of every error the scheduler raises on purpose."""


class StoreError(SchedulerError):
    """The SQLite store could not be opened, migrated or written."""


class BrokerUnreachable(SchedulerError):
    """A broker (MQTT or AMQP) could not be reached; the message names its URL."""


class EmbeddedBrokerError(SchedulerError):
    """The embedded MQTT broker could not start (port taken, bad address)."""


class ListenError(SchedulerError):
    """The HTTP API cannot listen on the address it was given."""


class UnknownNode(SchedulerError):
    """A target names a node the registry has never seen."""


class BadRequest(SchedulerError):
    """A dispatch, cancel or job request is malformed; the message says what to change."""


class NotFound(SchedulerError):
    """No task or job with that id."""
