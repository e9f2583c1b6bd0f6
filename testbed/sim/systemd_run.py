"""``systemd-run``: transient services and timers, and the manager's side of running them.

Imitates systemd's systemd-run (systemd-run(1)): ``--unit``, ``--description``, ``--collect``,
``--wait``/``--pipe``/``--pty`` (wait and report ``Finished with result``), ``--quiet``,
``--setenv``, ``--same-dir``/``--working-directory``, ``--service-type`` and
``--on-active=SPAN`` (a transient ``NAME.timer`` that starts ``NAME.service`` once; time spans
as systemd.time(7) spells them); ``--property``, ``--timer-property``, ``--nice``, ``--slice``,
``--uid`` and ``--gid`` are accepted and ignored. Names and messages are the real tool's
("Running timer as unit: ...", "Unit ... was already loaded or has a fragment file"); options it
does not simulate are refused.

Then what systemd (PID 1) does with those units, as helper processes started through
``rbtb-sim``: ``run-service`` runs a transient service's command as its main process and records
its result (a failed unit stays ``failed`` unless ``--collect``, as systemd.unit(5)'s
``CollectMode=`` says); ``timer`` sleeps until the timer elapses, then runs the service, unless
``systemctl stop`` cancelled it first. This is the dead-man timer rebuild arms before an
activation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.procs import proc_start_time, wait_child
from testbed.sim.host import Host, UsageError, internal_opts, locked_state
from testbed.sim.server import Helper, spawn_helper
from testbed.sim.units import timer_refs
from testbed.store import SimError

SERVICE_MAX_SECONDS = 900.0  # hard cap for any simulated service (keeps every wait bounded)

_SPAN_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}


def parse_timespan(text: str) -> float:
    """systemd time span (``90``, ``90s``, ``1min 30s``, ``500ms``) in seconds."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    total = 0.0
    pos = 0
    matched = False
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", value):
        if m.start() != pos or m.group(2) not in _SPAN_UNITS:
            raise ValueError(text)
        total += float(m.group(1)) * _SPAN_UNITS[m.group(2)]
        pos = m.end()
        matched = True
    if not matched or pos != len(value):
        raise ValueError(text)
    return total


_RUN_NOARG = {
    "--collect": "collect",
    "-G": "collect",
    "--wait": "wait",
    "-W": "wait",
    "--quiet": "quiet",
    "-q": "quiet",
    "--pipe": "pipe",
    "-P": "pipe",
    "--pty": "pty",
    "-t": "pty",
    "--same-dir": "same_dir",
    "-d": "same_dir",
    "--remain-after-exit": "remain",
    "-r": "remain",
    "--no-ask-password": "",
    "--no-block": "",
    "--system": "",
    "--send-sighup": "",
    "--shell": "shell",
    "-S": "shell",
}
_RUN_ARG = {
    "--unit": "unit",
    "-u": "unit",
    "--description": "description",
    "--on-active": "on_active",
    "--service-type": "service_type",
    "--setenv": "setenv",
    "-E": "setenv",
    "--property": "property",
    "-p": "property",
    "--timer-property": "timer_property",
    "--working-directory": "workdir",
    "--nice": "",
    "--slice": "",
    "--uid": "",
    "--gid": "",
}
_RUN_UNSUPPORTED = {
    "--user",
    "--scope",
    "--on-boot",
    "--on-startup",
    "--on-unit-active",
    "--on-unit-inactive",
    "--on-calendar",
    "--on-clock-change",
    "--on-timezone-change",
    "--path-property",
    "--socket-property",
    "--host",
    "-H",
    "--machine",
    "-M",
}


@dataclass
class _RunArgs:
    flags: set[str]
    values: dict[str, list[str]]
    command: list[str]


def _parse_systemd_run(argv: Sequence[str]) -> _RunArgs:
    flags: set[str] = set()
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        i += 1
        key, eq, value = arg.partition("=") if arg.startswith("--") else (arg[:2], "", arg[2:])
        if key in _RUN_UNSUPPORTED:
            raise UsageError(f"systemd-run (rebuild test bed): option '{key}' is not simulated")
        if key in _RUN_NOARG:
            if eq:
                raise UsageError(f"systemd-run: option '{key}' doesn't allow an argument")
            if not arg.startswith("--") and value:
                # grouped short flags such as -qG
                for ch in arg[1:]:
                    short = f"-{ch}"
                    if short not in _RUN_NOARG:
                        raise UsageError(f"systemd-run: invalid option -- '{ch}'")
                    flags.add(_RUN_NOARG[short])
                continue
            flags.add(_RUN_NOARG[key])
            continue
        if key in _RUN_ARG:
            if not eq and not value:
                if i >= len(argv):
                    raise UsageError(
                        f"systemd-run: option requires an argument -- '{key.lstrip('-')}'"
                    )
                value = argv[i]
                i += 1
            values.setdefault(_RUN_ARG[key], []).append(value)
            continue
        if arg.startswith("--"):
            raise UsageError(f"systemd-run: unrecognized option '{arg}'")
        raise UsageError(f"systemd-run: invalid option -- '{arg[1:2]}'")
    flags.discard("")
    return _RunArgs(flags=flags, values=values, command=list(argv[i:]))


def _service_env(host: Host, setenv: list[str]) -> dict[str, str]:
    extra: dict[str, str] = {}
    for item in setenv:
        if "=" in item:
            key, _, value = item.partition("=")
            extra[key] = value
        elif item in os.environ:
            extra[item] = os.environ[item]
    return host.service_env(extra)


def _unit_names(unit: str | None, counter: int) -> tuple[str, str]:
    base = unit or f"run-u{counter}"
    for suffix in (".service", ".timer"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return f"{base}.service", f"{base}.timer"


def systemd_run(argv: Sequence[str]) -> int:
    try:
        args = _parse_systemd_run(argv)
        if not args.command:
            raise UsageError("Command line to execute required.")
        delay = None
        if "on_active" in args.values:
            try:
                delay = parse_timespan(args.values["on_active"][-1])
            except ValueError:
                raise UsageError(
                    f"Failed to parse timer value: {args.values['on_active'][-1]}"
                ) from None
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    quiet = "quiet" in args.flags
    collect = "collect" in args.flags
    env = _service_env(host, args.values.get("setenv", []))
    command = [host.map_path(a) for a in args.command]
    cwd = str(Path.cwd()) if "same_dir" in args.flags else (args.values.get("workdir") or ["/"])[-1]
    description = (args.values.get("description") or [" ".join(args.command)])[-1]
    internal_flags = ["--collect"] if collect else []
    with locked_state(host) as state:
        state["counter"] = int(state["counter"]) + 1
        requested = args.values.get("unit")
        service, timer = _unit_names(requested[-1] if requested else None, state["counter"])
        units: dict[str, dict[str, Any]] = state["units"]
        if delay is not None:
            for name, kind in ((timer, "timer"), (service, "service")):
                if name in units:
                    print(
                        f"Failed to start transient {kind} unit: Unit {name} was already loaded or "
                        "has a fragment file.",
                        file=sys.stderr,
                    )
                    return 1
            units[service] = {
                "origin": "transient",
                "active": "inactive",
                "sub": "dead",
                "description": description,
                "collect": collect,
                "command": command,
            }
            proc = _spawn_internal(
                host,
                [
                    "timer",
                    "--name",
                    service,
                    "--timer",
                    timer,
                    "--delay",
                    repr(delay),
                    "--cwd",
                    cwd,
                    *internal_flags,
                    "--",
                    *command,
                ],
                env,
                host.log(service),
            )
            start = proc_start_time(proc.pid)
            host.pids.add(proc.pid, f"timer {timer}")
            units[timer] = {
                "origin": "transient",
                "active": "active",
                "sub": "waiting",
                "description": description,
                "service": service,
                "sleeper_pid": proc.pid,
                "sleeper_start": start,
                "fire_at": time.time() + delay,
            }
            if not quiet:
                print(f"Running timer as unit: {timer}", file=sys.stderr)
                print(f"Will run service as unit: {service}", file=sys.stderr)
            return 0
        if service in units:
            print(
                f"Failed to start transient service unit: Unit {service} was already loaded or has "
                "a fragment file.",
                file=sys.stderr,
            )
            return 1
        units[service] = {
            "origin": "transient",
            "active": "activating",
            "sub": "start",
            "description": description,
            "collect": collect,
            "command": command,
            "type": (args.values.get("service_type") or ["simple"])[-1],
        }
        synchronous = bool({"wait", "pipe", "pty"} & args.flags)
        inherit = bool({"pipe", "pty"} & args.flags)
        internal = ["run-service", "--name", service, "--cwd", cwd, *internal_flags, "--", *command]
        proc = _spawn_internal(host, internal, env, None if inherit else host.log(service))
        units[service].update(wrapper_pid=proc.pid, wrapper_start=proc_start_time(proc.pid))
        host.pids.add(proc.pid, f"service {service}")
    if not quiet:
        print(f"Running as unit: {service}; invocation ID: {env['INVOCATION_ID']}", file=sys.stderr)
    if not synchronous:
        return 0
    began = time.monotonic()
    try:
        code = proc.wait(timeout=SERVICE_MAX_SECONDS + 30)
    except subprocess.TimeoutExpired:
        return 1
    if not quiet:
        result = "success" if code == 0 else "exit-code"
        print(f"Finished with result: {result}", file=sys.stderr)
        print(f"Main processes terminated with: code=exited, status={code}", file=sys.stderr)
        print(f"Service runtime: {int((time.monotonic() - began) * 1000)}ms", file=sys.stderr)
    return code


def _spawn_internal(host: Host, args: list[str], env: dict[str, str], log: Path | None) -> Helper:
    # log None: --pipe / --pty, the service shares systemd-run's stdio
    return spawn_helper(host, args, env, log)


def _run_service_body(host: Host, service: str, command: list[str], cwd: str, collect: bool) -> int:
    """Run a transient service's command as its main process and keep its state."""
    try:
        child = subprocess.Popen(command, cwd=cwd)
    except OSError as exc:
        print(f"{service}: Failed to execute {command[0]}: {exc.strerror}", file=sys.stderr)
        _finish_service(host, service, 203, collect)
        return 203
    with locked_state(host) as state:
        unit = state["units"].get(service)
        if unit is not None:
            unit.update(
                active="active", sub="running", pid=child.pid, pid_start=proc_start_time(child.pid)
            )
    try:
        code = wait_child(child, SERVICE_MAX_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)
        code = 1
    if code < 0:
        code = 128 - code
    _finish_service(host, service, code, collect)
    return code


def _finish_service(host: Host, service: str, code: int, collect: bool) -> None:
    with locked_state(host) as state:
        units: dict[str, dict[str, Any]] = state["units"]
        unit = units.get(service)
        if unit is None:
            return
        result = "success" if code == 0 else "exit-code"
        if code != 0 and not collect:
            unit.update(active="failed", sub="failed", result=result, exit_status=code, pid=None)
        elif timer_refs(units, service):
            unit.update(active="inactive", sub="dead", result=result, exit_status=code, pid=None)
        else:
            del units[service]


def run_service(host: Host, argv: list[str]) -> int:
    opts, command = internal_opts(argv)
    host.pids.add(os.getpid(), f"service {opts['--name']}")
    try:
        return _run_service_body(
            host, opts["--name"], command, opts.get("--cwd", "/"), "--collect" in opts
        )
    finally:
        host.pids.remove(os.getpid())


def run_timer(host: Host, argv: list[str]) -> int:
    opts, command = internal_opts(argv)
    service, timer = opts["--name"], opts["--timer"]
    deadline = time.monotonic() + float(opts["--delay"])
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, 0.5))
    me = os.getpid()
    try:
        with locked_state(host) as state:
            units: dict[str, dict[str, Any]] = state["units"]
            record = units.get(timer)
            if record is None or record.get("sub") != "waiting" or record.get("sleeper_pid") != me:
                return 0  # cancelled (systemctl stop) before it fired
            record.update(sub="elapsed", fired_at=time.time())
            if service in units:
                units[service].update(
                    active="activating",
                    sub="start",
                    wrapper_pid=me,
                    wrapper_start=proc_start_time(me),
                )
        return _run_service_body(
            host, service, command, opts.get("--cwd", "/"), "--collect" in opts
        )
    finally:
        host.pids.remove(me)
