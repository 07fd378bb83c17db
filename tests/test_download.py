"""The download runner against a real local HTTP server."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgerun.agent import download
from edgerun.agent.outcome import Control
from edgerun.protocol import DownloadTask, State

from .httpkit import PAYLOAD, PAYLOAD_SHA, http_server
from .tlskit import CA


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with http_server() as url:
        yield url


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "backoff_delay", lambda attempt, **_: 0.01)


def fetch(url: str, dest: Path, control: Control | None = None, **kw: object) -> object:
    task = DownloadTask(id="d", url=url, dest=str(dest), **kw)  # type: ignore[arg-type]
    return download.run_download(task, control or Control.for_timeout(30))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_download_verifies_sets_mode_and_renames(base: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "dir" / "file.bin"
    outcome = fetch(f"{base}/file", dest, sha256=PAYLOAD_SHA, mode=0o750)
    assert outcome.state == State.SUCCEEDED
    assert outcome.fields["bytes"] == len(PAYLOAD) and outcome.fields["sha256"] == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD and stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert leftovers(dest.parent) == ["file.bin"]


def test_checksum_mismatch_leaves_nothing(base: str, tmp_path: Path) -> None:
    outcome = fetch(f"{base}/file", tmp_path / "f", sha256="0" * 64)
    assert outcome.state == State.FAILED
    assert outcome.fields["error"].code == "checksum_mismatch"
    assert leftovers(tmp_path) == []


def test_existing_file_is_kept_when_the_replacement_fails(base: str, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_text("old")
    assert fetch(f"{base}/file", dest, sha256="0" * 64).state == State.FAILED
    assert dest.read_text() == "old" and leftovers(tmp_path) == ["f"]


def test_http_errors(base: str, tmp_path: Path) -> None:
    missing = fetch(f"{base}/missing", tmp_path / "f")
    assert missing.fields["error"].code == "download_failed" and "404" in \
        missing.fields["error"].message
    broken = fetch(f"{base}/always-500", tmp_path / "f")
    assert broken.fields["error"].code == "download_failed"
    assert "gave up after 5 attempts" in broken.fields["error"].message
    refused = fetch("http://127.0.0.1:9/x", tmp_path / "f")
    assert refused.fields["error"].code == "download_failed"
    assert leftovers(tmp_path) == []


def test_5xx_is_retried_until_it_works(base: str, tmp_path: Path) -> None:
    outcome = fetch(f"{base}/flaky-1", tmp_path / "f", sha256=PAYLOAD_SHA)
    assert outcome.state == State.SUCCEEDED


def test_transfer_cut_short_is_retried_and_never_left_partial(base: str, tmp_path: Path) -> None:
    outcome = fetch(f"{base}/cut", tmp_path / "f")
    assert outcome.fields["error"].code == "download_failed"
    assert leftovers(tmp_path) == []


def test_max_bytes_with_and_without_content_length(base: str, tmp_path: Path) -> None:
    for path in ("/file", "/no-length"):
        outcome = fetch(f"{base}{path}", tmp_path / "f", max_bytes=1000)
        assert outcome.fields["error"].code == "too_large", path
    assert leftovers(tmp_path) == []


def test_redirects_are_followed_and_checked(base: str, tmp_path: Path) -> None:
    assert fetch(f"{base}/redirect", tmp_path / "ok").state == State.SUCCEEDED
    ftp = fetch(f"{base}/redirect-ftp", tmp_path / "f")
    assert ftp.fields["error"].code == "download_failed" and "ftp" in ftp.fields["error"].message
    loop = fetch(f"{base}/redirect-loop", tmp_path / "f")
    assert "redirects" in loop.fields["error"].message
    assert leftovers(tmp_path) == ["ok"]


def test_symlink_at_dest_is_replaced_not_written_through(base: str, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "d").mkdir()
    link = tmp_path / "d" / "f"
    link.symlink_to(target)
    assert fetch(f"{base}/file", link).state == State.SUCCEEDED
    assert target.read_text() == "keep me" and not link.is_symlink()


def test_dest_that_is_a_directory_fails(base: str, tmp_path: Path) -> None:
    outcome = fetch(f"{base}/file", tmp_path)
    assert outcome.fields["error"].code == "download_failed"


def test_timeout_and_cancel_leave_nothing(base: str, tmp_path: Path) -> None:
    timed = fetch(f"{base}/slow", tmp_path / "f", control=Control.for_timeout(0.3))
    assert timed.state == State.TIMED_OUT and timed.fields["error"].code == "timeout"
    control = Control.for_timeout(60)
    threading.Timer(0.3, control.stop, args=("stop",)).start()
    canceled = fetch(f"{base}/slow", tmp_path / "f", control=control)
    assert canceled.state == State.CANCELED
    assert leftovers(tmp_path) == []


def test_unwritable_directory(base: str, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        locked = Path("/proc/edgerun-nope")  # not even root can write there
    else:
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
    outcome = fetch(f"{base}/file", locked / "f")
    assert outcome.fields["error"].code == "download_failed"


def test_https_verifies_the_server_and_never_retries_a_bad_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CA(tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    with http_server(tls=(str(server.cert), str(server.key))) as base:
        untrusted = fetch(f"{base}/file", tmp_path / "f")
        assert untrusted.fields["error"].code == "download_failed"
        assert "certificate verify failed" in untrusted.fields["error"].message
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.path))
        trusted = fetch(f"{base}/file", tmp_path / "g", sha256=PAYLOAD_SHA)
        assert trusted.state == State.SUCCEEDED
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
        unreadable = fetch(f"{base}/file", tmp_path / "h")
        assert unreadable.fields["error"].code == "download_failed"
        assert "no-such-bundle" in unreadable.fields["error"].message
    assert leftovers(tmp_path) == ["g", "pki"]


def test_failed_attempts_say_why(base: str, tmp_path: Path) -> None:
    refused = fetch("http://127.0.0.1:9/x", tmp_path / "f")
    assert "Connection refused" in refused.fields["error"].message


def test_symlink_planted_at_the_temporary_name_is_never_followed(
        base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file is created with O_EXCL: even an attacker who guesses its name
    and plants a symlink there cannot make the agent write through it."""
    import tempfile
    names = iter(["guessed", "fresh"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    target = tmp_path / "victim"
    target.write_text("keep me")
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / ".f.guessed.part").symlink_to(target)
    outcome = fetch(f"{base}/file", directory / "f", sha256=PAYLOAD_SHA)
    assert outcome.state == State.SUCCEEDED
    assert target.read_text() == "keep me"
    assert (directory / "f").read_bytes() == PAYLOAD
    assert (directory / ".f.guessed.part").is_symlink()  # left alone, not written through


def _bounded(run: Callable[[], object], limit: float = 30.0) -> object:
    """Run a download in a thread; a runner still busy after `limit` s is stuck for good."""
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(run()), daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), "the download ignored its deadline"
    return box[0]


@pytest.mark.parametrize("route", ["/trickle", "/trickle-no-length", "/headers-forever",
                                   "/stall", "/silent"])
def test_deadline_covers_the_whole_transfer(base: str, tmp_path: Path, route: str) -> None:
    outcome = _bounded(lambda: fetch(f"{base}{route}", tmp_path / "f", timeout=1.5,
                                     control=Control.for_timeout(1.5)))
    assert outcome.state == State.TIMED_OUT, outcome  # type: ignore[attr-defined]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("route", ["/trickle", "/headers-forever", "/stall", "/silent"])
def test_cancel_ends_a_misbehaving_transfer(base: str, tmp_path: Path, route: str) -> None:
    control = Control.for_timeout(3600)
    threading.Timer(0.5, control.stop, args=("canceled by request",)).start()
    outcome = _bounded(lambda: fetch(f"{base}{route}", tmp_path / "f", control=control))
    assert outcome.state == State.CANCELED, outcome  # type: ignore[attr-defined]
    assert leftovers(tmp_path) == []
