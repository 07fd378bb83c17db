"""What the store's parts (nodes.py, jobreads.py, tokens.py, eventlog.py) use of the
store they are mixed into (`tasks.Store`): its reads and its transactions."""

from __future__ import annotations

import json
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgerun.scheduler.store.db import Database
    from edgerun.scheduler.store.tx import Tx


class StoreParts:
    """The base of the store's parts: `read` and `transaction` are `tasks.Store`'s."""

    if TYPE_CHECKING:
        _local: threading.local
        _touched: dict[str, float]

        def read(self) -> AbstractContextManager[Database]: ...
        def transaction(self) -> AbstractContextManager[Tx]: ...


def json_or_none(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None
