"""``systemctl``: the verbs rebuild and its checks use, on the host's simulated manager.

Imitates systemd's systemctl (systemctl(1)): ``is-system-running``, ``is-active``,
``is-failed``, ``show`` (``-p``/``--property``, ``--value``; property names and order as
systemd prints them, org.freedesktop.systemd1(5)), ``list-units``/``list-timers`` (``--state``,
``--type``, ``--all``, ``--failed``, ``--plain``, ``--no-legend``), ``status``, ``start``/
``restart``/``try-restart``/``reload-or-restart`` of a configuration's units, ``stop``/``kill``
(a transient timer: cancelled, as ``systemctl stop NAME.timer`` cancels rebuild's dead-man
timer), ``reset-failed``, ``daemon-reload``, ``reboot`` (:mod:`testbed.sim.reboot`). Exit codes
follow systemctl(1) and the LSB codes it uses for ``is-active``/``status`` (3: not active, 4: no
such unit, 5: not loaded). Options it does not simulate (``--user``, ``--host``, ...) are refused
rather than ignored.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Sequence
from typing import Any

from testbed.procs import terminate
from testbed.sim.host import Host, UsageError, locked_state
from testbed.sim.units import (
    mangle,
    start_config_unit,
    status_lines,
    stop_unit_process,
    system_state,
    timer_refs,
    unit_view,
    units_of,
)
from testbed.store import SimError, load_system


def _unit_props(name: str, unit: dict[str, Any] | None) -> dict[str, str]:
    """All properties the simulation knows, in systemd's output order."""
    props: dict[str, str] = {}
    kind = name.rsplit(".", 1)[-1]
    if unit is None:
        if kind == "service":
            props.update(Type="simple", MainPID="0", ExecMainCode="0", ExecMainStatus="0")
            props["Result"] = "success"
        props.update(
            Id=name,
            Names=name,
            Description=name,
            LoadState="not-found",
            ActiveState="inactive",
            SubState="dead",
        )
        return props
    active, sub = unit_view(unit)
    if kind == "service":
        status = unit.get("exit_status")
        props.update(
            Type=str(unit.get("type", "simple")),
            MainPID=str(unit.get("pid") or 0) if active in ("active", "activating") else "0",
            ExecMainCode="1" if status is not None else "0",
            ExecMainStatus=str(status or 0),
            Result=str(unit.get("result", "success")),
        )
    elif kind == "timer":
        props.update(Unit=str(unit.get("service", name[: -len(".timer")] + ".service")))
        props["Result"] = str(unit.get("result", "success"))
    props.update(
        Id=name,
        Names=name,
        Description=str(unit.get("description", name)),
        LoadState="loaded",
        ActiveState=active,
        SubState=sub,
    )
    return props


_SYSTEMCTL_NOARG = {
    "--no-pager",
    "--no-legend",
    "--plain",
    "--quiet",
    "-q",
    "--all",
    "-a",
    "--failed",
    "--value",
    "--no-block",
    "--system",
    "--full",
    "-l",
    "--no-ask-password",
    "--now",
    "--no-reload",
}
_SYSTEMCTL_ARG = {"--state", "--type", "-t", "--property", "-p", "--lines", "-n", "--output", "-o"}


def _systemctl_parse(argv: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        key, eq, value = arg.partition("=")
        if key in _SYSTEMCTL_NOARG and not eq:
            opts.setdefault(key, []).append("")
        elif key in _SYSTEMCTL_ARG:
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"systemctl: option '{key}' requires an argument")
                value = argv[i]
                i += 1
            opts.setdefault(key, []).append(value)
        elif key.startswith("-p") and len(key) > 2:
            opts.setdefault("-p", []).append(arg[2:])
        elif key in ("--user", "--global", "--host", "-H", "--machine", "-M"):
            raise UsageError(f"systemctl (rebuild test bed): option '{key}' is not simulated")
        elif key.startswith("--"):
            raise UsageError(f"systemctl: unrecognized option '{arg}'")
        else:
            raise UsageError(f"systemctl: invalid option -- '{arg[1:2]}'")
    return opts, positional


def _props_wanted(opts: dict[str, list[str]]) -> list[str] | None:
    values = opts.get("--property", []) + opts.get("-p", [])
    if not values:
        return None
    wanted: list[str] = []
    for value in values:
        wanted.extend(v for v in value.split(",") if v)
    return wanted


def systemctl(argv: Sequence[str]) -> int:
    try:
        opts, args = _systemctl_parse(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    verb = args[0] if args else "list-units"
    names = [mangle(a) for a in args[1:]]
    quiet = "--quiet" in opts or "-q" in opts
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if verb == "reboot":
        from testbed.sim.reboot import systemctl_reboot

        return systemctl_reboot(host)
    readonly = verb in (
        "show",
        "is-active",
        "is-failed",
        "is-system-running",
        "list-units",
        "status",
        "list-timers",
        "cat",
    )
    with locked_state(host, write=not readonly) as state:
        units: dict[str, dict[str, Any]] = state["units"]
        if verb == "is-system-running":
            status = system_state(units)
            if not quiet:
                print(status)
            return 0 if status == "running" else 1
        if verb in ("is-active", "is-failed"):
            if not names:
                print("Too few arguments.", file=sys.stderr)
                return 1
            hit = False
            for name in names:
                active = unit_view(units[name])[0] if name in units else "inactive"
                if not quiet:
                    print(active)
                hit = hit or (active == ("active" if verb == "is-active" else "failed"))
            return 0 if hit else (3 if verb == "is-active" else 1)
        if verb == "show":
            return _systemctl_show(units, names, opts)
        if verb in ("list-units", "list-timers"):
            return _systemctl_list(units, args[1:], opts, timers=verb == "list-timers")
        if verb == "status":
            return _systemctl_status(units, names)
        if verb in ("stop", "kill"):
            return _systemctl_stop(host, state, names)
        if verb in ("start", "restart", "try-restart", "reload-or-restart"):
            return _systemctl_start(host, state, names, verb)
        if verb == "reset-failed":
            targets = names or [n for n in list(units) if unit_view(units[n])[0] == "failed"]
            for name in targets:
                unit = units.get(name)
                if unit is None or unit_view(unit)[0] != "failed":
                    continue
                if unit.get("origin") == "transient" and not timer_refs(units, name):
                    del units[name]
                else:
                    unit.update(active="inactive", sub="dead", result="success", pid=None)
            return 0
        if verb in ("daemon-reload", "daemon-reexec"):
            return 0
    print(f"Unknown command verb '{verb}'.", file=sys.stderr)
    return 1


def _systemctl_show(
    units: dict[str, dict[str, Any]], names: list[str], opts: dict[str, list[str]]
) -> int:
    wanted = _props_wanted(opts)
    value_only = "--value" in opts
    blocks: list[str] = []
    for name in names or ["(manager)"]:
        if name == "(manager)":
            failed = [n for n, u in units.items() if unit_view(u)[0] == "failed"]
            props = {
                "Version": "257.5",
                "SystemState": system_state(units),
                "NFailedUnits": str(len(failed)),
            }
        else:
            props = _unit_props(name, units.get(name))
        lines = []
        for key, value in props.items():
            if wanted is not None and key not in wanted:
                continue
            lines.append(value if value_only else f"{key}={value}")
        blocks.append("\n".join(lines))
    sys.stdout.write("\n\n".join(blocks) + ("\n" if blocks else ""))
    return 0


def _systemctl_list(
    units: dict[str, dict[str, Any]], patterns: list[str], opts: dict[str, list[str]], timers: bool
) -> int:
    states: set[str] = set()
    for value in opts.get("--state", []):
        states.update(s for s in value.split(",") if s)
    if "--failed" in opts:
        states.add("failed")
    types: set[str] = set()
    for value in opts.get("--type", []) + opts.get("-t", []):
        types.update(t for t in value.split(",") if t)
    if timers:
        types = {"timer"}
    show_all = "--all" in opts or "-a" in opts
    rows: list[tuple[str, str, str, str, str]] = []
    for name in sorted(units):
        unit = units[name]
        active, sub = unit_view(unit)
        if types and name.rsplit(".", 1)[-1] not in types:
            continue
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if states:
            if not ({active, sub, "loaded"} & states):
                continue
        elif not show_all and active == "inactive":
            continue
        rows.append((name, "loaded", active, sub, str(unit.get("description", name))))
    plain = "--plain" in opts
    legend = "--no-legend" not in opts
    header = ("UNIT", "LOAD", "ACTIVE", "SUB", "DESCRIPTION")
    table = ([header] if legend else []) + rows
    widths = [max((len(r[i]) for r in table), default=0) for i in range(4)]
    for row in table:
        lead = "" if plain else ("● " if row[2] == "failed" else "  ")
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        print(f"{lead}{' '.join(cells)} {row[4]}".rstrip())
    if legend:
        print()
        print("LOAD   = Reflects whether the unit definition was properly loaded.")
        print("ACTIVE = The high-level unit activation state, i.e. generalization of SUB.")
        print("SUB    = The low-level unit activation state, values depend on unit type.")
        print(f"{len(rows)} loaded units listed.")
    return 0


def _systemctl_status(units: dict[str, dict[str, Any]], names: list[str]) -> int:
    code = 0
    for i, name in enumerate(names):
        unit = units.get(name)
        if unit is None:
            print(f"Unit {name} could not be found.", file=sys.stderr)
            code = max(code, 4)
            continue
        if i:
            print()
        for line in status_lines(name, unit):
            print(line)
        if unit.get("pid") and unit_view(unit)[0] == "active":
            print(f"   Main PID: {unit['pid']}")
        if unit_view(unit)[0] != "active":
            code = max(code, 3)
    return code


def _systemctl_stop(host: Host, state: dict[str, Any], names: list[str]) -> int:
    units: dict[str, dict[str, Any]] = state["units"]
    code = 0
    for name in names:
        unit = units.get(name)
        if unit is None:
            print(f"Failed to stop {name}: Unit {name} not loaded.", file=sys.stderr)
            code = 5
            continue
        if name.endswith(".timer"):
            sleeper = unit.get("sleeper_pid")
            if sleeper and unit.get("sub") == "waiting":
                terminate(int(sleeper), unit.get("sleeper_start"), timeout=2.0)
                host.pids.remove(int(sleeper))
            del units[name]
            service = str(unit.get("service", ""))
            svc = units.get(service)
            if (
                svc is not None
                and svc.get("origin") == "transient"
                and unit_view(svc)[0] != "active"
            ):
                del units[service]
            continue
        stop_unit_process(host, unit)
        if unit.get("origin") == "transient":
            if timer_refs(units, name):
                unit.update(active="inactive", sub="dead", pid=None, wrapper_pid=None)
            else:
                del units[name]
        else:
            unit.update(active="inactive", sub="dead", pid=None, activating_until=None)
    return code


def _systemctl_start(host: Host, state: dict[str, Any], names: list[str], verb: str) -> int:
    units: dict[str, dict[str, Any]] = state["units"]
    system = state.get("activated", {}).get("system")
    config: dict[str, Any] = load_system(system)[1] if system else {}
    defs = units_of(config)
    code = 0
    for name in names:
        if name not in defs:
            print(f"Failed to {verb} {name}: Unit {name} not found.", file=sys.stderr)
            code = 5
            continue
        unit = units.get(name)
        running = unit is not None and unit_view(unit)[0] == "active"
        if verb == "start" and running:
            continue
        if verb == "try-restart" and not running:
            continue
        if unit is not None:
            stop_unit_process(host, unit)
        record = start_config_unit(host, name, defs[name], str(config.get("label", "")))
        units[name] = record
        if record["active"] == "failed":
            print(
                f"Job for {name} failed because the control process exited with error code.\n"
                f'See "systemctl status {name}" and "journalctl -xeu {name}" for details.',
                file=sys.stderr,
            )
            code = 1
    return code
