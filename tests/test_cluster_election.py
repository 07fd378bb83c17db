"""A client that reaches a surviving RabbitMQ node while a quorum queue is still electing
its new leader gets its publishes to that queue confirmed, with the old leader's node down.

On RabbitMQ 3.10 a channel that first publishes to a quorum queue in that moment is
refused (nacked) for as long as it lives or until the dead node returns, while a new
channel is accepted at once; that stalled tests/test_cluster_rabbit.py for good (the
bridge's updates refused, the scheduler's pacing holding every other task). The shared
AMQP link renews a connection whose publishes are refused for a while (edgerun/amqp.py).
Here the scheduler's messenger starts on a survivor the moment the leader's node is
killed, deterministically inside the election, and its tasks must all be confirmed and
there, once each, without the dead node coming back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pika
import pytest

from edgerun.protocol import TASKS_EXCHANGE
from edgerun.scheduler.messaging.amqp import AmqpMessenger
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .cluster import RabbitCluster, have_rabbit

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_rabbit(), reason="rabbitmq-server not installed")]

TASKS = 20
QUEUE = "edgerun.bridge.election"  # stands for the bridge's queue of tasks


@pytest.fixture(scope="module")
def rabbits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbits")).start()
    yield cluster
    cluster.stop()


def test_publishes_during_a_quorum_leader_election_are_confirmed(
        rabbits: RabbitCluster, tmp_path: Path) -> None:
    first, survivor = rabbits.nodes[0], rabbits.nodes[1]
    setup = pika.BlockingConnection(pika.URLParameters(first.url))
    channel = setup.channel()
    channel.exchange_declare(TASKS_EXCHANGE, "topic", durable=True)
    channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(QUEUE, TASKS_EXCHANGE, "node.*")
    setup.close()
    assert rabbits.leaders(survivor)[QUEUE] == first.node  # declared there: led there

    messenger = AmqpMessenger(parse_broker_url(survivor.url, ("amqp", "amqps")),
                              queue="edgerun.scheduler.election", queue_type="quorum",
                              record_external=False)
    done: list[int] = []
    lock = threading.Lock()

    def confirmed(n: int) -> None:
        with lock:
            done.append(n)

    first.kill()
    killed_at = time.monotonic()
    messenger.start(lambda message: messenger.ack(message))
    try:
        for n in range(TASKS):
            messenger.send("victim", f"task {n}".encode(), partial(confirmed, n))
        assert wait_until(lambda: len(done) == TASKS, 120, 0.1), \
            (len(done), messenger.last_error)
        print(f"\nall {TASKS} confirmed {time.monotonic() - killed_at:.1f} s after the kill; "
              f"connections renewed for refusals: {messenger.link.renewals}")
        assert sorted(done) == list(range(TASKS))
        assert first.proc is not None and first.proc.poll() is not None  # still dead
    finally:
        messenger.stop()

    reader = pika.BlockingConnection(pika.URLParameters(survivor.url))
    try:
        channel = reader.channel()
        bodies = []
        while True:
            method, _props, body = channel.basic_get(QUEUE, auto_ack=True)
            if method is None:
                break
            bodies.append(body.decode())
    finally:
        reader.close()
    assert set(bodies) == {f"task {n}" for n in range(TASKS)}, sorted(bodies)[:5]
