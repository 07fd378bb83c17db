"""The agent over mqtts:// with a verified server and a client certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from .brokers import Mosquitto, free_port, mosquitto_binary, wait_port, wait_until
from .mqttkit import AgentProcess, Observer, shell
from .tlskit import CA

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs a private mosquitto")


@pytest.fixture
def tls_broker(tmp_path: Path):
    ca = CA(tmp_path / "pki")
    server = ca.issue("broker", server=True)
    port = free_port()
    extra = (f"listener {port} 127.0.0.1\ncafile {ca.path}\ncertfile {server.cert}\n"
             f"keyfile {server.key}\nrequire_certificate true\n")
    broker = Mosquitto(tmp_path / "mosquitto", extra=extra).start()
    wait_port(port)
    yield broker, ca, f"mqtts://127.0.0.1:{port}"
    broker.stop()


def test_agent_over_tls_with_client_certificate(tls_broker, tmp_path: Path) -> None:
    broker, ca, url = tls_broker
    client = ca.issue("node-tls", server=False)
    with Observer(broker.url) as observer:
        agent = AgentProcess(url, "node-tls", tmp_path / "a", "--ca-file", str(ca.path),
                             "--cert-file", str(client.cert), "--key-file", str(client.key))
        agent.start()
        agent.wait_online(observer)
        observer.send("node-tls", shell("over-tls", "echo secure"))
        assert observer.final("over-tls")["stdout"] == "secure\n"
        assert agent.terminate() == 0


@pytest.mark.parametrize("case", ["wrong-ca", "no-client-cert"])
def test_agent_refuses_what_cannot_be_verified(tls_broker, tmp_path: Path, case: str) -> None:
    _broker, ca, url = tls_broker
    other = CA(tmp_path / "other", name="impostor CA")
    client = ca.issue("node-x", server=False)
    args = ["--ca-file", str(other.path if case == "wrong-ca" else ca.path)]
    if case == "wrong-ca":
        args += ["--cert-file", str(client.cert), "--key-file", str(client.key)]
    agent = AgentProcess(url, "node-x", tmp_path / "a", *args).start()
    needle = "CERTIFICATE_VERIFY_FAILED" if case == "wrong-ca" \
        else "closed the connection before accepting it"
    assert wait_until(lambda: needle in agent.log(), 20), agent.log()[-2000:]
    assert "connected to" not in agent.log()
    assert agent.terminate() == 0
