from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer
from .rabbit import Rabbit


# --- markers: `./build.sh test --quick` is `pytest -m "not slow"` ------------------------
# The one list of the long tests (minutes of load, image builds, several broker nodes, a
# browser, kill -9 cycles); the rest run in about three minutes on two cores. A module's
# own pytestmark may say `slow` as well. Time a module with --durations=0 before adding
# to it or taking it out.
MODULE_MARKS: dict[str, tuple[str, ...]] = {
    "test_chaos": ("slow",),
}
# single tests of otherwise quick modules: "module::function" (every parametrisation)
TEST_MARKS: dict[str, tuple[str, ...]] = {
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
        function = getattr(item, "originalname", item.name)
        for mark in (*MODULE_MARKS.get(module, ()), *TEST_MARKS.get(f"{module}::{function}", ())):
            item.add_marker(mark)


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


@pytest.fixture(autouse=True, scope="session")
def tidy_agent_cgroups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An agent killed with SIGKILL leaves its empty `edgerun-<key>` cgroup behind. At the
    end of the run remove those of this run's agents: the key ends in a hash of the state
    directory (edgerun.agent.contain.make_key), so a cgroup is ours when the hash is that
    of a directory under this run's temporary root. Only empty ones go (rmdir refuses a
    cgroup with processes or children in it)."""
    yield
    from edgerun.agent._lean import sha256_hex
    from edgerun.agent.contain import THREAD_ROOT, cgroup_base

    base = cgroup_base()
    if base is None:
        return
    import os

    # a threaded-mode agent keeps its cgroup in <its cgroup>/edgerun (contain.py)
    top = os.path.dirname(base) if os.path.basename(base) == THREAD_ROOT else base
    ours = set()
    for where in (top, os.path.join(top, THREAD_ROOT)):
        try:
            ours |= {os.path.join(where, name) for name in os.listdir(where)
                     if name.startswith("edgerun-")}
        except OSError:
            pass
    if not ours:
        return
    hashes: set[str] = set()
    for here, _dirs, _files in os.walk(tmp_path_factory.getbasetemp()):
        hashes.add(sha256_hex(os.path.abspath(here).encode())[:10])
    for path in ours:
        if path.rsplit("-", 1)[-1] not in hashes:
            continue
        for here, dirs, _files in os.walk(path, topdown=False):
            for child in [*dirs, ""]:
                try:
                    os.rmdir(os.path.join(here, child) if child else here)
                except OSError:  # busy (a process still in it) or gone
                    pass


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


# --- RabbitMQ: the one fixture, at the two scopes tests need ---------------------------
def _private_rabbit(workdir: Path, extra_conf: str) -> Iterator[Rabbit]:
    broker = Rabbit(workdir, extra_conf)
    try:
        yield broker.start()
    finally:
        broker.stop()  # also a node that failed to start


@pytest.fixture(scope="module")
def rabbit_conf() -> str:
    """Extra rabbitmq.conf lines for `rabbit` and `fresh_rabbit`. A module that needs
    more (TLS listeners: test_amqps.py) overrides this fixture with its own."""
    return ""


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory, rabbit_conf: str) -> Iterator[Rabbit]:
    """A private RabbitMQ shared by the tests of one module, which may kill -9 and restart
    it (it comes back on the same ports and data) or SIGSTOP it; each test uses names of
    its own. Without rabbitmq-server it stands for the machine's broker, which cannot be
    restarted (kill/restart skip the test)."""
    yield from _private_rabbit(tmp_path_factory.mktemp("rabbit"), rabbit_conf)


@pytest.fixture
def fresh_rabbit(tmp_path: Path, rabbit_conf: str) -> Iterator[Rabbit]:
    """A private RabbitMQ for one test alone: empty at its start, stopped at its end."""
    yield from _private_rabbit(tmp_path / "rabbit", rabbit_conf)
