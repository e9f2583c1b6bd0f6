"""A run of `invoke rebuild` (and `invoke rollback`): gates, evaluation, locks, plan,
confirmation, then each host's deploy (`rebuild.driver` over `rebuild.core`) in batches, and
one audit record per host whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

from rebuild import audit, gitstate, hooks, hostops, identity, logs, nixos, prebuild, preview
from rebuild import sudo_keyring as sudo_secrets
from rebuild.console import Console
from rebuild.core import Outcome, Setup, TimerArmed
from rebuild.driver import Deploy, arm_answer, arm_script
from rebuild.errors import (
    Declined,
    Interrupted,
    RebuildError,
)
from rebuild.gates import git_gate, host_key_gate, operator_gate, terminal_gate
from rebuild.hostrun import (
    HostRun,
    builder_endpoint,
    endpoint_for,
    expected_system,
    locked_flake,
    open_master,
    previous_generation,
    remove_run_dir,
    verify_host,
)
from rebuild.inventory import Loaded, Target
from rebuild.locks import (
    release_local_lock,
    release_remote_lock,
    remote_lock,
    take_local_lock,
)
from rebuild.plan import HostPlan, Plan, batches, check_names, render_plan
from rebuild.progress import Progress
from rebuild.results import Result, most_severe
from rebuild.verify import Check, Report


@dataclass(frozen=True)
class Options:
    """The flags of `invoke rebuild` (and `invoke rollback`)."""

    action: str | None = None
    yes: bool = False
    dry_run: bool = False
    allow_dirty: bool = False
    verify: bool = True
    rollback: bool = True
    json: bool = False
    batch: int | None = None
    canary: bool = False
    max_fail: int = 0
    jobs: int = 8
    break_lock: bool = False
    every: bool = False
    rollback_generation: bool = False  # `invoke rollback`: nixos-rebuild switch --rollback
    preview: bool = True  # build ahead, copy, and show what will change before the prompt
    reboot: bool = False  # reboot after activation when the new system needs it


@dataclass
class Run:
    """What a run knows about all its hosts (filled by the gates, read by the records)."""

    run_id: str
    me: identity.Identity
    operator: str = ""
    state: gitstate.GitState | None = None
    overrides: tuple[str, ...] = ()
    flake: str = ""  # the flake reference used (a remote one pinned to its revision)
    audit_refused: bool = False  # the audit gate refused: no record can be written
    tools: dict[str, dict[str, str]] = field(default_factory=dict)  # path and version of each

    @property
    def operator_record(self) -> dict[str, str]:
        return {"name": self.operator, "hostname": self.me.hostname,
                "machine_id": self.me.machine_id}  # fmt: skip


def rebuild(loaded: Loaded, targets: list[Target], opts: Options, console: Console) -> int:
    """`invoke rebuild` for one or many hosts; returns the exit code."""
    run = Run(audit.new_run_id(), identity.current())
    runs = [
        HostRun(target, endpoint_for(loaded, target), opts.action or target.settings.action,
                run.run_id)
        for target in targets
    ]  # fmt: skip
    logs.bind(run_id=run.run_id)
    if os.environ.get("NIX_SSHOPTS"):
        console.notice(
            "warning: NIX_SSHOPTS from the environment is ignored: rebuild sets nixos-rebuild's "
            "ssh options from the inventory alone"
        )
    code = 1
    try:
        code = run_hosts(run, runs, loaded, opts, console)
    finally:
        audited = finish(run, runs, loaded, opts, console)
    return code if audited else most_severe([code, 1])


def run_hosts(
    run: Run, runs: list[HostRun], loaded: Loaded, opts: Options, console: Console
) -> int:
    """Gates, locks, plan, confirmation and the rollout; every host gets an Outcome."""
    cancel = threading.Event()
    changing = False  # has any host started to change?
    try:
        prepare(run, runs, loaded, opts)
        previewed = [hr for hr in runs if previews(hr, opts)]
        arming = arms_ahead(runs, opts, loaded)
        if not opts.dry_run or previewed:
            lock(run, runs, loaded, opts, arming.difference(hr.name for hr in previewed))
        build_ahead(run, previewed, loaded, opts, console, cancel, arming)
        plan = make_plan(run, runs, opts, run.flake or loaded.flake)
        console.say(render_plan(plan))
        if opts.dry_run:
            console.say("\n--dry-run: stopping after the plan; nothing was run on any host.")
            for hr in runs:
                hr.overrides.append("dry-run")
                hr.outcome = hr.outcome or Outcome(Result.OK, "dry run: plan only", hr.previous)
            return most_severe([outcome_of(hr).exit_code for hr in runs])
        if all(hr.outcome is not None for hr in runs):  # nothing left to deploy
            return most_severe([outcome_of(hr).exit_code for hr in runs])
        confirm(runs, opts, loaded, console)
        changing = True
        return rollout(run, runs, plan, loaded, opts, console, cancel)
    except KeyboardInterrupt:
        cancel.set()
        exc: RebuildError = (
            Interrupted("interrupted (Ctrl-C)")
            if changing
            else Declined("aborted (Ctrl-C) before anything changed")
        )
        end_all(runs, exc)
        console.error(str(exc))
        return exc.exit_code
    except RebuildError as exc:
        end_all(runs, exc)
        console.error(str(exc))
        return exc.exit_code
    except Exception as exc:  # a bug: still one record per host, then the traceback-free report
        end_all(runs, RebuildError(f"internal error: {type(exc).__name__}: {exc}"))
        raise


def prepare(run: Run, runs: list[HostRun], loaded: Loaded, opts: Options) -> None:
    """The gates, the command lines, and what each host must end on."""
    audit_gate(run, loaded)
    run.operator = operator_gate(loaded, run.me)
    run.state = gitstate.read(loaded.flake_dir) if loaded.flake_dir else None
    overrides = git_gate(run.state, opts.allow_dirty)
    overrides += [] if opts.verify else ["no-verify"]
    overrides += [] if opts.rollback else ["no-rollback"]
    run.overrides = tuple(overrides)
    run.flake = locked_flake(loaded)
    run.tools = {
        "nixos-rebuild": tool_info(loaded.nixos_rebuild_program),
        "nix": tool_info(loaded.nix_program),
    }
    for hr in runs:
        attach_sudo_password(hr)
        hr.command = nixos.nixos_rebuild_argv(
            loaded.nixos_rebuild_program, hr.action, run.flake, hr.target,
            flavour=loaded.inventory.nixos_rebuild_flavour,
            rollback=opts.rollback_generation,
            ask_sudo_password=hr.endpoint.sudo_password is not None,
        )  # fmt: skip
    builders = [builder_endpoint(loaded, hr.target) for hr in runs]
    host_key_gate([hr.endpoint for hr in runs] + [b for b in builders if b is not None])
    terminal_gate(yes=opts.yes, dry_run=opts.dry_run)
    if not opts.dry_run or any(previews(hr, opts) for hr in runs):  # `lock` follows
        for hr in runs:  # this machine's locks first: a refusal here touches no host
            hr.local_lock = take_local_lock(loaded.audit_log.parent, hr.name, run.run_id)
    # the connections open while the new systems are evaluated here (the lock uses them)
    reached = [hr for hr in runs if not opts.dry_run or previews(hr, opts)]
    for hr in reached:
        if previews(hr, opts):  # the preview's `nix copy` shares it
            open_master(loaded, hr.target)
    with ThreadPoolExecutor(max_workers=max(1, min(len(reached), opts.jobs))) as connecting:
        for hr in reached:
            connecting.submit(hr.connect_ahead)
        if not opts.rollback_generation:
            evaluated = [hr for hr in runs if not previews(hr, opts)]  # the others build ahead
            with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
                paths = list(pool.map(lambda h: expected_for(loaded, h, run.flake), evaluated))
            for hr, path in zip(evaluated, paths, strict=True):
                hr.expected = path


def expected_for(loaded: Loaded, hr: HostRun, flake: str) -> str:
    """What a host not previewed must end on, evaluated so that nixos-rebuild's own build of
    it is answered by Nix's evaluation cache when it builds here (`prebuild.expected_unbuilt`:
    one evaluation for the whole deploy)."""
    if prebuild.builds_here(hr):
        return prebuild.expected_unbuilt(loaded, hr, flake)
    return expected_system(loaded, hr.target, flake)


def tool_info(program: str) -> dict[str, str]:
    """Which program runs (resolved on PATH, links followed) and its version."""
    found = shutil.which(program)
    path = os.path.realpath(found) if found else program
    return {"path": path, "version": nixos.tool_version(path)}


def previews(hr: HostRun, opts: Options) -> bool:
    return opts.preview and not opts.rollback_generation and prebuild.wanted(hr)


def build_ahead(run: Run, runs: list[HostRun], loaded: Loaded, opts: Options,
                console: Console, cancel: threading.Event,
                arming: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """Per host, in parallel: build the new system (the deploy's one evaluation), copy it to
    the host, and ask the host what the switch will change (arming the dead-man timer in
    the same round trip for the hosts in `arming`)."""

    def one(hr: HostRun) -> None:
        hr.expected = prebuild.build(hr, loaded, run.flake, console, cancel)
        prebuild.copy(hr, loaded, hr.expected, console, cancel)
        seconds = hr.target.settings.rollback_timeout
        arm = arm_script(hr, seconds) if hr.name in arming and hr.previous else None
        hr.changes, armed = prebuild.ask(hr, hr.expected, arm)
        if armed is not None:
            with contextlib.suppress(RebuildError):  # not armed: the deploy arms it itself
                if isinstance(arm_answer(hr, armed, time.monotonic()), TimerArmed):
                    hr.armed_ahead = time.monotonic()

    errors = _parallel(runs, one, opts.jobs, cancel)
    for hr, error in zip(runs, errors, strict=True):
        if isinstance(error, Declined):  # Ctrl-C: the whole run stops, nothing changed
            raise error
        if isinstance(error, RebuildError):  # this host cannot be deployed; the others can
            hr.outcome = Outcome(error.result, str(error), hr.previous)
            console.error(str(error))


def arms_ahead(runs: list[HostRun], opts: Options, loaded: Loaded) -> frozenset[str]:
    """The host whose dead-man timer is armed ahead, in the last round trip before its
    deploy (the preview's, else the lock's, which also reads the system to restore): one
    host, and no prompt follows (--yes). In a fleet the other hosts' builds could outlast the
    timer, so every host there arms it when its deploy starts."""
    if not opts.yes or opts.dry_run or opts.rollback_generation or len(runs) != 1:
        return frozenset()
    # the previous system is read in that same round trip: here only the rest must hold
    wanted = [replace(setup_for(hr, opts, loaded), previous="(read then)") for hr in runs]
    return frozenset(setup.host for setup in wanted if setup.timer)


def audit_gate(run: Run, loaded: Loaded) -> None:
    """Refuse (exit 3) before anything runs when no audit record could be written."""
    try:
        audit.check_writable(loaded.audit_log)
    except audit.AuditError:
        run.audit_refused = True
        raise


def lock(run: Run, runs: list[HostRun], loaded: Loaded, opts: Options,
         arming: frozenset[str] = frozenset()) -> None:  # fmt: skip
    """Every host's lock on the host (learning what each runs), or none (the local locks were
    taken in `prepare`); the hosts in `arming` get their dead-man timer in the same round
    trip."""
    owner = hostops.LockOwner(
        run_id=run.run_id, operator=run.operator, hostname=run.me.hostname,
        machine_id=run.me.machine_id, pid=os.getpid(), since=time.time(),
    )  # fmt: skip
    for hr in runs:
        hr.start_record = host_record(run, hr, hr.expected, "started")
    errors = _parallel(
        runs,
        lambda hr: remote_lock(
            hr, owner, run.me, break_lock=opts.break_lock,
            stale_after=loaded.inventory.lock_stale_after,
            arm=hr.target.settings.rollback_timeout if hr.name in arming else None,
        ),
        opts.jobs,
    )  # fmt: skip
    refused = [e for e in errors if e is not None]
    if refused:
        raise refused[0]
    if opts.rollback_generation:
        for hr in runs:
            hr.expected = previous_generation(hr)


def host_record(run: Run, hr: HostRun, system: str | None, result: str) -> str:
    """A line for the host's own deploy log (/var/lib/rebuild/deployments.jsonl), so that
    another operator machine, or `invoke status`, learns who deployed what."""
    state = run.state
    return hostops.deploy_record(
        run_id=run.run_id,
        timestamp=audit.now_iso(),
        operator={"name": run.operator, "machine_id": run.me.machine_id},
        commit=state.commit if state else None,
        dirty=bool(state and state.dirty),
        action=hr.action,
        system=system,
        result=result,
    )


def make_plan(run: Run, runs: list[HostRun], opts: Options, flake: str) -> Plan:
    state = run.state
    return Plan(
        run_id=run.run_id,
        commit=state.commit if state else None,
        subject=state.subject if state else "",
        dirty_files=state.dirty_files if state else (),
        overrides=run.overrides,
        hosts=tuple(host_plan(hr, opts, flake) for hr in runs),
        batches=batches([hr.name for hr in runs], batch=opts.batch, canary=opts.canary),
        totals=preview.totals([hr.changes for hr in runs if hr.changes is not None]),
    )


def end_all(runs: list[HostRun], exc: RebuildError) -> None:
    """A run-wide error or refusal is every unfinished host's outcome."""
    for hr in runs:
        if hr.outcome is None:
            hr.outcome = Outcome(exc.result, str(exc), hr.previous)


def finish(run: Run, runs: list[HostRun], loaded: Loaded, opts: Options,
           console: Console) -> bool:  # fmt: skip
    """Release what the run holds and write one audit record per host (and the JSON); False
    when a record could not be written (it is then shown on stderr, never lost silently)."""
    audited = True
    # all held host locks at once: a refused or declined fleet run must not pay a round
    # trip per host, one host after the other, before it exits (the loop below retries)
    for hr in runs:
        if hr.remote_locked:
            outcome = outcome_of(hr)
            hr.final_record = host_record(run, hr, outcome.final_system, str(outcome.result))
    with contextlib.suppress(Exception):
        _parallel([hr for hr in runs if hr.remote_locked], release_remote_lock, opts.jobs)
    for hr in runs:
        release_remote_lock(hr)
        release_local_lock(hr.local_lock)
        hr.close()
        for warning in hr.warnings:
            console.notice(f"warning: [{hr.name}] {warning}")
        if run.audit_refused:  # the refusal said why; there is nowhere to write
            continue
        rec = record(run, hr, loaded, opts)
        try:
            audit.append(loaded.audit_log, rec)
        except RebuildError as exc:
            audited = False
            console.error(f"the audit record of {hr.name} was not written: {exc}; it follows")
            console.notice(json.dumps(audit.redact_value(rec.to_json()), sort_keys=True))
        hooks.run_hooks(loaded, rec, console)
    remove_run_dir()
    if opts.json:
        for hr in runs:
            console.json(host_json(hr))
    logs.clear()
    return audited


def outcome_of(hr: HostRun) -> Outcome:
    return hr.outcome or Outcome(Result.ERROR, f"{hr.name}: internal error: no outcome")


def record(run: Run, hr: HostRun, loaded: Loaded, opts: Options) -> audit.Record:
    """The host's audit record, made once from its Outcome."""
    outcome = outcome_of(hr)
    state = run.state
    return audit.Record(
        run_id=run.run_id,
        host=hr.name,
        address=hr.target.address,
        action=hr.action,
        flake=run.flake or loaded.flake,
        attr=hr.target.attr,
        operator=run.operator_record,
        event="rollback" if opts.rollback_generation else "rebuild",
        commit=state.commit if state else None,
        dirty=bool(state and state.dirty),
        overrides=[*run.overrides, *hr.overrides],
        command=list(hr.command),
        expected_system=hr.expected,
        previous_system=hr.previous,
        final_system=outcome.final_system,
        result=str(outcome.result),
        exit_code=outcome.exit_code,
        message=outcome.message,
        checks=[c.to_json() for c in outcome.report.checks] if outcome.report else [],
        rollback_checks=(
            [c.to_json() for c in outcome.rollback_report.checks] if outcome.rollback_report else []
        ),
        duration_s=round(time.monotonic() - hr.started, 3),
        timings={phase: round(seconds, 3) for phase, seconds in hr.timings.items()},
        remote_commands=hr.remote_commands,
        changes=hr.changes.to_json() if hr.changes is not None else None,
        tools=run.tools,
        extra={"warnings": list(hr.warnings)} if hr.warnings else {},
    )


def attach_sudo_password(hr: HostRun) -> None:
    """A sudo host's password from the OS keyring (its entry bound to the host's name, user,
    address and port); none stored means passwordless sudo. An older entry under the host name
    alone is refused (exit 3), never used."""
    spec = hr.target.settings
    if not spec.sudo:
        return
    try:
        password = sudo_secrets.get(hr.target)
    except sudo_secrets.KeyringUnavailable:
        logs.debug("no keyring backend; assuming passwordless sudo", host=hr.name)
        hr.endpoint = replace(hr.endpoint, keyring_available=False)
        return
    if password is not None:
        hr.endpoint = replace(hr.endpoint, sudo_password=password)


def _parallel(runs: list[HostRun], fn: Callable[[HostRun], None], jobs: int,
              cancel: threading.Event | None = None) -> list[BaseException | None]:  # fmt: skip
    """`fn` for every host at once; their refusals as values. Ctrl-C sets `cancel` (the steps
    stop their programs), waits for them, and goes on up."""

    def wrapped(hr: HostRun) -> BaseException | None:
        try:
            fn(hr)
        except RebuildError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(wrapped, hr) for hr in runs]
        try:
            while not all(f.done() for f in futures):
                wait(futures, timeout=0.2)
        except KeyboardInterrupt:
            if cancel is not None:
                cancel.set()
            wait(futures)
            raise
        return [f.result() for f in futures]


def host_plan(hr: HostRun, opts: Options, flake: str) -> HostPlan:
    spec = hr.target.settings
    return HostPlan(
        host=hr.name,
        address=spec.address,
        user=spec.user,
        action=hr.action + (" --rollback" if opts.rollback_generation else ""),
        flake_attr=f"{flake}#{hr.target.attr}",
        command=tuple(hr.command),
        expected_system=hr.expected,
        current_system=hr.previous,
        checks=check_names(spec.verify, hr.action, opts.verify),
        rollback_timeout=spec.rollback_timeout if opts.rollback else 0,
        changes=hr.changes,
        preview_note=preview_note(hr, opts),
    )


def preview_note(hr: HostRun, opts: Options) -> str:
    if hr.outcome is not None:
        return f"NOT DEPLOYED: {hr.outcome.message}"
    if hr.changes is not None or opts.rollback_generation or hr.action == "build":
        return ""
    if not opts.preview:
        return "not previewed (--no-preview)"
    if hr.target.settings.build_host:
        return "not previewed: the system is built on the build host during activation"
    return ""


def confirm(runs: list[HostRun], opts: Options, loaded: Loaded, console: Console) -> None:
    if opts.yes:
        return
    verb = "Roll back" if opts.rollback_generation else "Deploy"
    if len(runs) == 1 and not opts.every:
        hr = runs[0]
        answer = console.ask(f"{verb} {hr.name} ({hr.target.address})? [y/N] ")
        if answer.lower() not in ("y", "yes"):
            raise Declined(f"declined at the prompt; nothing was changed on {hr.name}")
        return
    count = len(runs)
    if opts.every or count > loaded.inventory.confirm_count_above:
        answer = console.ask(f"{verb} {count} hosts? Type {count} to confirm: ")
        if answer != str(count):
            raise Declined("declined at the prompt; nothing was changed on any host")
        return
    names = ", ".join(hr.name for hr in runs)
    answer = console.ask(f"{verb} {names}? [y/N] ")
    if answer.lower() not in ("y", "yes"):
        raise Declined("declined at the prompt; nothing was changed on any host")


def setup_for(hr: HostRun, opts: Options, loaded: Loaded) -> Setup:
    """What the decision core needs to know about one host's deploy."""
    spec = hr.target.settings
    return Setup(
        host=hr.name,
        action=hr.action,
        expected=hr.expected,
        previous=hr.previous,
        rollback_timeout=spec.rollback_timeout,
        verify=opts.verify,
        rollback=opts.rollback,
        lost_grace=LOST_GRACE,
        reboot=opts.reboot,
        reboot_timeout=spec.reboot_timeout,
        armed_at=hr.armed_ahead,
    )


LOST_GRACE = 20.0  # seconds past the timer's deadline before concluding a host is gone


def deploy_one(run: Run, hr: HostRun, loaded: Loaded, opts: Options, console: Console,
               cancel: threading.Event) -> None:  # fmt: skip
    """One host's deploy to its Outcome; never raises (a bug is an `error` outcome)."""
    hr.success_record = host_record(run, hr, hr.expected, str(Result.OK))
    deploy = Deploy(hr, setup_for(hr, opts, loaded), loaded, console, cancel)
    hr.armed_ahead = None  # from here the timer is the deploy's to keep or cancel
    try:
        hr.outcome = deploy.run()
    except Exception as exc:
        logs.exception("internal error", host=hr.name)
        hr.outcome = Outcome(
            Result.ERROR, f"{hr.name}: internal error: {type(exc).__name__}: {exc}"
        )
    finally:
        hr.timings.update(deploy.timings)
        outcome = outcome_of(hr)
        hr.final_record = host_record(run, hr, outcome.final_system, str(outcome.result))
        release_remote_lock(hr)
    if hr.outcome.exit_code != 0:
        console.error(hr.outcome.message)


def rollout(run: Run, runs: list[HostRun], plan: Plan, loaded: Loaded, opts: Options,
            console: Console, cancel: threading.Event) -> int:  # fmt: skip
    """The batches, one after the other; on a terminal, a fleet's hosts as live lines."""
    live = None
    if len(runs) > 1 and not opts.json and console.is_terminal():
        live = Progress(console.out, [hr.name for hr in runs])
        console.attach(live)
        live.start()
    try:
        return _rollout(run, runs, plan, loaded, opts, console, cancel, live)
    finally:
        if live is not None:
            live.stop()
            console.attach(None)
        if len(runs) > 1:
            console.say(summary(runs))


def _rollout(run: Run, runs: list[HostRun], plan: Plan, loaded: Loaded, opts: Options,
             console: Console, cancel: threading.Event, live: Progress | None) -> int:  # fmt: skip
    by_name = {hr.name: hr for hr in runs}
    failures = 0
    for batch in plan.batches:
        group = [by_name[name] for name in batch]
        failed_ahead = [hr for hr in group if hr.outcome is not None]  # its build failed
        group = [hr for hr in group if hr.outcome is None]
        if failures > opts.max_fail or cancel.is_set():
            for hr in group:
                hr.outcome = Outcome(
                    Result.SKIPPED, "not reached: the rollout stopped before this batch",
                    hr.previous,  # untouched: still what it ran
                )  # fmt: skip
                release_remote_lock(hr)
                if live is not None:
                    live.finish(hr.name, "skipped")
            continue
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            futures = [
                pool.submit(deploy_one, run, hr, loaded, opts, console, cancel) for hr in group
            ]
            pending = set(futures)
            try:
                while pending:
                    _, pending = wait(pending, timeout=0.2)
            except KeyboardInterrupt:
                cancel.set()
                console.error("interrupted: stopping nixos-rebuild; dead-man timers stay armed")
                wait(futures)
        failures += len(failed_ahead)
        failures += sum(1 for hr in group if outcome_of(hr).exit_code != 0)
        if live is not None:
            for hr in [*failed_ahead, *group]:
                outcome = outcome_of(hr)
                live.finish(hr.name, f"{outcome.result} (exit {outcome.exit_code})")
    return most_severe([outcome_of(hr).exit_code for hr in runs])


PHASE_ABBREVIATIONS = {
    "build": "build", "copy": "copy", "activation": "act", "verification": "verify",
    "rollback": "rollback", "reboot": "reboot",
}  # fmt: skip


def summary(runs: list[HostRun]) -> str:
    """The table at the end of a fleet run: result, exit code, time, seconds per phase."""
    lines = ["", f"{'host':16} {'result':14} {'exit':4} {'duration':>9}  system"]
    for hr in runs:
        outcome = outcome_of(hr)
        seconds = time.monotonic() - hr.started
        lines.append(
            f"{hr.name:16} {outcome.result:14} {outcome.exit_code:<4} {seconds:>8.1f}s  "
            f"{outcome.final_system or '-'}"
        )
        phases = [f"{short} {hr.timings[phase]:.1f}s" for phase, short in
                  PHASE_ABBREVIATIONS.items() if phase in hr.timings]  # fmt: skip
        if phases:
            lines.append(f"{'':16} {', '.join(phases)}")
    return "\n".join(lines)


def host_json(hr: HostRun) -> dict[str, object]:
    """`invoke rebuild --json`: one object per host (the contract's machine output)."""
    outcome = outcome_of(hr)
    report = outcome.report
    data: dict[str, object] = (
        report.to_json()
        if report is not None
        else {"host": hr.name, "ok": False, "current_system": outcome.final_system,
              "expected_system": hr.expected, "checks": []}
    )  # fmt: skip
    data["ok"] = outcome.result is Result.OK and (report is None or report.ok)
    data["result"] = str(outcome.result)
    data["exit_code"] = outcome.exit_code
    data["run_id"] = hr.run_id
    data["timings"] = {phase: round(s, 3) for phase, s in hr.timings.items()}
    data["remote_commands"] = hr.remote_commands
    data["changes"] = hr.changes.to_json() if hr.changes is not None else None
    if outcome.rollback_report is not None:
        data["rollback_checks"] = [c.to_json() for c in outcome.rollback_report.checks]
    return data


def verify_only(loaded: Loaded, target: Target, console: Console, *, json_mode: bool) -> int:
    """`invoke verify`: the checks alone against what HEAD evaluates to, with the allowlist,
    the host-key gate and an audit record (`event` `verify`). The SSH connection is opened
    while HEAD is evaluated."""
    started = time.monotonic()
    run = Run(audit.new_run_id(), identity.current())
    hr = HostRun(target, endpoint_for(loaded, target), "verify", run.run_id)
    report: Report | None = None
    expected: str | None = None
    try:
        audit_gate(run, loaded)
        run.operator = operator_gate(loaded, run.me)
        host_key_gate([hr.endpoint])
        with ThreadPoolExecutor(max_workers=1) as pool:
            connecting = pool.submit(hr.connection)
            try:
                run.state = gitstate.read(loaded.flake_dir) if loaded.flake_dir else None
                expected = expected_system(loaded, target, head_flake_ref(loaded, run.state))
            finally:
                connecting.result()
        report = verify_host(hr, expected, settle_timeout=0)
        outcome = Outcome(
            Result.OK if report.ok else Result.VERIFY_FAILED, "", report.current_system, report
        )
    except RebuildError as exc:
        outcome = Outcome(exc.result, str(exc))
        if json_mode:
            console.json({
                "host": target.name, "ok": False, "current_system": None,
                "expected_system": expected, "error": str(exc),
                "checks": [Check("ssh", False, str(exc)).to_json()],
            })  # fmt: skip
        console.error(str(exc))
    finally:
        hr.close()
    hr.expected, hr.outcome = expected, outcome
    rec = record(run, hr, loaded, Options())
    rec.event, rec.duration_s = "verify", round(time.monotonic() - started, 3)
    if run.audit_refused:
        return outcome.exit_code
    try:
        audit.append(loaded.audit_log, rec)
    except RebuildError as exc:
        console.error(f"the audit record was not written: {exc}")
        return most_severe([outcome.exit_code, 1])
    if report is not None:
        if json_mode:
            console.json(report.to_json())
        else:
            console.report(report)
    return outcome.exit_code


def head_flake_ref(loaded: Loaded, state: gitstate.GitState | None = None) -> str:
    """The flake as committed: a dirty working tree must not hide drift from HEAD."""
    if loaded.flake_dir is None:
        return loaded.flake
    state = state or gitstate.read(loaded.flake_dir)
    if state.is_repo and state.dirty and state.commit:
        return f"git+file://{loaded.flake_dir}?rev={state.commit}"
    return loaded.flake
