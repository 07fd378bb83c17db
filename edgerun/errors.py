"""The exception root shared by everything in edgerun, and the exit code each error means.

Every error class carries `exit_code`; each command's main() turns an EdgerunError into
one line on stderr and that code (`exit_with`), in one place. Library code raises and
never calls sys.exit.
"""

from __future__ import annotations

import sys
from typing import ClassVar

EXIT_OK = 0
EXIT_FAILED = 1       # the work ran and did not succeed (a task failed)
EXIT_USAGE = 2        # bad arguments or configuration: fix the command line or the file
EXIT_UNKNOWN = 3      # unknown node, task or job
EXIT_UNREACHABLE = 4  # a service or broker did not answer
EXIT_ERROR = 5        # any other error


class EdgerunError(Exception):
    """Root of every error edgerun raises on purpose."""

    exit_code: ClassVar[int] = EXIT_ERROR


class ConfigError(EdgerunError):
    """A configuration value, file, URL or flag is wrong; the message says which."""

    exit_code = EXIT_USAGE


class MissingExtra(ConfigError):
    """A command needs an optional part of edgerun that is not installed."""

    def __init__(self, command: str, extra: str, missing: str) -> None:
        super().__init__(f"`{command}` needs {missing}, which is not installed: "
                         f"pip install 'edgerun[{extra}]'")
        self.extra, self.missing = extra, missing


def exit_with(prog: str, exc: EdgerunError) -> int:
    """Print `prog: error: <message>` on one line; the exit code of the error's class."""
    message = str(exc).replace("\r", " ").replace("\n", " ") or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return exc.exit_code


__all__ = ["EXIT_ERROR", "EXIT_FAILED", "EXIT_OK", "EXIT_UNKNOWN", "EXIT_UNREACHABLE",
           "EXIT_USAGE", "ConfigError", "EdgerunError", "MissingExtra", "exit_with"]
