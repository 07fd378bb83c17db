"""Stream tickets live in the store: a ticket given by one instance opens one stream on
any instance sharing the database, once; lapsed and surplus tickets go (issue 22's
open finding: tickets were in one instance's memory, so a load balancer that sent the
POST and the GET to different instances got 401)."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from pathlib import Path

import pytest

from edgerun.control.errors import Unauthorized
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.api.tickets import PREFIX, Tickets
from edgerun.scheduler.store.tasks import Store

from .apikit import call
from .brokers import Mosquitto
from .pg import pg_database, pg_url  # noqa: F401  (fixtures)
from .scheduler_kit import running_app


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    target = str(tmp_path / "t.db") if request.param == "sqlite" \
        else request.getfixturevalue("pg_url")
    return Store(target)


def test_hostile_tickets_are_refused_and_break_nothing(store: Store) -> None:
    tickets = Tickets(store)
    for bad in ("", PREFIX, "ers_\x00", "x" * 100_000, "ers_' OR 1=1 --", "\udcff", "é"):
        with pytest.raises(Unauthorized):
            tickets.redeem(bad)
    good = tickets.issue(Principal("eyes", "viewer", 7))["ticket"]
    assert tickets.redeem(good) == Principal("eyes", "viewer", 7)
    with pytest.raises(Unauthorized):
        tickets.redeem(good)  # once


def test_a_lapsed_ticket_is_refused_and_surplus_ones_go_oldest_first(store: Store) -> None:
    lapsed = PREFIX + "lapsed"
    digest = hashlib.sha256(lapsed.encode()).hexdigest()  # what the store keeps of it
    store.add_ticket(digest, "old", "viewer", None, now=time.time() - 60, ttl=30, keep=10)
    with pytest.raises(Unauthorized):
        Tickets(store).redeem(lapsed)
    assert store.take_ticket(digest) is None  # and taken: a lapsed ticket is not kept
    now = time.time()
    for i in range(5):
        store.add_ticket(f"{i:064d}", f"n{i}", "viewer", i, now=now + i, ttl=30, keep=3)
    assert [store.take_ticket(f"{i:064d}") is not None for i in range(5)] == \
        [False, False, True, True, True]


def test_a_ticket_from_one_instance_opens_a_stream_on_another_once(
        tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    try:
        with running_app(mosquitto.url, tmp_path / "a", db=pg_url, share_group="tk") as a, \
                running_app(mosquitto.url, tmp_path / "b", db=pg_url, share_group="tk") as b:
            assert a.api is not None and b.api is not None and a.admin_token is not None
            ports = [a.api.port, b.api.port]
            viewer = call(ports[0], "POST", "/v1/tokens", a.admin_token,
                          {"name": "eyes", "role": "viewer"}).body["token"]

            def ticket(port: int) -> str:
                made = call(port, "POST", "/v1/stream-tickets", viewer)
                assert made.status == 201, made.body
                return str(made.body["ticket"])

            def opens(port: int, t: str) -> int:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    conn.request("GET", f"/v1/events?channel=tasks&ticket={t}")
                    return conn.getresponse().status
                finally:
                    conn.close()

            t = ticket(ports[0])
            assert opens(ports[1], t) == 200
            assert opens(ports[0], t) == 401 and opens(ports[1], t) == 401
            # one ticket redeemed on both instances at once: one stream opens
            for _ in range(5):
                t, got, start = ticket(ports[1]), list[int](), threading.Barrier(2)

                def race(port: int, t: str = t, got: list[int] = got,
                         start: threading.Barrier = start) -> None:
                    start.wait()
                    got.append(opens(port, t))
                threads = [threading.Thread(target=race, args=(p,)) for p in ports]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert sorted(got) == [200, 401], got
    finally:
        mosquitto.stop()
