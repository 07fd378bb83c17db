"""Labels an operator gives a node (`rack=r1`, `role=storage`): parsed, checked, layered.

Labels come from, lowest to highest precedence: the facts directory (a `labels`
object in a file or an executable's output, edgerun.agent.factsd), the TOML
file (`[labels]`), the kernel command line (`edgerun.labels=rack=r1,role=db`),
`EDGERUN_LABELS` and `--label` flags. Layers merge key by key: a higher layer
replaces the value of a key it names and keeps the others; `key=` with no
value removes `key` set by a lower layer.

A label the agent cannot use is dropped with one warning in the log, never an
exit: labels are often set per boot (iPXE), where a typo must not keep the
node off the fleet. A key is 1-63 of `A-Z a-z 0-9 _ -` (so `--where
labels.KEY=...` can name it); a value 1-128 of the node id's characters
`A-Z a-z 0-9 _ : -` and also `.` and `/`. At most MAX_LABELS labels are kept,
the first by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# checked with sets rather than regular expressions: nothing to compile at the agent's
# start (seconds count under emulation)
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
KEY_CHARS = frozenset(_ALNUM + "_-")
VALUE_CHARS = frozenset(_ALNUM + "_:-./")
MAX_KEY, MAX_VALUE = 63, 128
MAX_LABELS = 100
MAX_PROBLEMS = 5  # per layer: 10,000 bad labels are one warning with a count, not 10,000
_SHOWN = 40  # characters of a bad entry quoted in a warning


@dataclass(frozen=True)
class LabelLayer:
    """One layer's labels in the order given; a value of "" removes the key."""

    source: str
    labels: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Labels:
    """The labels the layers add up to, and what was wrong with them."""

    labels: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def check(key: str, value: str) -> str | None:
    """Why `key=value` is not a label (None when it is; "" as value removes)."""
    if not 0 < len(key) <= MAX_KEY or not KEY_CHARS.issuperset(key):
        return f"label name {_show(key)} must be 1-63 of A-Z a-z 0-9 _ -"
    if value and (len(value) > MAX_VALUE or not VALUE_CHARS.issuperset(value)):
        return f"label {key}: value {_show(value)} must be 1-128 of A-Z a-z 0-9 _ : - . /"
    return None


class _Builder:
    def __init__(self, source: str) -> None:
        self.source = source
        self.labels: list[tuple[str, str]] = []
        self.problems: list[str] = []
        self.bad = 0

    def add(self, key: str, value: str) -> None:
        problem = check(key, value)
        if problem is None:
            self.labels.append((key, value))
        else:
            self.problem(problem)

    def problem(self, text: str) -> None:
        self.bad += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{self.source}: {text}; ignored")

    def done(self) -> LabelLayer:
        problems = self.problems
        if self.bad > len(problems):
            problems = [*problems, f"{self.source}: {self.bad - len(problems)} more bad "
                        "labels ignored"]
        return LabelLayer(self.source, tuple(self.labels), tuple(problems))


def parse_text(text: str, source: str) -> LabelLayer:
    """`key=value,key2=value2` (kernel command line, environment, a flag)."""
    return parse_items([text], source)


def parse_items(items: Iterable[str], source: str) -> LabelLayer:
    """Each item `key=value`, or several comma-separated (`--label` given repeatedly)."""
    out = _Builder(source)
    for item in items:
        for entry in item.split(","):
            entry = entry.strip()
            if not entry:
                continue
            key, sep, value = entry.partition("=")
            if not sep:
                out.problem(f"{_show(entry)} is not key=value")
                continue
            out.add(key.strip(), value.strip())
    return out.done()


def parse_table(value: Any, source: str) -> LabelLayer:
    """A TOML `[labels]` table or a facts.d `labels` object of strings; a string is read
    as `key=value,...`."""
    if isinstance(value, str):
        return parse_text(value, source)
    out = _Builder(source)
    if not isinstance(value, Mapping):
        out.problem(f"labels must be a table of strings, not {type(value).__name__}")
        return out.done()
    for key, text in value.items():
        if not isinstance(text, str):
            out.problem(f"label {_show(str(key))}: value must be a string, not "
                        f"{type(text).__name__}")
        else:
            out.add(str(key), text)
    return out.done()


def merge(layers: Sequence[LabelLayer]) -> Labels:
    """Lowest layer first; key by key, "" removes. At most MAX_LABELS, the first by name."""
    merged: dict[str, str] = {}
    problems: list[str] = []
    for layer in layers:
        problems.extend(layer.problems)
        for key, value in layer.labels:
            if value:
                merged[key] = value
            else:
                merged.pop(key, None)
    if len(merged) > MAX_LABELS:
        problems.append(f"{len(merged)} labels; kept the first {MAX_LABELS} by name")
        merged = {key: merged[key] for key in sorted(merged)[:MAX_LABELS]}
    return Labels(dict(sorted(merged.items())), tuple(problems))
