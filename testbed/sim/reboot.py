"""``systemctl reboot``: the simulated host reboots into its boot default.

Imitates what a reboot of a NixOS host does, as far as rebuild can see it:

- ``systemctl reboot`` (systemctl(1)) only asks the manager for the reboot and returns; the
  reboot then happens without its caller: here in a detached process, a moment later;
- every process of the host ends: the units (transient services and timers too, so the
  dead-man timer does not survive a reboot, which is why rebuild cancels it first) and the
  host's SSH sessions, whose connections drop as on a real reboot (the sshd itself keeps
  listening: it is "back" at once);
- ``/run`` is a tmpfs: everything in it is gone (rebuild's lock under ``/run`` too);
- the kernel's ``/proc/sys/kernel/random/boot_id`` (proc(5)) is a new random UUID;
- the boot loader starts the system profile's current generation
  (``/nix/var/nix/profiles/system``, what ``switch`` and ``boot`` set), and NixOS's stage 2
  points ``/run/booted-system`` and ``/run/current-system`` at it
  (``nixos/modules/system/boot/stage-2-init.sh``); its units start.

A host told to hang (:meth:`testbed.testbed.SimHost.hang_on_reboot`: the file
``sim/hang-on-reboot``) does not come back: its sshd stops listening and nothing starts.
Every boot is a line in ``sim/log/boots.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from testbed.procs import children_of, is_alive, proc_start_time, terminate
from testbed.sim.host import BOOT_ID, PROFILE, Host, locked_state
from testbed.sim.units import start_config_unit, stop_unit_process, units_of
from testbed.store import SimError, load_system

HANG_FILE = "hang-on-reboot"  # in the host's sim/
JOURNAL = "boots.jsonl"  # in the host's sim/log
DELAY = 0.2  # seconds between `systemctl reboot` returning and the reboot


def write_boot_id(root: Path) -> str:
    """A new boot id in the host's ``/proc/sys/kernel/random/boot_id``."""
    path = Path(f"{root}{BOOT_ID}")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_name(f".boot_id.{os.getpid()}")
    tmp.write_text(value + "\n", encoding="utf-8")
    tmp.replace(path)
    return value


def systemctl_reboot(host: Host) -> int:
    """Schedule the reboot and return, as ``systemctl reboot`` does."""
    if not os.access(host.sim, os.W_OK):
        print("Failed to reboot system via logind: Access denied", file=sys.stderr)
        return 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the detached side
        code = 0
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.closerange(3, 4096)
            if os.fork() == 0:
                try:
                    time.sleep(DELAY)
                    boot(host)
                except BaseException:  # nobody to report to: note it
                    _journal(host, {"error": repr(sys.exc_info()[1])})
                    code = 1
                os._exit(code)
        finally:
            os._exit(code)
    os.waitpid(pid, 0)
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children_of(child))
    return found


def _sshd(host: Host) -> tuple[int, int | None] | None:
    owner = host.info.get("sshd_owner")
    if not owner:
        return None
    try:
        pid_text, _, start_text = Path(str(owner)).read_text(encoding="utf-8").partition(" ")
        return int(pid_text), int(start_text) if start_text.strip().isdigit() else None
    except (OSError, ValueError):
        return None


def drop_sessions(host: Host, *, listener: bool) -> None:
    """End every SSH session of the host (each connection's sshd and what it runs); with
    ``listener``, the listening sshd too."""
    sshd = _sshd(host)
    if sshd is None or not is_alive(*sshd):
        return
    for session in children_of(sshd[0]):
        doomed = [session, *_descendants(session)]
        for pid in reversed(doomed):
            terminate(pid, proc_start_time(pid), timeout=1.0)
    if listener:
        terminate(sshd[0], sshd[1], timeout=2.0)


def _stop_everything(host: Host) -> None:
    with locked_state(host) as state:
        units: dict[str, dict[str, Any]] = state["units"]
        for unit in units.values():
            sleeper = unit.get("sleeper_pid")
            if sleeper:
                terminate(int(sleeper), unit.get("sleeper_start"), timeout=1.0)
                host.pids.remove(int(sleeper))
            stop_unit_process(host, unit)
        state["units"] = {}
        state.pop("activated", None)


def _clear_run(host: Host) -> None:
    run = host.root / "run"
    if run.is_dir():
        for entry in run.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def boot(host: Host) -> None:
    """The reboot itself: everything stops, /run empties, a new boot id; then the boot
    default starts (unless the host hangs)."""
    hang = (host.sim / HANG_FILE).exists()
    _stop_everything(host)
    drop_sessions(host, listener=hang)
    _clear_run(host)
    boot_id = write_boot_id(host.root)
    if hang:
        _journal(host, {"boot_id": boot_id, "hung": True})
        return
    from testbed.sim.activation import set_run_link

    system = os.path.realpath(f"{host.root}{PROFILE}")
    try:
        _attr, config = load_system(system)
    except (OSError, ValueError, KeyError) as exc:
        raise SimError(f"the boot default {system} is not a system: {exc}") from exc
    set_run_link(host, "booted-system", system)
    set_run_link(host, "current-system", system)
    label = str(config.get("label", ""))
    with locked_state(host) as state:
        for name, udef in units_of(config).items():
            state["units"][name] = start_config_unit(host, name, udef, label)
        state["activated"] = {"system": system, "at": time.time(), "action": "boot"}
    _journal(host, {"boot_id": boot_id, "system": system})


def _journal(host: Host, entry: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        log = host.sim / "log"
        log.mkdir(parents=True, exist_ok=True)
        with (log / JOURNAL).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"at": time.time(), **entry}) + "\n")
