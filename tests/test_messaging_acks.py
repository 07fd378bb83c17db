"""The AMQP messenger's acks (edgerun/scheduler/messaging/acks.py): what one wake-up of
the connection's thread sends for the acks the service made, and, with a private
RabbitMQ, that the broker settles exactly the messages the service recorded."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from edgerun.scheduler.messaging import Incoming
from edgerun.scheduler.messaging.acks import DeliveryAcks
from edgerun.scheduler.messaging.amqp import AmqpMessenger
from edgerun.settings import parse_broker_url

from .brokers import wait_until
from .rabbit import Rabbit


def delivered(*tags: int) -> DeliveryAcks:
    acks = DeliveryAcks()
    for tag in tags:
        acks.delivered(tag)
    return acks


def test_a_second_ack_of_a_delivery_is_not_sent_again() -> None:
    acks = delivered(1, 2)
    assert acks.acked(1)
    assert not acks.acked(1)  # twice in one batch
    assert acks.settle() == (1, [])
    assert not acks.acked(1)  # after it was sent: RabbitMQ would close the channel
    assert acks.settle() == (None, [])
    assert len(acks) == 1


def test_an_ack_of_a_tag_never_delivered_is_ignored() -> None:
    acks = delivered(1)
    assert not acks.acked(7)
    assert not acks.acked(0)
    assert acks.settle() == (None, [])
    assert len(acks) == 1


def test_a_message_never_acked_holds_back_no_other() -> None:
    acks = delivered(1, 2, 3, 4)
    for tag in (2, 3, 4):
        assert acks.acked(tag)
    assert acks.settle() == (None, [2, 3, 4])  # one by one: 1 is still being recorded
    assert len(acks) == 1
    assert acks.acked(1)
    assert acks.settle() == (1, [])
    assert len(acks) == 0


def test_the_oldest_run_goes_in_one_multiple_ack_and_the_rest_singly() -> None:
    acks = delivered(1, 2, 3, 4, 5, 6)
    for tag in (3, 1, 2, 5):
        acks.acked(tag)
    assert acks.settle() == (3, [5])  # 4 is open: 5 alone, and nothing up to 5 in bulk
    acks.delivered(9)
    for tag in (9, 6, 4):
        acks.acked(tag)
    # 5 was acked on its own already: a multiple ack up to 9 settles only 4, 6 and 9
    assert acks.settle() == (9, [])
    assert len(acks) == 0


def test_a_lost_channel_forgets_its_deliveries() -> None:
    acks = delivered(1, 2)
    acks.acked(1)
    acks.reset()
    assert acks.settle() == (None, [])
    assert not acks.acked(2)
    acks.delivered(1)  # the new channel numbers from 1 again
    assert acks.acked(1)
    assert acks.settle() == (1, [])


def test_delivery_tags_must_ascend() -> None:
    acks = delivered(5)
    with pytest.raises(ValueError):
        acks.delivered(5)
    acks.acked(5)
    assert acks.settle() == (5, [])
    with pytest.raises(ValueError):  # also once every delivery is settled
        acks.delivered(3)


# --- with a real RabbitMQ -------------------------------------------------------------
def queue_counts(rabbit: Rabbit, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of `queue`."""
    for line in rabbit.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged",
                           "--no-table-headers").splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no queue {queue}")


def test_acks_out_of_order_twice_and_never_settle_exactly_what_was_recorded(
        rabbit: Rabbit) -> None:
    """The service acks 60 updates in a shuffled order, some twice, one never: the channel
    lives on (a second basic.ack of a tag would close it), RabbitMQ holds only the one
    never acked, and returns it, alone, when the messenger stops."""
    uid = uuid.uuid4().hex[:6]
    events, queue = f"acks{uid}.events", f"acks{uid}.scheduler"
    messenger = AmqpMessenger(parse_broker_url(rabbit.url, ("amqp",)), queue=queue,
                              events_exchange=events, tasks_exchange=f"acks{uid}.tasks",
                              audit_exchange="", record_external=False, prefetch=100)
    got: list[Incoming] = []
    lock = threading.Lock()

    def deliver(message: Incoming) -> None:
        with lock:
            got.append(message)

    messenger.start(deliver)
    setup = rabbit.connect()
    try:
        assert messenger.connected.wait(30), messenger.last_error
        channel = setup.channel()
        for n in range(60):
            channel.basic_publish(events, f"node.n{n:02d}.updates", f"update {n}".encode())
        assert wait_until(lambda: len(got) == 60, 30), len(got)
        generation = messenger.link.generation
        held = next(m for m in got if m.payload == b"update 17")
        order = [m for m in got if m is not held]
        random.Random(15).shuffle(order)
        for i, message in enumerate(order):
            messenger.ack(message)
            if i % 7 == 0:
                messenger.ack(message)  # twice
            if i % 10 == 0:
                time.sleep(0.01)  # across several wake-ups of the link's thread
        assert wait_until(lambda: queue_counts(rabbit, queue) == (0, 1), 30), \
            queue_counts(rabbit, queue)
        assert messenger.link.generation == generation and messenger.link.ready, \
            messenger.last_error
        messenger.stop()
        assert wait_until(lambda: queue_counts(rabbit, queue) == (1, 0), 30)
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"update 17"
        assert method.redelivered
    finally:
        messenger.stop()
        setup.close()
