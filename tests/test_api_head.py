"""A request head over 16 KiB gets a JSON 431 (the API answers every bad request in
JSON; uvicorn's own answer to it was a plain-text 400), whether it comes in one piece or
many; a head just under the limit is served; the server goes on serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from edgerun.scheduler.api.deadline import MAX_HEAD_BYTES

from .apikit import Stack, stack


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("head"), node="hd-agent") as st:
        yield st


def exchange(s: Stack, head: bytes, chunk: int = 1 << 20) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        try:
            for i in range(0, len(head), chunk):
                sock.sendall(head[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the rest went: the answer is still there to read
        data = b""
        while True:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            data += got
            if b"\r\n\r\n" in data:
                top, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in top.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def head_of(size: int, token: str) -> bytes:
    start = f"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    pad = size - len(start) - len("X-Pad: \r\n\r\n")
    return (start + "X-Pad: " + "a" * pad + "\r\n\r\n").encode()


@pytest.mark.parametrize("size, chunk", [(MAX_HEAD_BYTES + 1, 1 << 20), (20_000, 1 << 20),
                                         (200_000, 4096), (1_000_000, 1 << 20),
                                         (MAX_HEAD_BYTES + 1, 7)])
def test_a_head_too_large_gets_a_json_431(s: Stack, size: int, chunk: int) -> None:
    status, headers, body = exchange(s, head_of(size, s.viewer), chunk)
    assert status == 431, (status, body[:200])
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "head_too_large"


def test_a_head_at_the_limit_is_served_and_so_is_the_next_client(s: Stack) -> None:
    status, _, body = exchange(s, head_of(MAX_HEAD_BYTES, s.viewer))
    assert status == 200, body[:300]
    assert s.http("GET", "/v1/health", s.viewer).status == 200


def test_a_head_that_ends_without_its_blank_line_past_the_limit(s: Stack) -> None:
    no_end = b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"b" * (MAX_HEAD_BYTES + 10)
    status, _, body = exchange(s, no_end)
    assert status == 431 and json.loads(body)["code"] == "head_too_large"
