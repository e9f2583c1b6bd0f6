"""Network namespaces for test hosts that must be cut off the network (root only).

Each namespace is named ``rbtb-<creator pid>-<index>`` and joined to the root namespace by a
veth pair ``rbtb<index>h`` (root side) / ``rbtb<index>n`` (namespace side) carrying a /30 out of
10.214.0.0/16: ``10.214.<index // 64>.<(index % 64) * 4 + 1>`` on the root side, ``+ 2`` inside.
Indexes are allocated under an exclusive lock on ``/run/rbtb-netns.lock`` by looking at the
namespaces that exist, so concurrent test processes never share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import is_alive, terminate

PREFIX = "rbtb-"
LOCK_PATH = Path("/run/rbtb-netns.lock")
MAX_INDEX = 16384  # /30 networks in a /16
_NAME = re.compile(r"^rbtb-(\d+)-(\d+)$")


class NetnsError(RuntimeError):
    """Namespace setup failed or is impossible here."""


def _ip() -> str:
    return shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_ip(), *args], capture_output=True, text=True, timeout=20, check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def netns_available() -> str | None:
    """None when namespaces can be used, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (the test bed's netns mode runs sshd as root)"
    if shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        return "the `ip` command (Debian package iproute2) is missing"
    try:
        result = run_ip("netns", "list", check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` failed: {exc}"
    if result.returncode != 0:
        return f"`ip netns list` failed: {result.stderr.strip()}"
    return None


@dataclass(frozen=True)
class Netns:
    name: str
    index: int
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def exec_prefix(self) -> list[str]:
        return [_ip(), "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        run_ip("-n", self.name, "link", "set", "dev", self.ns_if, "up" if up else "down")


def addresses(index: int) -> tuple[str, str]:
    third, slot = divmod(index, 64)
    base = slot * 4
    return f"10.214.{third}.{base + 1}", f"10.214.{third}.{base + 2}"


def list_namespaces() -> list[str]:
    result = run_ip("netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    with LOCK_PATH.open("a+b") as handle:
        deadline = time.monotonic() + 60.0
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NetnsError(f"timed out waiting for {LOCK_PATH}") from None
                time.sleep(0.05)
        yield


def _delete(name: str, index: int | None) -> None:
    # processes left inside a namespace would keep its veth alive: end them first
    pids = run_ip("netns", "pids", name, check=False).stdout.split()
    for text in pids:
        if text.isdigit():
            terminate(int(text), None, timeout=2.0)
    run_ip("netns", "del", name, check=False)
    if index is not None:
        run_ip("link", "del", f"rbtb{index}h", check=False)


def cleanup_stale_netns() -> list[str]:
    """Delete ``rbtb-*`` namespaces whose creator process is gone; returns their names."""
    if os.geteuid() != 0:
        return []
    with _allocation_lock():
        return _cleanup_stale_locked()


def _cleanup_stale_locked() -> list[str]:
    removed: list[str] = []
    for name in list_namespaces():
        m = _NAME.match(name)
        if not m:
            continue
        if not is_alive(int(m.group(1))):
            _delete(name, int(m.group(2)))
            removed.append(name)
    return removed


def create_netns() -> Netns:
    """Allocate and set up a namespace with a veth pair; raises NetnsError if impossible."""
    why = netns_available()
    if why:
        raise NetnsError(why)
    with _allocation_lock():
        _cleanup_stale_locked()
        used = {int(m.group(2)) for n in list_namespaces() if (m := _NAME.match(n))}
        index = next((i for i in range(MAX_INDEX) if i not in used), None)
        if index is None:
            raise NetnsError("no free /30 left in 10.214.0.0/16")
        name = f"{PREFIX}{os.getpid()}-{index}"
        host_if, ns_if = f"rbtb{index}h", f"rbtb{index}n"
        host_ip, ns_ip = addresses(index)
        run_ip("link", "del", host_if, check=False)  # leftover of a crash mid-setup
        try:
            run_ip("netns", "add", name)
            run_ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            run_ip("link", "set", ns_if, "netns", name)
            run_ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            run_ip("link", "set", host_if, "up")
            run_ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            run_ip("-n", name, "link", "set", ns_if, "up")
            run_ip("-n", name, "link", "set", "lo", "up")
        except NetnsError:
            _delete(name, index)
            raise
        return Netns(
            name=name, index=index, host_if=host_if, ns_if=ns_if, host_ip=host_ip, ns_ip=ns_ip
        )


def delete_netns(ns: Netns) -> None:
    """Remove the namespace and its veth pair (idempotent)."""
    _delete(ns.name, ns.index)
