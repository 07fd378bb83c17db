"""amqps:// for the bridge and the scheduler: RabbitMQ's certificate verified, client
certificates presented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgerun.control.errors import BrokerUnreachable

from .bridgekit import AmqpSink, BridgeProcess, publish_amqp, publish_mqtt
from .brokers import Mosquitto, free_port, wait_port, wait_until
from .rabbit import Rabbit, rabbit_scripts
from .scheduler_kit import Api, running_app
from .tlskit import CA

pytestmark = pytest.mark.skipif(rabbit_scripts() is None, reason="needs a private RabbitMQ")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, int]:
    """The CA of the module and the port of RabbitMQ's TLS listener."""
    return CA(tmp_path_factory.mktemp("pki")), free_port()


@pytest.fixture(scope="module")
def rabbit_conf(tls: tuple[CA, int]) -> str:
    """conftest's `rabbit` with a TLS listener that wants a client certificate."""
    ca, port = tls
    server = ca.issue("rabbit", server=True)
    return (f"listeners.ssl.default = {port}\nssl_options.cacertfile = {ca.path}\n"
            f"ssl_options.certfile = {server.cert}\nssl_options.keyfile = {server.key}\n"
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n")


@pytest.fixture(scope="module")
def tls_rabbit(rabbit: Rabbit, tls: tuple[CA, int]) -> tuple[Rabbit, CA, str]:
    ca, port = tls
    wait_port(port)
    return rabbit, ca, f"amqps://guest:guest@127.0.0.1:{port}/"


def test_bridge_forwards_over_amqps_with_a_client_certificate(
        tls_rabbit, mosquitto: Mosquitto, tmp_path: Path) -> None:
    rabbit, ca, amqps = tls_rabbit
    client = ca.issue("edgerun-bridge", server=False)
    bridge = BridgeProcess(mosquitto.url, amqps, tmp_path / "bridge", "--ca-file", str(ca.path),
                           "--cert-file", str(client.cert), "--key-file", str(client.key))
    with AmqpSink(rabbit.url, "edgerun.events", "node.*.updates") as sink:
        bridge.start()
        try:
            bridge.wait_ready()
            body = json.dumps({"v": 1, "kind": "update", "id": "t", "node": "n1",
                               "state": "running", "at": "2026-11-22T06:00:00.000Z"}).encode()
            publish_mqtt(mosquitto.url, [("edgerun/nodes/n1/updates", body)])
            assert sink.wait_for(body)
        finally:
            assert bridge.proc is not None
            bridge.proc.terminate()
            bridge.proc.wait(30)


def test_bridge_refuses_a_rabbitmq_it_cannot_verify(tls_rabbit, mosquitto: Mosquitto,
                                                     tmp_path: Path) -> None:
    _rabbit, ca, amqps = tls_rabbit
    impostor = CA(tmp_path / "other", name="impostor CA")
    client = ca.issue("edgerun-bridge-2", server=False)
    bridge = BridgeProcess(mosquitto.url, amqps, tmp_path / "bridge", "--ca-file",
                           str(impostor.path), "--cert-file", str(client.cert), "--key-file",
                           str(client.key))
    bridge.start()
    try:
        assert wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in bridge.log(), 30), \
            bridge.log()[-2000:]
        health = bridge.health() or {}
        assert health.get("status") != "ok"
    finally:
        assert bridge.proc is not None
        bridge.proc.terminate()
        bridge.proc.wait(30)


def test_scheduler_connects_over_amqps_with_a_client_certificate(tls_rabbit,
                                                                 tmp_path: Path) -> None:
    rabbit, ca, amqps = tls_rabbit
    client = ca.issue("edgerun-scheduler", server=False)
    with AmqpSink(rabbit.url, "edgerun.tasks", "node.*") as tasks, \
            running_app(amqps, tmp_path, ca_file=str(ca.path), cert_file=str(client.cert),
                        key_file=str(client.key)) as app:
        assert app.service is not None and app.service.messenger.connected.is_set()
        status = {"v": 1, "kind": "status", "node": "node-tls", "state": "online",
                  "at": "2026-11-22T06:00:00.000Z"}
        publish_amqp(rabbit.url, "edgerun.events",
                     [("node.node-tls.status", json.dumps(status).encode())])
        api = Api(app.api_url)
        api.wait_node("node-tls")  # the scheduler heard the node over amqps
        api.dispatch(["node-tls"], {"id": "over-amqps", "type": "shell", "command": "true"})
        assert wait_until(lambda: any(b'"id":"over-amqps"' in r[1] for r in tasks.received), 20)
        key = next(r[0] for r in tasks.received if b'"id":"over-amqps"' in r[1])
        assert key == "node.node-tls"


def test_scheduler_without_its_client_certificate_is_refused(tls_rabbit, tmp_path: Path) -> None:
    _rabbit, ca, amqps = tls_rabbit
    with pytest.raises(BrokerUnreachable), \
            running_app(amqps, tmp_path, ca_file=str(ca.path), connect_timeout=5):
        pass
