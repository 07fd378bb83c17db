"""A small client of the scheduler's HTTP API /v1, used by the command line (stdlib only).

`Client(url)` sends `Authorization: Bearer` with the token it is given, else
the one in `token_file`, else (for a loopback URL only) the admin token the
local `edgerun serve` wrote on its first start. `https://` URLs are verified
against `ca_file` (or the system's CAs).
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from edgerun.control.errors import (
    BadRequest,
    BrokerUnreachable,
    Conflict,
    Forbidden,
    NotFound,
    SchedulerError,
    Unauthorized,
    UnknownNode,
)
from edgerun.control.tokens import find_token, read_token_file
from edgerun.errors import EXIT_UNREACHABLE, ConfigError

CODES: dict[str, type[SchedulerError]] = {
    "bad_request": BadRequest, "invalid": BadRequest, "bad_json": BadRequest,
    "too_large": BadRequest, "unknown_node": UnknownNode, "not_found": NotFound,
    "conflict": Conflict, "ambiguous": Conflict, "broker_unreachable": BrokerUnreachable,
    "unauthorized": Unauthorized, "forbidden": Forbidden,
}
PREFIX = "/v1"
RETRY_PAUSES_S = (0.2, 0.6, 1.2)  # between the attempts of one call: 4 in about 2 s
log = logging.getLogger(__name__)


class ServiceUnreachable(SchedulerError):
    """The scheduler's API did not answer."""

    exit_code = EXIT_UNREACHABLE


class TlsFailed(ServiceUnreachable):
    """The TLS handshake failed: sending again would fail the same way."""


class Client:
    def __init__(self, url: str, timeout: float = 30.0, token: str | None = None,
                 token_file: str | None = None, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"bad API URL {url!r}: it must look like http://HOST:PORT or "
                              f"https://HOST:PORT")
        try:
            default = 443 if parts.scheme == "https" else 80
            self.host, self.port = parts.hostname, parts.port or default
        except ValueError as exc:
            raise ConfigError(f"bad API URL {url!r}: {exc}") from None
        self.url, self.timeout = url.rstrip("/"), timeout
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self.tls = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot read the API CA file {ca_file}: {exc}") from None
        if token is None and token_file:
            token = read_token_file(token_file)
            if token is None:
                raise ConfigError(f"cannot read a token from {token_file}")
        self._token = token
        self.invocation = uuid.uuid4().hex  # the stem of this invocation's idempotency keys
        self._posts = 0

    @property
    def token(self) -> str | None:
        """The token given, else the local serve's (read at each request: a client made
        before the service started finds it once it has)."""
        return self._token or find_token(self.host, self.port)

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self, body: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _unreachable(self, exc: BaseException) -> ServiceUnreachable:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ServiceUnreachable(f"cannot reach the edgerun service at {self.url}: {reason} "
                                  f"(is `edgerun serve` running? set --api or EDGERUN_API)")

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        """One API call. A POST carries an Idempotency-Key (this invocation's, numbered),
        so that it, like every other call, can be sent again after a timeout, a lost
        connection or a 503 (a broker failover): the service answers a repeat with the
        first answer instead of doing the work twice."""
        path = PREFIX + path
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None},
                                    doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers(data is not None)
        if method == "POST":
            self._posts += 1
            headers["Idempotency-Key"] = f"{self.invocation}-{self._posts}"
        for attempt, pause in enumerate((*RETRY_PAUSES_S, None)):
            try:
                status, raw = self._send(method, path, data, headers)
            except ServiceUnreachable as exc:
                if pause is None or isinstance(exc, TlsFailed):
                    raise
                log.debug("attempt %d of %s %s failed; again in %.1f s", attempt + 1, method,
                          path, pause)
                time.sleep(pause)
                continue
            if status == 503 and pause is not None:
                time.sleep(pause)
                continue
            break
        return self._answer(status, raw)

    def _send(self, method: str, path: str, data: bytes | None,
              headers: dict[str, str]) -> tuple[int, bytes]:
        conn = self._connect(self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except ssl.SSLError as exc:
            raise TlsFailed(f"TLS with {self.url} failed: {exc.reason or exc} "
                                     f"(give the API's CA with --api-ca-file)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            conn.close()

    def _answer(self, status: int, raw: bytes) -> Any:
        try:
            answer = json.loads(raw)
        except ValueError:
            raise SchedulerError(f"{self.url} answered {status} with something that "
                                 f"is not JSON: is it an edgerun service?") from None
        if status >= 400:
            raise error_of(status, answer)
        return answer

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def nodes(self, **query: Any) -> list[dict[str, Any]]:
        """Every node the query matches, following the pages' cursors."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.get("/nodes", **query, limit=1000, cursor=cursor)
            out.extend(page["nodes"])
            cursor = page.get("next")
            if not cursor:
                return out

    def events(self, **query: Any) -> EventStream:
        return EventStream(self, query)


def error_of(status: int, answer: Any) -> SchedulerError:
    message = answer.get("error") if isinstance(answer, dict) else None
    code = answer.get("code") if isinstance(answer, dict) else None
    text = message or f"HTTP {status}"
    if isinstance(answer, dict) and answer.get("candidates"):
        text += " (" + ", ".join(str(c) for c in answer["candidates"]) + ")"
    if code == "unauthorized":
        text += "; give --token, EDGERUN_TOKEN or --token-file"
    return CODES.get(str(code), SchedulerError)(text)


def quoted(part: str) -> str:
    return quote(part, safe="")


class EventStream:
    """`/v1/events` (Server-Sent Events), open once the service said hello: every event
    after that reaches it. Yields each event's JSON with its `_id` (the SSE id)."""

    def __init__(self, client: Client, query: dict[str, Any],
                 last_event_id: int | None = None) -> None:
        self.client = client
        self.last_id: int | None = last_event_id
        path = PREFIX + "/events?" + urlencode(
            {k: v for k, v in query.items() if v is not None}, doseq=True)
        headers = client._headers()
        headers["Accept"] = "text/event-stream"
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self._conn = client._connect(None)
        try:
            self._conn.request("GET", path, headers=headers)
            self._response = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise client._unreachable(exc) from None
        if self._response.status != 200:
            try:
                answer = json.loads(self._response.read())
            except ValueError:
                answer = None
            raise error_of(self._response.status, answer)
        self.backlog: list[dict[str, Any]] = []
        while True:  # the resumed backlog (if any) comes before the hello
            event = self._read()
            if event is None:
                raise SchedulerError(f"{client.url}/v1/events did not greet: is it an "
                                     f"edgerun service?")
            if event.get("kind") == "hello":
                break
            self.backlog.append(event)

    def _read(self) -> dict[str, Any] | None:
        event_id: int | None = None
        data: list[str] = []
        while True:
            try:
                line = self._response.readline()
            except (OSError, http.client.HTTPException, ValueError):
                return None
            if not line:
                return None
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith(":"):
                continue
            if text == "":
                if not data:
                    continue
                try:
                    event = json.loads("\n".join(data))
                except ValueError:
                    event_id, data = None, []
                    continue
                if event_id is not None:
                    self.last_id = event_id
                if isinstance(event, dict):
                    event["_id"] = event_id
                    return event
                event_id, data = None, []
                continue
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id" and value.isdigit():
                event_id = int(value)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.backlog:
            yield self.backlog.pop(0)
        while True:
            event = self._read()
            if event is None:
                return
            yield event

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass
