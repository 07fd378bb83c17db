"""Bookkeeping of publisher confirms: pure, no I/O.

RabbitMQ numbers the publishes of a confirm channel 1, 2, 3, ... and answers
with basic.ack or basic.nack for one tag, or with `multiple` for every tag up
to and including it. A tag may be answered out of order, and never twice.

`Refusals` keeps the episodes of refused publishes (nacks) of one link and says
when to renew the channel they come on (edgerun/amqp.py says why).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
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


class Settled:
    """Which publish tags of a channel are answered, in O(1) per confirm while confirms
    come in order: every tag up to `low` is, and `above` holds those answered above it."""

    def __init__(self) -> None:
        self.low = 0
        self.above: set[int] = set()

    def settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            if tag > self.low:
                self.low = tag
                if self.above:
                    self.above = {t for t in self.above if t > tag}
        elif tag == self.low + 1:
            self.low = tag
        elif tag > self.low:
            self.above.add(tag)
        while self.above and self.low + 1 in self.above:
            self.low += 1
            self.above.discard(self.low)

    def all_answered(self, upto: int) -> bool:
        """Whether every tag from 1 to `upto` is answered."""
        return self.low >= upto


@dataclass
class Episode:
    """One run of refused publishes: no gap of `Refusals.gap` seconds between two."""

    started: float
    last: float  # the latest refusal
    refused: int = 0  # nack frames (a `multiple` one refuses several publishes)
    renewals: int = 0  # channels renewed in it
    renewed_at: float = 0.0
    reported: bool = False  # its end (publishes accepted again) was reported


class Refusals:
    """When to renew a channel RabbitMQ refuses publishes on, on a monotonic clock.

    A channel that refused a publish in the current episode is renewed at once the
    first time, then after `step`, 2 `step`, 4 `step` ... (at most `cap`) since the
    previous renewal, while refusals go on: a quorum queue's election is over within
    about a second, and a channel that refuses for good (RabbitMQ 3.10, see
    edgerun/amqp.py) is replaced at once; a queue that stays full costs one renewal
    every `cap` seconds. An episode ends after `gap` seconds without a refusal.
    """

    def __init__(self, *, gap: float = 2.0, step: float = 0.25, cap: float = 5.0) -> None:
        self.gap, self.step, self.cap = gap, step, cap
        self.episode: Episode | None = None

    def refused(self, now: float) -> bool:
        """Note a refusal (a nack frame); True when it begins a new episode."""
        episode = self.episode
        new = episode is None or now - episode.last > self.gap
        if new:
            episode = self.episode = Episode(started=now, last=now)
        assert episode is not None
        episode.last = now
        episode.refused += 1
        return new

    def accepted(self) -> Episode | None:
        """Note an accepted publish; the episode, the first time one follows its refusals
        (to report its end once), else None."""
        episode = self.episode
        if episode is None or episode.reported:
            return None
        episode.reported = True
        return episode

    def renew_at(self, now: float, ready_since: float) -> float | None:
        """When to renew the channel that is ready since `ready_since`: None when it
        refused nothing in the current episode."""
        episode = self.episode
        if episode is None or episode.last < ready_since or now - episode.last > self.gap:
            return None
        if episode.renewals == 0:
            return now
        wait = min(self.cap, self.step * 2.0 ** min(episode.renewals - 1, 62))
        return max(now, episode.renewed_at + wait)

    def renewed(self, now: float) -> None:
        episode = self.episode
        if episode is not None:
            episode.renewals += 1
            episode.renewed_at = now
