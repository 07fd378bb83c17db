"""MqttConnection over several addresses: round robin on loss, a dead first address
skipped, the node connected to exposed; with private Mosquittos it can kill."""

from __future__ import annotations

import threading
from pathlib import Path

from edgerun.backoff import Backoff
from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_urls

from .brokers import Mosquitto, free_port, wait_until


def test_fails_over_round_robin_and_says_where_it_is(tmp_path: Path) -> None:
    a = Mosquitto(tmp_path / "a").start()
    b = Mosquitto(tmp_path / "b").start()
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(msg: Inbound) -> None:
        got.append(msg.payload)
        arrived.set()

    urls = parse_broker_urls(f"{a.url},{b.url}", ("mqtt",))
    conn = MqttConnection(urls, "failover-sub", on_message=on_message, clean_session=True,
                          subscriptions=[("fo/t", 1)], backoff_cap=1.0, name="fo", first=0)
    conn.start()
    try:
        assert conn.connected.wait(10)
        assert conn.node == urls[0] and conn.url == urls[0]
        a.kill()
        assert wait_until(lambda: conn.node == urls[1], 20), conn.last_error
        assert conn.reconnects == 1
        # subscribed again on the new node
        pub = MqttConnection(urls[1], "failover-pub", clean_session=True)
        pub.start()
        pub.publish("fo/t", b"on b", 1)
        assert arrived.wait(10) and got == [b"on b"]
        pub.stop()
        # and back to the first address when the second dies
        a.start()
        b.kill()
        assert wait_until(lambda: conn.node == urls[0], 20), conn.last_error
    finally:
        conn.stop()
        a.stop()
        b.stop()
    assert conn.node is None


def test_a_dead_first_address_is_skipped(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "b").start()
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    urls = parse_broker_urls(f"{dead},{b.url}", ("mqtt",))
    conn = MqttConnection(urls, "skip-dead", clean_session=True, backoff_cap=1.0, first=0)
    conn.start()
    try:
        assert wait_until(lambda: conn.node == urls[1], 20)
        assert conn.last_error is not None and "cannot connect" in conn.last_error
    finally:
        conn.stop()
        b.stop()


def test_clients_given_one_list_spread_over_its_nodes(tmp_path: Path) -> None:
    a = Mosquitto(tmp_path / "a").start()
    b = Mosquitto(tmp_path / "b").start()
    urls = parse_broker_urls(f"{a.url},{b.url}", ("mqtt",))
    conns = [MqttConnection(urls, f"spread-{i}", clean_session=True, backoff_cap=1.0)
             for i in range(16)]
    try:
        for conn in conns:
            conn.start()
        assert all(conn.connected.wait(10) for conn in conns)
        # each starts at a random address: all 16 on one of two is a 1 in 32,768 chance
        assert {conn.node for conn in conns} == set(urls)
        assert all(conn.reconnects == 0 and conn.last_error is None for conn in conns)
    finally:
        for conn in conns:
            conn.stop()
        a.stop()
        b.stop()


def test_backoff_grows_once_per_round_when_asked() -> None:
    stop = threading.Event()
    stop.set()  # every wait ends at once
    backoff = Backoff(stop)
    assert backoff.wait(grow=False) and backoff.attempt == 0
    assert backoff.wait() and backoff.attempt == 1
