"""The control plane's request errors, shared by `edgerun serve` and its clients.

The service raises them and the API answers each with its status; the client
(edgerun.cli) turns an answer back into the same class, so both ends agree on
the exit code a failure gets.
"""

from __future__ import annotations

from edgerun.errors import EXIT_UNKNOWN, EXIT_UNREACHABLE, EXIT_USAGE, EdgerunError


class SchedulerError(EdgerunError):
    """Root of every error the scheduler raises on purpose."""


class BrokerUnreachable(SchedulerError):
    """A broker (MQTT or AMQP) could not be reached; the message names its URL."""

    exit_code = EXIT_UNREACHABLE


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


class Unauthorized(SchedulerError):
    """No token, or one the service does not know (or revoked)."""


class Forbidden(SchedulerError):
    """The token is valid but its role does not allow the request."""
