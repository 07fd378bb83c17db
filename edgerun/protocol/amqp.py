"""AMQP names of the contract (PROTOCOL.md, "AMQP side"): exchanges, routing keys, queues.

The bridge's default routes and the scheduler's bindings are both built from these, so
they cannot drift apart. Pure: names only, no I/O.
"""

from __future__ import annotations

from .names import is_node_id
from .topics import Channel

TASKS_EXCHANGE = "edgerun.tasks"    # scheduler -> bridge -> agent: `task`, `cancel`
EVENTS_EXCHANGE = "edgerun.events"  # agent -> bridge -> scheduler: updates, output, status
AUDIT_EXCHANGE = "edgerun.audit"    # the scheduler's full-data events
SCHEDULER_QUEUE = "edgerun.scheduler"       # the scheduler's durable queue
BRIDGE_TASKS_QUEUE = "edgerun.bridge.tasks"  # the bridge's queue of the tasks route
BRIDGE_QUEUE_PREFIX = "edgerun.bridge."      # + route name: a route's default queue

NODE_WORD = "node"  # first routing-key word
EVENT_CHANNELS = (Channel.UPDATES, Channel.OUTPUT, Channel.STATUS)


def routing_key(node: str, channel: Channel = Channel.TASKS) -> str:
    """`node.{node}` for a task or cancel, `node.{node}.{channel}` for the rest."""
    if not is_node_id(node):
        raise ValueError(f"bad node id {node!r}")
    return key_template(channel).replace("{node}", node)


def key_template(channel: Channel) -> str:
    """The bridge's routing-key template of `channel`: `node.{node}[.{channel}]`."""
    base = NODE_WORD + ".{node}"
    return base if channel is Channel.TASKS else f"{base}.{channel}"


def binding(channel: Channel) -> str:
    """The binding key that matches `channel` of every node: `node.*[.{channel}]`."""
    return key_template(channel).replace("{node}", "*")


def parse_routing_key(key: str) -> tuple[str, Channel] | None:
    """(node, channel) of `node.{node}` (a task) or `node.{node}.{updates|output|status}`."""
    parts = key.split(".")
    if len(parts) not in (2, 3) or parts[0] != NODE_WORD or not is_node_id(parts[1]):
        return None
    if len(parts) == 2:
        return parts[1], Channel.TASKS
    for channel in EVENT_CHANNELS:
        if parts[2] == channel:
            return parts[1], channel
    return None


__all__ = ["AUDIT_EXCHANGE", "BRIDGE_QUEUE_PREFIX", "BRIDGE_TASKS_QUEUE", "EVENTS_EXCHANGE",
           "EVENT_CHANNELS", "NODE_WORD", "SCHEDULER_QUEUE", "TASKS_EXCHANGE", "binding",
           "key_template", "parse_routing_key", "routing_key"]
