"""Fleet benchmark: one host vs N hosts (default 20), with 0 ms and 50 ms added per round trip.

Measured, each in the same run and against the same hosts:
- baseline: a bare `ssh host true` (a fresh connection) to one host, and to all at once;
- the bare stand-in `nixos-rebuild switch --target-host` to one host, and to all at once (one
  process per host, in parallel): the fleet ratio rebuild is measured against;
- rollout with verification: `invoke rebuild --host h00 --yes` vs `invoke rebuild --all --yes
  --jobs N`, every host moving to a new configuration (a new commit) each time; wall time of
  the real `invoke` process, from start to exit;
- verification only: what a rollout's verification step does (open the host's connection,
  gather the facts, evaluate the checks), for one host vs all hosts in parallel, in-process
  through rebuild's library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bed import CORES, Bed, BenchHost, Cpu, cpu_meter, median, run_invoke, ssh_true
from benchmarks.preview import bare_switch
from rebuild import hostrun
from rebuild.inventory import load

TARGET = 1.5
BARE_TARGET = 1.1  # rebuild's fleet ratio over the bare nixos-rebuild's


@dataclass
class Pair:
    """One measurement for one host and for the whole fleet."""

    name: str
    one: float
    many: float
    cpu_many: Cpu | None = None
    cpu_one: Cpu | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.many / self.one if self.one else float("nan")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"one_s": round(self.one, 3), "many_s": round(self.many, 3),
                                "ratio": round(self.ratio, 2)}  # fmt: skip
        if self.cpu_many is not None:
            c = self.cpu_many
            data["many_cpu"] = {
                "busy_s": round(c.busy, 2), "idle_s": round(c.idle, 2),
                "hosts_s": round(c.hosts, 2), "operator_s": round(c.operator, 2),
                "rebuild_process_s": round(c.tool, 2), "cpu_floor_s": round(c.floor, 2),
            }  # fmt: skip
        if self.cpu_one is not None:
            data["one_cpu_busy_s"] = round(self.cpu_one.busy, 2)
            data["projected_ratio"] = round(projected(self), 2)
        return data


def rollout(bed: Bed, inventory: Path, args: list[str]) -> Cpu:
    bed.bump()
    done = run_invoke(bed, inventory, "rebuild", *args, "--yes")
    if done.returncode != 0:
        raise RuntimeError(
            f"rollout {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done.cpu


def bare_rollout(bed: Bed, hosts: list[BenchHost], via_proxy: bool) -> float:
    """The bare stand-in nixos-rebuild switch to every host at once; wall seconds."""
    bed.bump()
    started = time.monotonic()

    def one(h: BenchHost) -> float:
        return bare_switch(bed, h, via_proxy, bed.tb.root / f"bare-{bed.round}-{h.name}")

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(one, hosts))
    return time.monotonic() - started


def verify_hosts(bed: Bed, inventory: Path, hosts: list[BenchHost]) -> Cpu:
    """Connect to every host and run the verification, all hosts in parallel."""
    loaded = load(str(inventory))
    expected = {h.name: h.sim.current_system() for h in hosts}
    runs = []
    for h in hosts:
        target = loaded.target(h.name)
        endpoint = hostrun.endpoint_for(loaded, target)
        runs.append(hostrun.HostRun(target, endpoint, "verify", "bench"))

    def one(hr: hostrun.HostRun) -> bool:
        try:
            hr.connection()
            return hostrun.verify_host(hr, expected[hr.name], settle_timeout=0).ok
        finally:
            hr.close()

    own = time.process_time()
    with cpu_meter(bed.groups) as cpu, ThreadPoolExecutor(max_workers=len(runs)) as pool:
        oks = list(pool.map(one, runs))
    # rebuild runs in this process here (the latency proxies' threads are counted too)
    cpu.tool = cpu.operator = time.process_time() - own
    if not all(oks):
        raise RuntimeError("verification failed on " + ", ".join(
            hr.name for hr, ok in zip(runs, oks, strict=True) if not ok))  # fmt: skip
    return cpu


def measure(bed: Bed, latency_ms: int, reps: int, say: Callable[[str], None]) -> list[Pair]:
    n = len(bed.hosts)
    via_proxy = latency_ms > 0
    bed.set_latency(latency_ms)
    folder = bed.tb.root / f"bench-{latency_ms}ms"
    folder.mkdir()
    inventory = bed.inventory(folder / "inventory.toml", via_proxy=via_proxy)
    first = bed.hosts[:1]
    say(f"  {latency_ms} ms: ssh true")
    ssh = Pair(
        "ssh host true (baseline)",
        median([ssh_true(bed, first, via_proxy=via_proxy) for _ in range(max(3, reps))]),
        median([ssh_true(bed, bed.hosts, via_proxy=via_proxy) for _ in range(max(2, reps))]),
    )
    say(f"  {latency_ms} ms: bare nixos-rebuild switch, 1 host x{reps}, then {n} hosts")
    bare = Pair(
        "bare nixos-rebuild switch",
        median([bare_rollout(bed, first, via_proxy) for _ in range(reps)]),
        bare_rollout(bed, bed.hosts, via_proxy),
    )
    say(f"  {latency_ms} ms: rollout with verification, 1 host x{reps}, then {n} hosts")
    ones = [rollout(bed, inventory, ["--host", first[0].name]) for _ in range(reps)]
    many = rollout(bed, inventory, ["--all", "--jobs", str(n)])
    one_cpu = sorted(ones, key=lambda c: c.wall)[len(ones) // 2]
    deploy_pair = Pair("rollout + verification", one_cpu.wall, many.wall, many, one_cpu)
    say(f"  {latency_ms} ms: verification only, 1 host vs {n} hosts")
    v_ones = [verify_hosts(bed, inventory, first) for _ in range(max(3, reps))]
    v_many = [verify_hosts(bed, inventory, bed.hosts) for _ in range(max(2, reps))]
    v_one = sorted(v_ones, key=lambda c: c.wall)[len(v_ones) // 2]
    v_mid = sorted(v_many, key=lambda c: c.wall)[len(v_many) // 2]
    verify_pair = Pair("verification only", v_one.wall, v_mid.wall, v_mid, v_one)
    return [ssh, bare, deploy_pair, verify_pair]


def run(hosts: int = 20, reps: int = 2, *, want_netns: bool = True,
        say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    say(f"fleet benchmark: 1 host vs {hosts} hosts")
    started = time.monotonic()
    results: dict[str, Any] = {"hosts": hosts, "cores": CORES}
    with Bed.open(hosts, want_netns=want_netns, say=say) as bed:
        results["netns"] = bed.netns
        results["cgroups"] = bed.groups.available
        for latency in (0, 50):
            pairs = measure(bed, latency, reps, say)
            results[f"{latency}ms"] = {p.name: p.to_json() for p in pairs}
            results.setdefault("_pairs", {})[latency] = pairs
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def projected(p: Pair) -> float:
    """The ratio if the hosts' own work ran on their own CPUs (see the report's legend)."""
    if p.cpu_many is None or not p.one:
        return float("nan")
    return max(p.one, p.cpu_many.operator / CORES) / p.one


def report(results: dict[str, Any]) -> str:
    n = results["hosts"]
    where = "network namespaces" if results["netns"] else "loopback addresses"
    lines = [
        "",
        f"Fleet: 1 host vs {n} hosts ({where}; {results['cores']} CPU cores; "
        f"target: {n} hosts within {TARGET}x of one host)",
        "",
        f"{'latency':>7}  {'measurement':26} {'1 host':>8} {f'{n} hosts':>9} {'ratio':>6}  "
        f"{'vs target':9}  {f'CPU floor ({n})':>14}",
    ]
    for latency, pairs in results["_pairs"].items():
        for p in pairs:
            verdict = "" if p.name.startswith(("ssh", "bare")) else (
                "ok" if p.ratio <= TARGET else "MISSED")  # fmt: skip
            floor = f"{p.cpu_many.floor:13.1f}s" if p.cpu_many is not None else ""
            lines.append(
                f"{latency:>5}ms  {p.name:26} {p.one:7.2f}s {p.many:8.2f}s {p.ratio:5.1f}x  "
                f"{verdict:9}  {floor:>14}"
            )
    lines += [""]
    for latency, pairs in results["_pairs"].items():
        by_name = {p.name: p for p in pairs}
        bare, ours = by_name["bare nixos-rebuild switch"], by_name["rollout + verification"]
        lines.append(
            f"{latency:>5}ms  rebuild's {n}-over-1 ratio / the bare nixos-rebuild's: "
            f"{ours.ratio:.2f} / {bare.ratio:.2f} = {ours.ratio / bare.ratio:.2f}x "
            f"(issue #17's goal: at most {BARE_TARGET}x)"
        )
    lines += ["", f"Where the CPU went during the {n}-host runs (CPU seconds):", ""]
    lines.append(
        f"{'latency':>7}  {'measurement':26} {'wall':>7} {'hosts':>7} {'operator':>9} "
        f"{'rebuild':>8} {'busy':>6} {'idle':>6}  {'wall/limit':>10}  {'projected':>9}"
    )
    for latency, pairs in results["_pairs"].items():
        for p in pairs:
            c = p.cpu_many
            if c is None:
                continue
            limit = max(p.one, c.floor)
            lines.append(
                f"{latency:>5}ms  {p.name:26} {c.wall:6.1f}s {c.hosts:6.1f}s {c.operator:8.1f}s "
                f"{c.tool:7.1f}s {c.busy:5.1f}s {c.idle:5.1f}s  {c.wall / limit:9.2f}x  "
                f"{projected(p):8.2f}x"
            )
    lines += [
        "",
        "hosts: the simulated hosts' sshd, sessions and shims (cpuacct cgroup; 0 when not root);",
        "operator: the invoke process tree (rebuild itself, the nix and nixos-rebuild",
        "stand-ins, ssh); rebuild: the rebuild process alone (for the in-process",
        "verification both are the benchmark's own process, latency proxies included);",
        f"CPU floor: machine busy / {results['cores']} cores, the shortest wall time that much "
        "work can take here;",
        "wall/limit: the N-host wall time over max(1-host wall, CPU floor): 1.00x means rebuild",
        "adds no waiting of its own, the machine's CPU is the limit;",
        "projected: a projection, not a measurement: the ratio if every host did its share on",
        "its own CPU, as real hosts do, so that only the operator side shares this machine:",
        "max(1-host wall, operator CPU / cores) / 1-host wall.",
    ]
    return "\n".join(lines)
