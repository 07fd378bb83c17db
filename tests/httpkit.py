"""A real local HTTP server for download tests, with a few misbehaving routes."""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        hits = self.server.hits[self.path]
        if self.path == "/file":
            self._send(PAYLOAD)
        elif self.path == "/no-length":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/missing":
            self.send_error(404)
        elif self.path.startswith("/flaky"):  # 503 twice, then the file
            if hits <= 2:
                self.send_error(503)
            else:
                self._send(PAYLOAD)
        elif self.path == "/always-500":
            self.send_error(500)
        elif self.path == "/redirect":
            self._redirect("/file")
        elif self.path == "/redirect-ftp":
            self._redirect("ftp://127.0.0.1/file")
        elif self.path == "/redirect-loop":
            self._redirect("/redirect-loop")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            for i in range(0, len(PAYLOAD), 4096):
                self.wfile.write(PAYLOAD[i:i + 4096])
                time.sleep(0.05)
        elif self.path in ("/trickle", "/trickle-no-length"):  # a byte every 0.2 s, forever
            self.send_response(200)
            if self.path == "/trickle":
                self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self._dribble(lambda: self.wfile.write(b"x"))
        elif self.path == "/headers-forever":  # the status line, then headers without end
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._dribble(lambda: self.wfile.write(b"X-More: yes\r\n"))
        elif self.path == "/stall":  # headers, then silence with the connection open
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.flush()
            self._dribble(lambda: None)
        elif self.path == "/silent":  # reads the request, never answers
            self._dribble(lambda: None)
        elif self.path == "/cut":  # announces 1 MiB, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _dribble(self, send: Callable[[], object], seconds: float = 120.0) -> None:
        """Keep the connection busy but useless until the client gives up."""
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                send()
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            return

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: dict[str, int]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up mid-body (cancel, timeout, max_bytes) is expected


@contextmanager
def http_server(tls: tuple[str, str] | None = None) -> Iterator[str]:
    """A local server of PAYLOAD and friends; with `tls` (cert, key files), https."""
    server = Server(("127.0.0.1", 0), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.hits = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
