"""Verification benchmark (issue 4): does the cost of verification grow with the checks?

One simulated host behind a delaying proxy that adds 50 ms to every round trip and counts the
request/response exchanges. For 1, 10 and 50 operator checks (rotating: unit active, TCP port
listening, command exits 0, a readlink of /run/current-system), each measured `reps` times on a
fresh connection, median reported:
- `ssh host true`: the floor, one fresh OpenSSH connection and one command;
- rebuild, in-process: open the connection (Fabric/paramiko, strict host keys), then one
  verification (`hostrun.verify_host`); remote commands counted by wrapping `Remote.run`;
- `invoke verify --host h00`: the real command, end to end (Python start, git, nix eval, the
  connection and the verification);
- testinfra (paramiko backend, the same checks through its modules): a fresh connection and one
  command per check, plus what testinfra runs to detect the system.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bed import Bed, BenchHost, median, run_invoke, ssh_true
from rebuild import hostrun
from rebuild.inventory import load
from rebuild.remote import Remote

LATENCY_MS = 50
COUNTS = (1, 10, 50)
KINDS = ("unit", "port", "command", "file")
COMMAND = "test -r /etc/hostname"
FILE = "/run/current-system"


def kinds(n: int) -> list[str]:
    return [KINDS[i % len(KINDS)] for i in range(n)]


def web_units_needed(n: int) -> int:
    return max(1, kinds(n).count("unit"), kinds(n).count("port"))


def unit_name(k: int) -> str:
    return "web.service" if k == 0 else f"web{k}.service"


def rebuild_spec(n: int) -> Callable[[BenchHost], list[str]]:
    """inventory lines of a [hosts.NAME.verify] table with n operator checks."""

    def lines(h: BenchHost) -> list[str]:
        ks = kinds(n)
        units = [unit_name(k) for k in range(ks.count("unit"))]
        ports = h.ports[: ks.count("port")]
        out = [f"units = {units!r}".replace("'", '"'), f"ports = {ports!r}"]
        for i, kind in enumerate(ks):
            if kind == "command":
                out += [f"[[hosts.{h.name}.verify.commands]]", f'name = "c{i}"',
                        f'run = "{COMMAND}"']  # fmt: skip
            elif kind == "file":
                out += [f"[[hosts.{h.name}.verify.commands]]", f'name = "f{i}"',
                        f"run = 'test -n \"$(readlink -f {FILE})\"'"]  # fmt: skip
        return out

    return lines


@dataclass
class Sample:
    wall: float
    connect: float
    commands: int
    exchanges: int
    connect_exchanges: int


@contextmanager
def counting_remote_runs() -> Iterator[list[int]]:
    """Count `Remote.run` calls (one exec channel each) while the block runs."""
    counter = [0]
    original = Remote.run

    def counted(self: Remote, script: str, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(self, script, **kwargs)

    Remote.run = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        Remote.run = original  # type: ignore[method-assign]


def rebuild_once(inventory: Path, h: BenchHost) -> Sample:
    loaded = load(str(inventory))
    target = loaded.target(h.name)
    hr = hostrun.HostRun(target, hostrun.endpoint_for(loaded, target), "verify", "bench")
    expected = h.sim.current_system()
    h.proxy.reset()
    with counting_remote_runs() as runs:
        start = time.monotonic()
        hr.connection()
        connected = time.monotonic()
        connect_exchanges = h.proxy.exchanges
        report = hostrun.verify_host(hr, expected, settle_timeout=0)
        end = time.monotonic()
    exchanges = h.proxy.exchanges
    hr.close()
    if not report.ok:
        failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]
        raise RuntimeError(f"rebuild verification failed: {failed}")
    return Sample(end - start, connected - start, runs[0], exchanges, connect_exchanges)


def testinfra_once(bed: Bed, h: BenchHost, n: int) -> Sample:
    import paramiko
    import testinfra  # type: ignore[import-untyped]
    from testinfra.modules import service  # type: ignore[import-untyped]

    # the simulated host has no /run/systemd/system; tell testinfra it is systemd, as NixOS is
    service.Service.get_module_class = classmethod(lambda cls, host: service.SystemdService)
    address, port = h.address(via_proxy=True)
    host = testinfra.get_host(f"paramiko://{h.sim.user}@{address}:{port}")
    backend = host.backend
    counter = [0]
    original = backend.run

    def counted(command: str, *args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(command, *args, **kwargs)

    backend.run = counted
    h.proxy.reset()
    start = time.monotonic()
    client = paramiko.SSHClient()
    client.load_host_keys(str(bed.tb.known_hosts))  # strict: no TOFU in the comparison either
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(address, port=port, username=h.sim.user, key_filename=str(bed.tb.client_key),
                   look_for_keys=False, allow_agent=False, timeout=15)  # fmt: skip
    backend.__dict__["client"] = client  # testinfra's cached_property
    connected = time.monotonic()
    connect_exchanges = h.proxy.exchanges
    ks = kinds(n)
    unit_k = port_k = 0
    failed = []
    for i, kind in enumerate(ks):
        if kind == "unit":
            ok = host.service(unit_name(unit_k)).is_running
            unit_k += 1
        elif kind == "port":
            ok = host.socket(f"tcp://{h.web_address}:{h.ports[port_k]}").is_listening
            port_k += 1
        elif kind == "command":
            ok = host.run(COMMAND).rc == 0
        else:
            ok = host.check_output("readlink -f %s", FILE).startswith("/")
        if not ok:
            failed.append(f"{kind} {i}")
    end = time.monotonic()
    exchanges = h.proxy.exchanges
    client.close()
    if failed:
        raise RuntimeError(f"testinfra checks failed: {failed}")
    return Sample(end - start, connected - start, counter[0], exchanges, connect_exchanges)


def cli_once(bed: Bed, inventory: Path, h: BenchHost) -> Sample:
    h.proxy.reset()
    done = run_invoke(bed, inventory, "verify", "--host", h.name)
    if done.returncode != 0:
        raise RuntimeError(f"invoke verify exited {done.returncode}: {done.stderr[-2000:]}")
    return Sample(done.cpu.wall, 0.0, 0, h.proxy.exchanges, 0)


def mid(samples: list[Sample]) -> Sample:
    return sorted(samples, key=lambda s: s.wall)[len(samples) // 2]


def run(reps: int = 3, say: Callable[[str], None] = print) -> dict[str, Any]:
    say(f"verification benchmark: checks {', '.join(map(str, COUNTS))} at {LATENCY_MS} ms")
    with_testinfra = importlib.util.find_spec("testinfra") is not None
    if not with_testinfra:
        say("  testinfra is not installed, so it is left out: .venv/bin/pip install -e '.[bench]'")
    started = time.monotonic()
    results: dict[str, Any] = {"latency_ms": LATENCY_MS, "rows": []}
    with Bed.open(1, web_ports=web_units_needed(max(COUNTS)), want_netns=False, say=say) as bed:
        h = bed.hosts[0]
        bed.set_latency(LATENCY_MS)
        walls = []
        for _ in range(max(3, reps)):
            h.proxy.reset()
            walls.append(ssh_true(bed, [h], via_proxy=True))
        results["ssh_true"] = {"wall_s": round(median(walls), 3), "exchanges": h.proxy.exchanges}
        for n in COUNTS:
            say(f"  {n} checks")
            inventory = bed.inventory(bed.tb.root / f"verify-{n}.toml", via_proxy=True,
                                      verify=rebuild_spec(n), settle_timeout=0)  # fmt: skip
            rebuild_s = mid([rebuild_once(inventory, h) for _ in range(reps)])
            cli_s = mid([cli_once(bed, inventory, h) for _ in range(reps)])
            row = {"checks": n, "rebuild": rebuild_s.__dict__, "invoke_verify": cli_s.__dict__}
            if with_testinfra:
                row["testinfra"] = mid([testinfra_once(bed, h, n) for _ in range(reps)]).__dict__
            results["rows"].append(row)
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def report(results: dict[str, Any]) -> str:
    ssh = results["ssh_true"]
    lines = [
        "",
        f"Verification: cost vs number of checks, {results['latency_ms']} ms added per round trip",
        f"(baseline: ssh host true = {ssh['wall_s']:.2f}s, {ssh['exchanges']} exchanges)",
        "",
        f"{'checks':>6}  {'tool':34} {'wall':>7} {'/ssh':>5} {'connect':>8} {'checks':>7} "
        f"{'commands':>8} {'exchanges':>9}",
    ]
    for row in results["rows"]:
        for key, label in (("rebuild", "rebuild (connect + verify)"),
                           ("invoke_verify", "invoke verify (whole command)"),
                           ("testinfra", "testinfra paramiko (same checks)")):  # fmt: skip
            if key not in row:
                continue
            s = row[key]
            checks = s["wall"] - s["connect"] if s["connect"] else float("nan")
            commands = str(s["commands"]) if s["commands"] else "-"
            connect = f"{s['connect']:7.2f}s" if s["connect"] else "       -"
            check_col = f"{checks:6.2f}s" if s["connect"] else "      -"
            times_ssh = s["wall"] / ssh["wall_s"]
            lines.append(
                f"{row['checks']:>6}  {label:34} {s['wall']:6.2f}s {times_ssh:4.1f}x "
                f"{connect} {check_col} {commands:>8} {s['exchanges']:>9}"
            )
    lines += [
        "",
        "commands: remote commands (exec channels) for the checks; exchanges: request/response",
        "turns seen by the proxy, connection set-up included (for invoke verify: everything).",
    ]
    return "\n".join(lines)
