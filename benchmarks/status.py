"""Status benchmark: `invoke status` of one host vs N hosts (default 20), at 0 ms and +50 ms.

Measured in the same run, against the same simulated hosts:
- baseline: a bare `ssh host true` (a fresh connection) to one host, and to all at once;
- `invoke status --host h00` vs `invoke status --all`: the real command as a subprocess, start
  to exit (Python start, gates, one connection and one remote script per host, one `nix eval` of
  HEAD for every host, the audit records).

Every host runs HEAD, so each run must exit 0. The goal: N hosts within 1.5x of one host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks.bed import CORES, Bed, Cpu, median, run_invoke, ssh_true

TARGET = 1.5


def status_run(bed: Bed, inventory: Any, args: list[str]) -> Cpu:
    done = run_invoke(bed, inventory, "status", *args)
    if done.returncode != 0:
        raise RuntimeError(
            f"invoke status {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}"
            f"\n{done.stderr[-2000:]}"
        )
    return done.cpu


def middle(cpus: list[Cpu]) -> Cpu:
    return sorted(cpus, key=lambda c: c.wall)[len(cpus) // 2]


def measure(bed: Bed, latency_ms: int, reps: int, say: Callable[[str], None]) -> dict[str, Any]:
    n = len(bed.hosts)
    via_proxy = latency_ms > 0
    bed.set_latency(latency_ms)
    folder = bed.tb.root / f"status-{latency_ms}ms"
    folder.mkdir()
    inventory = bed.inventory(folder / "inventory.toml", via_proxy=via_proxy)
    first = bed.hosts[:1]
    say(f"  {latency_ms} ms: ssh true, 1 host then {n}")
    ssh_one = median([ssh_true(bed, first, via_proxy=via_proxy) for _ in range(max(3, reps))])
    ssh_many = median([ssh_true(bed, bed.hosts, via_proxy=via_proxy)
                       for _ in range(max(3, reps))])  # fmt: skip
    say(f"  {latency_ms} ms: invoke status, 1 host x{reps}, then {n} hosts x{reps}")
    status_run(bed, inventory, ["--host", first[0].name])  # warm: caches, .pyc
    one = middle([status_run(bed, inventory, ["--host", first[0].name]) for _ in range(reps)])
    many = middle([status_run(bed, inventory, ["--all"]) for _ in range(reps)])
    return {"ssh_one": ssh_one, "ssh_many": ssh_many, "one": one, "many": many}


def run(hosts: int = 20, reps: int = 3, *, want_netns: bool = True,
        say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    say(f"status benchmark: invoke status, 1 host vs {hosts} hosts")
    started = time.monotonic()
    results: dict[str, Any] = {"hosts": hosts, "cores": CORES}
    with Bed.open(hosts, want_netns=want_netns, say=say) as bed:
        results["netns"] = bed.netns
        results["cgroups"] = bed.groups.available
        for latency in (0, 50):
            m = measure(bed, latency, reps, say)
            one, many = m["one"], m["many"]
            results[f"{latency}ms"] = {
                "ssh_true": {"one_s": round(m["ssh_one"], 3), "many_s": round(m["ssh_many"], 3),
                             "ratio": round(m["ssh_many"] / m["ssh_one"], 2)},
                "status": {
                    "one_s": round(one.wall, 3), "many_s": round(many.wall, 3),
                    "ratio": round(many.wall / one.wall, 2),
                    "many_cpu": {"busy_s": round(many.busy, 2), "hosts_s": round(many.hosts, 2),
                                 "operator_s": round(many.operator, 2),
                                 "rebuild_process_s": round(many.tool, 2),
                                 "cpu_floor_s": round(many.floor, 2)},
                    "one_cpu_busy_s": round(one.busy, 2),
                    "projected_ratio": round(projected(one, many), 2),
                },
            }  # fmt: skip
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def projected(one: Cpu, many: Cpu) -> float:
    """The ratio if each simulated host ran on its own CPU, as real hosts do: only the operator
    side (the invoke process tree) shares this machine."""
    return max(one.wall, many.operator / CORES) / one.wall if one.wall else float("nan")


def report(results: dict[str, Any]) -> str:
    n = results["hosts"]
    where = "network namespaces" if results["netns"] else "loopback addresses"
    lines = [
        "",
        f"Status: invoke status, 1 host vs {n} hosts ({where}; {results['cores']} CPU cores; "
        f"target: {n} hosts within {TARGET}x of one host)",
        "",
        f"{'latency':>7}  {'measurement':26} {'1 host':>8} {f'{n} hosts':>9} {'ratio':>6}  "
        f"{'vs target':9}  {'projected':>9}",
    ]
    for latency in (0, 50):
        r = results[f"{latency}ms"]
        ssh, st = r["ssh_true"], r["status"]
        lines.append(f"{latency:>5}ms  {'ssh host true (baseline)':26} {ssh['one_s']:7.2f}s "
                     f"{ssh['many_s']:8.2f}s {ssh['ratio']:5.1f}x")  # fmt: skip
        verdict = "ok" if st["ratio"] <= TARGET else "MISSED"
        lines.append(f"{latency:>5}ms  {'invoke status':26} {st['one_s']:7.2f}s "
                     f"{st['many_s']:8.2f}s {st['ratio']:5.1f}x  {verdict:9}  "
                     f"{st['projected_ratio']:8.2f}x")  # fmt: skip
    lines += ["", f"CPU seconds during the {n}-host `invoke status` runs:", ""]
    lines.append(f"{'latency':>7}  {'wall':>7} {'hosts':>7} {'operator':>9} {'rebuild':>8} "
                 f"{'busy':>6}  {'CPU floor':>9}")  # fmt: skip
    for latency in (0, 50):
        st = results[f"{latency}ms"]["status"]
        c = st["many_cpu"]
        lines.append(f"{latency:>5}ms  {st['many_s']:6.2f}s {c['hosts_s']:6.2f}s "
                     f"{c['operator_s']:8.2f}s {c['rebuild_process_s']:7.2f}s "
                     f"{c['busy_s']:5.2f}s  {c['cpu_floor_s']:8.2f}s")  # fmt: skip
    lines += [
        "",
        "hosts: the simulated hosts' sshd, sessions and shims (cpuacct cgroup; 0 when not root);",
        "operator: the invoke process tree (rebuild, the nix eval stand-in); rebuild: the",
        f"rebuild process alone; CPU floor: machine busy / {results['cores']} cores;",
        "projected: not a measurement: the ratio if every simulated host had its own CPU, as",
        "real hosts do: max(1-host wall, operator CPU / cores) / 1-host wall.",
    ]
    return "\n".join(lines)
