"""Signed tasks end to end: `edgerun keygen`, a scheduler that signs, agents that verify."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from edgerun.cli.main import main as cli_main

from .brokers import Mosquitto
from .mqttkit import ROOT
from .scheduler_kit import Api, running_app, start_agent


def keygen(directory: Path) -> tuple[Path, Path]:
    prefix = directory / "task"
    done = subprocess.run([sys.executable, "-m", "edgerun.scheduler", "keygen",
                           "--out", str(prefix)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "edgerun.public_key=" in done.stdout
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


def test_keygen_writes_a_private_and_a_public_key_and_never_overwrites(tmp_path: Path,
                                                                        capsys) -> None:
    private, public = keygen(tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert len(public.read_text().strip()) == 44
    assert cli_main(["keygen", "--out", str(tmp_path / "task")]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_signing_scheduler_drives_verifying_agents(mosquitto: Mosquitto,
                                                     tmp_path: Path) -> None:
    private, public = keygen(tmp_path)
    with running_app(mosquitto.url, tmp_path, private_key=str(private)) as signing, \
            running_app(mosquitto.url, tmp_path) as unsigned:
        api, other = Api(signing.api_url), Api(unsigned.api_url)
        agent = start_agent(mosquitto.url, "node-sig", tmp_path, "--public-key", str(public))
        api.wait_node("node-sig")
        api.dispatch(["node-sig"], {"id": "signed-task", "type": "shell", "command": "echo ok"})
        done = api.wait_state("signed-task", "node-sig", "succeeded")
        assert done["result"]["stdout"] == "ok\n"
        # a scheduler without the key is refused, and says why
        other.dispatch(["node-sig"], {"id": "unsigned-task", "type": "shell", "command": "true"})
        refused = other.wait_state("unsigned-task", "node-sig", "rejected")
        assert refused["error"]["code"] == "bad_signature"
        # cancels are signed too
        api.dispatch(["node-sig"], {"id": "long", "type": "shell", "command": "sleep 30"})
        api.wait_state("long", "node-sig", "running")
        api.post("/tasks/long/cancel", {})
        assert api.wait_state("long", "node-sig", "canceled")["state"] == "canceled"
        assert agent.terminate() == 0


def test_a_bad_private_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    done = subprocess.run([sys.executable, "-m", "edgerun.scheduler", "serve", "--embedded-broker",
                           "127.0.0.1:0", "--db", str(tmp_path / "db"), "--listen",
                           "127.0.0.1:0", "--private-key", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "private key" in done.stderr and "Traceback" not in done.stderr
