"""The wheel as a new user gets it: built from this tree, installed WITHOUT extras into a
fresh venv, each console script run for real.

The base install is the agent and the `edgerun` client; `edgerun serve`, `edgerun keygen`
and `edgerun-bridge` name the extra they need in one line and exit 2. Needs PyPI (or pip's
cache) for the build backend and the two base dependencies, paho-mqtt and requests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgerun import __version__

from .mqttkit import ROOT

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    work: Path
    build_log: str


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGERUN_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    # a copy, so that the build writes nothing (build/, *.egg-info) into the shared tree
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "edgerun", src / "edgerun",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                  "-w", str(tmp / "dist"), str(src)], tmp)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    [wheel] = (tmp / "dist").glob("edgerun-*.whl")
    made = _run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    assert made.returncode == 0, made.stderr
    venv_bin = tmp / "venv" / "bin"
    pip = _run([str(venv_bin / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                str(wheel)], tmp)
    assert pip.returncode == 0, f"installing the wheel failed:\n{pip.stdout}\n{pip.stderr}"
    work = tmp / "work"
    work.mkdir()
    yield Installed(wheel, venv_bin, work, built.stdout + built.stderr)


def script(inst: Installed, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([str(inst.bin / name), *args], inst.work, timeout=60)


def one_line(text: str, prog: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text
    assert "Traceback" not in text
    return lines[0]


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_wheel_holds_edgerun_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = zf.namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"edgerun", f"edgerun-{__version__}.dist-info"}, top
    for part in ("agent", "bridge", "scheduler", "protocol"):
        assert f"edgerun/{part}/__init__.py" in names
    for kind in ("sqlite", "postgresql"):  # the store's named queries, package data
        assert f"edgerun/scheduler/store/sql/{kind}.sql" in names
    assert "SetuptoolsDeprecationWarning" not in installed.build_log


def test_no_extra_is_installed(installed: Installed) -> None:
    for module in ("pika", "amqtt", "prometheus_client", "cryptography"):
        done = _run([str(installed.bin / "python"), "-c", f"import {module}"], installed.work)
        assert done.returncode != 0, f"{module} is installed in the base venv"


def test_the_client_works_without_extras(installed: Installed) -> None:
    helped = script(installed, "edgerun", "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("nodes", "run", "download", "tasks", "show", "cancel", "job", "serve"):
        assert command in helped.stdout
    assert script(installed, "edgerun", "--version").stdout.strip() == f"edgerun {__version__}"
    url = dead_url()
    for args in (["nodes"], ["tasks"], ["show", "t1"], ["cancel", "t1"],
                 ["run", "n1", "--", "true"], ["download", "n1", "http://127.0.0.1/x", "/tmp/x"]):
        done = script(installed, "edgerun", args[0], "--api", url, *args[1:])
        assert done.returncode == 4, (args, done.stderr)
        assert "cannot reach" in one_line(done.stderr, "edgerun") and url in done.stderr
    job = script(installed, "edgerun", "job", "no-such-job.toml", "--api", url)
    assert job.returncode == 2 and "no-such-job.toml" in one_line(job.stderr, "edgerun")


@pytest.mark.parametrize("prog,args,extra", [
    ("edgerun", ["serve"], "scheduler"),
    ("edgerun", ["serve", "--embedded-broker", "127.0.0.1:0"], "scheduler"),
    ("edgerun", ["keygen"], "scheduler"),
    ("edgerun-bridge", [], "bridge"),
    ("edgerun-bridge", ["--mqtt", "mqtt://127.0.0.1:1", "--amqp", "amqp://127.0.0.1:2"], "bridge"),
])
def test_commands_needing_an_extra_name_it(installed: Installed, prog: str, args: list[str],
                                           extra: str) -> None:
    done = script(installed, prog, *args)
    assert done.returncode == 2, done.stderr
    assert f"pip install 'edgerun[{extra}]'" in one_line(done.stderr, prog)
    assert done.stdout == "" and not list(installed.work.iterdir())  # keygen wrote nothing


def test_the_agent_runs_from_the_base_install(installed: Installed) -> None:
    helped = script(installed, "edgerun-agent", "--help")
    assert helped.returncode == 0 and "--broker" in helped.stdout, helped.stderr
    version = script(installed, "edgerun-agent", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"edgerun-agent {__version__}"
    bad = script(installed, "edgerun-agent", "--broker", "ftp://x")
    assert bad.returncode == 2 and "bad broker URL" in one_line(bad.stderr, "edgerun-agent")
