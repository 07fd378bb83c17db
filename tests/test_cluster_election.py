"""Failover on a 3-node RabbitMQ cluster started from deploy/rabbitmq/: where clients and
queue leaders land, and a client that reaches a survivor during a leader election.

- The shipped configuration spreads quorum queue leaders over the nodes
  (`queue_leader_locator = balanced`), and clients given the same list of nodes start
  at different ones (edgerun.backoff.first_node).
- On RabbitMQ 3.10 a channel that first publishes to a quorum queue while the queue
  elects a new leader is refused (nacked) for as long as it lives, while a new channel
  is accepted once the election is over. The shared AMQP link renews a channel whose
  publishes are refused (edgerun/amqp.py), and says so once. Here the scheduler's
  messenger starts on a survivor the moment the leader's node is killed,
  deterministically inside the election, and its tasks must all be confirmed and
  there, once each, without the dead node coming back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pika
import pytest

from edgerun.amqp import AmqpLink, Topology
from edgerun.protocol import TASKS_EXCHANGE
from edgerun.scheduler.messaging.amqp import AmqpMessenger
from edgerun.settings import parse_broker_url, parse_broker_urls

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


def test_the_shipped_configuration_spreads_quorum_leaders(rabbits: RabbitCluster) -> None:
    """Six quorum queues declared through one connection to node 1: with the default
    (client-local) node 1 would lead all six."""
    names = [f"spread.{uuid.uuid4().hex[:6]}.{i}" for i in range(6)]
    setup = pika.BlockingConnection(pika.URLParameters(rabbits.nodes[0].url))
    try:
        channel = setup.channel()
        for name in names:
            channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        leaders = rabbits.leaders(rabbits.nodes[0])
        led_by = {leaders[name] for name in names}
        print(f"\nleaders of 6 queues declared on node 1: {sorted(leaders[n] for n in names)}")
        assert len(led_by) == 3, led_by
        for name in names:
            channel.queue_delete(name)
    finally:
        setup.close()


class _Quiet:
    """A link handler that only connects (no queues, no publishes)."""

    def on_ready(self) -> None: ...
    def on_lost(self) -> None: ...
    def on_wake(self) -> None: ...
    def on_confirm(self, tag: int, multiple: bool, ok: bool) -> None: ...
    def on_delivery(self, queue: object, tag: int, routing_key: str, body: bytes) -> None: ...


def test_clients_given_the_same_list_start_at_different_nodes(rabbits: RabbitCluster) -> None:
    urls = parse_broker_urls(rabbits.urls(0), ("amqp", "amqps"))
    links = [AmqpLink(urls, Topology(()), _Quiet(), name=f"spread-{i}") for i in range(12)]
    for link in links:
        link.start()
    try:
        assert wait_until(lambda: all(link.ready for link in links), 60), \
            [link.last_error for link in links]
        nodes = [str(link.node) for link in links]
        # 12 clients on one node out of 3 by chance: 3 / 3**12, about 1 in 180,000
        assert len(set(nodes)) >= 2, nodes
        assert all(link.reconnects == 0 for link in links)  # each connected where it began
    finally:
        for link in links:
            link.stop()


def test_publishes_during_a_quorum_leader_election_are_confirmed(
        rabbits: RabbitCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgerun.amqp")
    first, survivor = rabbits.nodes[0], rabbits.nodes[1]
    setup = pika.BlockingConnection(pika.URLParameters(first.url))
    channel = setup.channel()
    channel.exchange_declare(TASKS_EXCHANGE, "topic", durable=True)
    channel.queue_declare(QUEUE, durable=True, arguments={  # led by node 1 for this test
        "x-queue-type": "quorum", "x-queue-leader-locator": "client-local"})
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
        confirmed_after = time.monotonic() - killed_at
        episode = messenger.link.refusals.episode
        print(f"\nall {TASKS} confirmed {confirmed_after:.2f} s after the kill; channels "
              f"renewed for refusals: {messenger.link.renewals}; refused from "
              f"{episode.started - killed_at:.2f} s to {episode.last - killed_at:.2f} s"
              if episode else "; none refused")
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
    # the refusals were said once, naming the election, and their end once
    said = [r.getMessage() for r in caplog.records if r.name == "edgerun.amqp"]
    warned = [m for m in said if "refuses publishes" in m]
    assert len(warned) <= 1 and all("electing a new leader" in m for m in warned), warned
    assert len([m for m in said if "accepts publishes again" in m]) == len(warned), said
