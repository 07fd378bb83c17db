"""Direct mode with the embedded amqtt broker and real agent processes: no RabbitMQ, no Mosquitto.

First the broker alone against the agent's MQTT contract (persistent session,
QoS 1 while offline, retained status, Last Will), then the whole scheduler.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.scheduler.errors import EmbeddedBrokerError
from edgerun.scheduler.messaging.broker import EmbeddedBroker

from .brokers import wait_until
from .mqttkit import AgentProcess, Observer, shell
from .scheduler_kit import Api, cli, running_app


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    yield broker
    broker.stop()


def test_amqtt_serves_the_agent_contract(embedded: EmbeddedBroker, tmp_path: Path) -> None:
    with Observer(embedded.url) as observer:
        other = AgentProcess(embedded.url, "other", tmp_path / "other").start()
        other.wait_online(observer)
        agent = AgentProcess(embedded.url, "amq-1", tmp_path / "a").start()
        try:
            status = agent.wait_online(observer)
            assert status["facts"]["hostname"]
            observer.send("amq-1", shell("t1", "echo one"))
            assert observer.final("t1")["stdout"] == "one\n"
            # persistent session: a task sent while the agent is away waits for it (QoS 1)
            assert agent.terminate() == 0
            observer.wait("status", node="amq-1", state="offline")
            observer.send("amq-1", shell("t2", "echo queued"))
            assert observer.conn.flush(10)  # the broker has it before the agent returns
            agent.start()
            assert observer.final("t2", timeout=30)["stdout"] == "queued\n"
            # the Last Will turns a killed agent offline
            agent.kill()
            will = observer.wait("status", node="amq-1", state="offline", count=2)[-1]
            assert will == {"v": 1, "kind": "status", "node": "amq-1", "state": "offline"}
            # a late subscriber gets the retained status
            with Observer(embedded.url) as late:
                late.wait("status", node="other", state="online")
            # amqtt as shipped sends a connecting client every retained message anyone
            # subscribed to; the agent would answer the other node's status as a bad task
            agent.start()
            observer.wait("status", node="amq-1", state="online", count=3)
            observer.send("amq-1", shell("t3", "true"))
            observer.final("t3")
            assert observer.of("update", state="rejected") == []
        finally:
            for proc in (agent, other):
                if proc.alive():
                    proc.kill()


def test_port_in_use_is_one_clear_error(embedded: EmbeddedBroker) -> None:
    with pytest.raises(EmbeddedBrokerError, match=f"cannot listen on 127.0.0.1:{embedded.port}"):
        EmbeddedBroker("127.0.0.1", embedded.port).start()


def test_direct_mode_end_to_end_with_the_embedded_broker(tmp_path: Path) -> None:
    with running_app(None, tmp_path, embedded_broker="127.0.0.1:0") as app:
        assert app.embedded is not None
        api = Api(app.api_url)
        agent = AgentProcess(app.embedded.url, "edge-1", tmp_path / "agent").start()
        try:
            api.wait_node("edge-1")
            result = cli(api.url, "run", "edge-1", "--", "sh", "-c", "echo via amqtt; exit 5")
            assert result.code == 5 and "edge-1 | via amqtt" in result.out
            [task] = api.dispatch(["edge-1"], {"type": "shell", "command": "sleep 60",
                                               "timeout": 2})
            api.wait_state(task["id"], "edge-1", "running")
            agent.kill()
            api.wait_node("edge-1", "offline")
            lost = api.wait_state(task["id"], "edge-1", {"lost", "succeeded", "failed"})
            assert lost["state"] == "lost"
            assert wait_until(lambda: app.service is not None
                              and app.service.messenger.connected.is_set())
        finally:
            if agent.alive():
                agent.kill()


def test_amqtt_internals_the_broker_relies_on_are_as_expected() -> None:
    """The installed amqtt has the private members messaging/broker.py overrides and reads:
    a release that changes them fails here, naming the member, not in the field."""
    import asyncio

    from amqtt.broker import Broker

    from edgerun.scheduler.messaging.broker import check_internals

    async def built() -> Broker:  # amqtt builds its broker inside a running loop
        return Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})

    check_internals(Broker, asyncio.run(built()))


def test_a_changed_amqtt_internal_is_refused_by_name() -> None:
    """Pure logic: a Broker whose overridden method changed its parameters, or lost an
    attribute, is refused with the member's name."""
    from edgerun.scheduler.messaging.broker import check_internals

    class Changed:
        async def _client_connected(self, listener_name: str, reader: object) -> None: ...

        async def _publish_retained_messages_for_subscription(
                self, subscription: object, session: object) -> None: ...

    with pytest.raises(EmbeddedBrokerError, match="_client_connected"):
        check_internals(Changed)

    class NoAttrs:
        async def _client_connected(self, listener_name: str, reader: object,
                                    writer: object) -> None: ...

        async def _publish_retained_messages_for_subscription(
                self, subscription: object, session: object) -> None: ...

    check_internals(NoAttrs)
    with pytest.raises(EmbeddedBrokerError, match="_subscriptions"):
        check_internals(NoAttrs, NoAttrs())
