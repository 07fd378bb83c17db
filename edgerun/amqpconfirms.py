"""Bookkeeping of publisher confirms: pure, no I/O.

RabbitMQ numbers the publishes of a confirm channel 1, 2, 3, ... and answers
with basic.ack or basic.nack for one tag, or with `multiple` for every tag up
to and including it. A tag may be answered out of order, and never twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfirmTracker(Generic[T]):
    """Publish tag -> what was published, until the broker confirms or refuses it."""

    def __init__(self) -> None:
        self._waiting: OrderedDict[int, T] = OrderedDict()  # tags ascend with insertion

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[T]:
        return iter(self._waiting.values())

    def add(self, tag: int, item: T) -> None:
        if self._waiting and tag <= next(reversed(self._waiting)):
            raise ValueError(f"publish tag {tag} does not ascend")
        self._waiting[tag] = item

    def settle(self, tag: int, multiple: bool) -> list[T]:
        """The items this confirm (ack or nack) answers, oldest first."""
        if not multiple:
            item = self._waiting.pop(tag, None)
            return [] if item is None else [item]
        done = []
        while self._waiting:
            first = next(iter(self._waiting))
            if first > tag:
                break
            done.append(self._waiting.pop(first))
        return done

    def reset(self) -> list[T]:
        """Every unanswered item, oldest first: the channel that would answer is gone."""
        items = list(self._waiting.values())
        self._waiting.clear()
        return items
