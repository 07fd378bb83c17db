"""The MQTT layer itself, against a real broker."""

from __future__ import annotations

import threading

import pytest

from edgerun import mqtt
from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_url

from .brokers import Mosquitto


def test_publishes_beyond_the_id_window_wait_their_turn_in_order(
        mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    """paho's message ids wrap at 65,535: past MAX_PENDING unacknowledged publishes the
    layer holds the rest back instead of letting paho refuse (and lose) them."""
    monkeypatch.setattr(mqtt, "MAX_PENDING", 3)
    url = parse_broker_url(mosquitto.url, ("mqtt",))
    got: list[bytes] = []
    all_in = threading.Event()

    def on_message(msg: Inbound) -> None:
        got.append(msg.payload)
        if len(got) == 500:
            all_in.set()
    sub = MqttConnection(url, "layer-sub", on_message=on_message, clean_session=True,
                         subscriptions=[("layer/t", 1)])
    pub = MqttConnection(url, "layer-pub", clean_session=True)
    done: list[int] = []
    for conn in (sub, pub):
        conn.start()
        assert conn.connected.wait(10)
    assert sub.flush(5)
    try:
        for i in range(500):
            pub.publish("layer/t", b"%d" % i, 1, on_done=lambda i=i: done.append(i))
        assert pub.flush(30)
        assert sorted(done) == list(range(500)) and pub.in_flight == 0
        assert all_in.wait(30)
        assert got == [b"%d" % i for i in range(500)]
    finally:
        pub.stop()
        sub.stop()
