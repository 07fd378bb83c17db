"""`edgerun serve`'s settings: the typed record, its layers, and one-line exit-2 mistakes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from edgerun.cli import main as cli
from edgerun.scheduler import main as serve_main
from edgerun.errors import ConfigError
from edgerun.scheduler.settings import SERVE_OPTIONS, ServeSettings, load

from .mqttkit import ROOT


def load_serve(argv: list[str], environ: Mapping[str, str] | None = None) -> ServeSettings:
    args = serve_main.build_parser().parse_args(argv)
    return load(args, environ or {})


def test_every_option_is_a_field_with_the_same_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(ServeSettings)}
    options = {o.name: o.default for o in SERVE_OPTIONS}
    assert fields == options
    assert load_serve([]) == ServeSettings()


def test_the_record_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServeSettings().grace = 3.0  # type: ignore[misc]


def test_layers_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[client]\napi = "http://x:1"\n'
                    '[serve]\nbroker = "mqtt://file:1883"\ngrace = 5\ntick = 0.5\n'
                    'record_external = false\nqueue = "from.file"\n')
    env = {"EDGERUN_CONFIG": str(path), "EDGERUN_GRACE": "7.5", "EDGERUN_QUEUE": "from.env"}
    s = load_serve(["--queue", "from.flag"], env)
    assert s.broker == "mqtt://file:1883" and s.tick == 0.5 and s.record_external is False
    assert s.grace == 7.5 and s.queue == "from.flag"
    assert s.db == "edgerun-scheduler.db" and s.listen == "127.0.0.1:8470"
    assert load_serve(["--config", str(path), "--record-external"], {}).record_external


def test_tls_files_that_exist_are_taken(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem", "task.key"):
        (tmp_path / name).write_text("x")
    s = load_serve(["--ca-file", str(tmp_path / "ca.pem"), "--cert-file",
                    str(tmp_path / "cert.pem"), "--key-file", str(tmp_path / "key.pem"),
                    "--private-key", str(tmp_path / "task.key")])
    assert s.ca_file == str(tmp_path / "ca.pem") and s.private_key == str(tmp_path / "task.key")


@pytest.mark.parametrize("toml,argv,message", [
    ('[serve]\ncolour = "red"\n', [], "unknown key `colour`"),
    ('broker = "mqtt://h"\n', [], "`broker` at the top level (serve settings go in a [serve]"),
    ('serve = 3\n', [], "[serve] must be a table"),
    ('[serve]\ngrace = "soon"\n', [], "`grace` must be a number"),
    ('[serve]\ngrace = -1\n', [], "`grace` must be 0 or more"),
    ('[serve]\ntick = 0\n', [], "`tick` must be greater than 0"),
    ('[serve]\nrecord_external = "maybe"\n', [], "must be true or false"),
    ('[serve]\nprefix = "a/b"\n', [], "one topic level"),
    ('[serve]\nqueue = ""\n', [], "`queue` must not be empty"),
    ('[serve]\ndb = " "\n', [], "`db` must not be empty"),
    ("", ["--broker", "http://h"], "scheme must be one of"),
    ("", ["--broker", "mqtt://h:99999"], "bad broker URL"),
    ("", ["--listen", "nowhere"], "is not HOST:PORT"),
    ("", ["--embedded-broker", "h:70000"], "is not HOST:PORT"),
    ("", ["--connect-timeout", "0"], "`connect_timeout` must be greater than 0"),
    ("", ["--log-level", "loud"], "debug, info, warning or error"),
    ("", ["--ca-file", "/no/such/ca.pem"], "`ca_file` /no/such/ca.pem: no such file"),
    ("", ["--cert-file", "/no/such/c.pem"], "`cert_file` /no/such/c.pem: no such file"),
    ("", ["--private-key", "/no/such.key"], "`private_key` /no/such.key: no such file"),
    ("[serve\n", [], "not valid TOML"),
])
def test_mistakes_are_one_config_error(tmp_path: Path, toml: str, argv: list[str],
                                       message: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_serve(["--config", str(path), *argv])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(ConfigError, match="without `cert_file`"):
        load_serve(["--key-file", str(tmp_path / "key.pem")])


def test_a_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file /no/such\.toml"):
        load_serve([], {"EDGERUN_CONFIG": "/no/such.toml"})


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGERUN_")}
    return subprocess.run([sys.executable, "-m", "edgerun.scheduler", "serve", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, check=False)


@pytest.mark.parametrize("args,env,message", [
    (["--ca-file", "/no/such/ca.pem", "--broker", "mqtts://127.0.0.1:1"], {},
     "`ca_file` /no/such/ca.pem: no such file"),
    ([], {"EDGERUN_TICK": "-1"}, "EDGERUN_TICK: `tick` must be greater than 0"),
    (["--grace"], {}, "expected one argument"),
    ([], {"EDGERUN_BROKER": "amqp://u:hunter2@h:0x"}, "bad broker URL"),
])
def test_the_command_prints_one_line_and_exits_2(args: list[str], env: dict[str, str],
                                                 message: str) -> None:
    done = run_serve(*args, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgerun: error: "), done.stderr
    assert message in lines[0] and "hunter2" not in done.stderr and done.stdout == ""


EXAMPLE = ROOT / "deploy" / "scheduler" / "serve.example.toml"
UNIT = ROOT / "deploy" / "scheduler" / "edgerun-serve.service"


def test_the_shipped_example_config_loads_and_lists_every_setting() -> None:
    s = load_serve(["--config", str(EXAMPLE)])
    assert s.broker and s.broker.startswith("mqtt://") and s.db.endswith("scheduler.db")
    text = EXAMPLE.read_text()
    missing = [o.name for o in SERVE_OPTIONS if f"\n{o.name} = " not in text
               and f"\n# {o.name} = " not in text]
    assert missing == [], f"serve.example.toml does not show {missing}"
    args = cli.build_parser().parse_args(["nodes", "--config", str(EXAMPLE)])
    assert cli._settings(args, cli.CLIENT_OPTIONS, "client", {})["api"].startswith("http")


def test_the_example_with_its_files_uncommented_names_the_first_missing(
        tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('# ca_file = ', 'ca_file = ')
    (tmp_path / "serve.toml").write_text(text)
    with pytest.raises(ConfigError, match=r"`ca_file` /etc/edgerun/ca\.pem: no such file"):
        load_serve(["--config", str(tmp_path / "serve.toml")])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not found: apt-get install systemd")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/edgerun serve --config /etc/edgerun/serve.toml" in unit
    assert "RestartPreventExitStatus=2" in unit
    copy = tmp_path / "edgerun-serve.service"
    stand_in = shutil.which("true") or "/bin/true"
    copy.write_text(unit.replace("/usr/local/bin/edgerun", stand_in))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
