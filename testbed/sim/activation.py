"""``<system>/bin/switch-to-configuration switch|boot|test|dry-activate``.

Imitates nixpkgs' switch-to-configuration (``pkgs/by-name/sw/switch-to-configuration-ng``, the
Rust rewrite, and the Perl ``nixos/modules/system/activation/switch-to-configuration.pl`` it
replaced; the rules are in the NixOS manual's "Unit handling",
``nixos/doc/manual/development/unit-handling.section.md``), deciding per unit as
``src/src/main.rs`` does (:func:`plan`): of the units active now, one gone from the new
configuration is stopped; one whose definition changed (``compare_units``: the description
does not count; a change of ``reload_triggers`` alone, ``X-Reload-Triggers``, is a reload) is
handled as ``handle_modified_unit`` does: ``reload_if_changed`` (``X-ReloadIfChanged``): reload;
``restart_if_changed = false`` (``X-RestartIfChanged``): left alone ("would NOT stop"); not a
service, or ``stop_if_changed = false`` (``X-StopIfChanged``): restarted; otherwise (a service,
the NixOS default) stopped before the activation and started after it. New units are started by
the targets (``multi-user.target``), which the output does not list; the switch reports them
afterwards ("the following new units were started"). The configuration is activated
(``/run/current-system`` points at the new system; the first activation of a host also sets
``/run/booted-system``, as its boot would), and a unit that failed makes the exit code 4 after a
``systemctl status``-like report. ``boot`` only updates the boot loader. ``dry-activate`` changes
nothing and prints on stderr, in this order and each line only when it has units: ``would stop
the following units: ...``, ``would NOT stop the following changed units: ...``, ``would
activate the configuration...``, ``would restart systemd`` (the configuration's ``systemd``
value changed), ``would reload ...``, ``would restart ...``, ``would start ...``, units sorted
by lower-cased name. A configuration with ``cut_network`` takes the host's link down after
activating (a host that cut itself off), in a network namespace only.

Every action first takes switch-to-configuration-ng's lock (``do_system_switch`` in
``pkgs/by-name/sw/switch-to-configuration-ng/src/src/main.rs``): ``/run/nixos`` is created
(mode 0755), ``/run/nixos/switch-to-configuration.lock`` opened for appending (created) and
locked with a non-blocking exclusive ``flock``, held until the program ends; when another switch
holds it the program prints ``Could not acquire lock`` on stderr and exits with errno
(``die()``: EAGAIN, 11). Here the path is the host's (``$SIM_ROOT/run/nixos/...``), the same
file the host's ``flock`` shim maps ``/run/nixos/...`` to. Two test bed knobs of the
configuration, not of NixOS: ``activation_seconds`` makes the program work that long under the
lock before it switches (a slow boot-loader install or unit start), printing a line every second
(a long but chatty activation; not for ``dry-activate``); every run is noted in
``$SIM_ROOT/sim/log/activations.jsonl`` (phase ``locked`` once it holds the lock, ``end`` with
its exit code; system, action, pid, start, end), so tests can tell the order of two switches.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.sim.host import Host, locked_state
from testbed.sim.units import (
    default_description,
    server_def,
    start_config_unit,
    status_lines,
    stop_unit_process,
    unit_view,
    units_of,
)
from testbed.store import SimError, load_system

LOCK_NAME = "switch-to-configuration.lock"  # in the host's /run/nixos
EAGAIN = 11  # switch-to-configuration's exit code when another switch holds the lock
JOURNAL = "activations.jsonl"  # in the host's sim/log


def _ip_link(host: Host, up: bool) -> None:
    iface = host.info.get("iface")
    if not host.info.get("netns") or not iface:
        return
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"
    result = subprocess.run(
        [ip, "link", "set", "dev", str(iface), "up" if up else "down"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        print(f"warning: ip link set {iface}: {result.stderr.strip()}", file=sys.stderr)


def set_run_link(host: Host, name: str, store_path: str) -> None:
    """Point the host's ``/run/NAME`` at a store path (atomically)."""
    run = host.root / "run"
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(store_path)
    tmp.replace(run / name)


def _set_current_system(host: Host, store_path: str) -> None:
    set_run_link(host, "current-system", store_path)
    # the first system a host activates is the one it booted (NixOS's stage 2 makes
    # /run/booted-system at boot; the test bed's hosts boot by their first activation)
    if not (host.root / "run" / "booted-system").is_symlink():
        set_run_link(host, "booted-system", store_path)


@dataclass
class Plan:
    """What switching to a configuration does to the units active now (stc-ng's lists)."""

    stop: set[str] = field(default_factory=set)
    skip: set[str] = field(default_factory=set)  # changed, but left running
    reload: set[str] = field(default_factory=set)
    restart: set[str] = field(default_factory=set)
    start: set[str] = field(default_factory=set)  # stopped before the activation


def _restart_relevant(udef: dict[str, Any]) -> dict[str, Any]:
    """What of a unit's definition needs a restart when it changes (compare_units ignores
    the [Unit] section's Description, and X-Reload-Triggers asks for a reload)."""
    return {k: v for k, v in udef.items() if k not in ("description", "reload_triggers")}


def compare(old_def: str, new_udef: dict[str, Any], label: str) -> str:
    """``compare_units``: ``equal``, ``restart`` or ``reload``."""
    try:
        old_udef = json.loads(old_def)
    except (TypeError, ValueError):
        return "restart"
    old_label = old_udef.pop("_label", None) if isinstance(old_udef, dict) else None
    if not isinstance(old_udef, dict):
        return "restart"
    new_label = label if new_udef.get("port") else None
    if _restart_relevant(old_udef) != _restart_relevant(new_udef) or old_label != new_label:
        return "restart"
    if old_udef.get("reload_triggers") != new_udef.get("reload_triggers"):
        return "reload"
    return "equal"


def plan(active: dict[str, str], new_units: dict[str, dict[str, Any]], label: str) -> Plan:
    """The lists of stc-ng's ``do_system_switch`` for the units active now (name -> their
    current definition)."""
    result = Plan()
    for name, old_def in active.items():
        if name not in new_units:
            result.stop.add(name)  # X-StopOnRemoval defaults to true
            continue
        udef = new_units[name]
        verdict = compare(old_def, udef, label)
        if verdict == "reload":
            result.reload.add(name)
        elif verdict == "restart":
            _modified(result, name, udef)
    result.reload -= result.restart | result.stop
    return result


def _modified(result: Plan, name: str, udef: dict[str, Any]) -> None:
    """``handle_modified_unit``."""
    if name.endswith((".slice", ".socket")) or name in (
        "sysinit.target", "basic.target", "multi-user.target", "graphical.target",
    ):  # fmt: skip
        return  # cannot be restarted directly (sockets: nixpkgs issue 74899)
    if udef.get("reload_if_changed") and name not in result.restart | result.stop:
        result.reload.add(name)
    elif udef.get("restart_if_changed") is False:
        result.skip.add(name)
    elif udef.get("stop_if_changed") is False or not name.endswith(".service"):
        result.restart.add(name)
    else:
        result.stop.add(name)
        result.start.add(name)


def _sorted(units: set[str]) -> str:
    return ", ".join(sorted(units, key=str.lower))


def _current_config(host: Host) -> dict[str, Any]:
    link = host.root / "run" / "current-system"
    try:
        return load_system(os.path.realpath(link))[1]
    except (OSError, ValueError, KeyError):
        return {}


def _failed_units(state: dict[str, Any]) -> list[str]:
    now = time.time()
    return sorted(n for n, u in state["units"].items() if unit_view(u, now)[0] == "failed")


def activate(host: Host, store_path: str, action: str) -> int:
    """switch-to-configuration ACTION of ``store_path`` on ``host``."""
    _attr, config = load_system(store_path)
    label = str(config.get("label", ""))
    new_units = units_of(config)
    out = sys.stderr
    if action == "boot":
        print("updating the boot loader configuration...", file=out)
        return 0
    systemd_changed = _current_config(host).get("systemd") != config.get("systemd")
    with locked_state(host, write=action != "dry-activate") as state:
        units: dict[str, dict[str, Any]] = state["units"]
        old = {n: u for n, u in units.items() if u.get("origin") == "config"}
        now = time.time()
        active = {
            n: str(u.get("def"))
            for n, u in old.items()
            if unit_view(u, now)[0] in ("active", "activating")
        }
        todo = plan(active, new_units, label)
        if action == "dry-activate":
            for words, names in (
                ("would stop the following units", todo.stop),
                ("would NOT stop the following changed units", todo.skip),
            ):
                if names:
                    print(f"{words}: {_sorted(names)}", file=out)
            print("would activate the configuration...", file=out)
            if systemd_changed:
                print("would restart systemd", file=out)
            for verb, names in (("reload", todo.reload), ("restart", todo.restart),
                                ("start", todo.start)):  # fmt: skip
                if names:
                    print(f"would {verb} the following units: {_sorted(names)}", file=out)
            return 0
        # units not active now (failed ones included) that the new configuration has are
        # started again by its targets, as are new units
        inactive = {n for n in old if n not in active and n in new_units}
        fresh = {n for n in new_units if n not in old}
        if todo.stop:
            print(f"stopping the following units: {_sorted(todo.stop)}", file=out)
        for name in sorted(todo.stop | inactive | (set(old) - set(new_units))):
            stop_unit_process(host, units[name])
            del units[name]
        if not config.get("cut_network"):
            _ip_link(host, up=True)
        print("activating the configuration...", file=out)
        print("setting up /etc...", file=out)
        _set_current_system(host, store_path)
        print("reloading user units for root...", file=out)
        if systemd_changed:
            print("restarting systemd...", file=out)
        if todo.reload:
            print(f"reloading the following units: {_sorted(todo.reload)}", file=out)
        if todo.restart:
            print(f"restarting the following units: {_sorted(todo.restart)}", file=out)
        if todo.start:
            print(f"starting the following units: {_sorted(todo.start)}", file=out)
        starting = float(config.get("starting_seconds") or 0)
        for name in sorted(todo.restart | todo.start | inactive | fresh):
            if name in units:
                stop_unit_process(host, units[name])
            record = start_config_unit(host, name, new_units[name], label)
            if starting > 0 and record["active"] == "active":
                record["activating_until"] = time.time() + starting
            units[name] = record
        for name, udef in new_units.items():
            # reloaded or left running too: the unit file is the new one, the process stays
            units[name]["def"] = server_def(udef, label)
            units[name]["description"] = str(udef.get("description") or default_description(name))
        started = {n for n in fresh | inactive if units[n].get("active") == "active"}
        if started:
            print(f"the following new units were started: {_sorted(started)}", file=out)
        state["activated"] = {"system": store_path, "at": time.time(), "action": action}
        if config.get("cut_network"):
            if host.info.get("netns"):
                _ip_link(host, up=False)
            else:
                print("note: cut_network ignored, host is not in a network namespace", file=out)
        failed = _failed_units(state)
        if failed:
            print(f"warning: the following units failed: {', '.join(failed)}", file=out)
            for name in failed:
                print("", file=out)
                for line in status_lines(name, units[name]):
                    print(line, file=out)
            return 4
    return 0


def stc_main(script: str, argv: Sequence[str]) -> int:
    """``<store path>/bin/switch-to-configuration ACTION``."""
    store_path = str(Path(script).resolve().parent.parent)
    usage = "Usage: switch-to-configuration [switch|boot|test|dry-activate]"
    if len(argv) != 1 or argv[0] not in ("switch", "boot", "test", "dry-activate"):
        print(usage, file=sys.stderr)
        return 1
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    started = time.time()
    code = 1
    try:
        lock = _switch_lock(host)
        if lock is None:
            print("Could not acquire lock", file=sys.stderr)
            code = EAGAIN
            return code
        try:
            _journal(host, {"phase": "locked", "system": store_path, "action": argv[0],
                            "pid": os.getpid(), "start": started})  # fmt: skip
            _, config = load_system(store_path)
            if argv[0] != "dry-activate":
                _slow_step(float(str(config.get("activation_seconds") or 0)))
            code = activate(host, store_path, argv[0])
        finally:
            os.close(lock)
        return code
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        entry = {"phase": "end", "system": store_path, "action": argv[0], "pid": os.getpid()}
        _journal(host, {**entry, "start": started, "end": time.time(), "code": code})


def _switch_lock(host: Host) -> int | None:
    """The host's switch lock, taken (a descriptor to close), or None when another holds it."""
    folder = host.root / "run" / "nixos"
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o755)
    try:
        fd = os.open(folder / LOCK_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        print("Could not open lock", file=sys.stderr)
        raise SimError(f"{folder / LOCK_NAME}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _slow_step(seconds: float) -> None:
    """`activation_seconds`: work that long under the lock, saying so every second."""
    seconds = min(seconds, 600.0)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        print(f"activation_seconds: {left:.0f} s of simulated work left...", file=sys.stderr,
              flush=True)  # fmt: skip
        time.sleep(min(1.0, left))


def _journal(host: Host, entry: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        log = host.root / "sim" / "log"
        log.mkdir(parents=True, exist_ok=True)
        with (log / JOURNAL).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
