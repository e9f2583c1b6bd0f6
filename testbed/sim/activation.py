"""``<system>/bin/switch-to-configuration switch|boot|test|dry-activate``.

Imitates nixpkgs' switch-to-configuration (``pkgs/by-name/sw/switch-to-configuration-ng``, the
Rust rewrite, and the Perl ``nixos/modules/system/activation/switch-to-configuration.pl`` it
replaced; the rules are in the NixOS manual's "Unit handling",
``nixos/doc/manual/development/unit-handling.section.md``): units gone from the new configuration
or whose definition changed are stopped, the configuration is activated (``/run/current-system``
points at the new system), changed and new units are started, and a unit that failed makes the
exit code 4 after a ``systemctl status``-like report. ``boot`` only updates the boot loader;
``dry-activate`` prints the units it would stop and start and changes nothing. The messages are
the real tool's. A configuration with ``cut_network`` takes the host's link down after
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


def _set_current_system(host: Host, store_path: str) -> None:
    run = host.root / "run"
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".current-system.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(store_path)
    tmp.replace(run / "current-system")


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
    with locked_state(host, write=action != "dry-activate") as state:
        units: dict[str, dict[str, Any]] = state["units"]
        old = {n: u for n, u in units.items() if u.get("origin") == "config"}
        now = time.time()

        def changed(name: str) -> bool:
            unit = old[name]
            if unit.get("def") != server_def(new_units[name], label):
                return True
            return unit_view(unit, now)[0] == "failed" and not new_units[name].get("fail")

        to_stop = sorted(n for n in old if n not in new_units or changed(n))
        to_start = sorted(n for n in new_units if n not in old or n in to_stop)
        if action == "dry-activate":
            if to_stop:
                print(f"would stop the following units: {', '.join(to_stop)}", file=out)
            print("would activate the configuration...", file=out)
            if to_start:
                print(f"would start the following units: {', '.join(to_start)}", file=out)
            return 0
        if to_stop:
            print(f"stopping the following units: {', '.join(to_stop)}", file=out)
        for name in to_stop:
            stop_unit_process(host, units[name])
            del units[name]
        if not config.get("cut_network"):
            _ip_link(host, up=True)
        print("activating the configuration...", file=out)
        print("setting up /etc...", file=out)
        _set_current_system(host, store_path)
        print("reloading user units for root...", file=out)
        restarted = [n for n in to_start if n in old]
        fresh = [n for n in to_start if n not in old]
        if restarted:
            print(f"starting the following units: {', '.join(restarted)}", file=out)
        starting = float(config.get("starting_seconds") or 0)
        for name in to_start:
            record = start_config_unit(host, name, new_units[name], label)
            if starting > 0 and record["active"] == "active":
                record["activating_until"] = time.time() + starting
            units[name] = record
        for name in new_units:
            if name not in to_start:
                units[name]["description"] = str(
                    new_units[name].get("description") or default_description(name)
                )
        if fresh:
            print(f"the following new units were started: {', '.join(fresh)}", file=out)
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
