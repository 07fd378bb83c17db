"""Exit codes live on the error classes and are mapped once per main(); library code never
exits; a closed stdout (`edgerun tasks | head -1`) ends quietly."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgerun.cmdline import EXIT_CLOSED_PIPE, require_extra
from edgerun.errors import ConfigError, EdgerunError, MissingExtra
from edgerun.cli.client import ServiceUnreachable
from edgerun.control.errors import BadRequest, BrokerUnreachable, NotFound, UnknownNode
from edgerun.scheduler.errors import EmbeddedBrokerError, ListenError, StoreError

from .mqttkit import ROOT
from .scheduler_kit import running_app


@pytest.mark.parametrize("error,code", [
    (EdgerunError, 5), (ConfigError, 2), (BadRequest, 2), (StoreError, 2),
    (EmbeddedBrokerError, 2), (ListenError, 2), (UnknownNode, 3), (NotFound, 3),
    (BrokerUnreachable, 4), (ServiceUnreachable, 4),
])
def test_each_error_class_carries_its_exit_code(error: type[EdgerunError], code: int) -> None:
    assert error.exit_code == code and error("x").exit_code == code


def test_a_missing_extra_is_a_config_error_naming_the_extra() -> None:
    with pytest.raises(MissingExtra) as info:
        require_extra("edgerun serve", "scheduler", ("edgerun_no_such_module",))
    assert info.value.exit_code == 2
    assert str(info.value) == ("`edgerun serve` needs edgerun_no_such_module, which is not "
                               "installed: pip install 'edgerun[scheduler]'")
    require_extra("edgerun serve", "scheduler")  # installed here: no error


def _exits(tree: ast.AST) -> list[int]:
    """Lines calling sys.exit/exit/quit/os._exit or raising SystemExit, outside
    `if __name__ == "__main__":` blocks."""
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and \
                isinstance(f.value, ast.Name) else ""
            if (owner, name) in (("sys", "exit"), ("os", "_exit"), ("", "exit"), ("", "quit")):
                found.append(node.lineno)
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id == "SystemExit":
                found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return found


def test_library_code_never_exits() -> None:
    offenders = []
    for path in sorted((ROOT / "edgerun").rglob("*.py")):
        if path.name == "__main__.py":
            continue  # `python -m ...`: sys.exit(main()) is what it is for
        lines = _exits(ast.parse(path.read_text(), str(path)))
        offenders += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert offenders == []


def closed_pipe_run(args: list[str], env: dict[str, str] | None = None,
                    cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`edgerun ARGS` with stdout a real pipe whose reading end is already closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "edgerun.scheduler", *args],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                              cwd=cwd, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    finally:
        os.close(write_end)


def test_help_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    for args in (["--help"], ["--version"], ["tasks", "--help"]):
        done = closed_pipe_run(args)  # argparse itself ignores the failed write: exit 0
        assert done.stderr == "" and done.returncode in (0, EXIT_CLOSED_PIPE), (args, done.stderr)
    keys = closed_pipe_run(["keygen", "--out", str(tmp_path / "k")])
    assert keys.stderr == "" and keys.returncode == EXIT_CLOSED_PIPE, keys.stderr


def test_a_listing_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    with running_app(None, tmp_path, embedded_broker="127.0.0.1:0") as app:
        done = closed_pipe_run(["tasks"], {"EDGERUN_API": app.api_url})
        assert done.stderr == "" and done.returncode == EXIT_CLOSED_PIPE, done.stderr
        nodes = closed_pipe_run(["nodes", "--json"], {"EDGERUN_API": app.api_url})
        assert nodes.stderr == "" and nodes.returncode == EXIT_CLOSED_PIPE, nodes.stderr


def test_a_listing_into_head_is_quiet(tmp_path: Path) -> None:
    """The shell's way: `edgerun tasks | head -1`, with more rows than head reads."""
    with running_app(None, tmp_path, embedded_broker="127.0.0.1:0") as app:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": app.api_url}
        done = subprocess.run(
            ["sh", "-c", f'for i in 1 2 3 4 5 6 7 8; do "{sys.executable}" -m edgerun.scheduler '
                         "nodes --json; done | head -c 1"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr == ""
