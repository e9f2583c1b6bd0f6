"""The driver of one host's deploy: it performs the decision core's actions through the seams
(`remote` for the host, `process` for nixos-rebuild) and feeds back what it saw. It holds no
decision of its own: every branch is in `rebuild.core`.

The heartbeat (pushing the dead-man deadline forward while nixos-rebuild runs) is a thread
that performs the arm step and puts what it saw on a queue; the driver hands those beats to
the core with nixos-rebuild's exit. It shares no mutable object with the driver.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rebuild import audit, core, facts, hostops, logs, process
from rebuild.console import Console
from rebuild.errors import GateRefused, RebuildError
from rebuild.hostrun import HostRun, child_env, current_system, run_dir, verify_host
from rebuild.hostrun import gather as gather_facts
from rebuild.inventory import Loaded
from rebuild.remote import RemoteResult, sudo_problem
from rebuild.results import Result
from rebuild.verify import Report, run_checks

RECONNECT_INTERVAL = 2.0
REBOOT_GRACE = 3.0  # seconds before asking a rebooting host again
LOCK_REFRESH_INTERVAL = 30.0  # seconds between refreshes of the host lock without a timer
MAX_STEPS = 64  # a deploy takes about ten; a bound, not a loop
LEGACY_SUDO_PROMPTS = 16  # older nixos-rebuild asks once per ssh session; a bound, not a loop

# Which contract phase (audit `timings`) each action's time counts for.
PHASE_OF: dict[type[core.Action], str] = {
    core.ArmTimer: "activation",
    core.RunNixosRebuild: "activation",
    core.CheckTimer: "activation",
    core.ReadSystem: "activation",
    core.CancelTimer: "verification",
    core.Verify: "verification",
    core.RollbackNow: "rollback",
    core.WaitForReturn: "rollback",
    core.CheckReboot: "reboot",
    core.Reboot: "reboot",
}


@dataclass
class Deploy:
    """One host's deploy, driven to its Outcome."""

    hr: HostRun
    setup: core.Setup
    loaded: Loaded
    console: Console
    cancel: threading.Event
    clock: Callable[[], float] = time.monotonic
    timings: dict[str, float] = field(default_factory=dict)

    def run(self) -> core.Outcome:
        decision = core.start(self.setup)
        for _ in range(MAX_STEPS):
            for line in decision.say:
                self.console.host_line(self.hr.name, line)
            action = decision.next
            if isinstance(action, core.Outcome):
                return action
            self.console.phase(self.hr.name, *self._label(action))
            seen = core.Interrupt() if self.cancel.is_set() else self._timed(action)
            logs.debug("step", host=self.hr.name, action=type(action).__name__,
                      seen=type(seen).__name__)  # fmt: skip
            decision = core.step(self.setup, decision.state, seen)
        return core.Outcome(Result.ERROR, f"{self.hr.name}: internal error: no outcome")

    def _label(self, action: core.Action) -> tuple[str, float | None]:
        """What the live display shows for an action, and when a wait in it ends."""
        now = self.clock()
        match action:
            case core.Verify():
                settle = self.hr.target.settings.verify.settle_timeout
                return "verifying", now + settle
            case core.WaitForReturn(deadline=deadline):
                return "host lost: waiting for its dead-man timer", deadline
            case core.Reboot():
                return "rebooting", now + self.setup.reboot_timeout
            case core.RunNixosRebuild():
                return "nixos-rebuild", None
            case core.RollbackNow():
                return "rolling back", None
        return PHASE_OF[type(action)], None

    def _timed(self, action: core.Action) -> core.Observation:
        began = self.clock()
        try:
            return self.perform(action)
        finally:
            phase = PHASE_OF[type(action)]
            self.timings[phase] = self.timings.get(phase, 0.0) + self.clock() - began

    def perform(self, action: core.Action) -> core.Observation:
        """Do one action; a host that does not answer is an observation, not an error."""
        try:
            match action:
                case core.ArmTimer():
                    return self.arm()
                case core.RunNixosRebuild(heartbeat=beat):
                    return self.nixos_rebuild(beat)
                case core.CheckTimer():
                    result = self.hr.run(hostops.timer_state_script(self.hr.run_id), timeout=30)
                    fired = hostops.timer_elapsed(result.stdout)
                    return core.TimerFired() if fired else core.TimerPending()
                case core.ReadSystem():
                    return core.SystemIs(current_system(self.hr))
                case core.CancelTimer(release=release):
                    hr = self.hr
                    record = hr.success_record if release and hr.remote_locked else None
                    script = hostops.cancel_timer_script(hr.run_id, record)
                    result = hr.run(script, timeout=30)
                    gone, now = hostops.parse_cancel(result.stdout)
                    if record is not None and hostops.parse_released(result.stdout):
                        hr.remote_locked = False  # released in the same round trip
                        if hostops.record_failed(result.stdout):
                            hr.warnings.append(
                                f"could not note the result in {hostops.DEPLOY_LOG} on the host"
                            )
                    return core.TimerCancelled(gone, now)
                case core.Verify(expected=expected, boot=boot, rearm=rearm):
                    if rearm:
                        report, rearmed = self.verify_rearmed(expected)
                    else:
                        report, rearmed = verify_host(self.hr, expected, boot=boot), None
                    self.console.report(report)
                    return core.Verified(report, rearmed)
                case core.RollbackNow(previous=previous):
                    return self.rollback_now(previous)
                case core.WaitForReturn(deadline=deadline, give_up=give_up):
                    return self.wait_for_return(deadline, give_up)
                case core.CheckReboot():
                    result = self.hr.run(hostops.reboot_check_script(), privileged=False)
                    reasons = hostops.parse_reboot_check(result.stdout)
                    return core.RebootNeeded(bool(reasons), reasons)
                case core.Reboot():
                    return self.reboot()
        except RebuildError as exc:
            return core.Unreachable(str(exc))
        raise AssertionError(f"unknown action {action!r}")  # pragma: no cover

    # --- the actions ---------------------------------------------------------------------

    def arm(self) -> core.TimerArmed | core.TimerFired | core.LockLost:
        """(Re-)arm the dead-man timer, if this run still holds the host's lock."""
        return self._armed(self.hr.run(self._arm_script(), timeout=hostops.ARM_TIMEOUT))

    def _arm_script(self) -> str:
        return arm_script(self.hr, self.setup.rollback_timeout)

    def _armed(self, result: RemoteResult) -> core.TimerArmed | core.TimerFired | core.LockLost:
        return arm_answer(self.hr, result, self.clock())

    def verify_rearmed(self, expected: str | None) -> tuple[Report, core.TimerBeat | None]:
        """Verification after nixos-rebuild: the first gathering of facts also pushes the
        dead-man timer forward (privileged), in the same round trip; retries gather alone."""
        hr = self.hr
        spec = hr.target.settings.verify
        beats: list[core.TimerBeat] = []

        def gather() -> facts.Facts:
            if beats:
                return gather_facts(hr, boot=False)
            try:
                timeout = hostops.ARM_TIMEOUT + facts.script_timeout(spec)
                armed, plain = hr.run_pair(self._arm_script(), facts.script(spec), timeout=timeout)
            except GateRefused as exc:  # sudo refused the re-arm: the facts alone, then
                beats.append(core.Unreachable(str(exc)))
                return gather_facts(hr, boot=False)
            try:
                beats.append(self._armed(armed))
            except RebuildError as exc:
                beats.append(core.Unreachable(str(exc)))
            return facts.parse(plain.stdout, spec)

        report = run_checks(gather, spec, expected, host=hr.name)
        return report, beats[0] if beats else None

    def refresh_lock(self) -> core.LockLost | None:
        """Keep the host's lock fresh while nixos-rebuild runs (no timer to arm)."""
        owner = refreshed_owner(self.hr)
        if owner is None:
            return None
        result = self.hr.run(hostops.refresh_lock_script(owner), timeout=hostops.ARM_TIMEOUT)
        holder = hostops.parse_lock_lost(result.stdout)
        return None if holder is None else core.LockLost(holder)

    def nixos_rebuild(self, heartbeat: bool) -> core.RebuildExited:
        beats: queue.SimpleQueue[core.TimerArmed | core.TimerFired | core.LockLost
                                 | core.Unreachable] = queue.SimpleQueue()  # fmt: skip
        stop = threading.Event()

        def beat() -> None:
            """Arm the timer again (which refreshes the lock), or refresh the lock alone."""
            timeout = self.setup.rollback_timeout
            interval = max(3.0, min(30.0, timeout / 3)) if heartbeat else LOCK_REFRESH_INTERVAL
            while not stop.wait(interval):
                seen: core.TimerArmed | core.TimerFired | core.LockLost | core.Unreachable | None
                try:
                    seen = self.arm() if heartbeat else self.refresh_lock()
                except RebuildError as exc:
                    seen = core.Unreachable(str(exc))
                if seen is not None:
                    beats.put(seen)

        thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{self.hr.name}")
        thread.start()
        try:
            done, failure = run_nixos_rebuild(self.hr, self.loaded, self.console, self.cancel)
        finally:
            stop.set()
            thread.join(timeout=35)
        seen = []
        while not beats.empty():
            seen.append(beats.get())
        code = 130 if done.returncode == 130 or self.cancel.is_set() else done.returncode
        return core.RebuildExited(code, failure, tuple(seen))

    def rollback_now(self, previous: str) -> core.RolledBackTo:
        hr = self.hr
        result = hr.run(hostops.rollback_now_script(hr.run_id, previous), timeout=600)
        settle = min(30.0, hr.target.settings.verify.settle_timeout)
        again = verify_host(hr, previous, settle_timeout=settle)
        self.console.report(again, title="after rollback")
        return core.RolledBackTo(again, result.exited)

    def reboot(self) -> core.Rebooted | core.Unreachable | core.Interrupt:
        """Reboot the host, then wait (bounded, cancellable) until it answers with a new boot
        id; the wait counts down on the console."""
        hr = self.hr
        before = hr.run(hostops.reboot_script(hr.run_id), timeout=30).stdout.strip()
        hr.close()
        deadline = self.clock() + self.setup.reboot_timeout
        self.console.host_line(hr.name, f"rebooting; waiting up to {self.setup.reboot_timeout}s")
        self.cancel.wait(REBOOT_GRACE)
        while self.clock() < deadline:
            if self.cancel.is_set():
                return core.Interrupt()
            try:
                lines = hr.run(hostops.boot_state_script(), timeout=20,
                               privileged=False).stdout.splitlines()  # fmt: skip
            except RebuildError:
                hr.close()
                self.cancel.wait(RECONNECT_INTERVAL)
                continue
            boot_id = lines[0].strip() if lines else ""
            if boot_id and boot_id != before:
                booted = next((x.strip() for x in lines[1:] if x.strip()), None)
                return core.Rebooted(booted)
            self.cancel.wait(RECONNECT_INTERVAL)
        return core.Unreachable(f"no new boot within {self.setup.reboot_timeout}s")

    def wait_for_return(self, deadline: float, give_up: float) -> core.Returned | core.Interrupt:
        """The host vanished after activation: wait for its timer to fire, then reconnect."""
        hr = self.hr
        hr.close()
        give_up += hr.endpoint.connect_timeout * 3
        while self.clock() < give_up:
            if self.cancel.is_set():
                return core.Interrupt()
            if self.clock() >= deadline:
                try:
                    return core.Returned(current_system(hr))
                except RebuildError:
                    hr.close()
            self.cancel.wait(RECONNECT_INTERVAL)
        return core.Returned(None)


def run_nixos_rebuild(
    hr: HostRun, loaded: Loaded, console: Console, cancel: threading.Event
) -> tuple[process.Completed, str]:
    """Run the host's nixos-rebuild command, answering its sudo prompt when a password is
    stored; returns what it did and, when it failed, why (for the operator)."""
    env = child_env(loaded, hr.target)
    env["GIT_TERMINAL_PROMPT"] = "0"  # git (fetching a flake input) never asks on the terminal
    logs.debug("running nixos-rebuild", host=hr.name, command=hr.command)
    password = hr.endpoint.sudo_password
    responder = None
    if password is not None and hr.target.settings.sudo and hr.action != "build":
        # only the exact prompts this command prints for this host's sudo are answered
        prompts = process.nixos_rebuild_prompts(
            hr.command, hr.target.settings.user, sudo_sessions=LEGACY_SUDO_PROMPTS
        )
        responder = process.Responder(password, prompts) if prompts else None
    complaint: list[str] = []

    def on_line(line: str) -> None:
        if not complaint and line.lstrip().startswith("sudo:"):
            complaint.append(line)
        console.host_line(hr.name, line)

    folder = work_folder(hr, loaded)
    done = process.stream(
        hr.command, env=env, cwd=str(folder), on_line=on_line, cancel=cancel, responder=responder
    )
    if done.ok:
        result = folder / "result"
        if hr.action == "build" and result.is_symlink():
            console.host_line(hr.name, f"built: {result} -> {os.path.realpath(result)}")
        return done, ""
    if responder is not None and responder.refused is not None:
        return done, f"{hr.name}: nixos-rebuild was stopped: {responder.refused}"
    return done, build_failure(hr, done, responder, complaint[0] if complaint else "")


def work_folder(hr: HostRun, loaded: Loaded) -> Path:
    """Where nixos-rebuild runs, so its `result` link never lands in the flake's tree (the
    next deploy would be refused as dirty): `build` keeps it in the state folder
    (`results/<host>/result`, a GC root the operator can use); every other action runs in the
    run's private folder, removed at its end."""
    if hr.action != "build":
        return run_dir()
    folder = loaded.audit_log.parent / "results" / hr.name
    audit.private_dir(folder.parent)
    audit.private_dir(folder)
    return folder


def build_failure(
    hr: HostRun,
    done: process.Completed,
    responder: process.Responder | None = None,
    complaint: str = "",
) -> str:
    """Why nixos-rebuild failed, for the operator: sudo's refusal said plainly, else the tail."""
    user = hr.target.settings.user
    if responder is not None and responder.failed:
        return (
            f"{hr.name}: sudo on {hr.name} rejected the stored password of {user}; "
            "nixos-rebuild was stopped and nothing more was tried; store the right one with "
            f"`invoke secret set --host {hr.name}`"
        )
    if complaint:
        problem = sudo_problem(hr.endpoint, complaint)
        if problem is not None and responder is not None and "needs a password" in problem:
            problem = (
                f"sudo on {hr.name} asked for a password that nixos-rebuild did not hand over "
                "(--use-remote-sudo: classic nixos-rebuild); if this machine's nixos-rebuild is "
                'nixos-rebuild-ng, set nixos_rebuild_flavour = "ng": rebuild then passes '
                "--sudo --ask-sudo-password"
            )
        if problem is not None:
            return f"{hr.name}: nixos-rebuild exited {done.returncode}: {problem}"
    tail = "\n".join(done.stderr.splitlines()[-10:])
    return f"{hr.name}: nixos-rebuild exited {done.returncode}:\n{tail}"


# --- the arm step, shared with the preview's round trip (arming ahead) -----------------------


def refreshed_owner(hr: HostRun) -> hostops.LockOwner | None:
    owner = hr.lock_owner
    return None if owner is None else replace(owner, refreshed=time.time())


def arm_script(hr: HostRun, seconds: int) -> str:
    """(Re-)arm the host's dead-man timer for `seconds`, refreshing this run's lock."""
    if hr.previous is None:  # the core arms a timer only with a known previous system
        raise RebuildError(f"{hr.name}: the current system is unknown; no dead-man timer")
    return hostops.arm_timer_script(hr.run_id, hr.previous, seconds, refreshed_owner(hr))


def arm_answer(hr: HostRun, result: RemoteResult, now: float
               ) -> core.TimerArmed | core.TimerFired | core.LockLost:  # fmt: skip
    """What the arm step's answer means (a failure to arm is a RebuildError)."""
    if result.stdout.strip() == "fired":
        return core.TimerFired()
    holder = hostops.parse_lock_lost(result.stdout)
    if holder is not None:
        return core.LockLost(holder)
    if not result.ok:
        detail = (result.stderr or result.stdout).strip()[-300:]
        raise RebuildError(f"{hr.name}: cannot arm the dead-man timer: {detail}")
    return core.TimerArmed(now)
