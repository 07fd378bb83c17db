"""The command line of fleet operations: --where, retries, rollouts, `run -i`, and
`edgerun rollout show|list|pause|resume|abort` (scheduler/README.md, "Fleet operations")."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from edgerun.cli import render
from edgerun.cli.client import Client, quoted
from edgerun.control.retries import OUTCOMES, attempt_ids
from edgerun.errors import ConfigError

EXIT_OK, EXIT_FAILED = 0, 1
MAX_STDIN = 192 * 1024  # a task message is at most 256 KiB, JSON escaping included

Command = Callable[[str, str], argparse.ArgumentParser]


def add_where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--where", action="append", default=[], metavar="EXPR",
                   help="only nodes whose facts match, such as arch=x86_64, "
                        "'dmi.sys_vendor=Dell*', 'cpus>=32', 'macs=52:54:00:*' "
                        "(repeatable: all must hold)")


def add_dispatch_options(p: argparse.ArgumentParser) -> None:
    """--where, retries and rollout options of `run` and `download`."""
    add_where(p)
    retry = p.add_argument_group("retries")
    retry.add_argument("--retries", type=int, default=0, metavar="N",
                       help="run again up to N times after an outcome of --retry-on; each "
                            "attempt is a new task (ID.a2, ID.a3 ...), never two at once")
    retry.add_argument("--retry-on", metavar="LIST", default=",".join(OUTCOMES),
                       help=f"which outcomes to retry, of {','.join(OUTCOMES)} "
                            f"(default: all)")
    retry.add_argument("--retry-delay", type=float, default=5.0, metavar="S",
                       help="back-off before the first retry (S/2 to S, doubling, at most "
                            "600 s)")
    rollout = p.add_argument_group("rollouts (waves, with an abort rule)")
    rollout.add_argument("--batch", type=int, metavar="N",
                         help="at most N nodes in progress at once (a sliding window)")
    rollout.add_argument("--rate", metavar="N/min",
                         help="start at most N nodes a minute (also N/s, N/h)")
    rollout.add_argument("--abort-after", metavar="N|P%",
                         help="abort after N failed nodes, or once P%% of the finished ones "
                              "failed (counted from --abort-min finished on); lost and "
                              "unreachable nodes count as failed")
    rollout.add_argument("--abort-min", type=int, metavar="N",
                         help="finished nodes before a percentage counts (default 10)")


def add_stdin(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--stdin", action="store_true",
                   help="forward this command's standard input as the task's stdin "
                        "(UTF-8 text, at most 192 KiB)")


def add_commands(command: Command) -> None:
    rollout = command("rollout", "Show, pause, resume or abort a rollout "
                                 "(run/download with --batch or --rate)")
    rollout.add_argument("action", choices=("show", "list", "pause", "resume", "abort"))
    rollout.add_argument("id", nargs="?", metavar="ID", help="the rollout id")


# --- request bodies -------------------------------------------------------------------------
def is_rollout(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("batch", "rate", "abort_after",
                                                               "abort_min"))


def extend_body(args: argparse.Namespace, body: dict[str, Any]) -> None:
    """Add --where, the retry policy and rollout options to a dispatch request."""
    if getattr(args, "where", None):
        body["where"] = list(args.where)
    retries = getattr(args, "retries", 0) or 0
    if retries < 0:
        raise ConfigError("--retries must be 0 or more")
    if retries:
        body["retry"] = {"retries": retries, "on": args.retry_on, "delay": args.retry_delay}
    if is_rollout(args):
        if args.batch is None and args.rate is None:
            raise ConfigError("--abort-after and --abort-min go with --batch N or --rate N/min")
        for key in ("batch", "rate", "abort_after", "abort_min"):
            value = getattr(args, key)
            if value is not None:
                body[key] = value


def follow_ids(task_id: str, args: argparse.Namespace) -> list[str]:
    """The ids a follower subscribes to: the task's, and its retries' ids."""
    return attempt_ids(task_id, getattr(args, "retries", 0) or 0)


def read_stdin() -> str:
    data = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(data) > MAX_STDIN:
        raise ConfigError(f"-i: standard input is over {MAX_STDIN // 1024} KiB; a task's "
                          f"stdin travels inside its message (use a download task for more)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("-i: standard input is not UTF-8 text; a task's stdin is a JSON "
                          "string (use a download task for binary data)") from None


def post_rollout(client: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Create the rollout; say its id on stderr; return its tasks (to follow)."""
    rollout = client.post("/rollouts", body)
    sys.stderr.write(f"edgerun: rollout {rollout['id']}: {rollout['counts']['total']} nodes "
                     f"({_shape(rollout['options'])}); `edgerun rollout show "
                     f"{rollout['id']}`\n")
    sys.stderr.flush()
    tasks: list[dict[str, Any]] = rollout["tasks"]
    for task in tasks:
        task["_rollout"] = rollout["id"]
    return tasks


def report_rollout(client: Client, tasks: list[dict[str, Any]], as_json: bool) -> int:
    """After following a rollout's tasks: its end, and why it stopped if it did."""
    ids = {t.get("_rollout") or t.get("rollout") for t in tasks} - {None}
    code = EXIT_OK
    for rollout_id in sorted(str(i) for i in ids):
        rollout = client.get(f"/rollouts/{quoted(rollout_id)}")
        if rollout["state"] == "aborted":
            code = EXIT_FAILED
        if not as_json:
            print(f"rollout {rollout_id}: {rollout['state']}, {_counts(rollout['counts'])}")
            if rollout.get("reason"):
                print(f"  reason: {rollout['reason']}")
    return code


def _shape(options: dict[str, Any]) -> str:
    parts = []
    if options.get("batch"):
        parts.append(f"batch {options['batch']}")
    if options.get("rate"):
        parts.append(f"{options['rate']:g}/min")
    if options.get("abort_count"):
        parts.append(f"abort after {options['abort_count']} failed")
    if options.get("abort_percent"):
        parts.append(f"abort at {options['abort_percent']:g}% failed (from "
                     f"{options['abort_min']} finished)")
    return ", ".join(parts)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("succeeded", "failed", "skipped", "active",
                                                  "pending") if counts.get(k))


# --- `edgerun rollout` -------------------------------------------------------------------------
def cmd_rollout(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        rollouts = client.get("/rollouts")["rollouts"]
        if args.json:
            print(json.dumps({"rollouts": rollouts}, indent=2))
        else:
            render.table([[r["id"], r["state"], r["task_id"], len(r["nodes"]),
                           _shape(r["options"]), render.utc(r["created_at"]), r.get("reason") or ""]
                          for r in rollouts],
                         ("ID", "STATE", "TASK", "NODES", "SHAPE", "CREATED", "REASON"))
        return EXIT_OK
    if not args.id:
        raise ConfigError(f"rollout {args.action}: give the rollout id")
    path = f"/rollouts/{quoted(args.id)}"
    rollout = client.get(path) if args.action == "show" else \
        client.post(f"{path}/{args.action}", {})
    if args.json:
        print(json.dumps(rollout, indent=2))
        return EXIT_OK
    print(f"rollout {rollout['id']}: {rollout['state']} ({_shape(rollout['options'])}), "
          f"task {rollout['task_id']}")
    print(f"  {_counts(rollout['counts']) or 'nothing finished yet'} of "
          f"{rollout['counts']['total']}")
    if rollout.get("reason"):
        print(f"  reason: {rollout['reason']}")
    print()
    render.table([[t["node"], t["phase"], t["task"], t["attempts"],
                   (t.get("error") or {}).get("message") or ""] for t in rollout["targets"]],
                 ("NODE", "PHASE", "TASK", "ATTEMPTS", "ERROR"))
    return EXIT_OK
