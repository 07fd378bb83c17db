"""What every command's main() shares: optional parts (extras) and a closed stdout.

Only the mains call these; library code raises (edgerun.errors) and never exits.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from importlib.util import find_spec

from .errors import MissingExtra

EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a C tool killed by the closed pipe returns
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def extra_requirements(extra: str, dist: str = "edgerun") -> list[str]:
    """Distribution names the installed `dist` declares for `extra` ([] when unknown, as
    when running from a source tree that is not installed)."""
    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""")
    names = []
    for req in requires:
        text, _, markers = req.partition(";")
        found = _NAME.match(text.strip())
        if found and marker.search(markers) and found.group() != dist:
            names.append(found.group())
    return names


def require_extra(command: str, extra: str, modules: tuple[str, ...] | None = None) -> None:
    """MissingExtra (one line, exit 2) naming the extra to install: unless each of `modules`
    can be imported, or (modules None) every distribution `extra` declares is installed."""
    if modules is not None:
        for module in modules:
            if find_spec(module) is None:
                raise MissingExtra(command, extra, module)
        return
    for name in extra_requirements(extra):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingExtra(command, extra, name) from None


def missing_module(exc: ModuleNotFoundError, command: str, extra: str) -> MissingExtra:
    """The MissingExtra for an import of a third-party module that failed anyway; an
    edgerun module that cannot be imported is a bug, so that error goes on."""
    top = (exc.name or "").split(".")[0]
    if not top or top == "edgerun":
        raise exc
    return MissingExtra(command, extra, top)


def closed_stdout() -> int:
    """After a BrokenPipeError on stdout (`edgerun tasks | head -1`): point stdout at
    /dev/null so that the flush at exit stays quiet too, and give the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_CLOSED_PIPE


__all__ = ["EXIT_CLOSED_PIPE", "closed_stdout", "extra_requirements", "missing_module",
           "require_extra"]
