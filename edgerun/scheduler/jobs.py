"""Job files: an ordered list of tasks for one or many nodes (like RackHD's bootstrap lists).

    targets = ["rack1-*"]          # optional; node ids, globs; NODE arguments override

    [[steps]]
    type = "shell"
    command = "ipmitool lan print"
    timeout = 60

    [[steps]]
    type = "download"
    url = "http://10.0.0.1/fw.bin"
    dest = "/tmp/fw.bin"
    sha256 = "…"

Each node runs the steps in order and goes on only when its previous step
succeeded; after a failure its remaining steps end `canceled`. The service
keeps the steps in its store, so a restart resumes where each node was.
A file ending in .json holds the same as a JSON object.
"""

from __future__ import annotations

import json
import tomllib
from typing import Any

from edgerun.errors import ConfigError


def load_job(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(targets, steps) from a TOML or JSON job file; ConfigError on any mistake."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.endswith(".json") else "TOML"
        raise ConfigError(f"job file {path} is not valid {kind}: {exc}") from None
    return parse_job(doc, path)


def parse_job(doc: Any, where: str = "job") -> tuple[list[str], list[dict[str, Any]]]:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a table with `steps`")
    unknown = set(doc) - {"targets", "steps"}
    if unknown:
        raise ConfigError(f"{where}: unknown key `{sorted(unknown)[0]}` "
                          f"(a job has `targets` and `steps`)")
    targets = doc.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{where}: `targets` must be a list of node ids or globs")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: `steps` must be a non-empty list of tasks ([[steps]])")
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict) or step.get("type") not in ("shell", "download"):
            raise ConfigError(f"{where}: step {number} needs `type` shell or download")
    return targets, steps
