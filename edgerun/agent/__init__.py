"""The edgerun agent (edgerun-agent). Importing the package defers imports the idle
agent does not need (see _lean.py)."""

from ._lean import defer_unused_imports

defer_unused_imports()
