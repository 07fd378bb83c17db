"""What a person sees: tables, task details, node-prefixed live output."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

TASK_COLUMNS = ("ID", "NODE", "TYPE", "STATE", "EXIT", "UPDATED (UTC)", "ERROR")


def utc(at: str | None) -> str:
    """An ISO time as `2026-12-07 18:22:03 UTC` (the zone always said)."""
    if not at:
        return "-"
    return at[:19].replace("T", " ") + " UTC"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: TextIO | None = None,
          last_wide: bool = True) -> None:
    out = out or sys.stdout
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if last_wide:
        widths[-1] = 0
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("\n", " ")


def short_error(task: dict[str, Any], width: int = 70) -> str | None:
    error = task.get("error")
    if not error:
        return None
    text = f"{error['code']}: {error['message']}"
    return text if len(text) <= width else text[:width - 1] + "…"


def task_rows(tasks: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[t["id"], t["node"], t["type"], t["state"], t["exit_code"],
             (t["updated_at"] or "")[11:23], short_error(t)] for t in tasks]


def summary(tasks: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rows = []
    for t in sorted(tasks, key=lambda t: (t["node"], t.get("step") or 0)):
        result = t.get("result") or {}
        rows.append([t["node"], t["state"], t["exit_code"], result.get("duration_s"),
                     short_error(t)])
    table(rows, ("NODE", "STATE", "EXIT", "SECONDS", "ERROR"), out)


def node_rows(nodes: Sequence[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for n in nodes:
        facts = n.get("facts") or {}
        ips = ",".join(_addresses(facts.get("ips"))) or None
        rows.append([n["node"], n["state"], (n["last_seen"] or "")[:19].replace("T", " "),
                     facts.get("hostname"), n.get("agent"), ips])
    return rows


def _addresses(ips: Any) -> list[str]:
    """Global addresses without prefix length from the agent's {iface: [addr/len]} fact."""
    if not isinstance(ips, dict):
        return []
    found = [str(a).split("/")[0] for addrs in ips.values() if isinstance(addrs, list)
             for a in addrs]
    return [a for a in found if not a.startswith(("fe80:", "127.", "::1"))]


NODE_COLUMNS = ("NODE", "STATE", "LAST SEEN (UTC)", "HOSTNAME", "AGENT", "IPS")


def show_task(task: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    spec = task.get("spec") or {}
    what = spec.get("command") if task["type"] == "shell" else \
        f"{spec.get('url')} -> {spec.get('dest')}" if task["type"] == "download" else None
    attempts = task.get("attempts") or []
    if len(attempts) > 1:  # a retry chain: its outcome first, then this attempt
        last = attempts[-1]
        out.write(f"{'outcome:':12}{last['state']} on attempt {last['attempt']} of "
                  f"{len(attempts)} ({last['id']})\n")
    fields = [("id", task["id"]), ("node", task["node"]), ("type", task["type"]),
              ("what", what),
              ("state", f"{task['state']} (attempt {task.get('attempt') or 1})" if attempts
               else task["state"]), ("exit code", task["exit_code"]),
              ("error", short_error(task, 400)), ("source", task["source"]),
              ("created", task["created_at"]), ("dispatched", task["dispatched_at"]),
              ("updated", task["updated_at"]), ("timeout", task["timeout"]),
              ("expires", task["expires_at"]), ("job", task["job"])]
    for name, value in fields:
        if value is not None:
            out.write(f"{name + ':':12}{value}\n")
    for update in task.get("updates") or []:
        out.write(f"  {update.get('at', '?')}  {update['state']}\n")
    if task.get("attempts"):
        out.write(f"{'attempts:':12}" + ", ".join(
            f"{a['id']} {a['state']}" for a in task["attempts"]) + "\n")
    result = task.get("result") or {}
    if result.get("output_dropped"):
        out.write(f"{'dropped:':12}{result['output_dropped']} bytes of live output were not "
                  f"sent (the agent's memory budget)\n")
    for stream in ("stdout", "stderr"):
        if result.get(stream):
            out.write(f"--- {stream}{' (truncated)' if result.get('truncated') else ''}\n")
            out.write(result[stream] if result[stream].endswith("\n") else result[stream] + "\n")


class Prefixer:
    """Live output, line by line, each line prefixed by its node."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self._partial: dict[tuple[str, str], str] = {}
        self.seen: set[str] = set()

    def write(self, node: str, stream: str, data: str) -> None:
        self.seen.add(node)
        text = self._partial.pop((node, stream), "") + data
        *lines, rest = text.split("\n")
        target = self.err if stream == "stderr" else self.out
        for line in lines:
            target.write(f"{node} | {line}\n")
        target.flush()
        if rest:
            self._partial[(node, stream)] = rest

    def flush(self, node: str) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((node, stream), "")
            if rest:
                self.write(node, stream, rest + "\n")
