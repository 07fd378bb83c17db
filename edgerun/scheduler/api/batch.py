"""POST /v1/task-batches: many distinct tasks in one request, all or nothing.

A workflow engine or a work queue submits many tasks that differ (each its own command
or input), as River's InsertMany or procrastinate's batch defer do; one POST per task
costs the HTTP round trip each time. Each item of a batch is exactly a POST /v1/tasks
body. Every item is read, checked by the contract's parser and its globs, --online and
--where resolved to nodes first; then all are stored in one store transaction (one
commit), node ids looked up as they are stored. A bad item refuses the whole batch with
the item's field path (`tasks.3.task.command`), an unknown node or a taken id rolls the
transaction back: nothing is created."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from edgerun.control.errors import BadRequest, Conflict, UnknownNode
from edgerun.control.retries import check_room, parse_retry
from edgerun.protocol import JSONObject
from edgerun.scheduler.api import edge
from edgerun.scheduler.api.auth import Principal
from edgerun.scheduler.api.handlers import Handlers
from edgerun.scheduler.fleet.targets import is_glob, is_mac, parse_wheres
from edgerun.scheduler.store.events import without_tails
from edgerun.scheduler.store.records import TaskRow

log = logging.getLogger(__name__)

MAX_ITEMS = 1000  # items in one batch (the OpenAPI document's maxItems says the same)
# tasks one batch may make, its items' targets resolved: one transaction stays bounded
# (a fan-out to more nodes goes as POST /v1/tasks)
MAX_TASKS = 10_000
KEYS = ("tasks",)


@dataclass(frozen=True)
class Item:
    """One checked item: a POST /v1/tasks body, its targets resolved to node ids."""

    index: int
    nodes: list[str]
    spec: JSONObject
    retry: Any


def within(prefix: str, exc: edge.Invalid) -> edge.Invalid:
    """`exc` of an item's body, its field and message placed under the item's path."""
    field = f"{prefix}.{exc.field}" if exc.field != "body" else prefix
    message = str(exc).replace(f"`{exc.field}`", f"`{field}`", 1)
    if f"`{field}`" not in message:
        message = f"`{prefix}`: {message}"
    return edge.Invalid(field, message)


def items_of(body: JSONObject) -> list[Any]:
    """The body's `tasks`: a list of 1 to MAX_ITEMS items (not yet checked)."""
    edge.check_keys(body, KEYS, "a task batch")
    raw = body.get("tasks")
    if not isinstance(raw, list):
        raise edge.Invalid("tasks", "`tasks` must be a list of POST /v1/tasks bodies "
                                    "({\"targets\": [...], \"task\": {...}})")
    if not raw:
        raise edge.Invalid("tasks", "`tasks` must hold at least one item")
    if len(raw) > MAX_ITEMS:
        raise edge.Invalid("tasks", f"`tasks` holds {len(raw)} items; a batch takes at most "
                                    f"{MAX_ITEMS} (send several batches)")
    return raw


class Batches:
    """The work of POST /v1/task-batches, beside the other routes' (handlers.py)."""

    def __init__(self, h: Handlers) -> None:
        self.h = h
        self.service = h.service

    def check(self, index: int, raw: Any) -> Item:
        """One item as POST /v1/tasks checks its body, and its targets resolved (a glob, a
        MAC address, --online, --where) or, node ids, taken as they are; errors name
        the item's fields."""
        prefix = f"tasks.{index}"
        if not isinstance(raw, dict):
            raise edge.Invalid(prefix, f"`{prefix}` must be an object: a POST /v1/tasks "
                                       f"body ({{\"targets\": [...], \"task\": {{...}}}})")
        try:
            targets, online, spec = edge.dispatch_body(raw)
        except edge.Invalid as exc:
            raise within(prefix, exc) from None
        self.h.check_spec(spec, f"{prefix}.task")
        where, retry = raw.get("where"), raw.get("retry")
        try:
            wheres = parse_wheres(where)
        except BadRequest as exc:
            raise within(prefix, edge.Invalid(edge.field_of(str(exc), "where"),
                                              str(exc))) from None
        try:
            # the attempts' ids must be ids too: the longest id the service would make
            check_room(spec.get("id") or str(uuid.uuid4()), parse_retry(retry))
        except BadRequest as exc:
            raise within(prefix, edge.Invalid(edge.field_of(str(exc), "retry"),
                                              str(exc))) from None
        if not online and not wheres and targets and all(
                t and not is_glob(t) and not is_mac(t) for t in targets):
            # node ids only: the service looks each up as it stores the item (an unknown
            # one is 404 there and rolls back the whole batch); not read twice
            return Item(index, list(dict.fromkeys(targets)), spec, retry)
        try:
            nodes = list(dict.fromkeys(self.service.resolve(targets, online, where)))
        except UnknownNode as exc:
            raise UnknownNode(f"`{prefix}`: {exc}") from None
        except BadRequest as exc:
            raise within(prefix, edge.Invalid(edge.field_of(str(exc), "targets"),
                                              str(exc))) from None
        return Item(index, nodes, spec, retry)

    def dispatch(self, who: Principal, body: JSONObject) -> JSONObject:
        items = [self.check(i, raw) for i, raw in enumerate(items_of(body))]
        total = sum(len(it.nodes) for it in items)
        if total > MAX_TASKS:
            raise edge.Invalid("tasks", f"the batch's items name {total} tasks (an item makes "
                                        f"one per target node); a batch makes at most "
                                        f"{MAX_TASKS}: send a large fan-out as POST /v1/tasks")
        ids: dict[str, int] = {}
        for it in items:
            given = it.spec.get("id")
            if given:
                if given in ids:
                    raise Conflict(f"`tasks.{it.index}`: task id {given!r} is also item "
                                   f"{ids[given]}'s; two items may not share an id")
                ids[given] = it.index
        self.h.hold_for_broker()
        created: list[tuple[int, TaskRow]] = []
        # one commit for every item: a failure in any (an id that exists) rolls back all;
        # the worker then sends the batch's nodes' tasks in one go, not once per item
        with self.service.store.transaction():
            for it in items:
                if not it.nodes:  # --online with none online: nothing, as POST /v1/tasks
                    continue
                try:
                    made = self.service.dispatch(it.nodes, False, it.spec, retry=it.retry,
                                                 pump=False)
                except Conflict as exc:
                    raise Conflict(f"`tasks.{it.index}`: {exc}") from None
                except UnknownNode as exc:
                    raise UnknownNode(f"`tasks.{it.index}`: {exc}") from None
                created.extend((it.index, task) for task in made)
            nodes = sorted({t.node for _, t in created})
            # the audit record commits with the batch (a write after it would wait behind
            # the batch's sending for the store)
            self.h.audit(who, "batch", tasks=sorted({t.id for _, t in created}),
                         nodes=nodes[:1000], count=len(created), items=len(items))
            self.service.pump_after_commit(nodes)
        return {"tasks": [{**without_tails(t.to_json()), "item": i} for i, t in created]}


def batch_schema(dispatch: JSONObject) -> JSONObject:
    """The body's schema: `tasks`, a list of POST /v1/tasks bodies (`dispatch`)."""
    return {"type": "object", "required": ["tasks"], "additionalProperties": False,
            "properties": {"tasks": {
                "type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": dispatch,
                "description": "each item exactly a POST /v1/tasks body"}}}


__all__ = ["MAX_ITEMS", "MAX_TASKS", "Batches", "Item", "batch_schema", "items_of"]
