"""The pure parts of failover: the order and back-off of attempts over a cluster's
nodes (edgerun.backoff.Rotation, first_node), and when a refusing channel is renewed
(edgerun.amqpconfirms.Refusals). No I/O; the live side is in test_amqp_renew.py and
test_cluster_election.py."""

from __future__ import annotations

import collections
import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgerun.amqpconfirms import ConfirmTracker, Refusals, Settled
from edgerun.backoff import Rotation, backoff_delay, first_node


def _ceilings(rotation: Rotation, tries: int) -> list[tuple[int, float]]:
    """(node tried next, the most it waits first) for `tries` failed attempts."""
    out = []
    for _ in range(tries):
        delay = rotation.next()
        out.append((rotation.index, delay))
    return out


def test_back_off_grows_once_per_round_of_the_nodes() -> None:
    rotation = Rotation(3, threading.Event(), first=1, base=0.5, cap=30.0, rand=lambda: 1.0)
    assert rotation.index == 1
    # every node of a round is tried after the same wait; the next round waits twice as long
    assert _ceilings(rotation, 9) == [(2, 0.5), (0, 0.5), (1, 0.5),
                                      (2, 1.0), (0, 1.0), (1, 1.0),
                                      (2, 2.0), (0, 2.0), (1, 2.0)]
    rotation.up()  # a connection was up: short again, from the node after it
    assert _ceilings(rotation, 2) == [(2, 0.5), (0, 0.5)]


def test_back_off_of_one_node_grows_at_every_attempt_up_to_its_cap() -> None:
    rotation = Rotation(1, threading.Event(), base=0.5, cap=4.0, rand=lambda: 1.0)
    assert [d for _, d in _ceilings(rotation, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_back_off_after_a_lost_quorum_reaches_the_cluster_sooner_than_per_node() -> None:
    """The issue's case: 3 nodes refusing for a while (no quorum). Per round, the wait
    before each try after 12 failed tries is a quarter of what per-node growth gave."""
    per_round = Rotation(3, threading.Event(), rand=lambda: 1.0)
    waited = sum(per_round.next() for _ in range(12))
    per_node = sum(backoff_delay(n, rand=lambda: 1.0) for n in range(12))
    assert waited == 3 * (0.5 + 1 + 2 + 4) == 22.5
    assert per_node == 0.5 + 1 + 2 + 4 + 8 + 16 + 30 * 6 == 211.5


def test_a_stopped_rotation_does_not_wait() -> None:
    stop = threading.Event()
    stop.set()
    rotation = Rotation(2, stop, base=60, cap=60)
    assert rotation.wait() and rotation.index == 1


def test_a_rotation_needs_a_node() -> None:
    with pytest.raises(ValueError):
        Rotation(0, threading.Event())


def test_clients_spread_their_first_node_over_the_list() -> None:
    rand = random.Random(7).randrange
    firsts = collections.Counter(first_node(3, rand) for _ in range(3000))
    assert set(firsts) == {0, 1, 2}
    assert min(firsts.values()) > 900  # about a third each
    assert first_node(1) == 0


# --- refusals -------------------------------------------------------------------------------
def test_a_refusing_channel_is_renewed_at_once_then_at_growing_intervals() -> None:
    refusals = Refusals(gap=2.0, step=0.25, cap=5.0)
    assert refusals.renew_at(10.0, ready_since=0.0) is None  # nothing refused
    assert refusals.refused(10.0) is True  # a new episode: the one warning
    assert refusals.renew_at(10.0, ready_since=0.0) == 10.0  # the first renewal: at once
    renewed_at = 10.0
    ready = 10.01
    waits = []
    for _ in range(7):  # each new channel is refused at once (a queue that stays full),
        refusals.renewed(renewed_at)  # and again at each of the handler's retries (1 s)
        assert refusals.refused(ready) is False  # the same episode: no second warning
        at = refusals.renew_at(ready, ready_since=ready)
        assert at is not None
        retry = ready + 1.0
        while retry < at:
            assert refusals.refused(retry) is False
            assert refusals.renew_at(retry, ready_since=ready) == at
            retry += 1.0
        waits.append(round(at - renewed_at, 3))
        renewed_at, ready = at, at + 0.01
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_channel_ready_after_the_last_refusal_is_not_renewed() -> None:
    refusals = Refusals()
    refusals.refused(5.0)
    refusals.renewed(5.0)
    assert refusals.renew_at(5.2, ready_since=5.1) is None


def test_an_episode_ends_after_a_quiet_gap_and_its_end_is_said_once() -> None:
    refusals = Refusals(gap=2.0)
    assert refusals.accepted() is None  # no refusals: nothing to say
    refusals.refused(1.0)
    refusals.refused(2.5)
    episode = refusals.accepted()
    assert episode is not None and episode.refused == 2 and episode.started == 1.0
    assert refusals.accepted() is None  # said once
    assert refusals.refused(3.0) is False  # within the gap: the same episode
    assert refusals.renew_at(6.0, ready_since=0.0) is None  # over: nothing to renew
    assert refusals.refused(6.0) is True  # a new episode, a new warning
    assert refusals.renew_at(6.0, ready_since=0.0) == 6.0  # and renewals start over


@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), max_size=60))
def test_settled_tags_are_what_the_confirm_tracker_settles(
        answers: list[tuple[int, bool]]) -> None:
    """A channel to renew waits until every publish it was sent is answered: Settled
    (cheap, for every confirm) agrees with the handlers' ConfirmTracker."""
    tracker: ConfirmTracker[int] = ConfirmTracker()
    for tag in range(1, 41):
        tracker.add(tag, tag)
    settled = Settled()
    for tag, multiple in answers:
        tracker.settle(tag, multiple)
        settled.settle(tag, multiple)
        waiting = set(tracker)
        for upto in range(0, 41):
            assert settled.all_answered(upto) == (not any(t <= upto for t in waiting))
