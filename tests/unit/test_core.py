"""The decision core of one host's deploy, as a table: observations in, actions and the
Outcome out. No SSH, no clock, no threads: every path in milliseconds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from rebuild import core
from rebuild.core import (
    ArmTimer,
    CancelTimer,
    CheckReboot,
    CheckTimer,
    Interrupt,
    LockLost,
    ReadSystem,
    Reboot,
    Rebooted,
    RebootNeeded,
    RebuildExited,
    Returned,
    RollbackNow,
    RolledBackTo,
    RunNixosRebuild,
    Setup,
    SystemIs,
    TimerArmed,
    TimerCancelled,
    TimerFired,
    TimerPending,
    Unreachable,
    Verified,
    Verify,
    WaitForReturn,
)
from rebuild.results import Result
from rebuild.verify import Check, Report

NEW = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-new"
PREV = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-prev"
OTHER = "/nix/store/5c7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-other"
HOLDER = "run 20261125-194500-d4e5f6 by ci on runner (pid 77), since 2026-11-25T19:45:00Z"

SWITCH = Setup(host="vps", action="switch", expected=NEW, previous=PREV, rollback_timeout=90)
NO_TIMER = dataclasses.replace(SWITCH, rollback_timeout=0)
NO_ROLLBACK = dataclasses.replace(SWITCH, rollback=False)
NO_VERIFY = dataclasses.replace(SWITCH, verify=False)
NO_VERIFY_NO_TIMER = dataclasses.replace(NO_VERIFY, rollback_timeout=0)
BUILD = dataclasses.replace(SWITCH, action="build")
BOOT = dataclasses.replace(SWITCH, action="boot")
DRY = dataclasses.replace(SWITCH, action="dry-activate")
UNKNOWN_PREVIOUS = dataclasses.replace(SWITCH, previous=None)
REBOOT = dataclasses.replace(SWITCH, reboot=True)
REBOOT_BOOT = dataclasses.replace(BOOT, reboot=True)
ARMED_AHEAD = dataclasses.replace(SWITCH, armed_at=10.0)


def report(current: str | None = NEW, *, ok: bool = True, reachable: bool = True) -> Report:
    if not reachable:
        return Report("vps", None, NEW, (Check("ssh", False, "connection lost"),), False)
    checks = (Check("ssh", True, "host answers"), Check("current-system", ok, f"running {current}"))
    return Report("vps", current, NEW, checks)


GOOD = Verified(report())
BAD = Verified(report(ok=False))
LOST = Verified(report(reachable=False))
ARMED = TimerArmed(at=10.0)
REARMED = TimerArmed(at=60.0)
GONE_NEW = TimerCancelled(gone=True, current=NEW)
GONE_PREV = TimerCancelled(gone=True, current=PREV)
RUN = RunNixosRebuild(heartbeat=True)
FINISH = CancelTimer(release=True)  # after a verification that passed: cancel and release
RUN_PLAIN = RunNixosRebuild(heartbeat=False)
VERIFY = Verify(NEW, boot=False)
REVERIFY = Verify(NEW, boot=False, rearm=True)  # after nixos-rebuild: re-arm + facts in one
R_GOOD = Verified(report(), REARMED)  # what that round trip saw
R_BAD = Verified(report(ok=False), REARMED)
WAIT = WaitForReturn(deadline=150.0, give_up=200.0)  # re-armed at 60 + 90 s, + 50 s grace
WAIT_FIRST = WaitForReturn(deadline=100.0, give_up=150.0)  # armed at 10 only
TIMER_NOTE = f"the dead-man timer restores {PREV} unless a later run confirms"


@dataclass(frozen=True)
class Path_:
    """One row: a setup, what the driver sees in order, what the core asks for, how it ends."""

    name: str
    setup: Setup
    seen: tuple[core.Observation, ...]
    actions: tuple[core.Action, ...]
    result: Result
    final: str | None = None
    message: tuple[str, ...] = ()  # fragments the outcome's message must contain
    said: tuple[str, ...] = field(default=())  # fragments of the lines shown on the way


TABLE = (
    # --- healthy ----------------------------------------------------------------------------
    Path_("healthy, with the dead-man timer", SWITCH,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW),
          (ArmTimer(), RUN, REVERIFY, FINISH),
          Result.OK, NEW, said=("dead-man timer armed",)),
    Path_("healthy, the timer armed ahead (in the preview's round trip)", ARMED_AHEAD,
          (RebuildExited(0), R_GOOD, GONE_NEW), (RUN, REVERIFY, FINISH),
          Result.OK, NEW, said=("dead-man timer armed",)),
    Path_("armed ahead, but no timer wanted: ignored", dataclasses.replace(NO_TIMER, armed_at=1.0),
          (RebuildExited(0), GOOD), (RUN_PLAIN, VERIFY), Result.OK, NEW),
    Path_("armed ahead, Ctrl-C before nixos-rebuild: the timer is taken back", ARMED_AHEAD,
          (Interrupt(), GONE_PREV), (RUN, CancelTimer()),
          Result.DECLINED, PREV, ("before anything changed",)),
    Path_("healthy, timer off (rollback_timeout = 0)", NO_TIMER,
          (RebuildExited(0), GOOD), (RUN_PLAIN, VERIFY), Result.OK, NEW),
    Path_("healthy, --no-rollback (no timer)", NO_ROLLBACK,
          (RebuildExited(0), GOOD), (RUN_PLAIN, VERIFY), Result.OK, NEW),
    Path_("healthy, previous system unknown (no timer possible)", UNKNOWN_PREVIOUS,
          (RebuildExited(0), GOOD), (RUN_PLAIN, VERIFY), Result.OK, NEW),
    Path_("a beat during nixos-rebuild and a re-arm that first missed", SWITCH,
          (ARMED, RebuildExited(0, beats=(TimerArmed(20.0), Unreachable("x"))),
           Verified(report(), Unreachable("timeout")), TimerPending(), GOOD, GONE_NEW),
          (ArmTimer(), RUN, REVERIFY, CheckTimer(), VERIFY, FINISH),
          Result.OK, NEW),
    Path_("boot: the profile is checked, no timer", BOOT,
          (RebuildExited(0), Verified(report(NEW))),
          (RUN_PLAIN, Verify(NEW, boot=True)), Result.OK, NEW),
    Path_("build: nothing to verify", BUILD, (RebuildExited(0),), (RUN_PLAIN,), Result.OK, PREV),
    Path_("dry-activate: nothing to verify", DRY, (RebuildExited(0),), (RUN_PLAIN,),
          Result.OK, PREV),
    Path_("--no-verify with a timer: cancelled, final system read by the cancel", NO_VERIFY,
          (ARMED, RebuildExited(0), REARMED, GONE_NEW),
          (ArmTimer(), RUN, ArmTimer(), CancelTimer()),
          Result.OK, NEW, ("verification skipped",)),
    Path_("--no-verify without a timer: final system read", NO_VERIFY_NO_TIMER,
          (RebuildExited(0), SystemIs(NEW)), (RUN_PLAIN, ReadSystem()),
          Result.OK, NEW, ("verification skipped",)),
    # --- nixos-rebuild fails ----------------------------------------------------------------
    Path_("build fails: timer cancelled, host untouched", SWITCH,
          (ARMED, RebuildExited(1, "vps: nixos-rebuild exited 1:\nboom"), REARMED,
           SystemIs(PREV), GONE_PREV),
          (ArmTimer(), RUN, ArmTimer(), ReadSystem(), CancelTimer()),
          Result.BUILD_FAILED, PREV, ("boom",)),
    Path_("build fails without a timer", NO_TIMER,
          (RebuildExited(1, "vps: boom"), SystemIs(PREV)), (RUN_PLAIN, ReadSystem()),
          Result.BUILD_FAILED, PREV, ("boom",)),
    Path_("`build` action fails: no host read", BUILD,
          (RebuildExited(1, "vps: boom"),), (RUN_PLAIN,), Result.BUILD_FAILED, PREV, ("boom",)),
    Path_("activation fails after switching (exit 4 from switch-to-configuration): verified",
          SWITCH, (ARMED, RebuildExited(1, "units failed"), REARMED, SystemIs(NEW), GOOD,
                   GONE_NEW),
          (ArmTimer(), RUN, ArmTimer(), ReadSystem(), VERIFY, FINISH),
          Result.OK, NEW, said=("exited 1 after activating the new system",)),
    Path_("activation fails after switching, and --no-verify: verified all the same", NO_VERIFY,
          (ARMED, RebuildExited(1, "x"), REARMED, SystemIs(NEW), GOOD, GONE_NEW),
          (ArmTimer(), RUN, ArmTimer(), ReadSystem(), VERIFY, FINISH), Result.OK, NEW),
    Path_("build fails and the host does not answer: the timer decides", SWITCH,
          (ARMED, RebuildExited(255, "lost"), REARMED, Unreachable("gone"), Returned(PREV)),
          (ArmTimer(), RUN, ArmTimer(), ReadSystem(), WAIT), Result.ROLLED_BACK, PREV),
    # --- verification fails -----------------------------------------------------------------
    Path_("verification fails: rolled back at once, and the old system verifies", SWITCH,
          (ARMED, RebuildExited(0), R_BAD, RolledBackTo(report(PREV), 0)),
          (ArmTimer(), RUN, REVERIFY, RollbackNow(PREV)),
          Result.ROLLED_BACK, PREV, ("rolled back to", "and it verifies"),
          ("rolling back to",)),
    Path_("verification fails, rolled back, old system still failing a check", SWITCH,
          (ARMED, RebuildExited(0), R_BAD, RolledBackTo(report(PREV, ok=False), 4)),
          (ArmTimer(), RUN, REVERIFY, RollbackNow(PREV)),
          Result.ROLLED_BACK, PREV, ("some checks still fail", "activation exited 4")),
    Path_("verification fails, timer off: still rolled back at once", NO_TIMER,
          (RebuildExited(0), BAD, RolledBackTo(report(PREV), 0)),
          (RUN_PLAIN, VERIFY, RollbackNow(PREV)), Result.ROLLED_BACK, PREV),
    Path_("verification fails with --no-rollback: the host stays", NO_ROLLBACK,
          (RebuildExited(0), BAD), (RUN_PLAIN, VERIFY),
          Result.VERIFY_FAILED, NEW, ("stays on", "--no-rollback")),
    Path_("verification fails, previous unknown: nothing to roll back to", UNKNOWN_PREVIOUS,
          (RebuildExited(0), BAD), (RUN_PLAIN, VERIFY),
          Result.VERIFY_FAILED, NEW, ("previous system is unknown",)),
    Path_("verification fails on boot: the profile stays", BOOT,
          (RebuildExited(0), Verified(report(OTHER, ok=False))),
          (RUN_PLAIN, Verify(NEW, boot=True)), Result.VERIFY_FAILED, OTHER),
    Path_("the rollback does not take", SWITCH,
          (ARMED, RebuildExited(0), R_BAD, RolledBackTo(report(NEW, ok=False), 1)),
          (ArmTimer(), RUN, REVERIFY, RollbackNow(PREV)),
          Result.VERIFY_FAILED, NEW, ("rollback did not take", "switch --rollback")),
    Path_("the rollback loses the host: the timer decides", SWITCH,
          (ARMED, RebuildExited(0), R_BAD, Unreachable("gone"), Returned(PREV)),
          (ArmTimer(), RUN, REVERIFY, RollbackNow(PREV), WAIT),
          Result.ROLLED_BACK, PREV),
    Path_("the rollback cannot run and there is no timer", NO_TIMER,
          (RebuildExited(0), BAD, Unreachable("gone")), (RUN_PLAIN, VERIFY, RollbackNow(PREV)),
          Result.VERIFY_FAILED, None, ("rollback could not run",)),
    Path_("verified, but the timer cannot be cancelled", SWITCH,
          (ARMED, RebuildExited(0), R_GOOD, TimerCancelled(gone=False, current=NEW)),
          (ArmTimer(), RUN, REVERIFY, FINISH),
          Result.VERIFY_FAILED, NEW, ("could not be cancelled",)),
    # --- the timer fired while rebuild was away ---------------------------------------------
    Path_("timer fired while away: the host restored itself", SWITCH,
          (ARMED, RebuildExited(255, "x"), TimerFired(), SystemIs(PREV), GONE_PREV),
          (ArmTimer(), RUN, ArmTimer(), ReadSystem(), CancelTimer()),
          Result.ROLLED_BACK, PREV, ("cut rebuild off",)),
    Path_("timer fired (seen by the re-arm in the verification's round trip)", SWITCH,
          (ARMED, RebuildExited(0), Verified(report(PREV, ok=False), TimerFired()),
           SystemIs(PREV), GONE_PREV),
          (ArmTimer(), RUN, REVERIFY, ReadSystem(), CancelTimer()),
          Result.ROLLED_BACK, PREV, ("cut rebuild off",)),
    Path_("timer fired (seen by the check after a missed re-arm)", SWITCH,
          (ARMED, RebuildExited(0), Verified(report(), Unreachable("x")), TimerFired(),
           SystemIs(PREV), GONE_PREV),
          (ArmTimer(), RUN, REVERIFY, CheckTimer(), ReadSystem(), CancelTimer()),
          Result.ROLLED_BACK, PREV),
    Path_("timer fired but the host runs something else", SWITCH,
          (ARMED, RebuildExited(0), Verified(report(OTHER, ok=False), TimerFired()),
           SystemIs(OTHER), GONE_PREV),
          (ArmTimer(), RUN, REVERIFY, ReadSystem(), CancelTimer()),
          Result.VERIFY_FAILED, OTHER, ("invoke verify",)),
    # --- the host is lost -------------------------------------------------------------------
    Path_("host lost after activation and restored by its timer", SWITCH,
          (ARMED, RebuildExited(0, beats=(TimerArmed(60.0),)), LOST, Returned(PREV)),
          (ArmTimer(), RUN, REVERIFY, WAIT),
          Result.ROLLED_BACK, PREV, ("lost after activation", "answers again"),
          ("host lost",)),
    Path_("host lost for good", SWITCH,
          (ARMED, RebuildExited(0, beats=(TimerArmed(60.0),)), LOST, Returned(None)),
          (ArmTimer(), RUN, REVERIFY, WAIT),
          Result.HOST_LOST, None, ("did not come back", "provider's console")),
    Path_("host lost, back on the new system", SWITCH,
          (ARMED, RebuildExited(0, beats=(TimerArmed(60.0),)), LOST, Returned(NEW)),
          (ArmTimer(), RUN, REVERIFY, WAIT),
          Result.VERIFY_FAILED, NEW, ("not the previous system",)),
    Path_("host lost during verification, restored by its timer", SWITCH,
          (ARMED, RebuildExited(0), LOST, Returned(PREV)),
          (ArmTimer(), RUN, REVERIFY, WAIT_FIRST), Result.ROLLED_BACK, PREV),
    Path_("the verification step fails on the host: lost, the timer decides", SWITCH,
          (ARMED, RebuildExited(0), Unreachable("vps: connection lost"), Returned(PREV)),
          (ArmTimer(), RUN, REVERIFY, WAIT_FIRST), Result.ROLLED_BACK, PREV),
    Path_("host lost during verification with no timer", NO_TIMER,
          (RebuildExited(0), LOST), (RUN_PLAIN, VERIFY),
          Result.HOST_LOST, None, ("no dead-man timer",)),
    Path_("host lost with --no-verify: the uncancelled timer restores it", NO_VERIFY,
          (ARMED, RebuildExited(0), REARMED, Unreachable("x"), Returned(PREV)),
          (ArmTimer(), RUN, ArmTimer(), CancelTimer(), WAIT), Result.ROLLED_BACK, PREV),
    Path_("host lost with --no-verify and no timer", NO_VERIFY_NO_TIMER,
          (RebuildExited(0), Unreachable("x")), (RUN_PLAIN, ReadSystem()),
          Result.HOST_LOST, None, ("stopped answering",)),
    # --- refused before anything changed ----------------------------------------------------
    Path_("the timer cannot be armed: nothing changed", SWITCH,
          (Unreachable("connection lost"),), (ArmTimer(),),
          Result.REFUSED, PREV, ("cannot arm", "connection lost", "nothing was changed")),
    Path_("the lock was taken over before anything changed", SWITCH,
          (LockLost(HOLDER),), (ArmTimer(),), Result.REFUSED, PREV, (HOLDER,)),
    Path_("the lock was broken while nixos-rebuild ran", SWITCH,
          (ARMED, RebuildExited(0), Verified(report(), LockLost(HOLDER))),
          (ArmTimer(), RUN, REVERIFY),
          Result.INTERRUPTED, None, (HOLDER, "dead-man timer restores")),
    Path_("the lock was broken while nixos-rebuild ran, no timer", NO_TIMER,
          (RebuildExited(0, beats=(LockLost(HOLDER),)),), (RUN_PLAIN,),
          Result.INTERRUPTED, None, (HOLDER, "invoke verify")),
    # --- Ctrl-C at each phase ---------------------------------------------------------------
    Path_("Ctrl-C before the timer was armed", SWITCH,
          (Interrupt(),), (ArmTimer(),), Result.DECLINED, PREV, ("before anything changed",)),
    Path_("Ctrl-C after arming, before nixos-rebuild: the timer is taken back", SWITCH,
          (ARMED, Interrupt(), GONE_PREV), (ArmTimer(), RUN, CancelTimer()),
          Result.DECLINED, PREV, ("before anything changed",)),
    Path_("Ctrl-C before nixos-rebuild, no timer", NO_TIMER,
          (Interrupt(),), (RUN_PLAIN,), Result.DECLINED, PREV),
    Path_("Ctrl-C during nixos-rebuild", SWITCH,
          (ARMED, RebuildExited(130)), (ArmTimer(), RUN),
          Result.INTERRUPTED, None, ("during nixos-rebuild", TIMER_NOTE)),
    Path_("Ctrl-C during nixos-rebuild, no timer", NO_TIMER,
          (RebuildExited(130),), (RUN_PLAIN,), Result.INTERRUPTED, None,
          ("during nixos-rebuild",)),
    Path_("Ctrl-C before the re-arm (after a failed nixos-rebuild)", SWITCH,
          (ARMED, RebuildExited(1, "x"), Interrupt()), (ArmTimer(), RUN, ArmTimer()),
          Result.INTERRUPTED, None, (TIMER_NOTE,)),
    Path_("Ctrl-C before verification (and its re-arm)", SWITCH,
          (ARMED, RebuildExited(0), Interrupt()),
          (ArmTimer(), RUN, REVERIFY), Result.INTERRUPTED, None,
          ("during verification", TIMER_NOTE)),
    Path_("Ctrl-C after verification, before the timer was cancelled", SWITCH,
          (ARMED, RebuildExited(0), R_GOOD, Interrupt()),
          (ArmTimer(), RUN, REVERIFY, FINISH), Result.INTERRUPTED, None,
          (TIMER_NOTE,)),
    Path_("Ctrl-C before the immediate rollback", SWITCH,
          (ARMED, RebuildExited(0), R_BAD, Interrupt()),
          (ArmTimer(), RUN, REVERIFY, RollbackNow(PREV)), Result.INTERRUPTED, None,
          ("during rolling back", TIMER_NOTE)),
    Path_("Ctrl-C while waiting for a lost host", SWITCH,
          (ARMED, RebuildExited(0), LOST, Interrupt()),
          (ArmTimer(), RUN, REVERIFY, WAIT_FIRST), Result.INTERRUPTED, None,
          ("waiting for the lost host", TIMER_NOTE)),
    Path_("Ctrl-C after the timer fired: no timer note", SWITCH,
          (ARMED, RebuildExited(0), Verified(report(PREV, ok=False), TimerFired()), Interrupt()),
          (ArmTimer(), RUN, REVERIFY, ReadSystem()), Result.INTERRUPTED, None),
    # --- --reboot ---------------------------------------------------------------------------
    Path_("--reboot, the kernel changed: reboot, come back on it, verify again", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, RebootNeeded(True, ("kernel",)),
           Rebooted(NEW), GOOD),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot(), Reboot(), VERIFY),
          Result.OK, NEW, ("rebooted into",), ("rebooting: the new system changes the kernel",)),
    Path_("--reboot, nothing boot-related changed: no reboot", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, RebootNeeded(False)),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot()),
          Result.OK, NEW, ("no reboot needed",)),
    Path_("--reboot with boot: always reboots into the new default", REBOOT_BOOT,
          (RebuildExited(0), Verified(report(NEW)), Rebooted(NEW), GOOD),
          (RUN_PLAIN, Verify(NEW, boot=True), Reboot(), VERIFY), Result.OK, NEW),
    Path_("--reboot: the host does not come back", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, RebootNeeded(True, ("kernel",)),
           Unreachable("no answer in 300s")),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot(), Reboot()),
          Result.HOST_LOST, None, ("did not come back after the reboot", "console")),
    Path_("--reboot: it booted something else", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, RebootNeeded(True, ("initrd",)),
           Rebooted(PREV)),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot(), Reboot()),
          Result.VERIFY_FAILED, PREV, ("rebooted into", "boot loader")),
    Path_("--reboot: checks fail after the reboot (no timer spans it)", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, RebootNeeded(True, ("kernel",)),
           Rebooted(NEW), BAD),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot(), Reboot(), VERIFY),
          Result.VERIFY_FAILED, NEW, ("after the reboot", "invoke rollback")),
    Path_("Ctrl-C before the reboot: no timer note (it was cancelled)", REBOOT,
          (ARMED, RebuildExited(0), R_GOOD, GONE_NEW, Interrupt()),
          (ArmTimer(), RUN, REVERIFY, CancelTimer(), CheckReboot()),
          Result.INTERRUPTED, NEW),
    # --- a driver bug -----------------------------------------------------------------------
    Path_("an observation that cannot happen is an internal error", SWITCH,
          (ARMED, SystemIs(NEW)), (ArmTimer(), RUN), Result.ERROR, None, ("internal error",)),
)  # fmt: skip


def drive(
    setup: Setup, seen: tuple[core.Observation, ...]
) -> tuple[list[core.Action], core.Outcome, list[str]]:
    """Feed the observations one by one; collect the actions asked for and the lines shown."""
    decision = core.start(setup)
    actions: list[core.Action] = []
    said = list(decision.say)
    for observation in seen:
        assert not isinstance(decision.next, core.Outcome), f"ended early: {decision.next}"
        actions.append(decision.next)
        decision = core.step(setup, decision.state, observation)
        said += decision.say
    assert isinstance(decision.next, core.Outcome), f"no outcome; next: {decision.next}"
    return actions, decision.next, said


class TestDecisionTable:
    @pytest.mark.parametrize("path", TABLE, ids=[p.name for p in TABLE])
    def test_path(self, path: Path_) -> None:
        """Each path asks for exactly these actions and ends with this result, exit code,
        final system and message."""
        actions, outcome, said = drive(path.setup, path.seen)
        assert actions == list(path.actions)
        assert outcome.result is path.result
        assert outcome.exit_code == path.result.exit_code
        assert outcome.final_system == path.final
        for fragment in path.message:
            assert fragment in outcome.message
        for fragment in path.said:
            assert any(fragment in line for line in said), said
        if path.result is not Result.OK:
            assert outcome.message.startswith("vps: ")

    def test_every_result_of_a_deploy_is_covered(self) -> None:
        """The table reaches every result a host's deploy can end with."""
        reached = {path.result for path in TABLE}
        assert reached == set(Result) - {Result.USAGE, Result.SKIPPED}


class TestOutcomeDetails:
    def test_reports_travel_with_the_outcome(self) -> None:
        """A rollback's outcome carries the failed report and the report after rolling back
        (the audit's `checks` and `rollback_checks`)."""
        again = report(PREV)
        seen = (ARMED, RebuildExited(0), R_BAD, RolledBackTo(again, 0))
        _, outcome, _ = drive(SWITCH, seen)
        assert outcome.report == R_BAD.report and outcome.rollback_report == again

    def test_the_wait_for_a_lost_host_counts_from_the_last_beat(self) -> None:
        """The deadline is the last successful arm (a heartbeat's) plus the timeout."""
        beats = (TimerArmed(30.0), Unreachable("x"), TimerArmed(75.0))
        seen = (ARMED, RebuildExited(0, beats=beats), LOST)
        decision = core.start(SWITCH)
        for observation in seen:
            decision = core.step(SWITCH, decision.state, observation)
        assert decision.next == WaitForReturn(deadline=165.0, give_up=215.0)

    def test_a_finished_deploy_takes_no_more_observations(self) -> None:
        """Stepping a finished deploy is a bug, reported as an error outcome, not a crash."""
        decision = core.start(NO_TIMER)
        decision = core.step(NO_TIMER, decision.state, RebuildExited(1, "boom"))
        decision = core.step(NO_TIMER, decision.state, SystemIs(PREV))
        assert isinstance(decision.next, core.Outcome)
        after = core.step(NO_TIMER, decision.state, GOOD)
        assert isinstance(after.next, core.Outcome) and after.next.result is Result.ERROR

    def test_the_timer_needs_an_activation_a_timeout_rollback_and_a_previous(self) -> None:
        """Only switch and test with rollback on, a timeout and a known system get a timer."""
        assert SWITCH.timer and dataclasses.replace(SWITCH, action="test").timer
        for setup in (NO_TIMER, NO_ROLLBACK, UNKNOWN_PREVIOUS, BOOT, BUILD, DRY):
            assert not setup.timer
