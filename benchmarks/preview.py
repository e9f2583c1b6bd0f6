"""Preview benchmark: what the preview costs, on one host, at 0 ms and +50 ms.

Measured in the same run, against the same simulated host, each run switching the host to a
new committed configuration (a package bump and a changed unit, so the preview has something
to show):
- baseline: the bare stand-in `nixos-rebuild switch --flake FLAKE#h00 --target-host ...
  --no-reexec` (ng), with NIX_SSHOPTS for the host: the build, the copy and the activation,
  nothing else;
- `invoke rebuild --host h00 --yes --no-preview`: rebuild's gates, lock, dead-man timer,
  nixos-rebuild, verification, audit;
- `invoke rebuild --host h00 --yes`: the same, with the preview before the prompt (the build,
  `nix copy` to the host, one round trip of the host's own tools).

Wall time of each process, start to exit (median of the repetitions), its ratio to the
baseline, and the full evaluations each cost, read from the stand-ins' log
(`$RBTB_ROOT/evaluations.jsonl`, with Nix's evaluation cache modelled: testbed/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bed import CORES, Bed, BenchHost, median, run_invoke

MODES = ("bare nixos-rebuild switch", "invoke rebuild --no-preview", "invoke rebuild (preview)")


def bump(bed: Bed, host: BenchHost) -> None:
    """Commit the host's next configuration: openssl one version up, web.service changed."""
    bed.round += 1
    port = host.ports[0]
    config = {
        "units": {"sshd.service": {}, "web.service": {"port": port, "stop_if_changed": False}},
        "label": f"p{bed.round}",
        "packages": {"openssl": f"3.0.{bed.round}", "nginx": "1.24.0"},
    }
    (bed.flake / "hosts" / f"{host.name}.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
    git = ["git", "-c", "safe.directory=*", "-C", str(bed.flake)]
    subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", f"p{bed.round}"], check=True, capture_output=True)


def evaluations(bed: Bed) -> list[dict[str, Any]]:
    path = bed.tb.root / "evaluations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def bare_switch(bed: Bed, host: BenchHost, via_proxy: bool, folder: Path | None = None) -> float:
    """The stand-in nixos-rebuild alone, as an operator would type it (from `folder`)."""
    address, port = host.address(via_proxy)
    tb = bed.tb
    sshopts = (
        f"-F /dev/null -i {tb.client_key} -o IdentitiesOnly=yes -o UserKnownHostsFile="
        f"{tb.known_hosts} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
        f"-o BatchMode=yes -o LogLevel=ERROR -p {port}"
    )
    env = {**os.environ, **tb.env(), "NIX_SSHOPTS": sshopts}
    argv = [str(tb.nixos_rebuild("ng")), "switch", "--flake", f"{bed.flake}#{host.name}",
            "--target-host", f"{host.sim.user}@{address}", "--no-reexec"]  # fmt: skip
    folder = folder or tb.root / f"bare-{bed.round}"
    folder.mkdir(parents=True)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, cwd=folder, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"nixos-rebuild switch exited {done.returncode}:\n{done.stderr}")
    return wall


def one_run(bed: Bed, host: BenchHost, inventory: Path, mode: str,
            via_proxy: bool) -> tuple[float, int, dict[str, float], int | None]:  # fmt: skip
    """(wall seconds, full evaluations, the audit's timings, the audit's remote commands) of
    one switch in `mode`."""
    bump(bed, host)
    since = len(evaluations(bed))
    timings: dict[str, float] = {}
    commands: int | None = None
    if mode == MODES[0]:
        wall = bare_switch(bed, host, via_proxy)
    else:
        args = ["rebuild", "--host", host.name, "--yes"]
        args += ["--no-preview"] if mode == MODES[1] else []
        done = run_invoke(bed, inventory, *args)
        if done.returncode != 0:
            raise RuntimeError(f"invoke {' '.join(args)} exited {done.returncode}:\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")  # fmt: skip
        wall = done.cpu.wall
        audit = inventory.parent / "audit.jsonl"
        record = json.loads(audit.read_text().splitlines()[-1])
        timings, commands = record.get("timings", {}), record.get("remote_commands")
    full = sum(1 for e in evaluations(bed)[since:] if not e["cached"])
    return wall, full, timings, commands


def measure(bed: Bed, latency_ms: int, reps: int, say: Callable[[str], None]) -> dict[str, Any]:
    host = bed.hosts[0]
    via_proxy = latency_ms > 0
    bed.set_latency(latency_ms)
    folder = bed.tb.root / f"preview-{latency_ms}ms"
    folder.mkdir()
    inventory = bed.inventory(folder / "inventory.toml", via_proxy=via_proxy)
    say(f"  {latency_ms} ms: warm-up")
    one_run(bed, host, inventory, MODES[2], via_proxy)  # caches, .pyc, the host's first copy
    results: dict[str, Any] = {}
    runs: dict[str, list[tuple[float, int, dict[str, float], int | None]]] = {m: [] for m in MODES}
    for rep in range(reps):  # interleaved, so a slow moment of the machine hits every mode
        say(f"  {latency_ms} ms: repetition {rep + 1} of {reps}")
        for mode in MODES:
            runs[mode].append(one_run(bed, host, inventory, mode, via_proxy))
    for mode in MODES:
        walls = [r[0] for r in runs[mode]]
        middle = sorted(runs[mode], key=lambda r: r[0])[len(runs[mode]) // 2]
        results[mode] = {
            "wall_s": round(median(walls), 3),
            "evaluations": sorted({r[1] for r in runs[mode]}),
            "timings": middle[2],
            "remote_commands": sorted({r[3] for r in runs[mode] if r[3] is not None}),
        }
    base = results[MODES[0]]["wall_s"]
    for mode in MODES:
        results[mode]["ratio"] = round(results[mode]["wall_s"] / base, 2) if base else None
        results[mode]["overhead_s"] = round(results[mode]["wall_s"] - base, 3)
    return results


def run(reps: int = 3, *, want_netns: bool = True,
        say: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    say("preview benchmark: one host, invoke rebuild with and without the preview vs the bare "
        "nixos-rebuild switch")  # fmt: skip
    started = time.monotonic()
    results: dict[str, Any] = {"cores": CORES, "reps": reps}
    with Bed.open(1, want_netns=want_netns, say=say) as bed:
        results["netns"] = bed.netns
        for latency in (0, 50):
            results[f"{latency}ms"] = measure(bed, latency, reps, say)
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "",
        f"Preview: one host, median of {results['reps']} switches each ({results['cores']} CPU "
        "cores); the ratio is to the bare nixos-rebuild switch of the same host",
        "",
        f"{'latency':>7}  {'measurement':30} {'wall':>7} {'ratio':>6} {'+bare':>7}  "
        f"{'evaluations':>11} {'cmds':>4}  phases (audit timings, s)",
    ]
    for latency in (0, 50):
        block = results[f"{latency}ms"]
        for mode in MODES:
            r = block[mode]
            evals = ", ".join(str(n) for n in r["evaluations"])
            phases = " ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()
                              if k in ("build", "copy", "activation", "verification"))  # fmt: skip
            cmds = ", ".join(str(n) for n in r["remote_commands"]) or "-"
            lines.append(f"{latency:>5}ms  {mode:30} {r['wall_s']:6.2f}s {r['ratio']:5.2f}x "
                         f"{r['overhead_s']:+6.2f}s  {evals:>11} {cmds:>4}  {phases}")  # fmt: skip
    lines += [
        "",
        "evaluations: full evaluations of the configuration per switch (the stand-ins' log;",
        "a build Nix's evaluation cache answers is not one); the bare nixos-rebuild evaluates",
        "once; rebuild without the preview evaluates with `nix build --dry-run --json` and",
        "with it builds once before the prompt, both answering nixos-rebuild's own build from",
        "the cache. build/copy: the preview's build and `nix copy` (they run before the prompt).",
        "+bare: seconds more than the bare nixos-rebuild (issue #17's goal at 50 ms: at most",
        "+0.80 s). cmds: commands over rebuild's own SSH connection (the audit's",
        "remote_commands, one round trip each).",
    ]
    return "\n".join(lines)
