"""What both benchmarks share: simulated hosts with a switchable, counting latency proxy, the
inventory and flake for them, running the real `invoke`, and CPU accounting.

CPU accounting matters on a small machine: the simulated hosts run on the same cores as rebuild
(every `systemctl`, `readlink` ... on a test host is a Python shim), so a fleet run can be bound
by the simulation's CPU rather than by anything rebuild waits for. As root the benchmark puts the
hosts' sshds and the `invoke` process tree into their own cpuacct cgroups (v1) and reports their
CPU exactly; otherwise it falls back to /proc/stat and rusage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebuild import identity
from testbed import SimHost, Testbed, netns_available
from testbed.proxy import LatencyProxy

REPO = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 1
CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")


# --------------------------------------------------------------------------- latency proxy


class CountingProxy(LatencyProxy):
    """The test bed's delaying proxy, with a latency that can change between measurements and
    a count of request/response exchanges: a chunk going host→client after one going
    client→host ends one exchange (one round trip someone waited for)."""

    def __init__(self, listen_host: str, target_host: str, target_port: int,
                 latency_ms: int) -> None:  # fmt: skip
        super().__init__(listen_host, target_host, target_port, latency_ms)
        self.exchanges = 0
        self.chunks = 0
        self._last_up = False
        self._count_lock = threading.Lock()

    def set_latency(self, latency_ms: int) -> None:
        self.one_way = max(0, latency_ms) / 2000.0

    def reset(self) -> None:
        with self._count_lock:
            self.exchanges = 0
            self.chunks = 0

    def _note(self, up: bool) -> None:
        """Count per proxy, not per connection: measure one connection at a time."""
        with self._count_lock:
            self.chunks += 1
            if not up and self._last_up:
                self.exchanges += 1
            self._last_up = up

    def forwarded(self, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        self._note(int(peer[1]) == self.target_port)  # writing to the sshd: client→host


# --------------------------------------------------------------------------- CPU accounting


def _proc_stat() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / tick, idle / tick


class CpuGroups:
    """cpuacct cgroups `hosts` and `operator` (root only; else `available` is False)."""

    def __init__(self) -> None:
        self.base = CGROUP_ROOT / f"rbbench-{os.getpid()}"
        self.available = False
        if os.geteuid() != 0 or not (CGROUP_ROOT / "cgroup.procs").exists():
            return
        try:
            for group in ("hosts", "operator"):
                (self.base / group).mkdir(parents=True, exist_ok=True)
            self.available = True
        except OSError:
            self.available = False

    def path(self, group: str) -> Path:
        return self.base / group / "cgroup.procs"

    def add(self, group: str, pid: int) -> None:
        if self.available:
            with contextlib.suppress(OSError):
                self.path(group).write_text(f"{pid}\n", encoding="ascii")

    def usage(self, group: str) -> float:
        if not self.available:
            return 0.0
        return int((self.base / group / "cpuacct.usage").read_text()) / 1e9

    def wrap(self, argv: list[str], group: str) -> list[str]:
        """argv that joins the cgroup before exec (so every child is accounted)."""
        if not self.available:
            return argv
        return ["/bin/sh", "-c", f'echo $$ > {self.path(group)} && exec "$@"', "sh", *argv]

    def close(self) -> None:
        if not self.available:
            return
        for group in ("operator", "hosts"):
            with contextlib.suppress(OSError):
                for pid in self.path(group).read_text().split():
                    with contextlib.suppress(OSError):
                        (CGROUP_ROOT / "cgroup.procs").write_text(pid + "\n")
            with contextlib.suppress(OSError):
                (self.base / group).rmdir()
        with contextlib.suppress(OSError):
            self.base.rmdir()


@dataclass
class Cpu:
    """CPU seconds spent during one measurement."""

    wall: float
    busy: float  # the whole machine
    idle: float
    hosts: float = 0.0  # simulated hosts: sshd, sessions, shims, units (cgroup; root only)
    operator: float = 0.0  # the invoke process tree: rebuild, nix / nixos-rebuild stand-ins, ssh
    tool: float = 0.0  # the rebuild process alone

    @property
    def floor(self) -> float:
        """The shortest wall time this much CPU work can take on this machine."""
        return self.busy / CORES


@contextlib.contextmanager
def cpu_meter(groups: CpuGroups) -> Iterator[Cpu]:
    busy0, idle0 = _proc_stat()
    hosts0, op0 = groups.usage("hosts"), groups.usage("operator")
    start = time.monotonic()
    cpu = Cpu(0, 0, 0)
    yield cpu
    busy1, idle1 = _proc_stat()
    cpu.wall = time.monotonic() - start
    cpu.busy, cpu.idle = busy1 - busy0, idle1 - idle0
    cpu.hosts = groups.usage("hosts") - hosts0
    op = groups.usage("operator") - op0
    cpu.operator = max(op, cpu.operator)


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the test bed


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def web_config(label: str, ports: list[int]) -> dict[str, Any]:
    units: dict[str, Any] = {"sshd.service": {}}
    for i, port in enumerate(ports):
        units["web.service" if i == 0 else f"web{i}.service"] = {"port": port}
    return {"units": units, "label": label}


@dataclass
class BenchHost:
    """A simulated host reachable directly (0 ms) or through its counting proxy."""

    sim: SimHost
    proxy: CountingProxy
    ports: list[int]

    @property
    def name(self) -> str:
        return self.sim.name

    @property
    def web_address(self) -> str:
        """Where its web units listen (seen from the host itself)."""
        return self.sim.sshd_address

    def address(self, via_proxy: bool) -> tuple[str, int]:
        if via_proxy:
            return self.proxy.listen_host, self.proxy.port
        return self.sim.sshd_address, self.sim.sshd_port

    def ssh_true_argv(self, tb: Testbed, via_proxy: bool) -> list[str]:
        address, port = self.address(via_proxy)
        return [
            "ssh", "-F", "/dev/null", "-i", str(tb.client_key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={tb.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=no", "-p", str(port), f"{self.sim.user}@{address}", "--", "true",
        ]  # fmt: skip


@dataclass
class Bed:
    """A test bed with N bench hosts, a git flake for them, and CPU groups."""

    tb: Testbed
    groups: CpuGroups
    netns: bool
    hosts: list[BenchHost] = field(default_factory=list)
    flake: Path = Path()
    round: int = 0
    runs: int = 0

    @classmethod
    @contextlib.contextmanager
    def open(cls, count: int, *, web_ports: int = 1, want_netns: bool = True,
             say: Callable[[str], None] = print) -> Iterator[Bed]:  # fmt: skip
        groups = CpuGroups()
        netns = want_netns and netns_available() is None
        try:
            with Testbed() as tb:
                bed = cls(tb, groups, netns)
                started = time.monotonic()
                for i in range(count):
                    bed._add(f"h{i:02d}", i, web_ports)
                bed.flake = tb.make_flake(
                    tb.root / "flake",
                    {h.name: web_config("r0", h.ports) for h in bed.hosts},
                )
                where = "network namespaces" if netns else "loopback addresses"
                say(f"  {count} simulated hosts in {where} ready in "
                    f"{time.monotonic() - started:.1f}s")  # fmt: skip
                try:
                    yield bed
                finally:
                    for h in bed.hosts:
                        h.proxy.stop()
        finally:
            groups.close()

    def _add(self, name: str, index: int, web_ports: int) -> None:
        tb = self.tb
        address = None if self.netns else f"127.0.{88 + index // 250}.{1 + index % 250}"
        ports = [free_port() for _ in range(web_ports)]
        sim = tb.add_host(name, netns=self.netns, address=address,
                          initial_config=web_config("r0", ports))  # fmt: skip
        if sim.sshd is not None:
            self.groups.add("hosts", sim.sshd.pid)
        if sim.server is not None:  # the host's simulator: its commands run in its children
            self.groups.add("hosts", sim.server.pid)
        listen = "127.0.0.1" if self.netns else sim.sshd_address
        proxy = CountingProxy(listen, sim.sshd_address, sim.sshd_port, 0)
        proxy.start()
        key_name = (
            sim.sshd_address if sim.sshd_port == 22 else f"[{sim.sshd_address}]:{sim.sshd_port}"
        )
        with tb.known_hosts.open("a", encoding="utf-8") as fh:
            fh.write(f"{key_name} {sim.host_key_line}\n")
            fh.write(f"[{listen}]:{proxy.port} {sim.host_key_line}\n")
        self.hosts.append(BenchHost(sim, proxy, ports))

    def set_latency(self, latency_ms: int) -> None:
        for h in self.hosts:
            h.proxy.set_latency(latency_ms)

    # ------------------------------------------------------------------ flake and inventory

    def bump(self) -> str:
        """Commit a new configuration for every host: the next rollout changes each one."""
        self.round += 1
        label = f"r{self.round}"
        for h in self.hosts:
            (self.flake / "hosts" / f"{h.name}.json").write_text(
                json.dumps(web_config(label, h.ports), indent=2, sort_keys=True) + "\n"
            )
        git = ["git", "-c", "safe.directory=*", "-C", str(self.flake)]
        subprocess.run([*git, "add", "-A"], check=True, capture_output=True)
        subprocess.run([*git, "commit", "-qm", label], check=True, capture_output=True)
        return label

    def inventory(self, path: Path, *, via_proxy: bool, verify: Callable[[BenchHost], list[str]]
                  | None = None, settle_timeout: float = 10) -> Path:  # fmt: skip
        """An inventory of every host (direct or through the proxies)."""
        me = identity.current()
        lines = [
            f'flake = "{self.flake}"',
            f'known_hosts = "{self.tb.known_hosts}"',
            f'audit_log = "{path.parent / "audit.jsonl"}"',
            "connect_timeout = 15",
            "confirm_count_above = 100",
            "",
            "[[operators]]",
            'name = "bench"',
            f'machine_id = "{me.machine_id}"',
        ]
        for h in self.hosts:
            address, port = h.address(via_proxy)
            lines += [
                "",
                f"[hosts.{h.name}]",
                f'address = "{address}"',
                f"port = {port}",
                f'user = "{h.sim.user}"',
                f'identity_file = "{self.tb.client_key}"',
                "rollback_timeout = 120",
                'tags = ["bench"]',
                "",
                f"[hosts.{h.name}.verify]",
                f"settle_timeout = {settle_timeout}",
            ]
            if verify is None:
                web = h.ports[0]
                lines += [
                    'units = ["sshd.service", "web.service"]',
                    f"ports = [{web}]",
                    f"[[hosts.{h.name}.verify.http]]",
                    f'url = "http://{h.web_address}:{web}/"',
                    "status = 200",
                ]
            else:
                lines += verify(h)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


# --------------------------------------------------------------------------- running invoke


@dataclass
class InvokeRun:
    returncode: int
    stdout: str
    stderr: str
    cpu: Cpu


def run_invoke(bed: Bed, inventory: Path, *args: str, timeout: float = 600) -> InvokeRun:
    """The real `invoke` as a subprocess, with a fresh ssh control folder (no connection left
    over from an earlier measurement), its CPU accounted."""
    bed.runs += 1
    runtime = Path(bed.tb.root) / f"x{bed.runs}"  # short: ssh's ControlPath lives below it
    runtime.mkdir(mode=0o700)
    env = {**os.environ, **bed.tb.env(), "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("REBUILD_INVENTORY", None)
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args,
            "--inventory", str(inventory)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with cpu_meter(bed.groups) as cpu:
        proc = subprocess.Popen(
            bed.groups.wrap(argv, "operator"), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        tool = 0.0
        stop = threading.Event()

        def sample() -> None:
            nonlocal tool
            while not stop.wait(0.05):
                value = _proc_cpu(proc.pid)
                if value is not None:
                    tool = max(tool, value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate(timeout=timeout)
        stop.set()
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.tool = tool
    tree = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu.operator = max(cpu.operator, tree)
    return InvokeRun(proc.returncode, out, err, cpu)


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ssh_true(bed: Bed, hosts: list[BenchHost], *, via_proxy: bool) -> float:
    """Wall time of a bare `ssh host true` to every host at once (a fresh connection each)."""

    def one(h: BenchHost) -> None:
        done = subprocess.run(h.ssh_true_argv(bed.tb, via_proxy), capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ssh {h.name} true failed: {done.stderr.strip()}")

    def all_at_once() -> None:
        threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return timed(all_at_once)


def require_tools() -> str | None:
    """Why the benchmark cannot run here, or None."""
    from testbed import sshd_missing_message

    missing = sshd_missing_message()
    if missing:
        return missing
    if shutil.which("ssh") is None:
        return "the ssh client is missing (Debian package openssh-client)"
    return None
