"""A channel RabbitMQ keeps refusing publishes on is replaced, and nothing is lost.

After a quorum queue's leader node is killed, a channel opened on a survivor
before the new leader is elected can nack every publish to that queue for as
long as it lives (RabbitMQ 3.10; tests/test_cluster_rabbit.py stalled on it
with the bridge's updates refused for minutes). edgerun.amqp renews a
connection whose publishes are refused for `nack_renew` seconds; what it did
not confirm goes out again on the next one.

Here a queue that refuses everything (max length 0, reject-publish) on a
private RabbitMQ stands for the stuck queue: the scheduler's messenger sends
tasks that it refuses, renews its connection (on the same node), and once the
queue takes messages again every task is confirmed and there, once each.
"""

from __future__ import annotations

import threading
import uuid
from functools import partial
from pathlib import Path

from edgerun.protocol import TASKS_EXCHANGE
from edgerun.scheduler.messaging.amqp import AmqpMessenger
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .rabbit import Rabbit

TASKS = 20


def test_refused_publishes_renew_the_connection_and_are_sent_again(rabbit: Rabbit,
                                                                   tmp_path: Path) -> None:
    node = f"renew-{uuid.uuid4().hex[:6]}"
    refusing, taking = f"refuse.{node}", f"take.{node}"
    messenger = AmqpMessenger(parse_broker_url(rabbit.url, ("amqp", "amqps")),
                              queue=f"edgerun.scheduler.{uuid.uuid4().hex[:8]}",
                              record_external=False)
    messenger.link.nack_renew = 1.0
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
        # refused again and again: the connection is renewed, on the same node
        assert wait_until(lambda: messenger.link.renewals >= 1 and messenger.link.ready, 60)
        assert messenger.link.url == first
        assert "refused publishes" in (messenger.last_error or "")
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
    finally:
        messenger.stop()
        channel.queue_delete(taking)
        setup.close()
