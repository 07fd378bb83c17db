"""Several addresses of one clustered broker: the list parser, hostile lists first, and
the commands that take it (one line on stderr and exit 2 for a bad list)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgerun.agent import config as agent_config
from edgerun.errors import ConfigError
from edgerun.settings import MAX_BROKER_URLS, BrokerURL, parse_broker_urls, redact

MQTT = ("mqtt", "mqtts")
AMQP = ("amqp", "amqps")


@pytest.mark.parametrize(("text", "schemes", "says"), [
    ("", MQTT, "entry 1 is empty"),
    (",", MQTT, "entry 1 is empty"),
    ("mqtt://a:1883,", MQTT, "entry 2 is empty"),
    ("mqtt://a:1883,,mqtt://b:1883", MQTT, "entry 2 is empty"),
    ("mqtt://a:1883, ,mqtt://b:1883", MQTT, "entry 2 is empty"),
    ("mqtt://a:1883,amqp://b:5672", MQTT, "scheme must be one of"),
    ("amqp://a,mqtt://b", ("mqtt", "mqtts", "amqp", "amqps"), "mixed schemes"),
    ("mqtt://a,mqtts://b", MQTT, "mixed schemes"),
    ("mqtt://u:p@a,mqtt://u:q@b", MQTT, "different credentials"),
    ("mqtt://u:p@a,mqtt://v:p@b", MQTT, "different credentials"),
    ("amqp://a/prod,amqp://b/test", AMQP, "different vhosts"),
    ("mqtt://a:1883,mqtt://a:1883", MQTT, "a:1883 appears twice"),
    ("mqtt://a,mqtt://a:1883", MQTT, "a:1883 appears twice"),
    ("mqtt://a:99999,mqtt://b", MQTT, "bad broker URL"),
    ("mqtt://a,b:1883", MQTT, "entry 2 is not a URL"),
    ("mqtt://:1883,mqtt://b", MQTT, "no host"),
    (",".join(f"mqtt://h{i}" for i in range(MAX_BROKER_URLS + 1)), MQTT, "too many"),
])
def test_bad_lists_are_one_clear_error(text: str, schemes: tuple[str, ...], says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_broker_urls(text, schemes)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message


def test_a_password_never_shows_in_the_error() -> None:
    # an unencoded comma in a password splits the list: the tail is not echoed
    for text in ("mqtt://user:se,cret@a:1883", "mqtt://u:secret@a,mqtt://u:other@b",
                 "mqtt://u:secret@a,mqtts://u:secret@b"):
        with pytest.raises(ConfigError) as caught:
            parse_broker_urls(text, MQTT)
        assert "secret" not in str(caught.value) and "cret" not in str(caught.value)
        assert "other" not in str(caught.value)


def test_redact_hides_every_password_of_a_list() -> None:
    assert redact("mqtt://u:p1@a:1,mqtts://v:p2@b/x") == "mqtt://u:***@a:1,mqtts://v:***@b/x"
    assert redact("amqp://u:p@ss@h/vh") == "amqp://u:***@h/vh"
    assert redact("mqtt://h:1883") == "mqtt://h:1883"


def test_credentials_and_vhost_given_once_apply_to_every_address() -> None:
    urls = parse_broker_urls("amqp://u:p%2Cw@a:5673/prod, amqp://b,amqp://u:p%2Cw@c/prod",
                             AMQP)
    assert [u.address for u in urls] == ["a:5673", "b:5672", "c:5672"]
    assert {(u.username, u.password, u.path) for u in urls} == {("u", "p,w", "/prod")}


def test_default_vhost_spellings_agree() -> None:
    urls = parse_broker_urls("amqp://a/,amqp://b/%2f,amqp://c", AMQP)
    assert {u.path for u in urls} == {"/"}


def test_one_url_is_a_list_of_one() -> None:
    assert parse_broker_urls("mqtts://h", MQTT) == (BrokerURL("mqtts", "h", 8883),)


def test_ipv6_addresses_are_told_apart() -> None:
    urls = parse_broker_urls("mqtt://[::1]:1883,mqtt://[::1]:1884", MQTT)
    assert [u.address for u in urls] == ["[::1]:1883", "[::1]:1884"]


def test_agent_takes_the_list_from_the_kernel_command_line(tmp_path: object) -> None:
    cmdline = "quiet edgerun.broker=mqtt://u:pw@10.0.0.1:1883,mqtt://10.0.0.2:1883 edgerun.node=n1"
    cfg = agent_config.load([], {}, cmdline)
    assert [u.address for u in cfg.broker_nodes] == ["10.0.0.1:1883", "10.0.0.2:1883"]
    assert all(u.username == "u" and u.password == "pw" for u in cfg.broker_nodes)
    assert cfg.broker == cfg.broker_nodes[0]


def test_agent_username_flag_overrides_every_address() -> None:
    cfg = agent_config.load(["--broker", "mqtt://a,mqtt://b", "--node", "n1",
                             "--username", "x", "--password", "y"], {})
    assert {(u.username, u.password) for u in cfg.broker_nodes} == {("x", "y")}


@pytest.mark.parametrize(("module", "args"), [
    ("edgerun.agent", ["--broker", "mqtt://127.0.0.1:1,,mqtt://127.0.0.1:2", "--node", "n"]),
    ("edgerun.agent", ["--broker", "mqtt://127.0.0.1:1,mqtts://127.0.0.1:2", "--node", "n"]),
    ("edgerun.bridge", ["--mqtt", "mqtt://127.0.0.1:1,amqp://127.0.0.1:2",
                        "--amqp", "amqp://127.0.0.1:5672/"]),
    ("edgerun.bridge", ["--mqtt", "mqtt://127.0.0.1:1",
                        "--amqp", "amqp://127.0.0.1:5672/a,amqp://127.0.0.1:5673/b"]),
    ("edgerun.scheduler", ["serve", "--broker", "mqtt://127.0.0.1:1,amqp://127.0.0.1:2"]),
    ("edgerun.scheduler", ["serve", "--broker", "amqp://127.0.0.1:1,"]),
    ("edgerun.scheduler", ["serve", "--broker", "amqp://u:a@127.0.0.1:1,amqp://u:b@127.0.0.1:2"]),
    ("edgerun.scheduler", ["serve", "--broker", "amqp://127.0.0.1:1", "--queue-type", "mirror"]),
    ("edgerun.bridge", ["--mqtt", "mqtt://127.0.0.1:1", "--amqp", "amqp://127.0.0.1:5672/",
                        "--queue-type", "Quorum"]),
])
def test_commands_refuse_a_bad_list_in_one_line(module: str, args: list[str],
                                                tmp_path: object) -> None:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], done.stderr
