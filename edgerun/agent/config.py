"""The agent's settings: defaults < TOML < kernel command line < EDGERUN_* < flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgerun import __version__
from edgerun.errors import ConfigError
from edgerun.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PREFIX, is_node_id, is_prefix
from edgerun.settings import (
    BrokerURL,
    Option,
    build_parser,
    config_path,
    kernel_params,
    parse_broker_urls,
    read_toml,
    resolve,
)

from .identity import derive_node_id
from .labels import LabelLayer, Labels, merge, parse_items, parse_table, parse_text

DEFAULT_STATE_DIR = "/var/lib/edgerun-agent"
DEFAULT_FACTS_DIR = "/etc/edgerun/facts.d"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _node(value: str) -> str | None:
    return None if is_node_id(value) else "must be 1-128 of A-Z a-z 0-9 _ : -"


def _prefix(value: str) -> str | None:
    return None if is_prefix(value) else "must be one topic level without / + #"


def _contain(value: str) -> str | None:
    return None if value in ("auto", "off") else "must be auto or off"


def _level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else \
        "must be debug, info, warning or error"


OPTIONS = [
    Option("broker", str, None, "MQTT broker URL, mqtt://host:port or mqtts://...; several "
           "nodes of one clustered broker comma-separated, tried in turn", metavar="URL[,URL]"),
    Option("node", str, None, "node id (default: DMI product UUID, else first MAC, else host name)",
           _node),
    Option("prefix", str, DEFAULT_PREFIX, "first topic level", _prefix),
    Option("username", str, None, "MQTT user name (overrides the URL's)"),
    Option("password", str, None, "MQTT password (overrides the URL's)"),
    Option("ca_file", str, None, "CA certificates for mqtts:// (default: the system's)",
           metavar="FILE"),
    Option("cert_file", str, None, "client certificate for mqtts://", metavar="FILE"),
    Option("key_file", str, None, "client certificate key for mqtts://", metavar="FILE"),
    Option("state_dir", str, DEFAULT_STATE_DIR,
           "where task ids are remembered across restarts (memory only when not writable)",
           metavar="DIR"),
    Option("parallel", int, 1, "tasks run at once", _positive, metavar="N"),
    Option("queue_size", int, 64, "tasks that may wait; beyond that a task is rejected busy",
           _positive, metavar="N"),
    Option("grace", float, 30.0, "seconds running tasks get to finish on SIGTERM", metavar="S"),
    Option("max_message_bytes", int, DEFAULT_MAX_MESSAGE_BYTES, "largest message accepted",
           _positive, metavar="N"),
    Option("remember", int, 10_000, "task ids remembered for at-most-once execution",
           _positive, metavar="N"),
    Option("keepalive", int, 30, "MQTT keepalive in seconds", _positive, metavar="S"),
    Option("public_key", str, None, "Ed25519 public key (base64 or PEM) or a file holding it; "
           "when set, only tasks signed with its private key run", metavar="KEY"),
    Option("contain", str, "auto", "a cgroup v2 per task where the hierarchy is writable "
           "(auto), or only the subreaper and /proc (off)", _contain, metavar="MODE"),
    Option("log_level", str, "info", "debug, info, warning or error", _level),
    Option("facts_dir", str, DEFAULT_FACTS_DIR, "custom facts: JSON files (*.json) and "
           "executables that print one JSON object, read every 5 s; '' for none",
           metavar="DIR"),
    Option("net_wait", float, 0.0, "at start, wait up to S seconds for a default route "
           "before connecting (the discovery image starts the agent while DHCP runs)",
           metavar="S"),
    Option("facts_timeout", float, 3.0, "seconds the facts directory's executables get, "
           "all together, at each check", _positive, metavar="S"),
]
LABEL_HELP = ("a label KEY=VALUE for --where labels.KEY=VALUE (repeatable; also "
              "`[labels]` in the TOML file, edgerun.labels=K=V,K2=V2 on the kernel "
              "command line, EDGERUN_LABELS); layers merge key by key, KEY= removes one")


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerURL
    node: str
    prefix: str = DEFAULT_PREFIX
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    state_dir: str | None = DEFAULT_STATE_DIR
    parallel: int = 1
    queue_size: int = 64
    grace: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    remember: int = 10_000
    keepalive: int = 30
    log_level: str = "info"
    public_key: bytes | None = None
    contain: str = "auto"
    brokers: tuple[BrokerURL, ...] = ()  # every node of a cluster, `broker` first; () = broker
    # lowest first: TOML, kernel command line, EDGERUN_LABELS, --label (facts.d goes below)
    label_layers: tuple[LabelLayer, ...] = ()
    facts_dir: str | None = DEFAULT_FACTS_DIR
    facts_timeout: float = 3.0
    net_wait: float = 0.0

    @property
    def broker_nodes(self) -> tuple[BrokerURL, ...]:
        return self.brokers or (self.broker,)

    @property
    def labels(self) -> Labels:
        """The configured labels alone (the agent adds those of its facts directory)."""
        return merge(self.label_layers)


def load(argv: Sequence[str] | None, environ: Mapping[str, str],
         cmdline: str = "", sys_root: str = "/") -> AgentConfig:
    """Read every layer; ConfigError (one line) on any mistake."""
    parser = build_parser("edgerun-agent", "Run edgerun shell and download tasks sent over MQTT.",
                          OPTIONS, __version__)
    parser.add_argument("--label", dest="label", action="append", default=None,
                        metavar="KEY=VALUE", help=LABEL_HELP)
    args = parser.parse_args(argv)
    path = config_path(args, environ)
    table = dict(read_toml(path)) if path else None
    kernel = kernel_params(cmdline)
    layers = label_layers(table.pop("labels", None) if table else None,
                          kernel.get("labels"), environ.get("EDGERUN_LABELS"), args.label,
                          table_source=f"config file {path}")
    values = resolve(OPTIONS, args, environ, table=table,
                     table_source=f"config file {path}", kernel=kernel)
    if not values["broker"]:
        raise ConfigError("no broker: give --broker URL, EDGERUN_BROKER or "
                          "edgerun.broker= on the kernel command line")
    brokers = parse_broker_urls(values["broker"], ("mqtt", "mqtts"))
    if values["username"] is not None or values["password"] is not None:
        brokers = tuple(dataclasses.replace(b, username=values["username"] or b.username,
                                            password=values["password"] or b.password)
                        for b in brokers)
    broker = brokers[0]
    for key in ("ca_file", "cert_file", "key_file"):
        if values[key] and not os.path.isfile(values[key]):
            raise ConfigError(f"`{key}` {values[key]}: no such file")
    return AgentConfig(
        broker=broker, brokers=brokers, node=values["node"] or derive_node_id(sys_root),
        prefix=values["prefix"],
        ca_file=values["ca_file"], cert_file=values["cert_file"], key_file=values["key_file"],
        state_dir=values["state_dir"] or None, parallel=values["parallel"],
        queue_size=values["queue_size"], grace=max(0.0, values["grace"]),
        max_message_bytes=values["max_message_bytes"], remember=values["remember"],
        keepalive=values["keepalive"], log_level=values["log_level"].upper(),
        contain=values["contain"], label_layers=layers,
        facts_dir=values["facts_dir"] or None, facts_timeout=values["facts_timeout"],
        net_wait=max(0.0, values["net_wait"]),
        public_key=_public_key(values["public_key"]) if values["public_key"] else None)


def _public_key(text: str) -> bytes:
    from edgerun.signing import load_public_key  # only for signed tasks: not at every start

    return load_public_key(text)


def label_layers(table: object, kernel: str | None, env: str | None,
                 flags: list[str] | None, *, table_source: str = "config file",
                 ) -> tuple[LabelLayer, ...]:
    """The configured label layers, lowest first. A bad label is a warning the agent logs
    (LabelLayer.problems), never a ConfigError: see edgerun.agent.labels."""
    layers = []
    if table is not None:
        layers.append(parse_table(table, f"{table_source}: [labels]"))
    if kernel is not None:
        layers.append(parse_text(kernel, "kernel command line: edgerun.labels"))
    if env is not None:
        layers.append(parse_text(env, "EDGERUN_LABELS"))
    if flags:
        layers.append(parse_items(flags, "--label"))
    return tuple(layers)
