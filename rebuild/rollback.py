"""The dead-man timer (armed, kept alive, cancelled), the immediate rollback, and waiting for
a host that the new system cut off to restore itself."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rebuild import facts, hostops
from rebuild.console import Console
from rebuild.errors import (
    GateRefused,
    RebuildError,
    RemoteError,
    RolledBack,
    VerifyFailed,
)
from rebuild.hostrun import HostRun, current_system, verify_host

LOST_GRACE = 20.0  # seconds past the timer's deadline before concluding a host is gone
RECONNECT_INTERVAL = 2.0


def arm_timer(hr: HostRun) -> None:
    if hr.previous is None:
        raise RemoteError(f"{hr.name}: the current system is unknown; no dead-man timer possible")
    seconds = hr.target.settings.rollback_timeout
    result = hr.run(hostops.arm_timer_script(hr.record.run_id, hr.previous, seconds), timeout=30)
    if not result.ok:
        raise RemoteError(
            f"{hr.name}: cannot arm the dead-man timer: "
            f"{(result.stderr or result.stdout).strip()[-300:]}"
        )
    if result.stdout.strip() == "fired":
        hr.timer_has_fired = True
        return
    hr.timer_armed_at = time.monotonic()


def timer_fired(hr: HostRun) -> bool:
    """Did the dead-man timer already fire (the host restored itself while we were away)?"""
    if hr.timer_has_fired:
        return True
    result = hr.run(hostops.timer_state_script(hr.record.run_id), timeout=30)
    return hostops.timer_elapsed(result.stdout)


def restored_by_timer(hr: HostRun) -> None:
    """nixos-rebuild came back, but the host's timer had already put the old system back."""
    now = current_system(hr)
    with contextlib.suppress(RebuildError):
        cancel_timer(hr)
    hr.record.final_system = now
    if now == hr.previous:
        raise RolledBack(
            f"{hr.name}: the new system cut rebuild off; the host's dead-man timer restored "
            f"{hr.previous}, which it runs now"
        )
    raise RemoteError(
        f"{hr.name}: the dead-man timer fired but the host runs {now}; run `invoke verify`"
    )


def cancel_timer(hr: HostRun) -> bool:
    """Cancel the dead-man timer and prove it is gone."""
    result = hr.run(hostops.cancel_timer_script(hr.record.run_id), timeout=30)
    gone = hostops.timer_gone(result.stdout)
    if gone:
        hr.timer_armed_at = None
    return gone


@contextlib.contextmanager
def heartbeat(hr: HostRun, active: bool) -> Iterator[None]:
    """While nixos-rebuild runs, keep pushing the dead-man deadline forward: if we lose the
    host (its new configuration cut us off) the timer fires one timeout after the last beat."""
    if not active:
        yield
        return
    stop = threading.Event()
    interval = max(3.0, min(30.0, hr.target.settings.rollback_timeout / 3))

    def beat() -> None:
        while not stop.wait(interval):
            try:
                arm_timer(hr)
            except RebuildError:
                continue

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{hr.name}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=35)


def wait_for_return(hr: HostRun, console: Console, cancel: threading.Event) -> str | None:
    """The host vanished after activation: wait for its timer to fire, then reconnect."""
    armed = hr.timer_armed_at or time.monotonic()
    deadline = armed + hr.target.settings.rollback_timeout
    give_up = deadline + LOST_GRACE + hr.endpoint.connect_timeout * 3
    console.host_line(
        hr.name,
        f"host lost; its dead-man timer restores {hr.previous} within "
        f"{max(0, deadline - time.monotonic()):.0f}s; waiting to reconnect",
    )
    hr.close()
    while time.monotonic() < give_up and not cancel.is_set():
        if time.monotonic() >= deadline:
            try:
                return current_system(hr)
            except RebuildError:
                hr.close()
        cancel.wait(RECONNECT_INTERVAL)
    return None


def rollback_now(hr: HostRun, console: Console) -> None:
    if hr.previous is None:
        raise VerifyFailed(f"{hr.name}: verification failed and the previous system is unknown")
    console.host_line(hr.name, f"verification failed: rolling back to {hr.previous}")
    result = hr.run(hostops.rollback_now_script(hr.record.run_id, hr.previous), timeout=600)
    settle = min(30.0, hr.target.settings.verify.settle_timeout)
    again = verify_host(hr, hr.previous, settle_timeout=settle)
    hr.rollback_report = again
    hr.record.rollback_checks = [c.to_json() for c in again.checks]
    hr.record.final_system = again.current_system
    console.report(again, title="after rollback")
    if again.current_system == hr.previous:
        state = "and it verifies" if again.ok else "but some checks still fail on it"
        raise RolledBack(
            f"{hr.name}: verification failed; rolled back to {hr.previous} {state}"
            + ("" if result.ok else f" (activation exited {result.exited})")
        )
    raise RemoteError(
        f"{hr.name}: verification failed and the rollback did not take: the host runs "
        f"{again.current_system}; log in and run `nixos-rebuild switch --rollback`"
    )


def lost(hr: HostRun, console: Console, cancel: threading.Event) -> None:
    now = wait_for_return(hr, console, cancel)
    hr.record.final_system = now
    if now is not None and now == hr.previous:
        raise RolledBack(
            f"{hr.name}: the host was lost after activation; its dead-man timer restored "
            f"{hr.previous} and it answers again"
        )
    if now is None:
        raise RemoteError(
            f"{hr.name}: the host did not come back; its dead-man timer should have restored "
            f"{hr.previous}; check it from the provider's console"
        )
    raise RemoteError(
        f"{hr.name}: the host answers again but runs {now}, not the previous system; "
        "run `invoke verify` and decide"
    )


def previous_generation(hr: HostRun) -> str:
    numbers, current = hostops.parse_generations(
        hr.run(hostops.generations_script(), timeout=30).stdout
    )
    older = [n for n in numbers if current is not None and n < current]
    if not older:
        raise GateRefused(f"{hr.name}: no generation older than the current one to roll back to")
    path = facts.parse_store_path(
        hr.run(hostops.generation_path_script(max(older)), timeout=30).stdout.splitlines()
    )
    if path is None:
        raise GateRefused(f"{hr.name}: cannot read the previous generation's system")
    return path
