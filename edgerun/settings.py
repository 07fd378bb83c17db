"""Layered configuration: defaults < TOML file < kernel command line < EDGERUN_* < flags.

Each part declares its options once; this module builds the argument parser,
reads each layer, converts and checks values, and turns every mistake into one
ConfigError line (the caller prints it and exits 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from .errors import ConfigError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "amqp": 5672, "amqps": 5671}


@dataclass(frozen=True)
class BrokerURL:
    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    path: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme.endswith("s")

    @property
    def address(self) -> str:
        """`host:port`, which names one node of a cluster in logs and metric labels."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        """The URL with the password hidden, fit for logs and error messages."""
        user = f"{self.username}{':***' if self.password else ''}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}{self.path}"


def redact(url: str) -> str:
    """`url` (or a comma-separated list of URLs) with any password replaced by ***."""
    entries = re.split(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)", url)
    if len(entries) > 1:
        return ",".join(redact(entry) for entry in entries)
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    userinfo, _, host = netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}{slash}{tail}"


def parse_broker_url(url: str, schemes: Sequence[str]) -> BrokerURL:
    """`mqtt://user:pass@host:port`, `amqps://host/vhost`, ... or ConfigError."""
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad broker URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise ConfigError(f"bad broker URL {shown!r}: scheme must be one of "
                          f"{', '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ConfigError(f"bad broker URL {shown!r}: no host")
    return BrokerURL(scheme=scheme, host=parts.hostname, port=port or DEFAULT_PORTS[scheme],
                     username=unquote(parts.username) if parts.username else None,
                     password=unquote(parts.password) if parts.password else None,
                     path=parts.path)


MAX_BROKER_URLS = 16


def parse_broker_urls(text: str, schemes: Sequence[str]) -> tuple[BrokerURL, ...]:
    """Several addresses of ONE broker (the nodes of a cluster), comma-separated, in the
    order they are tried: `mqtt://user:pw@a:1883,mqtt://b:1883`. ConfigError on:

    - an empty entry (`a,,b`, a trailing comma) or more than MAX_BROKER_URLS entries;
    - mixed schemes (`mqtt://` with `mqtts://`, or with `amqp://`): one broker speaks
      one protocol, and a plain address beside TLS ones would quietly drop TLS;
    - different credentials or different vhosts (AMQP path) on two entries: an entry
      without them takes those of the others, so they may be written once;
    - the same host:port twice.

    A comma inside a password must be percent-encoded (`%2C`), as in any URL.
    """
    shown = redact(text)
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > MAX_BROKER_URLS:
        raise ConfigError(f"too many broker URLs ({len(entries)}): at most {MAX_BROKER_URLS}")
    for n, entry in enumerate(entries, 1):
        if not entry:
            raise ConfigError(f"bad broker URL list {shown!r}: entry {n} is empty")
        if "://" not in entry:  # not echoed: it may be the tail of a password
            raise ConfigError(f"bad broker URL list {shown!r}: entry {n} is not a URL "
                              "(write a comma inside a password as %2C)")
    urls = [parse_broker_url(entry, schemes) for entry in entries]
    if len({url.scheme for url in urls}) > 1:
        raise ConfigError(f"bad broker URL list {shown!r}: mixed schemes "
                          f"({', '.join(sorted({u.scheme + '://' for u in urls}))}); every "
                          "address of one broker uses the same scheme")
    credentials = {(u.username, u.password) for u in urls if u.username or u.password}
    if len(credentials) > 1:
        raise ConfigError(f"bad broker URL list {shown!r}: different credentials; give them "
                          "once, or the same on every address")
    paths = {_vhost_path(u.path) for u in urls if u.path}
    if len(paths) > 1:
        raise ConfigError(f"bad broker URL list {shown!r}: different vhosts "
                          f"({', '.join(sorted(paths))}); every address is the same broker")
    seen: set[str] = set()
    for url in urls:
        if url.address in seen:
            raise ConfigError(f"bad broker URL list {shown!r}: {url.address} appears twice")
        seen.add(url.address)
    username, password = next(iter(credentials), (None, None))
    path = next(iter(paths), "")
    return tuple(dataclasses.replace(u, username=username, password=password, path=path)
                 for u in urls)


def _vhost_path(path: str) -> str:
    """`/` and `/%2f` both name the default vhost."""
    return "/" if path.lower() in ("/", "/%2f") else path


@dataclass(frozen=True)
class TLSFiles:
    """For mqtts:// and amqps://: CA bundle (None: the system's) and a client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Option:
    """One setting: its TOML key (also the flag and, upper-cased, the env name)."""

    name: str
    kind: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "EDGERUN_" + self.name.upper()


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are ConfigErrors: one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """A flag for each option; None when not given, so lower layers show through."""
    for opt in options:
        if opt.kind is bool:
            parser.add_argument(opt.flag, dest=opt.name, default=None,
                                action=argparse.BooleanOptionalAction, help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                                help=f"{opt.help} (default: {opt.default!r})")


def build_parser(prog: str, description: str, options: Sequence[Option],
                 version: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML file with the settings below (also EDGERUN_CONFIG)")
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    add_options(parser, options)
    return parser


def _convert(opt: Option, value: Any, source: str) -> Any:
    where = f"{source}: `{opt.name}`"
    if opt.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if opt.kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return opt.kind(value) if opt.kind is float or not isinstance(value, float) \
                else _exact_int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a{'n integer' if opt.kind is int else ' number'}, "
                              f"got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _exact_int(value: float) -> int:
    if not value.is_integer():
        raise ValueError(value)
    return int(value)


def read_toml(path: str) -> dict[str, Any]:
    import tomllib  # here, not at the top: the agent reads no TOML file unless given one

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def kernel_params(text: str) -> dict[str, str]:
    """`edgerun.<name>=<value>` words of a kernel command line, by name."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    out = {}
    for word in words:
        if word.startswith("edgerun.") and "=" in word:
            key, _, value = word[len("edgerun."):].partition("=")
            out[key.replace("-", "_")] = value
    return out


def resolve(options: Sequence[Option], args: argparse.Namespace, environ: Mapping[str, str],
            *, table: Mapping[str, Any] | None = None, table_source: str = "config file",
            kernel: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge the layers, convert and check every value; ConfigError on the first mistake."""
    known = {opt.name: opt for opt in options}
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (table_source, table or {}), ("kernel command line", kernel or {})]
    for source, layer in layers:
        for key in layer:
            if key not in known and source != "kernel command line":
                raise ConfigError(f"{source}: unknown key `{key}`")
    values: dict[str, Any] = {}
    for opt in options:
        value, source = opt.default, "default"
        for layer_source, layer in layers:
            if opt.name in layer:
                value, source = _convert(opt, layer[opt.name], layer_source), layer_source
        if opt.env in environ:
            value, source = _convert(opt, environ[opt.env], opt.env), opt.env
        flag_value = getattr(args, opt.name, None)
        if flag_value is not None:
            value, source = _convert(opt, flag_value, opt.flag), opt.flag
        if opt.check is not None and value is not None:
            problem = opt.check(value)
            if problem:
                raise ConfigError(f"{source}: `{opt.name}` {problem}")
        values[opt.name] = value
    return values


CONFIG_TABLES = ("client", "serve")
"""The tables of the shared config file of `edgerun` and `edgerun serve`."""


def config_table(path: str, section: str) -> dict[str, Any]:
    """The `[section]` table of the shared config file ({} when absent); ConfigError on a
    top-level key that is not one of the known tables, or a section that is not a table."""
    document = read_toml(path)
    for key in document:
        if key not in CONFIG_TABLES:
            raise ConfigError(f"config file {path}: unknown key `{key}` at the top level "
                              f"({section} settings go in a [{section}] table)")
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{section}] must be a table")
    return table


def config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    path = args.config or environ.get("EDGERUN_CONFIG")
    return str(path) if path else None


def proc_cmdline(path: str = "/proc/cmdline") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


__all__ = ["BrokerURL", "Option", "Parser", "TLSFiles", "add_options", "build_parser",
           "config_path", "kernel_params", "parse_broker_url", "parse_broker_urls",
           "proc_cmdline",
           "read_toml", "redact", "resolve"]
