"""Hooks: the operator's own commands, run locally after each host's run of `invoke rebuild`.

`[[hooks]]` in the committed inventory (the only source of hooks) names a shell command (`run`,
run with `sh -c`: the operator's own committed shell is its contract) and the results it
wants (`on`, audit result names; omitted: every result). Each runs with the host's audit
record as JSON on stdin and `REBUILD_RUN_ID`, `REBUILD_HOST`, `REBUILD_RESULT`,
`REBUILD_EXIT_CODE`, `REBUILD_COMMIT`, `REBUILD_OPERATOR` in its environment, for at most
`HOOK_TIMEOUT` seconds (then its process group is killed). A failing hook is reported in one
line on stderr; it never changes the run's exit code, and nothing it does can stop a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from rebuild import audit
from rebuild.console import Console
from rebuild.inventory import Hook, Loaded

HOOK_TIMEOUT = 30.0
KILL_GRACE = 2.0
SHOWN = 60  # characters of a hook's command shown in a report line


@dataclass(frozen=True)
class HookRun:
    """What one hook did: its exit code (None: it did not finish in time or did not start)."""

    hook: Hook
    returncode: int | None
    output: str
    problem: str | None = None  # why it failed, in words

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def wanted(hooks: tuple[Hook, ...], result: str) -> list[Hook]:
    """The hooks that want this result (`on` omitted: every result)."""
    return [hook for hook in hooks if hook.on is None or result in hook.on]


def hook_env(record: audit.Record, base: Mapping[str, str]) -> dict[str, str]:
    """The hook's environment: ours, and the host's run in REBUILD_* variables."""
    env = dict(base)
    env.update(
        REBUILD_RUN_ID=record.run_id,
        REBUILD_HOST=record.host,
        REBUILD_RESULT=str(record.result),
        REBUILD_EXIT_CODE=str(record.exit_code),
        REBUILD_COMMIT=record.commit or "",
        REBUILD_OPERATOR=str(record.operator.get("name", "")),
    )
    return env


def record_json(record: audit.Record) -> str:
    """The record exactly as the audit log has it (secret-looking keys redacted)."""
    return json.dumps(audit.redact_value(record.to_json()), sort_keys=True) + "\n"


def run_hook(hook: Hook, stdin: str, env: Mapping[str, str], *,
             timeout: float = HOOK_TIMEOUT) -> HookRun:  # fmt: skip
    """`sh -c RUN` in its own process group, stdin written, output captured, bounded in time."""
    try:
        proc = subprocess.Popen(
            ["sh", "-c", hook.run],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        return HookRun(hook, None, "", f"could not start: {exc}")
    try:
        output, _ = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        try:
            output, _ = proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:  # a daemon it left behind holds the pipe open
            output = ""
        return HookRun(hook, None, output or "", f"timed out after {timeout:g}s and was killed")
    except BrokenPipeError:  # it exited without reading its stdin
        output = proc.stdout.read() if proc.stdout else ""
        proc.wait()
    code = proc.returncode
    return HookRun(hook, code, output or "", None if code == 0 else f"exit code {code}")


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the hook's process group, then SIGKILL after a short grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=KILL_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def shown(hook: Hook) -> str:
    text = " ".join(hook.run.split())
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def run_hooks(loaded: Loaded, record: audit.Record, console: Console, *,
              timeout: float = HOOK_TIMEOUT) -> list[HookRun]:  # fmt: skip
    """Every hook that wants this host's result, one after the other; never raises.

    A dry run (`overrides` has `dry-run`) changed nothing and runs no hook.
    """
    hooks = wanted(loaded.inventory.hooks, str(record.result))
    if not hooks or "dry-run" in record.overrides:
        return []
    stdin = record_json(record)
    env = hook_env(record, os.environ)
    done = []
    for hook in hooks:
        outcome = run_hook(hook, stdin, env, timeout=timeout)
        for line in outcome.output.splitlines()[-20:]:
            console.notice(f"[{record.host}] hook: {line}")
        if not outcome.ok:
            console.notice(
                f"warning: [{record.host}] hook `{shown(hook)}` failed: {outcome.problem} "
                f"(the run's exit code is unchanged)"
            )
        done.append(outcome)
    return done
