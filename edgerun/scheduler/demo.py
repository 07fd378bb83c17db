"""`./build.sh demo`: the whole system on this machine with nothing but Python.

Starts the embedded MQTT broker, the scheduler service and one real agent
process, then uses the `edgerun` command to run a shell command, a download
(from a local HTTP server, checksum verified), a failing command and one that
times out; shows live output and the final table, and checks every outcome.
Exit code 0 when all came out as expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgerun.cli.main import main as edgerun
from edgerun.scheduler.app import App
from edgerun.scheduler.settings import ServeSettings

NODE = "demo-1"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(api: str, *args: str) -> int:
    print("$ edgerun " + " ".join(shlex.quote(a) for a in args), flush=True)
    with contextlib.redirect_stderr(sys.stdout):  # keep the story in order when piped
        code = edgerun([*args[:1], "--api", api, *args[1:]])
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"(exit code {code})", flush=True)
    return code


@contextlib.contextmanager
def file_server(directory: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def agent(broker: str, state_dir: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerun.agent", "--broker", broker, "--node", NODE,
             "--state-dir", str(state_dir), "--grace", "2"],
            stdout=log, stderr=log, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_online(app: App, timeout: float) -> bool:
    assert app.service is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if NODE in app.service.store.online_nodes():
            return True
        app.stopped.wait(0.05)
    return False


def wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
    print("stopping the agent, the scheduler and the broker", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in args if a != "--keep"]
    if unknown:
        print(f"demo: unknown argument {unknown[0]!r} (only --keep)", file=sys.stderr)
        return 2
    keep = "--keep" in args
    logging.basicConfig(level=logging.WARNING, format="  [service] %(levelname)s %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgerun-demo-") as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        payload = os.urandom(256 * 1024)
        (work / "www" / "firmware.bin").write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        dest = work / "node" / "firmware.bin"
        dest.parent.mkdir()

        say("starting the embedded MQTT broker, the scheduler and one agent")
        app = App(ServeSettings(embedded_broker="127.0.0.1:0", listen="127.0.0.1:0",
                                db=str(work / "scheduler.db"), grace=2.0, tick=0.2,
                                default_expiry=600.0, client_id="edgerun-demo")).start()
        try:
            assert app.embedded is not None
            print(f"broker {app.embedded.url}, API {app.api_url}, store {work / 'scheduler.db'}")
            print(f"console: {app.api_url}/   token: {app.admin_token}", flush=True)
            with agent(app.embedded.url, work / "agent", work / "agent.log") as proc, \
                    file_server(work / "www") as www:
                if not wait_online(app, 20):
                    print(f"demo: the agent never came online (exit {proc.poll()}); its log:\n"
                          + (work / "agent.log").read_text(errors="replace")[-2000:])
                    return 1
                outcomes = steps(app.api_url, www, digest, dest)
                if keep:
                    say("--keep: the console stays up until Ctrl-C")
                    print(f"console: {app.api_url}/\ntoken:   {app.admin_token}\n"
                          f"CLI:     edgerun --api {app.api_url} nodes  (this user finds "
                          f"the token by itself)", flush=True)
                    wait_for_interrupt()
        finally:
            app.stop()
        say("outcomes")
        width = max(len(name) for name, _ok in outcomes)
        for name, ok in outcomes:
            print(f"{name.ljust(width)}  {'as expected' if ok else 'NOT AS EXPECTED'}")
        elapsed = time.monotonic() - started
        failed = [name for name, ok in outcomes if not ok]
        print(f"\ndemo {'passed' if not failed else 'FAILED'} in {elapsed:.1f} s")
        return 0 if not failed else 1


def steps(api: str, www: str, digest: str, dest: Path) -> list[tuple[str, bool]]:
    outcomes = []
    say("the node registry, from the agent's retained status")
    outcomes.append(("nodes lists demo-1", run(api, "nodes") == 0))

    say("a shell command, with live output prefixed by node")
    code = run(api, "run", NODE, "--", "sh", "-c",
               "for i in 1 2 3; do echo \"step $i of 3\"; sleep 0.3; done; uname -s")
    outcomes.append(("shell command succeeded (exit 0)", code == 0))

    say("a download from a local HTTP server, its SHA-256 checked on the node")
    code = run(api, "download", NODE, f"{www}/firmware.bin", str(dest), "--sha256", digest,
               "--mode", "0644")
    ok = code == 0 and dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    outcomes.append(("download succeeded, checksum matches", ok))

    say("a failing command: edgerun exits with the remote exit code")
    code = run(api, "run", NODE, "--", "sh", "-c", 'echo "disk check failed" >&2; exit 3')
    outcomes.append(("failing command exited 3", code == 3))

    say("a command that outlives its timeout: killed on the node, exit 124")
    code = run(api, "run", NODE, "--timeout", "1", "--", "sleep", "30")
    outcomes.append(("timed out (exit 124)", code == 124))

    say("every task, as recorded in the scheduler's store")
    outcomes.append(("tasks table", run(api, "tasks") == 0))
    return outcomes


if __name__ == "__main__":
    sys.exit(main())
