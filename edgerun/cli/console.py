"""The CLI's commands around the console's API: tokens, `logs -f`, `job show|cancel`.

cli.py builds the parser and maps exit codes; this module adds these commands'
arguments and does their work through the same Client.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from edgerun.cli import render
from edgerun.cli.client import Client, ServiceUnreachable, quoted
from edgerun.cli.follow import exit_code, explain
from edgerun.control.tokens import ROLES
from edgerun.errors import ConfigError
from edgerun.protocol import State, is_final
from edgerun.settings import Option

EXIT_OK = 0

CLIENT_OPTIONS = [
    Option("token", str, None, "API token (default: the local serve's admin token)",
           metavar="TOKEN"),
    Option("token_file", str, None, "read the API token from this file", metavar="FILE"),
    Option("api_ca_file", str, None, "CA certificates for an https:// API", metavar="FILE"),
]


def client_from(values: Mapping[str, Any]) -> Client:
    return Client(values["api"], token=values.get("token") or None,
                  token_file=values.get("token_file"), ca_file=values.get("api_ca_file"))


Command = Callable[[str, str], argparse.ArgumentParser]


def add_commands(command: Command) -> None:
    token = command("token", "Manage API tokens (admin): create, list, revoke")
    token.add_argument("action", choices=("create", "list", "revoke"))
    token.add_argument("name_arg", nargs="?", metavar="NAME", help="the token to revoke")
    token.add_argument("--name", metavar="NAME", help="who or what uses the new token")
    token.add_argument("--role", choices=ROLES, default="viewer",
                       help="viewer (read), operator (dispatch, cancel), admin (tokens)")

    logs = command("logs", "Print a task's output; -f follows it live until it ends")
    logs.add_argument("id", metavar="ID", help="task id or a unique prefix")
    logs.add_argument("--node", metavar="NODE")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="reattach to the task's live output until it ends")


# --- tokens ---------------------------------------------------------------------------
def cmd_token(client: Client, args: argparse.Namespace) -> int:
    if args.action == "create":
        if not args.name:
            raise ConfigError("token create: give --name (who or what uses the token)")
        made = client.post("/tokens", {"name": args.name, "role": args.role})
        if args.json:
            print(json.dumps(made, indent=2))
        else:
            print(made["token"])
            print(f"token {made['name']!r} ({made['role']}): shown this once; the service "
                  f"keeps only its hash", file=sys.stderr)
        return EXIT_OK
    if args.action == "list":
        tokens = client.get("/tokens")["tokens"]
        if args.json:
            print(json.dumps({"tokens": tokens}, indent=2))
        else:
            render.table([[t["name"], t["role"], t["hint"], render.utc(t["created_at"]),
                           render.utc(t["last_used_at"]) if t["last_used_at"] else None,
                           "revoked" if t["revoked_at"] else "live"] for t in tokens],
                         ("NAME", "ROLE", "TOKEN", "CREATED", "LAST USED", "STATE"))
        return EXIT_OK
    name = args.name_arg or args.name
    if not name:
        raise ConfigError("token revoke: give the token's NAME")
    revoked = client.delete(f"/tokens/{quoted(name)}")
    print(json.dumps(revoked, indent=2) if args.json else f"revoked token {name!r}")
    return EXIT_OK


# --- logs -----------------------------------------------------------------------------
def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    tasks = client.get(f"/tasks/{quoted(args.id)}", node=args.node)["tasks"]
    task_id = tasks[0]["id"]
    open_keys = {(t["node"], t["id"]) for t in tasks if not is_final(State(t["state"]))}
    prefixer = render.Prefixer()
    if not args.follow or not open_keys:
        for task in tasks:
            _print_tails(task, prefixer, len(tasks) > 1)
        if args.follow:
            explain(tasks)
        return exit_code(tasks) if args.follow else EXIT_OK
    latest = {(t["node"], t["id"]): t for t in tasks}
    stream = client.events(task=[task_id], channel=["tasks", "output"],
                           node=[args.node] if args.node else None)
    shown: dict[tuple[str, str], int] = {}  # the last output seq printed, per task
    try:
        # read again once subscribed: a final update may have come in between, and what
        # the task wrote before is printed first, then only the live chunks after it
        for task in client.get(f"/tasks/{quoted(task_id)}", node=args.node)["tasks"]:
            key = (task["node"], task["id"])
            latest[key] = task
            if is_final(State(task["state"])):
                open_keys.discard(key)
                _print_tails(task, prefixer, True)
            for chunk in task.get("live_output") or ():
                if chunk["seq"] > shown.get(key, -1):
                    prefixer.write(task["node"], chunk["stream"], chunk["data"])
                    shown[key] = chunk["seq"]
        for event in stream if open_keys else ():
            kind = event.get("kind")
            if kind == "output" and (event["node"], event["id"]) in latest:
                key = (event["node"], event["id"])
                if isinstance(event.get("seq"), int):
                    if event["seq"] <= shown.get(key, -1):
                        continue  # printed already from the earlier output
                    shown[key] = event["seq"]
                prefixer.write(event["node"], event["stream"], event["data"])
            elif kind == "task_event":
                key = (event["node"], event["id"])
                if key in latest:
                    latest[key] = event["task"]
                    if is_final(State(event["state"])):
                        open_keys.discard(key)
                        prefixer.flush(event["node"])
            elif kind == "error":
                raise ServiceUnreachable(f"the event stream ended: {event.get('error')}")
            if not open_keys:
                break
        if open_keys:
            raise ServiceUnreachable("the service closed the event stream before the task "
                                     "ended; run `edgerun logs -f` again")
    except KeyboardInterrupt:
        print(f"edgerun: stopped following; task {task_id} goes on", file=sys.stderr)
        raise
    finally:
        stream.close()
    done = list(latest.values())
    explain(done)
    return exit_code(done)


def _print_tails(task: dict[str, Any], prefixer: render.Prefixer, prefix: bool) -> None:
    result = task.get("result") or {}
    for stream in ("stdout", "stderr"):
        text = result.get(stream)
        if not text:
            continue
        if prefix:
            prefixer.write(task["node"], stream, text)
            prefixer.flush(task["node"])
        else:
            target = sys.stderr if stream == "stderr" else sys.stdout
            target.write(text)
            target.flush()


# --- job show | cancel ------------------------------------------------------------------
def cmd_job_show(client: Client, job_id: str, as_json: bool) -> int:
    job = client.get(f"/jobs/{quoted(job_id)}")
    about = client.get(f"/jobs/{quoted(job_id)}/tasks", limit=1)["job"]
    job.update({k: about.get(k) for k in ("creator", "started_at", "ended_at")})
    targets: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(f"/jobs/{quoted(job_id)}/targets", limit=1000, cursor=cursor)
        targets.extend(page["targets"])
        cursor = page["next"]
        if cursor is None:
            break
    if as_json:
        print(json.dumps({**job, "targets": targets}, indent=2))
        return EXIT_OK
    for line in job_lines(job):
        print(line)
    print()
    headers, rows = job_table(job, targets)
    render.table(rows, headers)
    return EXIT_OK


def step_label(spec: dict[str, Any], index: int) -> str:
    """A step's name in a graph, else its number (from 1)."""
    return str(spec.get("name") or index + 1)


def job_lines(job: dict[str, Any]) -> list[str]:
    """The head of `job show`: who, when, progress, then one line per step with its own
    targets and progress (a graph's steps each have theirs)."""
    p, steps = job["progress"], job["steps"]
    graph = any(s.get("name") for s in steps)
    shape = "graph" if graph else ("one step" if len(steps) == 1 else "ordered steps")
    about = [f"job {job['id']}"]
    if job.get("name"):
        about.append(f"name {job['name']}")
    if job.get("creator"):
        about.append(f"by {job['creator']}")
    about.append(f"created {render.utc(job['created_at'])}")
    for key in ("started_at", "ended_at"):
        if job.get(key):
            about.append(f"{key.removesuffix('_at')} {render.utc(job[key])}")
    lines = ["  ".join(about),
             f"{shape}: {job['nodes']} nodes x {len(steps)} step"
             f"{'s' if len(steps) != 1 else ''}, {p['tasks']} tasks",
             f"{p['done']}/{p['tasks']} done, {p['failed']} failed"]
    for row in p["steps"]:
        i = row["step"]
        spec = steps[i] if i < len(steps) else {}
        what = spec.get("command") or spec.get("url") or ""
        if isinstance(what, list):
            what = " ".join(str(w) for w in what)
        states = ", ".join(f"{n} {s}" for s, n in sorted(row["states"].items())) or "none yet"
        size = row.get("tasks", sum(row["states"].values()))
        done = row.get("done", 0)
        needs = f" needs {','.join(spec['needs'])}" if spec.get("needs") else ""
        lines.append(f"  step {step_label(spec, i)} ({spec.get('type')} {what}){needs}: "
                     f"{done}/{size} done: {states}")
    return lines


BAD = ("failed", "timed_out", "lost", "rejected", "canceled")


def job_table(job: dict[str, Any], targets: list[dict[str, Any]]
              ) -> tuple[list[str], list[list[Any]]]:
    """One row per node, one column per step; `-` where a step does not target the node
    (graphs); nodes with a failed step first."""
    steps = job["steps"]
    headers = ["NODE", *[f"STEP {step_label(s, i)}".upper() for i, s in enumerate(steps)]]
    rows: list[tuple[bool, list[Any]]] = []
    for target in targets:
        cells: list[Any] = [None] * len(steps)
        for step in target["steps"]:
            index = step.get("step")
            if isinstance(index, int) and 0 <= index < len(steps):
                cells[index] = step["state"]
        failed = any(c in BAD for c in cells)
        rows.append((not failed, [target["node"], *cells]))
    rows.sort(key=lambda r: r[0])  # stable: failures first, then by node as listed
    return headers, [r for _, r in rows]


def cmd_job_cancel(client: Client, job_id: str, as_json: bool) -> int:
    answer = client.post(f"/jobs/{quoted(job_id)}/cancel", {})
    print(json.dumps(answer, indent=2) if as_json else
          f"job {job_id}: cancel sent to {answer['canceled']} open tasks")
    return EXIT_OK
