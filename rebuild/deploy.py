"""The orchestration: gates → plan → confirmation → nixos-rebuild → verification → rollback,
and an audit record for every host whatever happens."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import structlog

from rebuild import audit, gitstate, hostops, identity, nixos, process
from rebuild import sudo_keyring as sudo_secrets
from rebuild.console import Console, stdin_is_terminal
from rebuild.errors import (
    BuildFailed,
    Declined,
    GateRefused,
    Interrupted,
    RebuildError,
    RemoteError,
    VerifyFailed,
    most_severe,
)
from rebuild.hostrun import (
    HostRun,
    child_env,
    current_system,
    endpoint_for,
    expected_system,
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
from rebuild.remote import (
    key_is_known,
    sudo_problem,
    unknown_key_message,
)
from rebuild.rollback import (
    arm_timer,
    cancel_timer,
    heartbeat,
    lost,
    previous_generation,
    restored_by_timer,
    rollback_now,
    timer_fired,
)
from rebuild.verify import Check

log = structlog.get_logger("rebuild")


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


# --- gates -----------------------------------------------------------------------------------


def operator_gate(loaded: Loaded, me: identity.Identity) -> str:
    """Refuse unless this machine is on the allowlist; returns the operator's name."""
    operator = identity.authorize(me, loaded.inventory.operators)
    if operator is None:
        why = "the allowlist is empty" if not loaded.inventory.operators else "it is not listed"
        raise GateRefused(
            f"this machine ({me.hostname}, machine-id {me.machine_id or 'unknown'}) "
            f"may not deploy: "
            f"{why} in {loaded.path} [[operators]]; run `invoke operator` to see the lines that "
            "would authorize it, and have them reviewed and committed"
        )
    return operator.name


def git_gate(state: gitstate.GitState | None, allow_dirty: bool) -> list[str]:
    """Refuse an uncommitted tree unless --allow-dirty; returns the overrides used."""
    if state is None or not state.dirty:
        return []
    if allow_dirty:
        return ["allow-dirty"]
    if not state.is_repo:
        raise GateRefused(
            "the flake is not in a git repository, so what is deployed cannot be traced to a "
            "commit; commit it to git, or pass --allow-dirty (recorded in the audit)"
        )
    shown = ", ".join(state.dirty_files[: gitstate.MAX_LISTED])
    more = len(state.dirty_files) - gitstate.MAX_LISTED
    extra = f" (+{more} more)" if more > 0 else ""
    raise GateRefused(
        f"the flake's git tree is dirty: {shown}{extra}; commit or stash the changes, or pass "
        "--allow-dirty (recorded in the audit)"
    )


def host_key_gate(runs: list[HostRun]) -> None:
    for hr in runs:
        if not key_is_known(hr.endpoint):
            raise GateRefused(unknown_key_message(hr.endpoint))


def terminal_gate(opts: Options) -> None:
    if not opts.yes and not opts.dry_run and not stdin_is_terminal():
        raise GateRefused(
            "no terminal to ask for confirmation; pass --yes to deploy without a prompt"
        )


# --- the steps on one host ---------------------------------------------------------------------


def attach_sudo_password(hr: HostRun) -> None:
    """A sudo host's password from the OS keyring; none stored means passwordless sudo."""
    spec = hr.target.settings
    if not spec.sudo:
        return
    try:
        password = sudo_secrets.get(hr.name, spec.user)
    except sudo_secrets.KeyringUnavailable:
        log.debug("no keyring backend; assuming passwordless sudo", host=hr.name)
        hr.endpoint = dataclasses.replace(hr.endpoint, keyring_available=False)
        return
    if password is not None:
        hr.endpoint = dataclasses.replace(hr.endpoint, sudo_password=password)


LEGACY_SUDO_PROMPTS = 16  # older nixos-rebuild asks once per ssh session; a bound, not a loop


def run_nixos_rebuild(hr: HostRun, loaded: Loaded, console: Console,
                      cancel: threading.Event) -> process.Completed:  # fmt: skip
    env = child_env(loaded, hr.target)
    log.debug("running nixos-rebuild", host=hr.name, command=hr.command)
    password = hr.endpoint.sudo_password
    if password is not None and hr.target.settings.sudo and hr.action != "build":
        legacy = hr.target.settings.sudo_flag != "--sudo"
        hr.responder = process.Responder(password, max_answers=LEGACY_SUDO_PROMPTS if legacy else 1)

    def on_line(line: str) -> None:
        if not hr.sudo_complaint and line.lstrip().startswith("sudo:"):
            hr.sudo_complaint = line
        console.host_line(hr.name, line)

    return process.stream(
        hr.command, env=env, on_line=on_line, cancel=cancel, responder=hr.responder
    )


def build_failure(hr: HostRun, done: process.Completed) -> str:
    """Why nixos-rebuild failed, for the operator: sudo's refusal said plainly, else the tail."""
    user = hr.target.settings.user
    if hr.responder is not None and hr.responder.failed:
        return (
            f"{hr.name}: sudo on {hr.name} rejected the stored password of {user}; "
            "nixos-rebuild was stopped and nothing more was tried; store the right one with "
            f"`invoke secret set --host {hr.name}`"
        )
    if hr.sudo_complaint:
        problem = sudo_problem(hr.endpoint, hr.sudo_complaint)
        if problem is not None and hr.responder is not None and "needs a password" in problem:
            flag = hr.target.settings.sudo_flag
            problem = (
                f"sudo on {hr.name} asked for a password that nixos-rebuild did not hand over "
                f"({flag}); with nixos-rebuild-ng (NixOS 25.05 and later) set "
                f'sudo_flag = "--sudo" for {hr.name}: rebuild then passes --ask-sudo-password'
            )
        if problem is not None:
            return f"{hr.name}: nixos-rebuild exited {done.returncode}: {problem}"
    tail = "\n".join(done.stderr.splitlines()[-10:])
    return f"{hr.name}: nixos-rebuild exited {done.returncode}:\n{tail}"


def deploy_host(hr: HostRun, loaded: Loaded, opts: Options, console: Console,
                cancel: threading.Event) -> None:  # fmt: skip
    """One host, after every gate passed and the operator confirmed. Raises the outcome."""
    use_timer = hr.timer_wanted and opts.rollback and hr.previous is not None
    if use_timer:
        arm_timer(hr)
        console.host_line(
            hr.name,
            f"dead-man timer armed: {hostops.timer_unit(hr.record.run_id)} restores "
            f"{hr.previous} in {hr.target.settings.rollback_timeout}s unless verified",
        )
    with heartbeat(hr, use_timer):
        done = run_nixos_rebuild(hr, loaded, console, cancel)
    if done.returncode == 130 or cancel.is_set():
        raise Interrupted(
            f"{hr.name}: interrupted during nixos-rebuild"
            + (f"; the dead-man timer restores {hr.previous} unless a later run confirms"
               if use_timer else "")
        )  # fmt: skip
    if use_timer:
        try:
            arm_timer(hr)  # a full window for verification, unless the timer already fired
            fired = hr.timer_has_fired
        except RebuildError:
            try:
                fired = timer_fired(hr)
            except RebuildError:
                return lost(hr, console, cancel)
        if fired:
            return restored_by_timer(hr)
    activated_anyway = False
    if not done.ok:
        if hr.action not in ("switch", "test"):
            raise BuildFailed(build_failure(hr, done))
        try:
            now = current_system(hr)
        except RebuildError:
            now = None
            if use_timer:
                return lost(hr, console, cancel)
        if now is not None and now == hr.expected and now != hr.previous:
            activated_anyway = True
            console.host_line(
                hr.name,
                f"nixos-rebuild exited {done.returncode} after activating the new system; "
                "verifying it",
            )
        else:
            if use_timer:
                with contextlib.suppress(RebuildError):
                    cancel_timer(hr)
            raise BuildFailed(build_failure(hr, done))
    if hr.action in ("build", "dry-activate"):
        hr.record.result, hr.record.exit_code = "ok", 0
        return None
    if not opts.verify and not activated_anyway:
        if use_timer:
            try:
                cancel_timer(hr)
            except RebuildError:
                return lost(hr, console, cancel)
        hr.record.message = "verification skipped (--no-verify)"
        hr.record.final_system = hr.expected
        hr.record.result, hr.record.exit_code = "ok", 0
        return None
    report = verify_host(hr, hr.expected, boot=hr.action == "boot")
    hr.report = report
    hr.record.checks = [c.to_json() for c in report.checks]
    hr.record.final_system = report.current_system
    console.report(report)
    if report.ok:
        if use_timer and not cancel_timer(hr):
            raise RemoteError(f"{hr.name}: verified, but the dead-man timer could not be cancelled")
        hr.record.result, hr.record.exit_code = "ok", 0
        return None
    host_lost = report.checks and report.checks[0].name == "ssh" and not report.checks[0].ok
    if host_lost and use_timer:
        return lost(hr, console, cancel)
    if use_timer or (opts.rollback and hr.action in ("switch", "test") and hr.previous):
        return rollback_now(hr, console)
    raise VerifyFailed(
        f"{hr.name}: verification failed; the host stays on {report.current_system}"
        + (" (--no-rollback)" if not opts.rollback else "")
    )


# --- the run -----------------------------------------------------------------------------------


def finish(hr: HostRun, exc: BaseException | None) -> None:
    rec = hr.record
    if isinstance(exc, RebuildError):
        rec.result, rec.exit_code, rec.message = exc.result, exc.exit_code, str(exc)
    elif exc is not None:
        rec.result, rec.exit_code = "error", 1
        rec.message = f"internal error: {type(exc).__name__}: {exc}"
    rec.duration_s = round(time.monotonic() - hr.started, 3)


def make_runs(loaded: Loaded, targets: list[Target], opts: Options, run_id: str,
              operator: dict[str, str]) -> list[HostRun]:  # fmt: skip
    runs = []
    for target in targets:
        action = opts.action or target.settings.action
        record = audit.Record(
            run_id=run_id,
            host=target.name,
            address=target.address,
            action=action,
            flake=loaded.flake,
            attr=target.attr,
            operator=operator,
        )
        if opts.rollback_generation:
            record.event = "rollback"
        runs.append(HostRun(target, record, endpoint_for(loaded, target), action))
    return runs


def rebuild(loaded: Loaded, targets: list[Target], opts: Options, console: Console) -> int:
    """`invoke rebuild` for one or many hosts; returns the exit code."""
    run_id = audit.new_run_id()
    me = identity.current()
    operator = {"name": "", "hostname": me.hostname, "machine_id": me.machine_id}
    runs = make_runs(loaded, targets, opts, run_id, operator)
    cancel = threading.Event()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    stage = "gates"
    try:
        operator["name"] = operator_gate(loaded, me)
        state = gitstate.read(loaded.flake_dir) if loaded.flake_dir else None
        for hr in runs:
            hr.record.commit = state.commit if state else None
            hr.record.dirty = bool(state and state.dirty)
        overrides = git_gate(state, opts.allow_dirty)
        for hr in runs:
            hr.record.overrides.extend(overrides)
            if not opts.verify:
                hr.record.overrides.append("no-verify")
            if not opts.rollback:
                hr.record.overrides.append("no-rollback")
            attach_sudo_password(hr)
            hr.command = nixos.nixos_rebuild_argv(
                loaded.inventory.nixos_rebuild, hr.action, loaded.flake, hr.target,
                rollback=opts.rollback_generation,
                ask_sudo_password=hr.endpoint.sudo_password is not None,
            )  # fmt: skip
            hr.record.command = list(hr.command)
        host_key_gate(runs)
        terminal_gate(opts)
        stage = "evaluate"
        if not opts.rollback_generation:
            with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
                paths = list(pool.map(lambda h: expected_system(loaded, h.target), runs))
            for hr, path in zip(runs, paths, strict=True):
                hr.expected = hr.record.expected_system = path
        if not opts.dry_run:
            stage = "lock"
            state_dir = loaded.audit_log.parent
            for hr in runs:
                hr.local_lock = take_local_lock(state_dir, hr.name, run_id)
            owner = hostops.LockOwner(
                run_id=run_id, operator=operator["name"], hostname=me.hostname,
                machine_id=me.machine_id, pid=os.getpid(), since=time.time(),
            )  # fmt: skip
            errors = _parallel(
                runs,
                lambda hr: remote_lock(hr, owner, me, break_lock=opts.break_lock,
                                       stale_after=loaded.inventory.lock_stale_after),
                opts.jobs,
            )  # fmt: skip
            refused = [e for e in errors if e is not None]
            if refused:
                raise refused[0]
            if opts.rollback_generation:
                for hr in runs:
                    hr.expected = hr.record.expected_system = previous_generation(hr)
        plan = Plan(
            run_id=run_id,
            commit=state.commit if state else None,
            subject=state.subject if state else "",
            dirty_files=state.dirty_files if state else (),
            overrides=tuple(runs[0].record.overrides) if runs else (),
            hosts=tuple(host_plan(hr, opts) for hr in runs),
            batches=batches([hr.name for hr in runs], batch=opts.batch, canary=opts.canary),
        )
        console.say(render_plan(plan))
        if opts.dry_run:
            console.say("\n--dry-run: stopping after the plan; nothing was run on any host.")
            for hr in runs:
                hr.record.result, hr.record.exit_code = "ok", 0
                hr.record.message = "dry run: plan only"
                hr.record.overrides.append("dry-run")
            return 0
        stage = "confirm"
        confirm(runs, opts, loaded, console)
        stage = "deploy"
        return rollout(runs, plan, loaded, opts, console, cancel)
    except KeyboardInterrupt:
        cancel.set()
        if stage in ("gates", "evaluate", "lock", "confirm"):
            exc: RebuildError = Declined("aborted (Ctrl-C) before anything changed")
        else:
            exc = Interrupted("interrupted (Ctrl-C)")
        for hr in runs:
            if not _finished(hr):
                finish(hr, exc)
        console.error(str(exc))
        return exc.exit_code
    except RebuildError as exc:
        for hr in runs:
            if not _finished(hr):
                finish(hr, exc)
        console.error(str(exc))
        return exc.exit_code
    finally:
        # all held host locks at once: a refused or declined fleet run must not pay a round
        # trip per host, one host after the other, before it exits (the loop below retries)
        with contextlib.suppress(Exception):
            _parallel([hr for hr in runs if hr.remote_locked], release_remote_lock, opts.jobs)
        for hr in runs:
            if not _finished(hr):
                finish(hr, RebuildError("run ended without an outcome"))
            if hr.record.duration_s == 0:
                hr.record.duration_s = round(time.monotonic() - hr.started, 3)
            release_remote_lock(hr)
            release_local_lock(hr.local_lock)
            hr.close()
            try:
                audit.append(loaded.audit_log, hr.record)
            except OSError as exc:
                console.error(f"cannot write the audit record to {loaded.audit_log}: {exc}")
        if opts.json:
            _print_json(runs)
        structlog.contextvars.clear_contextvars()


def _finished(hr: HostRun) -> bool:
    return not (hr.record.result == "error" and hr.record.exit_code == 1 and not hr.record.message)


def _parallel(runs: list[HostRun], fn: Callable[[HostRun], None],
              jobs: int) -> list[BaseException | None]:  # fmt: skip
    def wrapped(hr: HostRun) -> BaseException | None:
        try:
            fn(hr)
        except RebuildError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(wrapped, runs))


def host_plan(hr: HostRun, opts: Options) -> HostPlan:
    spec = hr.target.settings
    return HostPlan(
        host=hr.name,
        address=spec.address,
        user=spec.user,
        action=hr.action + (" --rollback" if opts.rollback_generation else ""),
        flake_attr=f"{hr.record.flake}#{hr.target.attr}",
        command=tuple(hr.command),
        expected_system=hr.expected,
        current_system=hr.previous,
        checks=check_names(spec.verify, hr.action, opts.verify),
        rollback_timeout=spec.rollback_timeout if opts.rollback else 0,
    )


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


def rollout(runs: list[HostRun], plan: Plan, loaded: Loaded, opts: Options, console: Console,
            cancel: threading.Event) -> int:  # fmt: skip
    by_name = {hr.name: hr for hr in runs}
    failures = 0
    stopped = False
    for batch in plan.batches:
        group = [by_name[name] for name in batch]
        if stopped or cancel.is_set():
            for hr in group:
                hr.record.result, hr.record.exit_code = "skipped", 0
                hr.record.message = "not reached: the rollout stopped before this batch"
                hr.record.final_system = hr.previous  # untouched: still what it ran
                release_remote_lock(hr)
            continue

        def one(hr: HostRun) -> None:
            try:
                deploy_host(hr, loaded, opts, console, cancel)
            except BaseException as exc:
                finish(hr, exc)
                console.error(hr.record.message)
                if not isinstance(exc, RebuildError):
                    log.exception("internal error", host=hr.name)
            else:
                finish(hr, None)
            finally:
                release_remote_lock(hr)

        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            futures = [pool.submit(one, hr) for hr in group]
            pending = set(futures)
            try:
                while pending:
                    _, pending = wait(pending, timeout=0.2)
            except KeyboardInterrupt:
                cancel.set()
                console.error("interrupted: stopping nixos-rebuild; dead-man timers stay armed")
                wait(futures)
        failures += sum(1 for hr in group if hr.record.exit_code != 0)
        if failures > opts.max_fail:
            stopped = True
    if len(runs) > 1:
        console.say(summary(runs))
    return most_severe([hr.record.exit_code for hr in runs])


def summary(runs: list[HostRun]) -> str:
    lines = ["", f"{'host':16} {'result':14} {'exit':4} {'duration':>9}  system"]
    for hr in runs:
        r = hr.record
        lines.append(
            f"{hr.name:16} {r.result:14} {r.exit_code:<4} {r.duration_s:>8.1f}s  "
            f"{r.final_system or '-'}"
        )
    return "\n".join(lines)


def _print_json(runs: list[HostRun]) -> None:

    for hr in runs:
        report = hr.report
        data: dict[str, object] = (
            report.to_json()
            if report is not None
            else {"host": hr.name, "ok": False, "current_system": hr.record.final_system,
                  "expected_system": hr.expected, "checks": []}
        )  # fmt: skip
        data["ok"] = hr.record.result == "ok" and (report is None or report.ok)
        data["result"] = hr.record.result
        data["exit_code"] = hr.record.exit_code
        data["run_id"] = hr.record.run_id
        if hr.rollback_report is not None:
            data["rollback_checks"] = [c.to_json() for c in hr.rollback_report.checks]
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def verify_only(loaded: Loaded, target: Target, console: Console, *, json_mode: bool) -> int:
    """`invoke verify`: the checks alone against what HEAD evaluates to."""
    hr = HostRun(
        target=target,
        record=audit.Record(
            run_id=audit.new_run_id(),
            host=target.name,
            address=target.address,
            action="verify",
            flake=loaded.flake,
            attr=target.attr,
            operator={},
        ),
        endpoint=endpoint_for(loaded, target),
        action="verify",
    )
    try:
        if not key_is_known(hr.endpoint):
            raise GateRefused(unknown_key_message(hr.endpoint))
        flake = head_flake_ref(loaded)
        expected = expected_system(loaded, target, flake)
        hr.connection()
        report = verify_host(hr, expected, settle_timeout=0)
    except RebuildError as exc:
        if json_mode:
            sys.stdout.write(json.dumps({
                "host": target.name, "ok": False, "current_system": None,
                "expected_system": None, "error": str(exc),
                "checks": [Check("ssh", False, str(exc)).to_json()],
            }, sort_keys=True) + "\n")  # fmt: skip
        console.error(str(exc))
        return exc.exit_code if not isinstance(exc, RemoteError) else VerifyFailed.exit_code
    finally:
        hr.close()
    if json_mode:
        sys.stdout.write(json.dumps(report.to_json(), sort_keys=True) + "\n")
    else:
        console.report(report)
    return 0 if report.ok else VerifyFailed.exit_code


def head_flake_ref(loaded: Loaded) -> str:
    """The flake as committed: a dirty working tree must not hide drift from HEAD."""
    if loaded.flake_dir is None:
        return loaded.flake
    state = gitstate.read(loaded.flake_dir)
    if state.is_repo and state.dirty and state.commit:
        return f"git+file://{loaded.flake}?rev={state.commit}"
    return loaded.flake
