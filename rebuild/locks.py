"""Deploy locks: one per host on this machine (flock) and one on the host (an atomic mkdir
under /run naming its holder)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from rebuild import audit, hostops, identity, logs
from rebuild.core import TimerArmed
from rebuild.driver import arm_answer
from rebuild.errors import GateRefused, RebuildError, RemoteError
from rebuild.hostrun import HostRun
from rebuild.remote import RemoteResult


def take_local_lock(state_dir: Path, host: str, run_id: str) -> int:
    """A per-host lock on this machine (flock): one deploy of a host at a time from here. The
    lock file is private (0600, in a private folder) and never opened through a symlink."""
    audit.private_dir(state_dir)
    fd = audit.open_private(state_dir / "locks" / f"{host}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise GateRefused(
            f"{host} is locked on this machine by {holder or 'another rebuild process'}; "
            "wait for it to finish"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"run {run_id} (pid {os.getpid()})".encode(), 0)
    return fd


def release_local_lock(fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remote_lock(hr: HostRun, owner: hostops.LockOwner, me: identity.Identity, *,
                break_lock: bool, stale_after: float, arm: int | None = None) -> None:  # fmt: skip
    """Take the host's lock (and learn what it runs); a held lock refuses, naming the holder.
    Nothing has changed yet, so a host that does not answer is a refusal too. With `arm`
    (seconds), the same round trip arms the dead-man timer (`hr.armed_ahead`)."""
    try:
        _take_remote_lock(hr, owner, me, break_lock=break_lock, stale_after=stale_after, arm=arm)
    except RemoteError as exc:
        raise GateRefused(f"{exc}; nothing was changed") from None


def _take_remote_lock(hr: HostRun, owner: hostops.LockOwner, me: identity.Identity, *,
                      break_lock: bool, stale_after: float, arm: int | None) -> None:  # fmt: skip
    spec = hr.target.settings
    copies = spec.user != "root" and spec.build_host != "target" and hr.action != "build"
    script = hostops.acquire_script(owner, hr.start_record, trust=copies, arm=arm)
    output = hr.run(script, timeout=30).stdout
    answer = hostops.parse_acquire(output)
    if not answer.acquired and answer.holder is not None and break_lock:
        holder = answer.holder
        stale = hostops.lock_is_stale(
            holder,
            now=time.time(),
            stale_after=stale_after,
            machine_id=me.machine_id,
            pid_alive=pid_alive(holder.pid),
        )
        if not stale:
            raise GateRefused(
                f"{hr.name} is locked by {holder.describe()}; the lock is not stale (younger than "
                f"{stale_after:g}s and its run may be alive), so --break-lock refuses to break it"
            )
        hr.run(hostops.break_script(holder.run_id), timeout=30)
        hr.overrides.append(f"break-lock {holder.run_id}")
        output = hr.run(script, timeout=30).stdout
        answer = hostops.parse_acquire(output)
    if answer.acquired:
        if hostops.record_failed(output):
            hr.warnings.append(f"could not note the deploy in {hostops.DEPLOY_LOG} on the host")
        hr.remote_locked = True
        hr.lock_owner = owner
        hr.previous = answer.current_system
        armed = hostops.parse_arm_section(output)
        if armed is not None:  # a timer that did not arm is armed again by the deploy
            with contextlib.suppress(RebuildError):
                seen = arm_answer(hr, RemoteResult(*armed, ""), time.monotonic())
                hr.armed_ahead = seen.at if isinstance(seen, TimerArmed) else None
        trust = hostops.parse_trust(output)
        if trust is not None and trust.trusted is False:
            raise GateRefused(
                f"{hr.name}: {trust.user} is not a trusted Nix user there (trusted-users = "
                f"{' '.join(trust.trusted_users or ()) or 'empty'}), so nixos-rebuild could not "
                f'copy the new system to it; add nix.settings.trusted-users = [ "{trust.user}" '
                ']; to the host\'s configuration, or build on the host (build_host = "target"), '
                "or deploy as root"
            )
        return
    if answer.holder is not None:
        raise GateRefused(
            f"{hr.name} is locked by {answer.holder.describe()}; wait for it to finish, or if "
            "that run is gone, pass --break-lock (recorded in the audit)"
        )
    raise GateRefused(
        f"cannot take the deploy lock on {hr.name}: {answer.error or 'no answer'}; rebuild needs "
        'root on the host (user = "root", or sudo = true with sudo rights)'
    )


def release_remote_lock(hr: HostRun) -> None:
    if not hr.remote_locked:
        return
    try:
        if hr.armed_ahead is not None:  # the deploy never started: take its timer back too
            script = hostops.cancel_timer_script(hr.run_id, hr.final_record or "")
            result = hr.run(script, timeout=20)
            if not hostops.parse_released(result.stdout):
                raise RebuildError(f"{hr.name}: the dead-man timer armed ahead would not stop")
            hr.armed_ahead = None
        else:
            result = hr.run(hostops.release_script(hr.run_id, hr.final_record), timeout=20)
        hr.remote_locked = False
        if hostops.record_failed(result.stdout):
            hr.warnings.append(f"could not note the result in {hostops.DEPLOY_LOG} on the host")
    except RebuildError as exc:
        logs.warning("could not release the host lock", host=hr.name, error=str(exc))
