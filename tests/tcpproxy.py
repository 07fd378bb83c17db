"""A TCP proxy whose connections a test can cut at once, as pika's own tests do.

Cutting is far quicker than killing a broker, so a test can drop one
connection many times in the middle of a flow. The proxy keeps accepting, so
clients reconnect through it.
"""

from __future__ import annotations

import socket
import threading

from .brokers import free_port


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.port = free_port()
        self._listener = socket.create_server((host, self.port))
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        self.cuts = 0
        # while set, every byte is dropped in both directions and the connections stay
        # open: a stalled broker or a dead link, rather than a cut one
        self.swallowing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tcpproxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    def url(self, scheme: str, credentials: str = "") -> str:
        return f"{scheme}://{credentials}{self.target[0]}:{self.port}/"

    def connections(self) -> int:
        with self._lock:
            return len(self._open) // 2

    def cut(self) -> None:
        """Drop every connection through the proxy, both sides, at once."""
        with self._lock:
            doomed, self._open = self._open, []
            self.cuts += 1
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.swallowing.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._open = [s for s in self._open if s not in (src, dst)]
