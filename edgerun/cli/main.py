"""`edgerun`: send tasks to nodes and see what happened; `edgerun serve` runs the service.

Exit codes (scheduler/README.md, "Exit codes"): 0 success; `run` on one node:
the remote exit code, or 124 timed out, 125 lost, 126 rejected, 130 canceled;
1 some task did not succeed; 2 bad arguments or configuration; 3 unknown node,
task or job; 4 the service or its broker is unreachable; 5 any other error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from edgerun import __version__
from edgerun.cli import console as cli_console
from edgerun.cli import fleet as cli_fleet
from edgerun.cli import render
from edgerun.cli import watch as cli_watch
from edgerun.cli.client import Client, quoted
from edgerun.cli.follow import dispatch_and_follow, exit_code, explain
from edgerun.cmdline import closed_stdout, missing_module, require_extra
from edgerun.control.jobfile import is_graph, load_job_file, step_ids
from edgerun.errors import EXIT_FAILED, EXIT_OK, ConfigError, EdgerunError, exit_with
from edgerun.settings import Option, Parser, add_options, config_path, config_table, resolve

PROG = "edgerun"

EPILOG = """exit codes:
  0    success                      N    `run` on one node: the remote exit code
  124  timed out   125 lost         126  rejected          130 canceled
  1    a task did not succeed       2    bad arguments or configuration
  3    unknown node, task or job    4    service or broker unreachable
  5    any other error
"""

CLIENT_OPTIONS = [
    Option("api", str, "http://127.0.0.1:8470", "URL of the scheduler's HTTP API",
           metavar="URL"),
    *cli_console.CLIENT_OPTIONS,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Send shell and download tasks to edgerun nodes "
                     "and see what happened.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML file: [client] and [serve] "
                        "tables (also EDGERUN_CONFIG)")
    add_options(common, CLIENT_OPTIONS)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    def targets(p: argparse.ArgumentParser) -> None:
        p.add_argument("--online", action="store_true",
                       help="every online node (with NODEs: only those online)")
        p.add_argument("--timeout", type=float, metavar="S", help="seconds the task may run "
                       "on the node (default 3600)")
        p.add_argument("--detach", action="store_true",
                       help="print the task and return at once; do not follow it")

    run = command("run", "Run a command on nodes: edgerun run NODE... -- CMD...")
    run.add_argument("nodes", nargs="*", metavar="NODE", help="node id or glob ('rack1-*')")
    targets(run)
    cli_fleet.add_dispatch_options(run)
    cli_fleet.add_stdin(run)
    run.add_argument("--env", action="append", default=[], metavar="K=V")
    run.add_argument("--cwd", metavar="DIR")
    run.add_argument("--ok-codes", metavar="N,N", help="exit codes that count as success")

    dl = command("download", "Download a URL to a file on nodes: "
                             "edgerun download NODE... URL DEST")
    dl.add_argument("args", nargs="+", metavar="NODE... URL DEST")
    targets(dl)
    cli_fleet.add_dispatch_options(dl)
    dl.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the file")
    dl.add_argument("--mode", metavar="MODE", help="file mode, octal such as 0755")

    nodes = command("nodes", "List the nodes the scheduler knows")
    nodes.add_argument("patterns", nargs="*", metavar="PATTERN")
    nodes.add_argument("--online", action="store_true")
    cli_fleet.add_where(nodes)

    tasks = command("tasks", "List tasks, newest first")
    tasks.add_argument("--node", metavar="NODE")
    tasks.add_argument("--state", metavar="STATE")
    tasks.add_argument("--job", metavar="JOB")
    tasks.add_argument("--limit", type=int, default=50, metavar="N")

    show = command("show", "Show one task with its updates and output")
    show.add_argument("id", metavar="ID")
    show.add_argument("--node", metavar="NODE")

    cancel = command("cancel", "Cancel a task")
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--node", metavar="NODE")

    job = command("job", "Run a job file: ordered steps per node, each after a success; "
                  "`job show ID`, `job cancel ID`")
    job.add_argument("file", metavar="FILE", help="the job file, or show / cancel")
    job.add_argument("nodes", nargs="*", metavar="NODE")
    job.add_argument("--online", action="store_true")
    job.add_argument("--detach", action="store_true")
    cli_fleet.add_where(job)
    cli_console.add_commands(command)
    cli_fleet.add_commands(command)

    keygen = sub.add_parser("keygen", help="Make an Ed25519 key pair for signed tasks",
                            description="Write PREFIX.key (private, for `edgerun serve "
                            "--private-key`) and PREFIX.pub (for `edgerun-agent --public-key` "
                            "or edgerun.public_key= on the kernel command line).")
    keygen.add_argument("--out", metavar="PREFIX", default="edgerun-task",
                        help="file name prefix (default: edgerun-task)")

    # `edgerun serve ...` is handed to the service's own entry point before parsing
    # (edgerun.scheduler.main); listed here for --help
    sub.add_parser("serve", help="Run the scheduler service (edgerun serve --help)",
                   add_help=False)
    return parser


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "run" in argv and "--" in argv and argv.index("run") < argv.index("--"):
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, None


def _settings(args: argparse.Namespace, options: Sequence[Option], section: str,
              environ: Mapping[str, str]) -> dict[str, Any]:
    path = config_path(args, environ)
    table = config_table(path, section) if path else None
    return resolve(options, args, environ, table=table, table_source=f"config file {path}")


def main(argv: list[str] | None = None) -> int:
    """The one place where errors become exit codes (each class carries its own)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _main(argv, os.environ)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:  # `edgerun tasks | head -1`: the reader has all it wanted
        return closed_stdout()
    except EdgerunError as exc:
        return exit_with(PROG, exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; tasks already sent go on (see `edgerun tasks`)",
              file=sys.stderr)
        return 130


def _main(argv: list[str], environ: Mapping[str, str]) -> int:
    if argv[:1] == ["serve"]:
        return serve(argv[1:], environ)
    head, command = _split_command(argv)
    args = build_parser().parse_args(head)
    if args.command == "keygen":
        return keygen(args.out)
    values = _settings(args, CLIENT_OPTIONS, "client", environ)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    client = cli_console.client_from(values)
    handler = {"run": cmd_run, "download": cmd_download, "nodes": cmd_nodes,
               "tasks": cmd_tasks, "show": cmd_show, "cancel": cmd_cancel, "job": cmd_job,
               "token": cli_console.cmd_token, "logs": cli_console.cmd_logs,
               "rollout": cli_fleet.cmd_rollout}
    if args.command == "run":
        if not command:
            raise ConfigError("run: give the command after --, as in: "
                              "edgerun run NODE -- uname -a")
        args.argv = command
    return handler[args.command](client, args)


def keygen(prefix: str) -> int:
    """Write a new key pair; never overwrite a key that may already be in use."""
    require_extra("edgerun keygen", "scheduler", ("cryptography",))
    from edgerun.signing import generate_keypair

    private, public = f"{prefix}.key", f"{prefix}.pub"
    for path in (private, public):
        if os.path.exists(path):
            raise ConfigError(f"{path} exists; remove it or choose another --out")
    pem, public_b64 = generate_keypair()
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        with open(public, "x", encoding="ascii") as fh:
            fh.write(public_b64 + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair: {exc}") from None
    print(f"private key: {private} (give it to `edgerun serve --private-key`; keep it secret)")
    print(f"public key:  {public}: {public_b64}")
    print(f"agents: --public-key {public}, or edgerun.public_key={public_b64}")
    return EXIT_OK


# --- dispatching commands -------------------------------------------------------------
def _send(client: Client, args: argparse.Namespace, targets: list[str],
          task: dict[str, Any]) -> int:
    if not targets and not args.online and not args.where:
        raise ConfigError("no target: name node ids, a glob such as 'rack1-*', --where "
                          "FACT=VALUE, or --online")
    if args.timeout is not None:
        if args.timeout <= 0:
            raise ConfigError("--timeout must be greater than 0")
        task["timeout"] = args.timeout
    task["id"] = str(uuid.uuid4())
    body: dict[str, Any] = {"targets": targets, "online": args.online, "task": task}
    cli_fleet.extend_body(args, body)
    rollout = cli_fleet.is_rollout(args)
    retries: int = getattr(args, "retries", 0) or 0
    ids = cli_fleet.follow_ids(task["id"], args)
    path = "/tasks"
    if not rollout and not retries and _several(targets, args):
        # several nodes: one job of one step, so the console shows one aggregated row
        job_id = task.pop("id")
        body = {"id": job_id, "targets": targets, "online": args.online, "steps": [task],
                **({"where": list(args.where)} if args.where else {})}
        path, ids = "/jobs", [f"{job_id}.0"]
    if args.detach:
        created = cli_fleet.post_rollout(client, body) if rollout else \
            client.post(path, body)["tasks"]
        _print_tasks(created, args.json)
        return EXIT_OK
    prefixer = None if args.json else render.Prefixer()

    def send() -> list[dict[str, Any]]:
        if rollout:
            return cli_fleet.post_rollout(client, body)
        created: list[dict[str, Any]] = client.post(path, body)["tasks"]
        _note_offline(client, created)
        return created
    if rollout or retries > 0:
        # retries and rollouts are said as they happen; a rollout's progress is its counts
        done, _ = cli_watch.follow(client, ids, send, prefixer, rollout)
    else:
        done = dispatch_and_follow(client, ids, send, prefixer)
    _finish(done, args.json, rollout)
    if rollout:
        return cli_fleet.report_rollout(client, done, args.json) or exit_code(done)
    return exit_code(done)


def _several(targets: list[str], args: argparse.Namespace) -> bool:
    """Whether a dispatch may reach more than one node: a glob, several targets, --online
    or --where (one node id or MAC stays a plain task)."""
    return bool(len(targets) != 1 or any(c in targets[0] for c in "*?[") or args.online
                or args.where)


def _note_offline(client: Client, created: list[dict[str, Any]]) -> None:
    """Say so when a task will wait for an offline node, rather than hang silently."""
    # the offline ones only (a target is always a known node): a fan-out to 10,000
    # online nodes does not fetch 10,000 node records to find none
    offline = {n["node"] for n in client.nodes(state="offline")}
    for task in created:
        if task["node"] in offline:
            until = f" until it expires at {task['expires_at']}" if task["expires_at"] else ""
            print(f"{PROG}: note: node {task['node']} is offline; the task waits for it{until}",
                  file=sys.stderr, flush=True)


def _finish(tasks: list[dict[str, Any]], as_json: bool, rollout: bool = False) -> None:
    if as_json:
        print(json.dumps({"tasks": tasks}, indent=2))
        return
    for task in tasks:
        result = task.get("result") or {}
        if task["type"] == "download" and task["state"] == "succeeded":
            print(f"{task['node']} | downloaded {result.get('bytes')} bytes to "
                  f"{result.get('dest')} (sha256 {result.get('sha256')})")
    if len(tasks) > 1:
        print()
        render.summary(tasks)
    sys.stdout.flush()
    if rollout:
        cli_watch.explain_rollout(tasks)
    else:
        explain(tasks)


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    argv: list[str] = args.argv
    task: dict[str, Any] = {"type": "shell", "command": argv[0] if len(argv) == 1 else argv}
    if args.env:
        pairs = [e.partition("=") for e in args.env]
        if any(not k or not sep for k, sep, _ in pairs):
            raise ConfigError("--env must be NAME=VALUE")
        task["env"] = {k: v for k, _, v in pairs}
    if args.cwd:
        task["cwd"] = args.cwd
    if args.ok_codes:
        try:
            task["ok_codes"] = [int(c) for c in args.ok_codes.split(",")]
        except ValueError:
            raise ConfigError("--ok-codes must be whole numbers separated by commas") from None
    if args.stdin:
        task["stdin"] = cli_fleet.read_stdin()
    return _send(client, args, list(args.nodes), task)


def cmd_download(client: Client, args: argparse.Namespace) -> int:
    if len(args.args) < 2:
        raise ConfigError("download: give NODE... URL DEST")
    *targets, url, dest = args.args
    task: dict[str, Any] = {"type": "download", "url": url, "dest": dest}
    if args.sha256:
        task["sha256"] = args.sha256
    if args.mode:
        task["mode"] = args.mode
    return _send(client, args, targets, task)


def cmd_job(client: Client, args: argparse.Namespace) -> int:
    if args.file in ("show", "cancel") and not os.path.exists(args.file):
        if len(args.nodes) != 1:
            raise ConfigError(f"job {args.file}: give one job id")
        action = cli_console.cmd_job_show if args.file == "show" else \
            cli_console.cmd_job_cancel
        return action(client, args.nodes[0], args.json)
    job_file = load_job_file(args.file)
    steps, where = job_file.steps, list(args.where) or job_file.where
    targets = list(args.nodes) or job_file.targets
    if not targets and not args.online and not where and not is_graph(steps):
        raise ConfigError("no target: name nodes, give `targets` or `where` in the job file, "
                          "--where, or --online")
    job_id = str(uuid.uuid4())
    body = {"id": job_id, "targets": targets, "online": args.online, "steps": steps}
    if where:
        body["where"] = where
    if args.detach:
        job = client.post("/jobs", body)
        _print_tasks(job["tasks"], args.json)
        return EXIT_OK
    prefixer = None if args.json else render.Prefixer()
    ids = step_ids(job_id, steps)
    done = dispatch_and_follow(client, ids, lambda: client.post("/jobs", body)["tasks"],
                               prefixer)
    if args.json:
        print(json.dumps({"job": job_id, "tasks": done}, indent=2))
    else:
        print()
        render.table(render.task_rows(sorted(done, key=lambda t: (t["node"], t["step"]))),
                     render.TASK_COLUMNS)
        print(f"job {job_id}")
    return EXIT_OK if all(t["state"] == "succeeded" for t in done) else EXIT_FAILED


# --- reading commands -----------------------------------------------------------------
def _print_tasks(tasks: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"tasks": tasks}, indent=2))
    else:
        render.table(render.task_rows(tasks), render.TASK_COLUMNS)


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    if args.patterns[:1] == ["forget"]:  # `edgerun nodes forget ID...`
        return _forget_nodes(client, args.patterns[1:], args.json)
    nodes = client.nodes(match=args.patterns or None, where=args.where or None,
                         online=1 if args.online else None)  # every page
    if args.json:
        print(json.dumps({"nodes": nodes}, indent=2))
    else:
        render.table(render.node_rows(nodes), render.NODE_COLUMNS)
    return EXIT_OK


def _forget_nodes(client: Client, nodes: list[str], as_json: bool) -> int:
    """Remove nodes from the registry (their tasks stay until --keep-days prunes them)."""
    if not nodes:
        raise ConfigError("edgerun nodes forget: name the node ids to forget")
    done = [client.request("DELETE", f"/nodes/{quoted(node)}") for node in nodes]
    if as_json:
        print(json.dumps({"forgotten": done}, indent=2))
    else:
        for entry in done:
            print(f"forgot node {entry['node']}")
    return EXIT_OK


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    tasks = client.get("/tasks", node=args.node, state=args.state, job=args.job,
                       limit=args.limit)["tasks"]
    _print_tasks(tasks, args.json)
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    tasks = client.get(f"/tasks/{quoted(args.id)}", node=args.node)["tasks"]
    if args.json:
        print(json.dumps({"tasks": tasks}, indent=2))
    else:
        for i, task in enumerate(tasks):
            if i:
                print()
            render.show_task(task)
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    tasks = client.post(f"/tasks/{quoted(args.id)}/cancel",
                        {"node": args.node} if args.node else {})["tasks"]
    if args.json:
        print(json.dumps({"tasks": tasks}, indent=2))
    else:
        for task in tasks:
            print(f"cancel sent: task {task['id']} on {task['node']} (was {task['state']})")
    return EXIT_OK


def serve(argv: list[str], environ: Mapping[str, str]) -> int:
    """`edgerun serve`: the service, which the client's modules never import."""
    require_extra("edgerun serve", "scheduler")
    try:
        from edgerun.scheduler.main import main as serve_main
    except ModuleNotFoundError as exc:  # installed without its metadata, say
        raise missing_module(exc, "edgerun serve", "scheduler") from None
    return serve_main(argv, environ)


if __name__ == "__main__":
    sys.exit(main())
