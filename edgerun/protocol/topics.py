"""MQTT topic names (PROTOCOL.md, "MQTT topics")."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .names import DEFAULT_PREFIX, is_node_id, is_prefix


class Channel(enum.StrEnum):
    TASKS = "tasks"
    UPDATES = "updates"
    OUTPUT = "output"
    STATUS = "status"


QOS = {Channel.TASKS: 1, Channel.UPDATES: 1, Channel.OUTPUT: 0, Channel.STATUS: 1}
RETAINED = {Channel.TASKS: False, Channel.UPDATES: False, Channel.OUTPUT: False,
            Channel.STATUS: True}


@dataclass(frozen=True)
class Topics:
    """`{prefix}/nodes/{node}/{channel}` for one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not is_prefix(self.prefix):
            raise ValueError(f"bad topic prefix {self.prefix!r}: one topic level without / + #")

    def topic(self, node: str, channel: Channel) -> str:
        if not is_node_id(node):
            raise ValueError(f"bad node id {node!r}")
        return f"{self.prefix}/nodes/{node}/{channel}"

    def tasks(self, node: str) -> str:
        return self.topic(node, Channel.TASKS)

    def updates(self, node: str) -> str:
        return self.topic(node, Channel.UPDATES)

    def output(self, node: str) -> str:
        return self.topic(node, Channel.OUTPUT)

    def status(self, node: str) -> str:
        return self.topic(node, Channel.STATUS)

    def wildcard(self, channel: Channel) -> str:
        """The subscription that matches `channel` of every node."""
        return f"{self.prefix}/nodes/+/{channel}"

    def parse(self, topic: str) -> tuple[str, Channel] | None:
        """(node, channel) of one of our topics, or None if it is not one."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != self.prefix or parts[1] != "nodes":
            return None
        try:
            channel = Channel(parts[3])
        except ValueError:
            return None
        return (parts[2], channel) if is_node_id(parts[2]) else None
