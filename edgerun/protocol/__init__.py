"""The edgerun wire contract, v1: pure, stdlib only, no I/O.

Shared by the agent, the bridge and the scheduler. See PROTOCOL.md.
"""

from .amqp import (
    AUDIT_EXCHANGE, BRIDGE_QUEUE_PREFIX, BRIDGE_TASKS_QUEUE, EVENTS_EXCHANGE, SCHEDULER_QUEUE,
    TASKS_EXCHANGE, binding, key_template, parse_routing_key, routing_key,
)
from .messages import (
    Cancel, DownloadTask, Error, JSONObject, Message, Output, ShellTask, Status, Task, Update,
    canonical_json, encode, last_will, rejected, signing_bytes,
)
from .names import (
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PREFIX, DEFAULT_TIMEOUT_S, VERSION, ErrorCode, format_time,
    is_node_id, is_prefix, is_task_id, normalise_node_id, parse_time,
)
from .parse import (
    ProtocolError, check_url, decode, decode_bounded, message_id, parse_command, parse_message,
    parse_output, parse_status, parse_update,
)
from .states import AGENT_STATES, FINAL_STATES, TRANSITIONS, State, can_transition, is_final
from .topics import QOS, RETAINED, Channel, Topics

__all__ = [
    "AUDIT_EXCHANGE", "BRIDGE_QUEUE_PREFIX", "BRIDGE_TASKS_QUEUE", "EVENTS_EXCHANGE",
    "SCHEDULER_QUEUE", "TASKS_EXCHANGE", "binding", "key_template", "parse_routing_key",
    "routing_key",
    "AGENT_STATES", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_PREFIX", "DEFAULT_TIMEOUT_S",
    "FINAL_STATES", "QOS", "RETAINED", "TRANSITIONS", "VERSION",
    "Cancel", "Channel", "DownloadTask", "Error", "ErrorCode", "JSONObject", "Message", "Output",
    "ProtocolError", "ShellTask", "State", "Status", "Task", "Topics", "Update",
    "can_transition", "canonical_json", "check_url", "decode", "decode_bounded", "encode",
    "format_time", "is_final", "is_node_id", "is_prefix", "is_task_id", "last_will",
    "message_id", "normalise_node_id", "parse_command", "parse_message", "parse_output",
    "parse_status", "parse_time", "parse_update", "rejected", "signing_bytes",
]
