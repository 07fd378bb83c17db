"""A channel RabbitMQ keeps refusing publishes on is replaced at once, and nothing is lost.

After a quorum queue's leader node is killed, a channel that first publishes to the
queue before the new leader is elected is refused (nacked) for as long as it lives
(RabbitMQ 3.10; tests/test_cluster_election.py shows it on a real election), while a
new channel is accepted. edgerun.amqp renews a channel whose publishes are refused: at
once, then at growing intervals while the refusals go on; what it did not confirm goes
out again on the next channel, on the same connection.

Here a queue that refuses everything (max length 0, reject-publish) on a private
RabbitMQ stands for the stuck queue: the scheduler's messenger sends tasks that it
refuses, renews its channel (same connection, same node), says so once, and once the
queue takes messages again every task is confirmed and there, once each.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from edgerun.protocol import TASKS_EXCHANGE
from edgerun.scheduler.messaging.amqp import AmqpMessenger
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .rabbit import Rabbit

TASKS = 20


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rabbit]:
    broker = Rabbit(tmp_path_factory.mktemp("rabbit")).start()
    yield broker
    broker.stop()


def test_refused_publishes_renew_the_channel_and_are_sent_again(
        rabbit: Rabbit, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgerun.amqp")
    node = f"renew-{uuid.uuid4().hex[:6]}"
    refusing, taking = f"refuse.{node}", f"take.{node}"
    messenger = AmqpMessenger(parse_broker_url(rabbit.url, ("amqp", "amqps")),
                              queue=f"edgerun.scheduler.{uuid.uuid4().hex[:8]}",
                              record_external=False)
    setup = rabbit.connect()
    channel = setup.channel()
    channel.exchange_declare(TASKS_EXCHANGE, "topic", durable=True)
    channel.queue_declare(refusing, arguments={"x-max-length": 0,
                                               "x-overflow": "reject-publish"})
    channel.queue_bind(refusing, TASKS_EXCHANGE, f"node.{node}")
    done: list[int] = []
    lock = threading.Lock()

    def confirmed(n: int) -> None:
        with lock:
            done.append(n)

    messenger.start(lambda message: messenger.ack(message))
    try:
        assert messenger.connected.wait(30), messenger.last_error
        first = messenger.link.url
        for n in range(TASKS):
            messenger.send(node, f"task {n}".encode(), partial(confirmed, n))
        # refused again and again: new channels on the same connection, more and more
        # spaced out (at once, then 0.25, 0.5, 1 s ... after the previous one)
        assert wait_until(lambda: messenger.link.renewals >= 4 and messenger.link.ready, 60)
        assert messenger.link.url == first and messenger.link.reconnects == 0
        assert "refuses publishes" in (messenger.last_error or "")
        assert "electing a new leader" in (messenger.last_error or "")
        assert done == []  # a refused task is never reported sent

        # the queue takes messages again: every task is confirmed and there, once each
        channel.queue_declare(taking)
        channel.queue_bind(taking, TASKS_EXCHANGE, f"node.{node}")
        channel.queue_delete(refusing)
        assert wait_until(lambda: len(done) == TASKS, 60), (len(done), messenger.last_error)
        assert sorted(done) == list(range(TASKS))
        bodies = []
        while True:
            method, _props, body = channel.basic_get(taking, auto_ack=True)
            if method is None:
                break
            bodies.append(body.decode())
        assert sorted(bodies) == sorted(f"task {n}" for n in range(TASKS))
        assert messenger.link.reconnects == 0
    finally:
        messenger.stop()
        channel.queue_delete(taking)
        setup.close()
    # one episode of refusals: one warning that names the election, however many
    # publishes and channels were refused, and one line when they are accepted again
    said = [r.getMessage() for r in caplog.records if r.name == "edgerun.amqp"]
    warned = [m for m in said if "refuses publishes" in m]
    assert len(warned) == 1, warned
    assert len([m for m in said if "accepts publishes again" in m]) == 1, said
