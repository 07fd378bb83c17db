"""A small client of the scheduler's HTTP API, used by the command line (stdlib only)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from edgerun.errors import EXIT_UNREACHABLE, ConfigError

from .errors import BadRequest, BrokerUnreachable, NotFound, SchedulerError, UnknownNode

CODES: dict[str, type[SchedulerError]] = {
    "bad_request": BadRequest, "unknown_node": UnknownNode, "not_found": NotFound,
    "broker_unreachable": BrokerUnreachable,
}


class ServiceUnreachable(SchedulerError):
    """The scheduler's API did not answer."""

    exit_code = EXIT_UNREACHABLE


class Client:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"bad API URL {url!r}: it must look like http://HOST:PORT")
        try:
            self.host, self.port = parts.hostname, parts.port or 80
        except ValueError as exc:
            raise ConfigError(f"bad API URL {url!r}: {exc}") from None
        self.url, self.timeout = url.rstrip("/"), timeout

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _unreachable(self, exc: BaseException) -> ServiceUnreachable:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ServiceUnreachable(f"cannot reach the edgerun service at {self.url}: {reason} "
                                  f"(is `edgerun serve` running? set --api or EDGERUN_API)")

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None},
                                    doseq=True)
        conn = self._connect(self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            raise SchedulerError(f"{self.url} answered {response.status} with something that "
                                 f"is not JSON: is it an edgerun service?") from None
        if response.status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            code = answer.get("code") if isinstance(answer, dict) else None
            raise CODES.get(str(code), SchedulerError)(message or f"HTTP {response.status}")
        return answer

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body=body)

    def events(self, **query: Any) -> EventStream:
        return EventStream(self, query)


def quoted(part: str) -> str:
    return quote(part, safe="")


class EventStream:
    """`/events`, open once the service greeted: every event after that reaches it."""

    def __init__(self, client: Client, query: dict[str, Any]) -> None:
        self.client = client
        path = "/events?" + urlencode({k: v for k, v in query.items() if v is not None},
                                      doseq=True)
        self._conn = client._connect(None)
        try:
            self._conn.request("GET", path)
            self._response = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise client._unreachable(exc) from None
        if self._response.status != 200:
            raise SchedulerError(f"{client.url}/events answered {self._response.status}")
        hello = self._read()
        if hello is None or hello.get("kind") != "hello":
            raise SchedulerError(f"{client.url}/events did not greet: is it an edgerun service?")

    def _read(self) -> dict[str, Any] | None:
        while True:
            try:
                line = self._response.readline()
            except (OSError, http.client.HTTPException, ValueError):
                return None
            if not line:
                return None
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("kind") != "heartbeat":
                return event

    def __iter__(self) -> Iterator[dict[str, Any]]:
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
