"""Run a download task: stream to a temporary file beside `dest`, verify, rename.

`requests` is imported on the first download, never at idle. Redirects are
followed by hand so every hop is checked (http and https only). Connection
errors and 5xx answers are retried with back-off; any failure removes the
temporary file, so nothing partial is ever left at `dest`.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import socket
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

from edgerun.backoff import backoff_delay
from edgerun.protocol import DownloadTask, ErrorCode, State, check_url

from .outcome import Control, Outcome, failure

if TYPE_CHECKING:
    import requests

RETRIES = 4            # further attempts after the first, on connection errors and 5xx
MAX_REDIRECTS = 10
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
BLOCK = 64 * 1024
DEFAULT_MODE = 0o644


class _Stop(Exception):
    """End this download with the outcome it carries."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.state)
        self.outcome = outcome


class _Retry(Exception):
    """A failure worth another attempt (connection error, 5xx)."""


class _Watch:
    """Ends a transfer at its deadline or cancel, whatever the server does.

    Socket timeouts bound one read, not a transfer: a server that sends a byte a
    second, or headers without end, never trips them. This thread shuts the
    transfer's sockets down instead; the blocked read then fails at once and the
    runner reports the timeout or the cancel."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.conns: list[Any] = []
        self.done = threading.Event()
        self.fired = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="download-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.1):
            if self.control.cancel.is_set() or time.monotonic() >= self.control.deadline:
                with self._lock:
                    self.fired = True
                    conns = list(self.conns)
                for conn in conns:
                    _shut(conn)
                return

    def add(self, conn: Any) -> None:
        with self._lock:
            self.conns.append(conn)

    def connected(self, conn: Any) -> None:
        """Hold the connected socket itself: http.client hands it to the response and
        clears `conn.sock` when the server will close the connection after the body."""
        with self._lock:
            if conn.sock is not None:
                self.conns.append(conn.sock)
            fired = self.fired
        if fired:
            _shut(conn)

    def close(self) -> None:
        self.done.set()


def _shut(conn: Any) -> None:
    sock = conn if isinstance(conn, socket.socket) else getattr(conn, "sock", None)
    if sock is not None:
        try:  # the plain socket's shutdown, also under TLS: it only wakes the reader
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _session(watch: _Watch) -> requests.Session:
    """A requests session whose connections the watch can end."""
    import requests
    from urllib3 import connection, connectionpool

    class Conn(connection.HTTPConnection):
        def connect(self) -> None:
            watch.add(self)
            super().connect()
            watch.connected(self)

    class TLSConn(connection.HTTPSConnection):
        def connect(self) -> None:
            watch.add(self)
            super().connect()
            watch.connected(self)

    class Pool(connectionpool.HTTPConnectionPool):
        ConnectionCls = Conn

    class TLSPool(connectionpool.HTTPSConnectionPool):
        ConnectionCls = TLSConn

    session = requests.Session()
    for prefix in ("http://", "https://"):
        adapter = session.get_adapter(prefix)
        adapter.poolmanager.pool_classes_by_scheme = {  # type: ignore[attr-defined]
            "http": Pool, "https": TLSPool}
    return session


def _import_requests() -> None:
    """requests, on the first download only (it keeps the idle agent small). The frozen
    agent leaves out charset_normalizer, which only guesses text encodings; requests
    warns about that on import."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to find acceptable character")
        import requests  # noqa: F401


def run_download(task: DownloadTask, control: Control) -> Outcome:
    _import_requests()

    started = time.monotonic()
    watch = _Watch(control)
    session = _session(watch)
    attempt = 0
    try:
        _prepare_dir(task.dest)
        while True:
            try:
                size, digest = _attempt(session, task, control)
                break
            except _Retry as exc:
                if attempt >= RETRIES:
                    raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                        f"{exc} (gave up after {attempt + 1} attempts)")) from None
                delay = backoff_delay(attempt, base=0.5, cap=10.0)
                attempt += 1
                _check(control, task, until=time.monotonic() + delay)
                if control.cancel.wait(delay):
                    _check(control, task)
    except _Stop as stop:
        stop.outcome.fields["duration_s"] = round(time.monotonic() - started, 3)
        return stop.outcome
    finally:
        watch.close()
        session.close()
    return Outcome(State.SUCCEEDED, {"bytes": size, "sha256": digest, "dest": task.dest,
                                     "duration_s": round(time.monotonic() - started, 3)})


def _check(control: Control, task: DownloadTask, until: float | None = None) -> None:
    """Raise _Stop when the task was canceled or its deadline is (or will be) past."""
    if control.cancel.is_set():
        raise _Stop(failure(ErrorCode.CANCELED, control.why or "canceled", state=State.CANCELED))
    if (until or time.monotonic()) >= control.deadline:
        raise _Stop(failure(ErrorCode.TIMEOUT, f"the download did not finish within "
                            f"{task.timeout:g} s", state=State.TIMED_OUT))


def _prepare_dir(dest: str) -> None:
    parent = posixpath.dirname(dest)
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                            f"cannot create the directory {parent}: {exc.strerror}")) from None
    if os.path.isdir(dest):
        raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED, f"{dest} is a directory"))


def _open(session: requests.Session, task: DownloadTask, control: Control) -> Any:
    import requests

    url = task.url
    for _ in range(MAX_REDIRECTS + 1):
        _check(control, task)
        left = control.deadline - time.monotonic()
        read_timeout = max(0.5, min(READ_TIMEOUT, left))
        try:
            response = session.get(url, stream=True, allow_redirects=False,
                                   timeout=(max(0.5, min(CONNECT_TIMEOUT, left)), read_timeout))
        except requests.exceptions.SSLError as exc:  # not transient: no retry
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                f"TLS with {url} failed: {_reason(exc)}")) from None
        except requests.RequestException as exc:
            _check(control, task)
            raise _Retry(f"cannot reach {url}: {_reason(exc)}") from None
        except OSError as exc:  # a CA bundle that cannot be read, say
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                f"cannot download {url}: {exc}")) from None
        if not response.is_redirect:
            return response
        target = urljoin(url, response.headers.get("location", ""))
        response.close()
        problem = check_url(target)
        if problem:
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                f"{url} redirects to {target[:200]}: {problem}"))
        url = target
    raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED, f"more than {MAX_REDIRECTS} redirects"))


def _attempt(session: requests.Session, task: DownloadTask, control: Control) -> tuple[int, str]:
    import requests

    response = _open(session, task, control)
    with response:
        if response.status_code >= 500:
            raise _Retry(f"the server answered {response.status_code} {response.reason}")
        if response.status_code >= 400:
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED, f"the server answered "
                                f"{response.status_code} {response.reason} for {task.url}"))
        announced = response.headers.get("content-length", "")
        if task.max_bytes and announced.isdigit() and int(announced) > task.max_bytes:
            raise _Stop(failure(ErrorCode.TOO_LARGE, f"the file is {announced} bytes; "
                                f"max_bytes is {task.max_bytes}"))
        directory, name = posixpath.split(task.dest)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name[:100]}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                f"cannot write in {directory}: {exc.strerror}")) from None
        try:
            size, digest = _stream(response, fd, task, control)
            if task.sha256 and digest != task.sha256:
                raise _Stop(failure(ErrorCode.CHECKSUM_MISMATCH, f"sha256 of the download is "
                                    f"{digest}, expected {task.sha256}", sha256=digest,
                                    bytes=size))
            os.fchmod(fd, task.mode if task.mode is not None else DEFAULT_MODE)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, task.dest)
            tmp = ""
            _fsync_dir(directory)
            return size, digest
        except requests.RequestException as exc:
            _check(control, task)
            raise _Retry(f"the transfer from {task.url} broke off: {_reason(exc)}") from None
        except OSError as exc:
            _check(control, task)
            raise _Stop(failure(ErrorCode.DOWNLOAD_FAILED,
                                f"cannot write {task.dest}: {exc.strerror}")) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp:
                _unlink(tmp)


def _stream(response: Any, fd: int, task: DownloadTask, control: Control) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    for block in response.iter_content(BLOCK):
        _check(control, task)
        size += len(block)
        if task.max_bytes and size > task.max_bytes:
            raise _Stop(failure(ErrorCode.TOO_LARGE, f"the download passed max_bytes "
                                f"({task.max_bytes}) and was stopped"))
        hasher.update(block)
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view):]
    _check(control, task)  # a body cut off by the watch ends like a read that failed
    return size, hasher.hexdigest()


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests error, in one line (urllib3 nests them deeply)."""
    while exc.__context__ is not None and exc.__cause__ is None:
        exc = exc.__context__
    text = str(exc.args[0] if exc.args else exc)
    verify = "certificate verify failed"
    # "... certificate verify failed: unable to get local issuer certificate (_ssl.c:992)')"
    if verify in text:
        detail = text.split(verify, 1)[1].strip(" :(").split(" (_ssl")[0].rstrip(" )'\"")
        return f"{verify}: {detail}" if detail else verify
    for marker in ("Connection refused", "Name or service not known", "timed out",
                   "Connection reset"):
        if marker in text:
            return marker
    return f"{type(exc).__name__}: {text[:160]}"


def _fsync_dir(directory: str) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
