"""Facts that change after the agent came online (a late DHCP lease, a new host name,
here a DMI field) are published as a new retained online status; unchanged ones are not."""

from __future__ import annotations

import threading
from pathlib import Path

from edgerun.agent import config
from edgerun.agent.core import FACTS_CHECK_S, Agent

from .brokers import Mosquitto
from .fleet_kit import make_sys_root
from .mqttkit import Observer


def test_changed_facts_are_published_again(mosquitto: Mosquitto, observer: Observer,
                                           tmp_path: Path) -> None:
    root = make_sys_root(tmp_path / "root", vendor="Before Inc", product="P1",
                         macs={"eth0": "52:54:00:00:00:01"})
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-f",
                       "--state-dir", str(tmp_path / "state")], {}, "")
    agent = Agent(cfg, sys_root=str(root))
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        first = observer.wait("status", node="node-f", state="online")[0]
        assert first["facts"]["dmi"]["vendor"] == "Before Inc"
        # nothing changed: after two checks there is still one online status
        assert not agent.stopping.wait(2 * FACTS_CHECK_S + 1)
        assert len(observer.of("status", node="node-f", state="online")) == 1
        (root / "sys/class/dmi/id/sys_vendor").write_text("After Inc\n")
        statuses = observer.wait("status", timeout=4 * FACTS_CHECK_S, count=2, node="node-f",
                                 state="online")
        assert statuses[-1]["facts"]["dmi"]["vendor"] == "After Inc"
        assert statuses[-1]["facts"]["macs"] == {"eth0": "52:54:00:00:00:01"}
    finally:
        agent.stop()
        thread.join(30)
