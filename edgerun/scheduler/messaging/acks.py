"""Bookkeeping of a consumer's acks on one AMQP channel: pure, no I/O.

The service acknowledges each delivery once it is recorded, one at a time and
from another thread. Sending one basic.ack per delivery costs a frame on each
side and work in RabbitMQ for every message; AMQP lets one basic.ack with
`multiple` settle every outstanding delivery up to a tag. `DeliveryAcks`
collects the service's acks between two wake-ups of the connection's thread and
says what to send: one `multiple` ack for the run of oldest deliveries that are
all acknowledged, and single acks for those acknowledged past a delivery still
being recorded (so a message the service never acks holds nothing else back).
An ack for a tag that is not outstanding (twice, or of a channel that is gone)
is ignored: RabbitMQ would close the channel for it.
"""

from __future__ import annotations

from collections import OrderedDict


class DeliveryAcks:
    def __init__(self) -> None:
        self._open: OrderedDict[int, None] = OrderedDict()  # delivered, not yet acked; tags ascend
        self._new: set[int] = set()  # acked by the service since the last settle
        self._last = 0  # the newest tag delivered on this channel

    def __len__(self) -> int:
        return len(self._open)

    def delivered(self, tag: int) -> None:
        """A delivery handed to the service; its ack is expected."""
        if tag <= self._last:
            raise ValueError(f"delivery tag {tag} does not ascend")
        self._last = tag
        self._open[tag] = None

    def acked(self, tag: int) -> bool:
        """The service recorded delivery `tag`; False (and nothing to send) if the tag is
        not outstanding or was acked already."""
        if tag not in self._open or tag in self._new:
            return False
        self._new.add(tag)
        return True

    def settle(self) -> tuple[int | None, list[int]]:
        """What to send now: the tag for one ack with `multiple` (or None), then the
        tags to ack one by one; all of them stop being outstanding."""
        upto = None
        new, opened = self._new, self._open
        while opened and new:
            first = next(iter(opened))
            if first not in new:
                break
            del opened[first]
            new.discard(first)
            upto = first
        singles = sorted(new)
        for tag in singles:
            del opened[tag]
        new.clear()
        return upto, singles

    def reset(self) -> None:
        """The channel is gone: RabbitMQ requeues what it had not been told."""
        self._open.clear()
        self._new.clear()
        self._last = 0
