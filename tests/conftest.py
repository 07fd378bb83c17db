from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer


@pytest.fixture(autouse=True, scope="session")
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`edgerun serve` writes its first admin token under $XDG_STATE_HOME and the CLI reads
    it from there: keep the tests' tokens out of the user's home, in one place per run."""
    import os

    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(autouse=True)
def reap_agents() -> Iterator[None]:
    """Kill every agent process the test itself started and left running, pass or fail.

    Agents of module- or session-scoped fixtures were made before this fixture's
    set-up (pytest sets up wider scopes first) and are left to their fixture."""
    before = len(AgentProcess.CREATED)
    yield
    while len(AgentProcess.CREATED) > before:
        agent = AgentProcess.CREATED.pop()
        if agent.alive():
            agent.kill()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def observer(mosquitto: Mosquitto) -> Iterator[Observer]:
    with Observer(mosquitto.url) as obs:
        yield obs
