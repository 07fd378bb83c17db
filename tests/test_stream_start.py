"""Where a live stream starts (streams.py): a fresh reader's `hello` names the id it starts
after, and every logged event that follows it on the stream is newer, each once, in id
order, however busy the hub is while the stream opens; a resuming reader likewise gets
the log after its id, then the live events, without a gap or a repeat."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from edgerun.scheduler.store.events import audit_event

from .apikit import Stack, stack
from .test_api_streams import Sse

FOLLOWED = 12  # logged events read on each stream after its hello


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("stream-start"), node="start-a") as st:
        yield st


def _busy(s: Stack, stop: threading.Event) -> threading.Thread:
    """Audit events logged one after another (a little apart: a reader that cannot keep
    up is cut off as slow, which is another test's subject)."""
    assert s.app.service is not None
    hub = s.app.service.hub

    def publish() -> None:
        i = 0
        while not stop.is_set():
            hub.publish(audit_event("probe", "test", "admin", n=i))
            i += 1
            stop.wait(0.002)
    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


def _logged(sse: Sse, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        event_id, kind, _data = sse.next()
        assert kind == "audit" and event_id is not None, (kind, _data)
        ids.append(event_id)
    return ids


def test_fresh_streams_opened_while_the_hub_is_busy_start_right_after_their_hello(
        s: Stack) -> None:
    stop = threading.Event()
    busy = _busy(s, stop)
    try:
        for _ in range(40):
            sse = Sse(s.port, "?channel=audit", s.admin)
            event_id, kind, hello = sse.next()
            assert kind == "hello" and event_id == hello["last_id"]
            ids = _logged(sse, FOLLOWED)
            sse.close()
            assert ids == list(range(event_id + 1, event_id + 1 + FOLLOWED)), \
                f"hello at {event_id}, then {ids}"
    finally:
        stop.set()
        busy.join(10)


def test_resumed_streams_opened_while_the_hub_is_busy_miss_and_repeat_nothing(
        s: Stack) -> None:
    stop = threading.Event()
    busy = _busy(s, stop)
    try:
        first = Sse(s.port, "?channel=audit", s.admin)
        start, _kind, _hello = first.next()
        assert start is not None
        first.close()
        for k in range(20):
            since = start + k * 7
            sse = Sse(s.port, "?channel=audit", s.admin, last_event_id=since)
            ids: list[int] = []
            while True:
                event_id, kind, data = sse.next()
                if kind == "hello":
                    assert data["resumed_from"] == since
                    break
                assert kind == "audit" and event_id is not None
                ids.append(event_id)
            ids += _logged(sse, FOLLOWED)
            sse.close()
            assert ids == list(range(since + 1, since + 1 + len(ids))), \
                f"resumed after {since}: {ids[:5]}...{ids[-5:]}"
    finally:
        stop.set()
        busy.join(10)
