"""The bridge's settings: layers, routes from TOML, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgerun.bridge import config
from edgerun.bridge.service import subscriptions
from edgerun.errors import ConfigError

from .mqttkit import ROOT

URLS = ["--mqtt", "mqtt://127.0.0.1:1", "--amqp", "amqp://u:secret@127.0.0.1:2/prod"]


def test_flags_alone_give_the_default_routes() -> None:
    cfg = config.load(URLS, {})
    assert [r.name for r in cfg.routes.routes] == ["tasks", "updates", "output", "status"]
    assert cfg.mqtt.port == 1 and cfg.amqp.port == 2 and cfg.vhost == "prod"
    assert cfg.client_id.startswith("edgerun-bridge-") and cfg.share_group == ""
    assert subscriptions(cfg)[0] == ("edgerun/nodes/+/updates", 1)


def test_layers_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('mqtt = "mqtt://file:1883"\namqp = "amqp://file"\nprefetch = 7\n'
                    'prefix = "lab"\nshare_group = "fromfile"\nevents_exchange = "ev"\n')
    env = {"EDGERUN_CONFIG": str(path), "EDGERUN_PREFETCH": "9",
           "EDGERUN_SHARE_GROUP": "fromenv"}
    cfg = config.load(["--share-group", "fromflag"], env)
    assert cfg.mqtt.host == "file" and cfg.prefetch == 9 and cfg.share_group == "fromflag"
    assert cfg.vhost == "/"
    assert subscriptions(cfg)[0] == ("$share/fromflag/lab/nodes/+/updates", 1)
    assert {r.exchange for r in cfg.routes.mqtt_to_amqp} == {"ev"}
    assert config.load(["--config", str(path), *URLS], {}).mqtt.host == "127.0.0.1"


def test_routes_from_the_file_replace_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(
        'mqtt = "mqtt://localhost"\namqp = "amqp://localhost"\n'
        '[[route]]\nname = "up"\ndirection = "mqtt_to_amqp"\ntopic = "x/{node}/up"\n'
        'exchange = "ex"\nrouting_key = "n.{node}"\n'
        '[[route]]\nname = "down"\ndirection = "amqp_to_mqtt"\ntopic = "x/{node}/down"\n'
        'exchange = "ex2"\nrouting_key = "d.{node}"\nqueue = "bridge.down"\n')
    cfg = config.load(["--config", str(path)], {})
    assert [(r.name, r.exchange) for r in cfg.routes.routes] == [("up", "ex"), ("down", "ex2")]
    assert cfg.routes.amqp_to_mqtt[0].queue == "bridge.down"


def test_the_shipped_example_config_loads() -> None:
    cfg = config.load(["--config", str(ROOT / "deploy" / "bridge" / "bridge.example.toml")], {})
    assert len(cfg.routes.routes) >= 4
    assert "edgerun.events" in cfg.routes.exchanges()


@pytest.mark.parametrize("toml,argv,message", [
    ('colour = "red"\n', URLS, "unknown key `colour`"),
    ("", ["--amqp", "amqp://h"], "no MQTT broker"),
    ("", ["--mqtt", "mqtt://h"], "no AMQP broker"),
    ("", ["--mqtt", "http://h", "--amqp", "amqp://h"], "bad broker URL"),
    ("", ["--mqtt", "mqtt://h", "--amqp", "amqp://h:99999"], "bad broker URL"),
    ("", [*URLS, "--prefetch", "0"], "`prefetch` must be greater than 0"),
    ("", [*URLS, "--queue-type", "stream"], "classic or quorum"),
    ("", [*URLS, "--share-group", "a/b"], "share_group"),
    ("route = 3\n", URLS, "[[route]]"),
    ('[[route]]\ndirection = "mqtt_to_amqp"\ntopic = "a/{node}"\nexchange = "e"\n'
     'routing_key = "k"\n', URLS, "{node} must appear in both"),
    ('[[route]]\ndirection = "mqtt_to_amqp"\ntopic = "a/{node"\nexchange = "e"\n'
     'routing_key = "k.{node}"\n', URLS, "whole level"),
    ("mqtt = [\n", URLS, "not valid TOML"),
])
def test_mistakes_are_one_config_error(tmp_path: Path, toml: str, argv: list[str],
                                       message: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config.load(["--config", str(path), *argv], {})
    assert message in str(err.value) and "\n" not in str(err.value)


def run_bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgerun.bridge", *args],
                          capture_output=True, text=True,
                          timeout=30, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize("toml,args,message", [
    ('oops = 1\nmqtt = "mqtt://h"\namqp = "amqp://h"\n', [], "unknown key `oops`"),
    ('mqtt = "mqtt://h"\namqp = "amqp://h"\n[[route]]\ndirection = "mqtt_to_amqp"\n'
     'topic = "t/{node}/{x}"\nexchange = "e"\nrouting_key = "k.{node}"\n', [],
     "{x} must appear in both"),
    ('mqtt = "mqtt://h"\namqp = "amqp://h"\n[[route]]\ndirection = "mqtt_to_amqp"\n'
     'topic = "t/#"\nexchange = "e"\nrouting_key = "k"\n', [], "no wildcards"),
    ("", ["--mqtt", "mqtt://h", "--amqp", "rabbit://h"], "bad broker URL"),
])
def test_the_command_prints_one_line_and_exits_2(tmp_path: Path, toml: str, args: list[str],
                                                 message: str) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(toml)
    done = run_bridge("--config", str(path), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgerun-bridge: error: "), done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr and done.stdout == ""


def test_env_overrides_the_file_and_the_password_stays_hidden(tmp_path: Path) -> None:
    done = run_bridge(env={"EDGERUN_MQTT": "mqtt://h", "EDGERUN_AMQP": "amqp://u:hunter2@h:0x"})
    assert done.returncode == 2 and "hunter2" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_and_version_exit_0() -> None:
    done = run_bridge("--help")
    assert done.returncode == 0 and "--share-group" in done.stdout and "--mqtt" in done.stdout
    assert run_bridge("--version").stdout.startswith("edgerun-bridge ")
