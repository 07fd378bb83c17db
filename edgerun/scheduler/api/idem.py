"""`Idempotency-Key` on the API's POSTs (issue 23): a retry with the same key and body
gets the first answer again, on any instance sharing the store; the same key with
another request gets 409 naming the key. The rows live in store/idempotency.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from edgerun.scheduler.api import edge
from edgerun.scheduler.api.handlers import ApiError
from edgerun.scheduler.store.idempotency import Idempotency, InProgress, KeyReused, fingerprint

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

HEADER = "Idempotency-Key"
MAX_KEY = 255
WAIT_S = 10.0  # how long a retry waits for the first request with its key to answer
POLL_S = 0.05


def key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        raise edge.Invalid(HEADER, f"`{HEADER}` must be 1 to {MAX_KEY} printable ASCII "
                                   f"characters, such as a UUID")
    return key


async def once(keys: Idempotency, owner: str, key: str, request: Request, payload: object,
               work: Callable[[], Awaitable[Response]]) -> Response:
    """The answer of `work`, or the one kept for `key` when it ran already."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    print_ = fingerprint(request.method, request.url.path, payload)
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            kept = await run_in_threadpool(keys.begin, owner, key, print_)
            break
        except KeyReused:
            raise ApiError(409, "idempotency_key_reused",
                           f"the {HEADER} {key!r} was used with another request; send a "
                           f"new key for a new request", key=key) from None
        except InProgress:
            if time.monotonic() > deadline:
                raise ApiError(409, "idempotency_key_in_progress",
                               f"a request with {HEADER} {key!r} is still running; retry "
                               f"later", key=key) from None
            await asyncio.sleep(POLL_S)
    if kept is not None:
        return Response(kept.body.encode("utf-8"), status_code=kept.status,
                        media_type="application/json",
                        headers={"Cache-Control": "no-store", "Idempotent-Replayed": "true"})
    try:
        response = await work()
    except BaseException:
        await run_in_threadpool(keys.abandon, owner, key)
        raise
    body = bytes(response.body).decode("utf-8")
    await run_in_threadpool(keys.finish, owner, key, response.status_code, body)
    return response
