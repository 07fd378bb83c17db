"""What the service needs from a broker, whichever kind it is.

A messenger owns its broker connection on one thread of its own. It hands
every message from the nodes (and every task another client published) to
`deliver` without blocking, and the service acknowledges each one with `ack`
after it is recorded, so a message in flight during a crash is redelivered.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from edgerun.protocol import Channel
from edgerun.settings import BrokerURL

OnDone = Callable[[], None]


@dataclass(frozen=True)
class Incoming:
    """One message: from `node` on `channel` (tasks, updates, output or status)."""

    node: str
    channel: Channel
    payload: bytes
    token: Any = None  # what `ack` needs; messenger-specific


class Messenger(ABC):
    kind: str = "?"

    def __init__(self, url: BrokerURL) -> None:
        self.url = url
        self.connected = threading.Event()

    @abstractmethod
    def start(self, deliver: Callable[[Incoming], None]) -> None:
        """Connect (retrying with back-off for as long as it runs) and start delivering."""

    @abstractmethod
    def stop(self) -> None:
        """Flush what is queued, briefly, and close the connection."""

    @abstractmethod
    def send(self, node: str, payload: bytes, on_done: OnDone | None = None) -> None:
        """Publish a task or cancel for `node`; `on_done` runs (on the messenger's thread)
        once the broker has taken it. Queued while disconnected."""

    @abstractmethod
    def publish_event(self, subject: str, node: str, state: str, payload: bytes) -> None:
        """Publish a full-data event (subject `tasks` or `nodes`); best effort."""

    @abstractmethod
    def ack(self, message: Incoming) -> None:
        """The message is recorded: the broker may forget it."""

    def send_many(self, sends: Sequence[tuple[str, bytes, OnDone | None]]) -> None:
        """`send` of each (node, payload, on_done), in order; a messenger may hand them
        to its network thread at once."""
        for node, payload, on_done in sends:
            self.send(node, payload, on_done)

    def publish_events(self, events: Sequence[tuple[str, str, str, bytes]]) -> None:
        """`publish_event` of each (subject, node, state, payload), in order."""
        for event in events:
            self.publish_event(*event)

    def ack_many(self, messages: Sequence[Incoming]) -> None:
        """`ack` of each message, in order."""
        for message in messages:
            self.ack(message)

    @property
    def node(self) -> BrokerURL | None:
        """The broker address (one node of a cluster) connected to now; None while down."""
        return self.url if self.connected.is_set() else None

    def seed(self, nodes: Iterable[str]) -> None:
        """The node ids the store knows, before `start`: a messenger that must ask for
        their retained status one by one (messaging/mqtt.py) remembers them."""
        del nodes  # the AMQP messenger asks the bridges instead (edgerun/bridge/resync.py)

    @property
    @abstractmethod
    def last_error(self) -> str | None:
        """Why the last connection attempt failed, for error messages."""
