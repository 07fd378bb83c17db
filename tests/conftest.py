from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto
from .mqttkit import Observer


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def observer(mosquitto: Mosquitto) -> Iterator[Observer]:
    with Observer(mosquitto.url) as obs:
        yield obs
