"""One host's deploy as a pure state machine (a decision core, in the sans-IO style).

After the gates, the lock and the confirmation, a host's deploy is a conversation: the core
names the next thing to do (an `Action`), the driver (`rebuild.driver`) does it through the
seams and reports what it saw (an observation), and the core decides again, until it returns
the final `Outcome`. The core never connects, sleeps, reads a clock or raises for a normal
result: a rollback, a lost host or a failed build is an Outcome like success is.

    decision = start(setup)
    while isinstance(decision.next, Action):
        decision = step(setup, decision.state, perform(decision.next))
    outcome = decision.next

Every path is tested as a table in tests/unit/test_core.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from rebuild.results import Result
from rebuild.verify import Check, Report

ACTIVATING = ("switch", "test")  # the actions that change what runs (and get a dead-man timer)
NO_CHECKS = ("build", "dry-activate")  # nothing to verify afterwards


@dataclass(frozen=True)
class Setup:
    """What the core knows about one host before it starts (all decided by the gates)."""

    host: str
    action: str
    expected: str | None  # the system the deploy must end on
    previous: str | None  # what the host ran when it was locked
    rollback_timeout: int = 90  # the inventory's dead-man timer (0: off)
    verify: bool = True  # not --no-verify
    rollback: bool = True  # not --no-rollback
    lost_grace: float = 50.0  # seconds past the timer's deadline before a lost host is given up
    reboot: bool = False  # --reboot: after a verified activation, reboot when needed
    reboot_timeout: int = 300  # how long a host may take to come back from its reboot
    armed_at: float | None = None  # the timer was armed ahead (in the preview's round trip)

    @property
    def timer(self) -> bool:
        """Is this deploy protected by a dead-man timer on the host?"""
        return (
            self.action in ACTIVATING
            and self.rollback
            and self.rollback_timeout > 0
            and self.previous is not None
        )


# --- observations: what the driver saw -------------------------------------------------------


@dataclass(frozen=True)
class TimerArmed:
    """The dead-man timer is (re-)armed; `at` is the driver's monotonic clock at that moment."""

    at: float


@dataclass(frozen=True)
class TimerFired:
    """The dead-man timer already fired: the host restored the previous system by itself."""


@dataclass(frozen=True)
class TimerPending:
    """The dead-man timer is still waiting."""


@dataclass(frozen=True)
class LockLost:
    """The host's deploy lock is no longer this run's (another run broke it)."""

    holder: str


@dataclass(frozen=True)
class RebuildExited:
    """nixos-rebuild ended (`code` 130: stopped by Ctrl-C); `failure` says why when `code` is
    not 0; `beats` are what the heartbeat saw while it ran, in order."""

    code: int
    failure: str = ""
    beats: tuple[TimerBeat, ...] = ()


@dataclass(frozen=True)
class SystemIs:
    """What /run/current-system is on the host now."""

    path: str | None


@dataclass(frozen=True)
class TimerCancelled:
    """The cancel step ran: is the timer gone, and what does the host run?"""

    gone: bool
    current: str | None


@dataclass(frozen=True)
class Verified:
    """The verification report (its checks may fail); `report.reachable` False: host lost.
    After `Verify(rearm=True)`, `rearm` is what the re-arm in the same round trip saw (None:
    the round trip never came back)."""

    report: Report
    rearm: TimerBeat | None = None


@dataclass(frozen=True)
class RolledBackTo:
    """The immediate rollback ran (activation exit `code`) and was verified (`report`)."""

    report: Report
    code: int


@dataclass(frozen=True)
class Returned:
    """After waiting for a lost host: what it runs when it answered again (None: it did not)."""

    path: str | None


@dataclass(frozen=True)
class RebootNeeded:
    """Whether the running system's kernel, initrd or modules differ from the booted one's."""

    needed: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rebooted:
    """The host came back from its reboot (a new boot id) and booted `booted`."""

    booted: str | None


@dataclass(frozen=True)
class Unreachable:
    """The host did not answer the last step (or the step failed on it)."""

    detail: str


TimerBeat = TimerArmed | TimerFired | LockLost | Unreachable  # what one arm step saw


@dataclass(frozen=True)
class Interrupt:
    """The operator pressed Ctrl-C before the pending action was performed (the driver feeds
    this instead of performing it)."""


Observation = (
    TimerArmed | TimerFired | TimerPending | LockLost | RebuildExited | SystemIs
    | TimerCancelled | Verified | RolledBackTo | Returned | Unreachable | Interrupt
    | RebootNeeded | Rebooted
)  # fmt: skip


# --- actions: what the driver does next ------------------------------------------------------


@dataclass(frozen=True)
class ArmTimer:
    """Arm (or push forward) the dead-man timer; report TimerArmed, TimerFired or LockLost."""


@dataclass(frozen=True)
class RunNixosRebuild:
    """Run nixos-rebuild; while it runs, keep the timer alive (`heartbeat`): RebuildExited,
    with what each beat saw."""

    heartbeat: bool


@dataclass(frozen=True)
class CheckTimer:
    """Ask whether the timer fired: TimerFired or TimerPending."""


@dataclass(frozen=True)
class ReadSystem:
    """Read /run/current-system: SystemIs."""


@dataclass(frozen=True)
class CancelTimer:
    """Stop the dead-man timer and prove it is gone: TimerCancelled. With `release` (the
    deploy verified and nothing follows), the same round trip notes the result in the host's
    log and releases its lock once the timer is gone."""

    release: bool = False


@dataclass(frozen=True)
class Verify:
    """Run the host's checks against `expected` (`boot`: the profile only): Verified. With
    `rearm`, the dead-man timer is pushed forward first, in the same round trip as the first
    gathering of facts (a full window for verification at no extra round trip)."""

    expected: str | None
    boot: bool
    rearm: bool = False


@dataclass(frozen=True)
class RollbackNow:
    """Put `previous` back at once and verify it: RolledBackTo."""

    previous: str


@dataclass(frozen=True)
class WaitForReturn:
    """Wait (cancellable) until `deadline` (when the timer fires), then keep trying to read the
    host's system until `give_up`: Returned. Both are on the driver's monotonic clock."""

    deadline: float
    give_up: float


@dataclass(frozen=True)
class CheckReboot:
    """Compare the booted and running systems' boot links: RebootNeeded."""


@dataclass(frozen=True)
class Reboot:
    """Reboot the host and wait (bounded) until it answers with a new boot id: Rebooted."""


Action = (
    ArmTimer | RunNixosRebuild | CheckTimer | ReadSystem | CancelTimer | Verify | RollbackNow
    | WaitForReturn | CheckReboot | Reboot
)  # fmt: skip


# --- the outcome -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one host's deploy ended. The audit record is filled from it, once."""

    result: Result
    message: str
    final_system: str | None = None
    report: Report | None = None
    rollback_report: Report | None = None

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


# --- state -----------------------------------------------------------------------------------


class Phase(Enum):
    """What the core is waiting for."""

    ARMING = "arming the dead-man timer"
    BUILDING = "nixos-rebuild"
    REARMING = "re-arming the dead-man timer"
    CHECKING_TIMER = "checking the dead-man timer"
    RESTORED_READ = "reading the restored system"
    RESTORED_CANCEL = "cancelling the fired timer"
    FAILED_READ = "reading the system after a failed nixos-rebuild"
    FAILED_CANCEL = "cancelling the timer after a failed nixos-rebuild"
    UNVERIFIED_CANCEL = "cancelling the timer (--no-verify)"
    UNVERIFIED_READ = "reading the system (--no-verify)"
    VERIFYING = "verification"
    VERIFIED_CANCEL = "cancelling the dead-man timer"
    ROLLING_BACK = "rolling back"
    LOST = "waiting for the lost host"
    ABORT_CANCEL = "cancelling the timer after Ctrl-C"
    CHECKING_REBOOT = "checking whether a reboot is needed"
    REBOOTING = "the reboot"
    REVERIFYING = "verification after the reboot"
    DONE = "nothing (the deploy is over)"


@dataclass(frozen=True)
class State:
    phase: Phase
    armed_at: float | None = None  # when the timer was last pushed forward
    code: int = 0  # nixos-rebuild's exit code
    failure: str = ""  # why nixos-rebuild failed
    activated_anyway: bool = False  # nixos-rebuild failed after activating the new system
    seen: str | None = None  # a system read from the host on the way
    report: Report | None = None


@dataclass(frozen=True)
class Decision:
    """The core's answer: the new state, the next action or the outcome, and lines to show."""

    state: State
    next: Action | Outcome
    say: tuple[str, ...] = ()


def start(setup: Setup) -> Decision:
    """The first action of a host's deploy (a timer armed ahead is already running)."""
    if setup.timer and setup.armed_at is not None:
        return _arming(setup, State(Phase.ARMING), TimerArmed(setup.armed_at))
    if setup.timer:
        return Decision(State(Phase.ARMING), ArmTimer())
    return Decision(State(Phase.BUILDING), RunNixosRebuild(heartbeat=False))


def step(setup: Setup, state: State, seen: Observation) -> Decision:
    """The next action (or the outcome) after observation `seen` in `state`."""
    if isinstance(seen, Interrupt):
        return _interrupted(setup, state)
    handler = _HANDLERS[state.phase]
    return handler(setup, state, seen)


# --- one handler per phase -------------------------------------------------------------------


def _arming(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, TimerArmed):
        note = (
            f"dead-man timer armed: restores {setup.previous} in {setup.rollback_timeout}s "
            "unless verified"
        )
        return Decision(
            State(Phase.BUILDING, armed_at=seen.at), RunNixosRebuild(heartbeat=True), (note,)
        )
    if isinstance(seen, LockLost):
        return _end(Result.REFUSED, f"{setup.host}: the host lock was taken over by "
                    f"{seen.holder} before anything changed", setup.previous)  # fmt: skip
    detail = seen.detail if isinstance(seen, Unreachable) else _unexpected(seen)
    return _end(
        Result.REFUSED,
        f"{setup.host}: cannot arm the dead-man timer ({detail}); nothing was changed",
        setup.previous,
    )


def _building(setup: Setup, state: State, seen: Observation) -> Decision:
    if not isinstance(seen, RebuildExited):
        return _bug(setup, state, seen)
    armed_at = state.armed_at
    for beat in seen.beats:  # a missed beat: the re-arm afterwards decides
        if isinstance(beat, TimerArmed):
            armed_at = beat.at
        if isinstance(beat, LockLost) and not setup.timer:  # no re-arm to learn it from
            return _end(
                Result.INTERRUPTED,
                f"{setup.host}: the host lock was broken by {beat.holder} while nixos-rebuild "
                "ran; stopping here (no dead-man timer): run `invoke verify` and decide",
            )
    after = dataclasses.replace(state, armed_at=armed_at, code=seen.code, failure=seen.failure)
    if seen.code == 130:  # Ctrl-C while nixos-rebuild ran
        return _end(Result.INTERRUPTED, f"{setup.host}: interrupted during nixos-rebuild"
                    + _protected_by_timer(setup))  # fmt: skip
    if setup.timer and seen.code == 0 and setup.verify and setup.action not in NO_CHECKS:
        verify = Verify(setup.expected, boot=False, rearm=True)
        return Decision(dataclasses.replace(after, phase=Phase.VERIFYING), verify)
    if setup.timer:
        return Decision(dataclasses.replace(after, phase=Phase.REARMING), ArmTimer())
    return _after_rebuild(setup, after)


def _rearming(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, TimerArmed):  # a full window for verification
        return _after_rebuild(setup, dataclasses.replace(state, armed_at=seen.at))
    if isinstance(seen, TimerFired):
        return _go(state, Phase.RESTORED_READ, ReadSystem())
    if isinstance(seen, LockLost):
        return _lock_lost_after_rebuild(setup, seen)
    return _go(state, Phase.CHECKING_TIMER, CheckTimer())


def _lock_lost_after_rebuild(setup: Setup, seen: LockLost) -> Decision:
    return _end(
        Result.INTERRUPTED,
        f"{setup.host}: the host lock was broken by {seen.holder} while nixos-rebuild ran; "
        f"stopping here: the dead-man timer restores {setup.previous} unless a run verifies",
    )


def _checking_timer(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, TimerFired):
        return _go(state, Phase.RESTORED_READ, ReadSystem())
    if isinstance(seen, TimerPending):
        return _after_rebuild(setup, state)
    return _lost(setup, state)


def _restored_read(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, SystemIs):
        return _go(state, Phase.RESTORED_CANCEL, CancelTimer(), seen=seen.path)
    return _lost(setup, state)


def _restored_cancel(setup: Setup, state: State, seen: Observation) -> Decision:
    now = state.seen
    if now == setup.previous:
        return _end(
            Result.ROLLED_BACK,
            f"{setup.host}: the new system cut rebuild off; the host's dead-man timer restored "
            f"{setup.previous}, which it runs now",
            now,
        )
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: the dead-man timer fired but the host runs {now}; run `invoke verify`",
        now,
    )


def _after_rebuild(setup: Setup, state: State) -> Decision:
    """nixos-rebuild is done and the timer (if any) is alive: judge its exit."""
    if state.code == 0:
        return _activated(setup, state)
    if setup.action not in ACTIVATING:
        return _end(Result.BUILD_FAILED, state.failure, setup.previous)
    return _go(state, Phase.FAILED_READ, ReadSystem())


def _failed_read(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, SystemIs):
        now = seen.path
        if now is not None and now == setup.expected and now != setup.previous:
            note = (
                f"nixos-rebuild exited {state.code} after activating the new system; verifying it"
            )
            decided = _activated(setup, dataclasses.replace(state, activated_anyway=True))
            return dataclasses.replace(decided, say=(note, *decided.say))
        if setup.timer:
            return _go(state, Phase.FAILED_CANCEL, CancelTimer(), seen=now)
        return _end(Result.BUILD_FAILED, state.failure, now)
    if setup.timer:
        return _lost(setup, state)
    return _end(Result.BUILD_FAILED, state.failure, None)


def _failed_cancel(setup: Setup, state: State, seen: Observation) -> Decision:
    now = seen.current if isinstance(seen, TimerCancelled) and seen.current else state.seen
    return _end(Result.BUILD_FAILED, state.failure, now)


def _activated(setup: Setup, state: State) -> Decision:
    """The new system is active (or built): verify it, or finish."""
    if setup.action in NO_CHECKS:
        return _end(Result.OK, "", setup.previous)
    if not setup.verify and not state.activated_anyway:
        if setup.timer:
            return _go(state, Phase.UNVERIFIED_CANCEL, CancelTimer())
        return _go(state, Phase.UNVERIFIED_READ, ReadSystem())
    verify = Verify(setup.expected, boot=setup.action == "boot")
    return Decision(dataclasses.replace(state, phase=Phase.VERIFYING), verify)


def _unverified(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, TimerCancelled) and seen.gone:
        return _end(Result.OK, "verification skipped (--no-verify)", seen.current)
    if isinstance(seen, SystemIs):
        return _end(Result.OK, "verification skipped (--no-verify)", seen.path)
    if setup.timer:  # the timer could not be cancelled: it will restore the previous system
        return _lost(setup, state)
    return _end(
        Result.HOST_LOST,
        f"{setup.host}: the host stopped answering after activation (--no-verify); "
        "run `invoke verify` when it is back",
    )


def _verifying(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, Unreachable):  # the step failed on the host before any facts came
        seen = Verified(Report(setup.host, None, setup.expected,
                               (Check("ssh", False, seen.detail),), reachable=False))  # fmt: skip
    if not isinstance(seen, Verified):
        return _bug(setup, state, seen)
    report = seen.report
    rearm = seen.rearm
    if isinstance(rearm, TimerFired):  # the facts are of a host that restored itself
        return _go(state, Phase.RESTORED_READ, ReadSystem())
    if isinstance(rearm, LockLost):
        return _lock_lost_after_rebuild(setup, rearm)
    if isinstance(rearm, TimerArmed):
        state = dataclasses.replace(state, armed_at=rearm.at)
    elif isinstance(rearm, Unreachable) and report.reachable:
        # the host answered but the re-arm failed: ask the timer, then verify again
        return _go(state, Phase.CHECKING_TIMER, CheckTimer())
    state = dataclasses.replace(state, report=report)
    if report.ok:
        if setup.timer:
            return _go(state, Phase.VERIFIED_CANCEL, CancelTimer(release=not setup.reboot))
        return _verified(setup, state, report.current_system)
    if not report.reachable:
        if setup.timer:
            return _lost(setup, state)
        return _end(
            Result.HOST_LOST,
            f"{setup.host}: the host stopped answering after activation and no dead-man timer "
            "was armed; check it from the provider's console",
            None,
            report,
        )
    if setup.previous is not None and (
        setup.timer or (setup.rollback and setup.action in ACTIVATING)
    ):
        note = f"verification failed: rolling back to {setup.previous}"
        return Decision(
            dataclasses.replace(state, phase=Phase.ROLLING_BACK),
            RollbackNow(setup.previous),
            (note,),
        )
    why = "" if setup.rollback else " (--no-rollback)"
    if setup.rollback and setup.action in ACTIVATING:
        why = " (the previous system is unknown, so no rollback)"
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: verification failed; the host stays on {report.current_system}{why}",
        report.current_system,
        report,
    )


def _verified_cancel(setup: Setup, state: State, seen: Observation) -> Decision:
    report = state.report
    final = report.current_system if report is not None else None
    if isinstance(seen, TimerCancelled) and seen.gone:
        return _verified(setup, state, seen.current or final)
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: verified, but the dead-man timer could not be cancelled; it restores "
        f"{setup.previous} when it fires: run `invoke rebuild --host {setup.host}` again",
        final,
        report,
    )


def _verified(setup: Setup, state: State, final: str | None) -> Decision:
    """The new system runs and verifies (and no timer is pending): done, or on to the reboot.
    The order is the safe one: the dead-man timer has protected the switch and is gone (a
    transient timer would not survive a reboot anyway); the boot default is the new system."""
    if not setup.reboot:
        return _end(Result.OK, "", final, state.report)
    if setup.action == "boot":
        return _go(state, Phase.REBOOTING, Reboot(), seen=final)
    return _go(state, Phase.CHECKING_REBOOT, CheckReboot(), seen=final)


def _checking_reboot(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, RebootNeeded):
        if not seen.needed:
            return _end(Result.OK, "no reboot needed", state.seen, state.report)
        note = f"rebooting: the new system changes the {', '.join(seen.reasons)}"
        decided = _go(state, Phase.REBOOTING, Reboot())
        return dataclasses.replace(decided, say=(note,))
    return _end(
        Result.HOST_LOST,
        f"{setup.host}: verified, but the host stopped answering before the reboot "
        f"({_detail(seen)}); check it, then reboot it yourself",
        state.seen,
        state.report,
    )


def _rebooting(setup: Setup, state: State, seen: Observation) -> Decision:
    if isinstance(seen, Rebooted):
        if seen.booted != setup.expected:
            return _end(
                Result.VERIFY_FAILED,
                f"{setup.host}: rebooted into {seen.booted}, not the new system "
                f"{setup.expected}; check the boot loader's default from the provider's console",
                seen.booted,
                state.report,
            )
        return _go(state, Phase.REVERIFYING, Verify(setup.expected, boot=False))
    return _end(
        Result.HOST_LOST,
        f"{setup.host}: the host did not come back after the reboot ({_detail(seen)}); open "
        "the provider's console (docs/playbooks/vps-rebuild.md, \"The host does not come "
        'back"): its boot menu also offers the previous generation',
        None,
        state.report,
    )


def _reverifying(setup: Setup, state: State, seen: Observation) -> Decision:
    if not isinstance(seen, Verified):
        return _bug(setup, state, seen)
    report = seen.report
    if report.ok:
        return _end(Result.OK, f"rebooted into {report.current_system}", report.current_system,
                    report)  # fmt: skip
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: verification failed after the reboot; the host stays on "
        f"{report.current_system} (no dead-man timer spans a reboot): `invoke rollback "
        f"--host {setup.host}` returns it to the previous generation",
        report.current_system,
        report,
    )


def _rolling_back(setup: Setup, state: State, seen: Observation) -> Decision:
    if not isinstance(seen, RolledBackTo):
        return _lost(setup, state) if setup.timer else _end(
            Result.VERIFY_FAILED,
            f"{setup.host}: verification failed and the rollback could not run "
            f"({_detail(seen)}); log in and run `nixos-rebuild switch --rollback`",
            None,
            state.report,
        )  # fmt: skip
    again = seen.report
    if again.current_system == setup.previous:
        how = "and it verifies" if again.ok else "but some checks still fail on it"
        exited = "" if seen.code == 0 else f" (activation exited {seen.code})"
        return _end(
            Result.ROLLED_BACK,
            f"{setup.host}: verification failed; rolled back to {setup.previous} {how}{exited}",
            again.current_system,
            state.report,
            again,
        )
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: verification failed and the rollback did not take: the host runs "
        f"{again.current_system}; log in and run `nixos-rebuild switch --rollback`",
        again.current_system,
        state.report,
        again,
    )


def _lost(setup: Setup, state: State) -> Decision:
    """The host stopped answering after activation: its timer will restore it; wait."""
    armed = state.armed_at if state.armed_at is not None else 0.0
    deadline = armed + setup.rollback_timeout
    wait = WaitForReturn(deadline=deadline, give_up=deadline + setup.lost_grace)
    note = (
        f"host lost; its dead-man timer restores {setup.previous} when it fires "
        f"({setup.rollback_timeout}s after the last beat); waiting to reconnect"
    )
    return Decision(dataclasses.replace(state, phase=Phase.LOST), wait, (note,))


def _waiting(setup: Setup, state: State, seen: Observation) -> Decision:
    now = seen.path if isinstance(seen, Returned) else None
    report = state.report
    if now is not None and now == setup.previous:
        return _end(
            Result.ROLLED_BACK,
            f"{setup.host}: the host was lost after activation; its dead-man timer restored "
            f"{setup.previous} and it answers again",
            now,
            report,
        )
    if now is None:
        return _end(
            Result.HOST_LOST,
            f"{setup.host}: the host did not come back; its dead-man timer should have restored "
            f"{setup.previous}; check it from the provider's console",
            None,
            report,
        )
    return _end(
        Result.VERIFY_FAILED,
        f"{setup.host}: the host answers again but runs {now}, not the previous system; "
        "run `invoke verify` and decide",
        now,
        report,
    )


def _abort_cancel(setup: Setup, state: State, seen: Observation) -> Decision:
    return _end(
        Result.DECLINED, f"{setup.host}: aborted (Ctrl-C) before anything changed", setup.previous
    )


def _interrupted(setup: Setup, state: State) -> Decision:
    """Ctrl-C. Before nixos-rebuild started nothing changed (an armed timer is taken back);
    afterwards the dead-man timer protects the host."""
    if state.phase in (Phase.ARMING, Phase.ABORT_CANCEL):
        return _abort_cancel(setup, state, Interrupt())
    if state.phase is Phase.BUILDING:  # nixos-rebuild never started
        if setup.timer:
            return _go(state, Phase.ABORT_CANCEL, CancelTimer())
        return _abort_cancel(setup, state, Interrupt())
    fired = state.phase in (
        Phase.RESTORED_READ, Phase.RESTORED_CANCEL,  # the timer fired already
        Phase.CHECKING_REBOOT, Phase.REBOOTING, Phase.REVERIFYING,  # verified, timer cancelled
    )  # fmt: skip
    tail = "" if fired else _protected_by_timer(setup)
    return _end(
        Result.INTERRUPTED,
        f"{setup.host}: interrupted during {state.phase.value}{tail}",
        state.seen,
        state.report,
    )


def _protected_by_timer(setup: Setup) -> str:
    if not setup.timer:
        return ""
    return f"; the dead-man timer restores {setup.previous} unless a later run confirms"


def _bug(setup: Setup, state: State, seen: Observation) -> Decision:
    return _end(Result.ERROR, f"{setup.host}: internal error: {_unexpected(seen)} "
                f"during {state.phase.value}")  # fmt: skip


def _unexpected(seen: Observation) -> str:
    return f"unexpected {type(seen).__name__}"


def _detail(seen: Observation) -> str:
    return seen.detail if isinstance(seen, Unreachable) else _unexpected(seen)


def _go(state: State, phase: Phase, action: Action, **changes: object) -> Decision:
    """Move to `phase` (with `changes` to the state) and ask the driver for `action`."""
    return Decision(dataclasses.replace(state, phase=phase, **changes), action)  # type: ignore[arg-type]


def _end(
    result: Result,
    message: str,
    final_system: str | None = None,
    report: Report | None = None,
    rollback_report: Report | None = None,
) -> Decision:
    outcome = Outcome(result, message, final_system, report, rollback_report)
    return Decision(State(Phase.DONE), outcome)


_HANDLERS = {
    Phase.ARMING: _arming,
    Phase.BUILDING: _building,
    Phase.REARMING: _rearming,
    Phase.CHECKING_TIMER: _checking_timer,
    Phase.RESTORED_READ: _restored_read,
    Phase.RESTORED_CANCEL: _restored_cancel,
    Phase.FAILED_READ: _failed_read,
    Phase.FAILED_CANCEL: _failed_cancel,
    Phase.UNVERIFIED_CANCEL: _unverified,
    Phase.UNVERIFIED_READ: _unverified,
    Phase.VERIFYING: _verifying,
    Phase.VERIFIED_CANCEL: _verified_cancel,
    Phase.ROLLING_BACK: _rolling_back,
    Phase.LOST: _waiting,
    Phase.ABORT_CANCEL: _abort_cancel,
    Phase.CHECKING_REBOOT: _checking_reboot,
    Phase.REBOOTING: _rebooting,
    Phase.REVERIFYING: _reverifying,
    Phase.DONE: _bug,
}
