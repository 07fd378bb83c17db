"""edgerun benchmarks: `./build.sh bench [--quick] [ITEM ...]` (items 1-11, default all).

Writes bench/results/results.json, results.md and PNG plots. Not a test: it
asserts nothing; targets are reported. Every broker it starts is private, on
127.0.0.1, in a temporary directory, and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.common import ROOT, machine, versions

FULL: dict[str, dict[str, Any]] = {
    "1": {"runs": 3, "counts": {128: 20000, 1024: 20000, 131072: 1000}},
    "2": {"light": 200, "rate": 500.0, "seconds": 10.0, "processes": 4, "per": 25},
    "3": {"counts": [1000, 10000], "runs": 3},
    "4": {"rates": [260.0, 520.0, 1040.0, 2080.0], "seconds": 10.0, "stable_n": 1000,
          "task_rate": 100.0},
    "5": {"runs": 5},
    "6": {"count": 1_000_000},
    "7": {"rate": 50.0, "seconds": 10.0},
    "8": {"runs": 5},
    # 9: nodes for the re-sync and the fan-out through serve (bench/fanout.py), its rounds,
    # PGQueuer's jobs drained (bench/pgqueuer_drain.py)
    "9": {"updates": 2000, "nodes": 10_000, "rounds": 2, "jobs": 20_000},
    # 10: the work queue (bench/workqueue.py); at today's store rate 1M tasks take about an hour
    "10": {"tasks": 1_000_000, "rate": 1000.0, "nodes": 1000},
    # 11: history at scale (bench/history.py) and POST latency (bench/apilatency.py)
    "11": {"tasks": 1_000_000, "nodes": 100_000, "samples": 100, "retention": True,
           "jobs": 5, "posts": 100},
}
QUICK: dict[str, dict[str, Any]] = {
    "1": {"runs": 1, "counts": {128: 3000, 1024: 3000, 131072: 200}},
    "2": {"light": 50, "rate": 500.0, "seconds": 3.0, "processes": 4, "per": 25},
    "3": {"counts": [1000], "runs": 1},
    "4": {"rates": [260.0, 1040.0], "seconds": 5.0, "stable_n": 200, "task_rate": 50.0},
    "5": {"runs": 1},
    "6": {"count": 50_000},
    "7": {"rate": 20.0, "seconds": 3.0},
    "8": {"runs": 1},
    "9": {"updates": 300, "nodes": 2000, "rounds": 2, "jobs": 10_000},
    "10": {"tasks": 20_000, "rate": 300.0, "nodes": 1000},
    "11": {"tasks": 100_000, "nodes": 10_000, "samples": 30, "retention": False,
           "jobs": 3, "posts": 30},
}


def runner(item: str) -> Callable[..., dict[str, Any]]:
    if item in ("1", "6"):
        from bench import throughput
        return throughput.item1 if item == "1" else throughput.item6
    if item == "2":
        from bench.roundtrip import item2
        return item2
    if item in ("3", "4"):
        from bench import scale
        return scale.item3 if item == "3" else scale.item4
    if item == "8":
        from bench.cluster import item8
        return item8
    if item == "9":
        from bench.controlplane import item9
        return item9
    if item == "10":
        from bench.workqueue import item10
        return item10
    if item == "11":
        return item11
    from bench import footprint
    return footprint.item5 if item == "5" else footprint.item7


def item11(tmp: Path, *, tasks: int, nodes: int, samples: int, retention: bool, jobs: int,
           posts: int) -> dict[str, Any]:
    from bench import apilatency, history
    return {"history": history.item11(tmp, tasks=tasks, nodes=nodes, samples=samples,
                                      retention=retention),
            "post": apilatency.run(tmp, jobs=jobs, tasks=posts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./build.sh bench", description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", help="items to run, 1 to 11 (default: all)")
    parser.add_argument("--quick", action="store_true", help="small counts, one run each")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--merge", action="store_true",
                        help="replace only these items in the existing results.json")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results.md and the plots from results.json")
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.out))
    bad = [i for i in args.items if i not in FULL]
    if bad:
        parser.error(f"unknown item {bad[0]!r}: choose from {' '.join(FULL)}")
    items = args.items or list(FULL)
    settings = {i: (QUICK if args.quick else FULL)[i] for i in items}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if args.quick else "full", "machine": machine(),
        "versions": versions(), "settings": settings, "items": {},
        "load_average_before": os.getloadavg()}
    previous = out / "results.json"
    if args.merge and previous.exists():
        results = json.loads(previous.read_text())
        results["settings"].update(settings)
        results.setdefault("merged", []).append(
            {"items": items, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    elapsed_before = float(results.get("elapsed_s", 0.0))
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgerun-bench-") as tmp:
        for item in items:
            print(f"item {item} ...", flush=True)
            t0 = time.monotonic()
            try:
                results["items"][item] = runner(item)(Path(tmp), **settings[item])
            except Exception as exc:
                traceback.print_exc()
                results["items"][item] = {"error": f"{type(exc).__name__}: {exc}"}
            results["items"][item]["elapsed_s"] = time.monotonic() - t0
            results["items"][item]["load_average_after"] = os.getloadavg()
            results["elapsed_s"] = elapsed_before + time.monotonic() - began
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return render(out, results)


def render(out: Path, results: dict[str, Any] | None = None) -> int:
    if results is None:
        path = out / "results.json"
        if not path.exists():
            print(f"./build.sh bench: no {path} to render", file=sys.stderr)
            return 2
        results = json.loads(path.read_text())
    notes = ROOT / "bench" / "NOTES.md"
    results["notes"] = notes.read_text() if notes.exists() else ""
    try:
        results["plots"] = report.plots(results, out)
    except Exception as exc:
        print(f"plots failed: {exc!r}", file=sys.stderr)
        results["plots"] = []
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(report.markdown(results))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'} "
          f"({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
