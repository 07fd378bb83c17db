"""results.json -> results.md and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = "Targets are reported, not asserted."


def _f(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |"
            for r in rows]
    return [*out, ""]


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def item1(r: dict[str, Any]) -> list[str]:
    rows = [[_size(x["size"]), x["direction"], x["count"], x["bridge_msg_s"], x["plugin_msg_s"],
             f"{x['ratio']:.2f}", _met(x["ratio"] >= 1.0), *_item1_cpu(x)] for x in r["rows"]]
    return ["## 1. Bridge throughput against RabbitMQ's MQTT plugin", "",
            f"Median of {r['runs']} runs each; up = MQTT -> AMQP, down = AMQP -> MQTT. "
            f"Producer: {r['producer']}. Consumer: {r['consumer']}. CPU: microseconds per "
            "message, user + system; the bridge's own process, and every process of each "
            "path together (brokers, bridge, load generators).", "",
            *_table(["payload", "direction", "messages", "bridge msg/s", "plugin msg/s",
                     "ratio bridge/plugin", "target >= 1", "bridge process CPU",
                     "bridge path CPU", "plugin path CPU", "CPU ratio bridge/plugin path"],
                    rows)]


def _item1_cpu(x: dict[str, Any]) -> list[str]:
    cpu = x.get("cpu_us_per_msg")
    if not cpu:
        return ["-"] * 4
    bridge, plugin = sum(cpu["bridge"].values()), sum(cpu["plugin"].values())
    return [f"{cpu['bridge'].get('bridge', 0.0):.1f}", f"{bridge:.1f}", f"{plugin:.1f}",
            f"{bridge / plugin:.2f}" if plugin else "-"]


def item2(r: dict[str, Any]) -> list[str]:
    rows = []
    for mode in ("direct", "bridge"):
        if mode not in r:
            continue
        light, loaded = r[mode]["light"], r[mode]["loaded"]
        rows.append([mode, "light (one at a time)", light["n"], light["p50_ms"], light["p95_ms"],
                     light["p99_ms"], "-",
                     f"p50 {_met(light['p50_ms'] <= 2)}, p99 {_met(light['p99_ms'] <= 10)}"])
        rows.append([mode, f"{loaded['target_rate']:.0f} tasks/s offered", loaded["n"],
                     loaded["p50_ms"], loaded["p95_ms"], loaded["p99_ms"],
                     f"{loaded['completed_rate']:.0f}/s", "-"])
    return ["## 2. Task round trip: dispatch -> succeeded, `true`", "",
            f"{r['agents']} real agents (`edgerun.agent.core.Agent`, --parallel 1) in "
            f"{r['agent_processes']} processes; dispatched through the scheduler's "
            "messaging layer (MqttMessenger direct to Mosquitto, AmqpMessenger through the "
            "bridge). Milliseconds.", "",
            *_table(["mode", "load", "tasks", "p50", "p95", "p99", "completed",
                     "target (p50 <= 2, p99 <= 10 at light load)"], rows),
            *_item2_floor(r), *_item2_cpu(r)]


def _item2_floor(r: dict[str, Any]) -> list[str]:
    """What an agent with no cost of its own would still take here (bench/floor.py)."""
    rows = r.get("floor")
    if not rows:
        return []
    what = {"echo": "two broker hops and paho (answer at once)",
            "sync": "+ fdatasync of a 150-byte record",
            "spawn": "+ `/bin/sh -c true` spawned after it, waited for"}
    over = r.get("over_floor")
    return ["", "The floor on this machine, light load, no agent (bench/floor.py: one "
            "paho callback answers; milliseconds):", "",
            *_table(["level", "what it pays", "p50", "p99"],
                    [[k, what.get(k, ""), v["p50_ms"], v["p99_ms"]] for k, v in rows.items()]),
            *(["", f"The agent's light-load round trip (direct) over the floor (`spawn`): "
               f"p50 {over['p50_ms']:.2f} - {over['floor_p50_ms']:.2f} = "
               f"{over['over_ms']:+.2f} ms; target <= +1.0 ms: {_met(over['over_ms'] <= 1.0)}."]
              if over else [])]


def _item2_cpu(r: dict[str, Any]) -> list[str]:
    """CPU milliseconds per task of each part during the loaded phase (bench/roundtrip.py)."""
    cpus = {m: r[m]["loaded"].get("cpu") for m in ("direct", "bridge") if m in r}
    cpus = {m: c for m, c in cpus.items() if c}
    if not cpus:
        return []
    parts = sorted({k for c in cpus.values() for k in c["cpu_ms_per_task"]},
                   key=lambda k: -max(c["cpu_ms_per_task"].get(k, 0.0) for c in cpus.values()))
    rows = [[part, *(f"{c['cpu_ms_per_task'][part]:.2f}" if part in c["cpu_ms_per_task"]
                     else "-" for c in cpus.values())] for part in parts]
    rows.append(["total", *(f"{c['cpu_ms_per_task_total']:.2f}" for c in cpus.values())])
    rows.append(["cores used", *(f"{c['cores_used']:.2f}" for c in cpus.values())])
    return ["CPU milliseconds per task while the tasks were offered, by process (`messenger`: "
            "the scheduler's messenger's connection thread and `driver`: the sending loop, "
            "both in the benchmark's process; `agent commands`: the `true` processes):", "",
            *_table(["part", *cpus], rows)]


def item3(r: dict[str, Any]) -> list[str]:
    rows = []
    for row in r["rows"]:
        b, p = row["bridge"], row["plugin"]
        rows.append([row["nodes"], "edgerun bridge", b["connect_s"], b["fanout_s"],
                     b["idle"]["queues"], b["idle"]["rabbit_rss_mib"],
                     b["idle"]["rabbit_mem_mib"], b["idle"]["bridge_rss_mib"],
                     b["bridge_peak_rss_mib"], b["idle"]["mosquitto_rss_mib"]])
        rows.append([row["nodes"], "RabbitMQ MQTT plugin", p["connect_s"], p["fanout_s"],
                     p["idle"]["queues"], p["idle"]["rabbit_rss_mib"],
                     p["idle"]["rabbit_mem_mib"], "-", "-", "-"])
    ratios = []
    for row in r["rows"]:
        b, p = row["bridge"]["idle"], row["plugin"]["idle"]
        ratios.append([row["nodes"], f"{row['fanout_ratio']:.2f}",
                       f"{p['queues']} vs {b['queues']}",
                       f"{p['rabbit_rss_mib'] / b['rabbit_rss_mib']:.1f}"])
    queues = {row["bridge"]["idle"]["queues"] for row in r["rows"]}
    return ["## 3. Scale in nodes", "",
            "Simulated nodes (bench/swarm.py: one real paho MQTT client per node, many per "
            "process on one epoll loop, Last Will, retained online status, QoS 1 "
            "subscription to its tasks topic, `accepted`/`running`/`succeeded` answers; they "
            "speak the contract but do not fork processes). Fan-out: one task per node "
            f"published at once, until every `succeeded` is back at an AMQP consumer (median "
            f"of {r['runs']}). MiB; RabbitMQ RSS is its whole process tree, `erlang` is "
            "`erlang:memory(total)` (allocated by the VM, which with the plugin is far above "
            "what is resident).", "",
            *_table(["nodes", "path", "connect s", "fan-out s", "RabbitMQ queues",
                     "RabbitMQ RSS", "erlang", "bridge RSS", "bridge peak", "Mosquitto RSS"],
                    rows),
            *_table(["nodes", "fan-out time plugin/bridge", "queues plugin vs bridge",
                     "RabbitMQ RSS plugin/bridge"], ratios),
            f"Targets: RabbitMQ's queue count independent of node count: "
            f"{_met(len(queues) == 1)} (bridge queue counts {sorted(queues)}); "
            f"{max(row['nodes'] for row in r['rows']):,} nodes on one bridge: "
            f"{_met(all(row['bridge']['swarm_errors'] == 0 for row in r['rows']))} "
            "(every node connected, every fan-out task came back).", ""]


def item4(r: dict[str, Any]) -> list[str]:
    rows = [[s["target_rate"], s["achieved_connect_rate"], s["churn_events"],
             f"{s['tasks_succeeded']}/{s['tasks_sent']}", s["swarm_errors"],
             ", ".join(f"{k} {v:.2f}" for k, v in s.get("cpu_cores_used", {}).items()),
             "yes" if s["held"] else "no"] for s in r["steps"]]
    return ["## 4. Churn while tasks flow (through the bridge)", "",
            f"{r['stable_nodes']} stable simulated nodes receive {r['task_rate']:.0f} tasks/s "
            "over AMQP while other simulated nodes disconnect (cleanly) and reconnect "
            f"(with a new session's status and subscription) at the target rate, "
            f"{r['seconds_per_step']:.0f} s per step. Held = every task succeeded, no "
            "connection error, and >= 90% of the target connect rate reached.", "",
            *_table(["target /s", "connects /s", "churn events", "tasks ok", "errors",
                     "CPU cores used", "held"], rows),
            f"Highest rate held: **{r['held_rate']:.0f}/s**.", ""]


def item5(r: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("frozen binary", "the image's folder, run in place",
                 "installed (python -m edgerun.agent)"):
        e = r.get(name, {})
        if not e:
            continue
        if not e.get("built"):
            rows.append([name, "not built", "-", "-", "-", "-"])
            continue
        rows.append([name, e["size_mib"], f"{e['exec_to_online_s']:.3f}", e["idle_rss_mib"],
                     e["task_rss_mib"], e.get("cmd", "")])
    base = r.get("python3 -c pass", {})
    rows.append(["python3 -c pass", "-", f"{base.get('exec_s', 0):.3f} (exit)",
                 base.get("rss_mib", "-"),
                 "-", "the same interpreter"])
    out = ["## 5. Agent footprint", "",
           f"Median of {r['runs']} runs. RSS of the agent's whole process tree (the frozen "
           "binary is staticx's launcher plus the Python child), MiB; while running: "
           "peak during `sleep 1`, the `sleep` process excluded. Exec -> online: seconds "
           "from exec to the retained online status at a subscriber.", "",
           *_table(["agent", "size MiB", "exec -> online s", "idle RSS", "RSS running task",
                    "command"], rows)]
    for name in ("frozen binary",):
        frozen = r.get(name, {})
        if frozen.get("built"):
            out += [f"Targets ({name}): size <= 8 MiB {_met(frozen['size_mib'] <= 8)}, "
                    f"idle RSS <= 20 MiB {_met(frozen['idle_rss_mib'] <= 20)}, "
                    f"exec -> online <= 0.3 s {_met(frozen['exec_to_online_s'] <= 0.3)}.", ""]
    return out + _item5_boot(r.get("image boot", {}))


def _item5_boot(boot: dict[str, Any]) -> list[str]:
    """Issue 25: the image's boot against busybox alone on the same kernel (bench/boot.py)."""
    if "floor" not in boot:
        return ["Discovery image: not measured (`./build.sh image` first; needs QEMU).", ""] \
            if boot else []
    rows = []
    for n, (floor, image) in enumerate(zip(boot["floor"], boot["image"], strict=True), 1):
        rows.append([n, f"{floor['load_before']:.1f} / {image['load_before']:.1f}",
                     f"{floor.get('online_s', float('nan')):.1f}",
                     f"{image.get('online_s', float('nan')):.1f}",
                     f"{floor.get('cpu_s', float('nan')):.1f}",
                     f"{image.get('cpu_s', float('nan')):.1f}",
                     f"{floor.get('ram_used_kib', 0) / 1024:.1f}",
                     f"{image.get('ram_used_kib', 0) / 1024:.1f}"])
    extra_s, extra_ram = boot["extra_online_s"], boot["extra_ram_used_kib"] / 1024
    size = boot["initramfs_bytes"]
    return [f"Discovery image in QEMU ({boot['accel']}, two NICs, 512 MiB, 2 vCPUs, direct "
            "kernel boot) against its floor, busybox alone on the same kernel, booted "
            "alternately: power-on to online (the floor: to its /init's first line), the "
            "QEMU process's CPU seconds to then, and RAM in use at idle (MemTotal - "
            "MemAvailable in the guest, 10 s after online). Load: the 1-minute load average "
            "before each boot.", "",
            *_table(["round", "load floor / image", "floor online s", "image online s",
                     "floor CPU s", "image CPU s", "floor RAM MiB", "image RAM MiB"], rows),
            f"Medians of the rounds' differences: online +{extra_s:.1f} s "
            f"(+{boot['extra_cpu_s']:.1f} CPU s), RAM +{extra_ram:.1f} MiB. Targets: online "
            f"<= floor + 2 s {_met(extra_s <= 2)}, RAM <= floor + 30 MiB "
            f"{_met(extra_ram <= 30)}, initramfs <= 20 MB {_met(size <= 20_000_000)} "
            f"({size:,} bytes; failed boots {boot['failed']}).", ""]


def item6(r: dict[str, Any]) -> list[str]:
    return ["## 6. Correctness under volume", "",
            *_table(["messages", "path", "unique", "sum", "expected", "correct", "duplicates",
                     "seconds", "msg/s"],
                    [[r["count"], r["path"], r["unique"], r["sum"], r["expected_sum"],
                      r["correct"], r["duplicates"], r["seconds"], r["msg_s"]]])]


def item7(r: dict[str, Any]) -> list[str]:
    rows = []
    for key, name in (("small", "small mode: embedded broker + scheduler + agent"),
                      ("full", "RabbitMQ + Mosquitto + bridge + scheduler + agent")):
        e = r[key]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in e["idle"].items())
        rows.append([name, e["idle_total_mib"], e["peak_rss_mib"], parts,
                     "yes" if e["all_succeeded"] else "no"])
    return ["## 7. Footprint of the small mode", "",
            f"Total RSS (MiB) of every process, idle and peak under load ({r['load']}).", "",
            *_table(["set-up", "idle", "under load", "idle by process", "all succeeded"], rows),
            f"Ratio full/small: idle {r['idle_ratio']:.1f}x, under load {r['load_ratio']:.1f}x.",
            "", *_item7_hostile(r.get("hostile"))]


def _item7_hostile(h: dict[str, Any] | None) -> list[str]:
    """Issue 23: the scheduler of the small mode idle, in a hostile burst, and after it."""
    if not h or "idle_mib" not in h:
        return []
    bursts = sorted(int(k[5:-4]) for k in h if k.startswith("after") and k.endswith("_mib")
                    and not k.endswith("idle_mib"))
    rows = [[n, h[f"burst{n}_peak_mib"], h[f"after{n}_mib"], h[f"after{n}_minus_idle_mib"],
             _met(h[f"after{n}_minus_idle_mib"] <= 10)] for n in bursts]
    return [f"Scheduler RSS (MiB), small mode: idle {h['idle_mib']} (target <= 64: "
            f"{_met(h['idle_mib'] <= 64)}); each burst: {h['readers']} SSE readers that never "
            f"read while a task prints {h['output_mb']} MB, and {h['burst1_requests']} hostile "
            f"requests (bench/hostile_memory.py).", "",
            *_table(["burst", "peak", "after", "after - idle", "<= 10 MiB"], rows)]


def item8(r: dict[str, Any]) -> list[str]:
    mem = [[name, e["single_mib"], e["cluster_mib"], e["per_cluster_node_mib"]]
           for name, e in (("NATS (JetStream + MQTT)", r["memory"]["nats_jetstream_mqtt"]),
                           ("RabbitMQ", r["memory"]["rabbitmq"]))]
    fail = [[name, f"{e['reconnected']}/{e['runs']}",
             ", ".join(f"{t:.2f}" for t in e["seconds"]), e["median_s"]]
            for name, e in (("MQTT client on NATS", r["failover"]["mqtt_nats"]),
                            ("scheduler's AMQP messenger on RabbitMQ (quorum queue)",
                             r["failover"]["amqp_rabbitmq"]))]
    return ["## 8. Clusters: memory and failover", "",
            "RSS (MiB) of the broker processes at rest, one node against three "
            "(deploy/nats, deploy/rabbitmq):", "",
            *_table(["broker", "1 node", "3 nodes", "per node"], mem),
            "Failover: kill -9 of the node a client is on, to connected to another (s):", "",
            *_table(["client", "reconnected", "runs (s)", "median (s)"], fail),
            *_item8_stall(r["failover"].get("stall_rabbitmq"))]


def _item8_stall(st: dict[str, Any] | None) -> list[str]:
    """The stall a user sees on RabbitMQ (bench/failover.py)."""
    if not st:
        return []
    rows = [[i + 1, k["stall_s"], ", ".join(c for c, on in
                                             k["connections_on_killed_node"].items() if on)
             or "none", len(k["queue_leaders_on_killed_node"]), k["dispatch_refused"],
             k["dispatch_refused_for_s"]] for i, k in enumerate(st["kills"])]
    return ["", f"Stall as a user sees it: {st['rate_per_s']:.0f} tasks/s through the bridge "
            f"to {st['agents']} agents, the node leading the scheduler's queue killed -9; the "
            "longest gap between two recorded completions from 1 s before to 10 s after "
            f"(quiet seconds before: {st['quiet_longest_gap_s']} s; bench/failover.py):", "",
            *_table(["kill", "stall (s)", "connections on it", "queue leaders on it",
                     "dispatches refused", "refused for (s)"], rows)]


def _item9(r: dict[str, Any]) -> list[str]:
    from bench.controlplane import render  # item 9 renders itself (bench/controlplane.py)
    return render(r)


def _item10(r: dict[str, Any]) -> list[str]:
    from bench.workqueue import render  # the work queue renders itself (bench/workqueue.py)
    return render(r)


def _item11(r: dict[str, Any]) -> list[str]:
    from bench.apilatency import render as posts
    from bench.history import render  # history at scale, POST latency: their own modules
    return [*render(r["history"]), *posts(r["post"])]


SECTIONS = {"1": item1, "2": item2, "3": item3, "4": item4, "5": item5, "6": item6, "7": item7,
            "8": item8, "9": _item9, "10": _item10, "11": _item11}


def markdown(results: dict[str, Any]) -> str:
    m, v = results["machine"], results["versions"]
    lines = ["# edgerun benchmarks", "",
             f"Run {results['started']} ({results['mode']}, {results['elapsed_s']:.0f} s). "
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
             f"{m['kernel']}, nofile {m['nofile']}. Versions: "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ". " + TARGETS, "",
             "Load average (1 min) before the run and after each item: "
             + ", ".join([f"{results.get('load_average_before', [0])[0]:.1f}"]
                         + [f"{k}: {i.get('load_average_after', [0])[0]:.1f}"
                            for k, i in results["items"].items()])
             + " (on 2 cores; other work on the machine shows here).", ""]
    for merged in results.get("merged", []):
        many = len(merged["items"]) > 1
        lines += [f"Item{'s' if many else ''} {', '.join(merged['items'])} "
                  f"{'were' if many else 'was'} run again at {merged['at']} "
                  "(`--merge`); that run replaces the earlier one.", ""]
    for key, render in SECTIONS.items():
        item = results["items"].get(key)
        if item is None:
            continue
        if "error" in item:
            lines += [f"## {key}. failed", "", f"`{item['error']}`", ""]
            continue
        try:
            lines += render(item)
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            lines += [f"## {key}. (could not render: {exc!r})", ""]
    for name in results.get("plots", []):
        lines += [f"![{name}]({name})", ""]
    if results.get("notes"):
        lines += ["## Notes", "", results["notes"], ""]
    return "\n".join(lines)


# --- plots ---------------------------------------------------------------------------
def plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    items = results["items"]
    if "rows" in items.get("1", {}):
        rows = items["1"]["rows"]
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{_size(r['size'])} {r['direction']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["bridge_msg_s"] for r in rows], 0.4, label="edgerun bridge")
        ax.bar([i + 0.2 for i in x], [r["plugin_msg_s"] for r in rows], 0.4,
               label="RabbitMQ MQTT plugin")
        ax.set_xticks(list(x), labels)
        ax.set_yscale("log")
        ax.set_ylabel("messages/s (QoS 1, log)")
        ax.legend()
        ax.set_title("Item 1: throughput, median of runs")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        plt.close(fig)
        made.append("throughput.png")
    if "direct" in items.get("2", {}):
        fig, ax = plt.subplots(figsize=(8, 4))
        for mode in ("direct", "bridge"):
            if mode not in items["2"]:
                continue
            for load, key in (("light", "runs_ms"), ("loaded", "runs_ms_sample")):
                values = sorted(items["2"][mode][load][key])
                if values:
                    ax.plot(values, [i / len(values) for i in range(len(values))],
                            label=f"{mode}, {load}")
        ax.set_xscale("log")
        ax.set_xlabel("dispatch -> succeeded, ms (log)")
        ax.set_ylabel("fraction of tasks")
        ax.axvline(2, color="grey", linestyle=":")
        ax.axvline(10, color="grey", linestyle=":")
        ax.legend()
        ax.set_title("Item 2: round trip of `true`, CDF")
        fig.tight_layout()
        fig.savefig(out / "roundtrip.png", dpi=100)
        plt.close(fig)
        made.append("roundtrip.png")
    if "rows" in items.get("3", {}):
        rows = items["3"]["rows"]
        nodes = [r["nodes"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for path, label in (("bridge", "edgerun bridge"), ("plugin", "MQTT plugin")):
            axes[0].plot(nodes, [r[path]["fanout_s"] for r in rows], "o-", label=label)
            axes[1].plot(nodes, [r[path]["idle"]["queues"] for r in rows], "o-", label=label)
            axes[2].plot(nodes, [r[path]["idle"]["rabbit_rss_mib"] for r in rows], "o-",
                         label=label)
        for ax, title in zip(axes, ("fan-out to all nodes, s", "RabbitMQ queues",
                                    "RabbitMQ RSS, MiB"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("nodes")
            ax.set_title(title)
            ax.legend()
        axes[1].set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=100)
        plt.close(fig)
        made.append("scale.png")
    return made
