"""Fleet tests' kit: many real agents in one process, each with facts of its own.

`python -m tests.fleet_kit URL SPEC.json` runs one full `edgerun.agent.core.Agent`
per entry of SPEC (node, state_dir, sys_root, queue_size, parallel): its own MQTT
client, session, Last Will, dispatcher and workers, reading its facts (DMI,
MACs) from its own /sys tree, exactly as the agent binary reads the real one.
Only the interpreter is shared. Ends on SIGTERM, each agent draining as alone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun.agent.config import AgentConfig
from edgerun.agent.core import Agent
from edgerun.settings import parse_broker_url

from .agent_pool import serve
from .brokers import ChildProcess, Mosquitto, wait_until
from .mqttkit import ROOT
from .scheduler_kit import Api, running_app


def make_sys_root(base: Path, *, vendor: str | None = None, product: str | None = None,
                  macs: dict[str, str] | None = None) -> Path:
    """A /sys tree with the DMI vendor and product and NICs (name -> MAC) given."""
    dmi = base / "sys/class/dmi/id"
    dmi.mkdir(parents=True, exist_ok=True)
    for name, value in (("sys_vendor", vendor), ("product_name", product)):
        if value is not None:
            (dmi / name).write_text(value + "\n")
    for name, mac in (macs or {}).items():
        nic = base / "sys/class/net" / name
        nic.mkdir(parents=True, exist_ok=True)
        (nic / "address").write_text(mac + "\n")
        (nic / "device").mkdir(exist_ok=True)
    return base


@dataclass
class AgentSpec:
    node: str
    sys_root: str = "/"
    queue_size: int = 64
    parallel: int = 1


@dataclass
class Pool(ChildProcess):
    """A process of real agents (see the module's docstring)."""

    url: str
    workdir: Path
    agents: Sequence[AgentSpec]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def start(self) -> Pool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "pool.log"
        spec = self.workdir / "pool.json"
        spec.write_text(json.dumps([{**a.__dict__, "state_dir": str(self.workdir / a.node)}
                                    for a in self.agents]))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.fleet_kit", self.url,
                                          str(spec)], stdout=log, stderr=log, env=env,
                                         cwd=self.workdir)
        return self

    def stop(self) -> None:
        if not self.alive():
            return
        try:
            self.terminate(60)
        except subprocess.TimeoutExpired:
            self.kill()


@contextmanager
def pool(url: str, workdir: Path, agents: Sequence[AgentSpec], api: Any,
         timeout: float = 120.0) -> Iterator[Pool]:
    """Start the agents and wait until the scheduler (`api`) sees every one online."""
    running = Pool(url, workdir, agents).start()
    try:
        wanted = {a.node for a in agents}

        def online() -> bool:
            nodes = api.get("/nodes", online=1)["nodes"]
            return wanted <= {n["node"] for n in nodes}
        assert wait_until(online, timeout, 0.2), f"agents never came online:\n" \
                                                 f"{running.log()[-3000:]}"
        yield running
    finally:
        running.stop()


@contextmanager
def fleet_api(tmp: Path, nodes: Sequence[str]) -> Iterator[Api]:
    """A private Mosquitto, `edgerun serve` on it and one agent per node, all online: the
    scheduler's API client (a module fixture's whole set-up)."""
    broker = Mosquitto(tmp / "mosquitto").start()
    try:
        with running_app(broker.url, tmp) as app:
            client = Api(app.api_url)
            with pool(broker.url, tmp / "agents", [AgentSpec(n) for n in nodes], client):
                yield client
    finally:
        broker.stop()


def main(argv: list[str]) -> int:
    url, spec_path = argv
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(message)s")
    broker = parse_broker_url(url, ("mqtt", "mqtts"))
    specs: list[dict[str, Any]] = json.loads(Path(spec_path).read_text())
    agents = [Agent(AgentConfig(broker=broker, node=s["node"], grace=5.0,
                                state_dir=s["state_dir"], queue_size=s["queue_size"],
                                parallel=s["parallel"]), sys_root=s["sys_root"])
              for s in specs]
    return serve(agents)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
