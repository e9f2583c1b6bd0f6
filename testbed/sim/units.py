"""systemd's units as the simulated host's manager keeps them.

Imitates systemd (PID 1): the ActiveState/SubState pairs that ``systemctl is-active``, ``show``
and ``list-units`` report (systemctl(1); org.freedesktop.systemd1(5) documents the states),
``systemctl is-system-running``'s starting/degraded/running (systemctl(1)), systemctl's unit
name mangling (a name without a suffix means ``NAME.service``), and ``systemctl status``'s first
lines. Also the units a NixOS configuration defines (``"units"`` of the simulated
configuration): starting one (a unit with a ``port`` runs :mod:`testbed.sim.unit_server`),
stopping it, and telling whether its definition changed, which is how nixpkgs'
switch-to-configuration decides what to restart.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from typing import Any

from testbed.procs import is_alive, proc_start_time, terminate
from testbed.sim.host import Host
from testbed.sim.server import spawn_helper
from testbed.store import canonical_json

UNIT_READY_TIMEOUT = 5.0
UNIT_SUFFIXES = (
    ".service",
    ".timer",
    ".socket",
    ".target",
    ".mount",
    ".path",
    ".slice",
    ".scope",
    ".device",
    ".swap",
    ".automount",
)


def unit_view(unit: dict[str, Any], now: float | None = None) -> tuple[str, str]:
    """(ActiveState, SubState) of a unit record as systemd would report it right now."""
    moment = time.time() if now is None else now
    active = str(unit.get("active", "inactive"))
    sub = str(unit.get("sub", "dead"))
    if active == "active" and float(unit.get("activating_until") or 0) > moment:
        return "activating", "start"
    pid = unit.get("pid")
    if (
        active == "active"
        and sub == "running"
        and pid
        and not is_alive(int(pid), unit.get("pid_start"))
    ):
        wrapper = unit.get("wrapper_pid")
        if wrapper and is_alive(int(wrapper), unit.get("wrapper_start")):
            # a transient service's main process just exited and its wrapper (systemd's side,
            # testbed.sim.systemd_run) is recording the result: systemd would be reaping it
            # now, not showing it failed (a switch that starts as another ends saw this)
            return "deactivating", "stop"
        return "failed", "failed"
    return active, sub


def system_state(units: dict[str, dict[str, Any]]) -> str:
    """What ``systemctl is-system-running`` prints: starting, degraded or running."""
    now = time.time()
    views = {n: unit_view(u, now)[0] for n, u in units.items()}
    if any(v == "activating" and units[n].get("origin") == "config" for n, v in views.items()):
        return "starting"
    if "failed" in views.values():
        return "degraded"
    return "running"


def mangle(name: str) -> str:
    """systemctl's name mangling: a name without a unit suffix means NAME.service."""
    if name.endswith(UNIT_SUFFIXES) or any(ch in name for ch in "*?["):
        return name
    return f"{name}.service"


def default_description(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return f"{stem[:1].upper()}{stem[1:]} unit"


def server_def(udef: dict[str, Any], label: str) -> str:
    if udef.get("port"):
        return canonical_json({**udef, "_label": label})
    return canonical_json(udef)


def _start_server(host: Host, name: str, udef: dict[str, Any], label: str) -> tuple[int, int, str]:
    """Start the HTTP server of a unit with a port; (pid, start time, error text)."""
    read_fd, write_fd = os.pipe()
    args = [
        "unit-server",
        "--addr",
        host.address,
        "--port",
        str(int(udef["port"])),
        "--status",
        str(int(udef.get("http_status", 200))),
        "--body",
        f"{name} {label}".strip(),
        "--ready-fd",
        str(write_fd),
    ]
    log = host.log(name)
    try:
        proc = spawn_helper(host, args, host.service_env(), log, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], UNIT_READY_TIMEOUT)
        data = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    start = proc_start_time(proc.pid)
    if data.startswith(b"ok") and start is not None:
        host.pids.add(proc.pid, f"unit {name}")
        return proc.pid, start, ""
    terminate(proc.pid, start, timeout=1.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    except OSError:
        tail = []
    return 0, 0, (tail[0] if tail else "did not become ready")


def stop_unit_process(host: Host, unit: dict[str, Any]) -> None:
    pid = unit.get("pid")
    if pid:
        terminate(int(pid), unit.get("pid_start"))
        host.pids.remove(int(pid))
    wrapper = unit.get("wrapper_pid")
    if wrapper:
        terminate(int(wrapper), unit.get("wrapper_start"))
        host.pids.remove(int(wrapper))


def start_config_unit(host: Host, name: str, udef: dict[str, Any], label: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "origin": "config",
        "description": str(udef.get("description") or default_description(name)),
        "def": server_def(udef, label),
        "result": "success",
    }
    if udef.get("fail"):
        record.update(active="failed", sub="failed", result="exit-code", exit_status=1)
        return record
    if udef.get("inactive"):  # installed but not started (no wantedBy): loaded, inactive, dead
        record.update(active="inactive", sub="dead")
        return record
    if udef.get("port"):
        pid, start, error = _start_server(host, name, udef, label)
        if error:
            print(f"{name}: {error}", file=sys.stderr)
            record.update(active="failed", sub="failed", result="exit-code", exit_status=1)
            return record
        record.update(active="active", sub="running", pid=pid, pid_start=start)
        return record
    sub = {
        ".timer": "waiting",
        ".target": "active",
        ".socket": "listening",
        ".mount": "mounted",
        ".path": "waiting",
    }.get("." + name.rsplit(".", 1)[-1], "running")
    record.update(active="active", sub=sub)
    return record


def units_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    units = config.get("units") or {}
    if isinstance(units, list):
        return {mangle(str(n)): {} for n in units}
    return {mangle(str(n)): dict(d or {}) for n, d in dict(units).items()}


def status_lines(name: str, unit: dict[str, Any]) -> list[str]:
    active, sub = unit_view(unit)
    mark = "×" if active == "failed" else "●"
    result = unit.get("result", "success")
    return [
        f"{mark} {name} - {unit.get('description', name)}",
        f"     Loaded: loaded (/etc/systemd/system/{name}; enabled; preset: enabled)",
        f"     Active: {active} ({sub if active != 'failed' else 'Result: ' + str(result)})",
    ]


def timer_refs(units: dict[str, dict[str, Any]], service: str) -> bool:
    return any(u.get("service") == service for n, u in units.items() if n.endswith(".timer"))
