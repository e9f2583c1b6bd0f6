"""Host side of the simulated NixOS host: the commands a test host's PATH provides.

Every simulated host has a state directory ``SIM_ROOT``; ``/run`` and ``/nix/var`` of the host
are ``$SIM_ROOT/run`` and ``$SIM_ROOT/nix/var``. Internal state lives in ``$SIM_ROOT/sim``
(``host.json`` written by the test bed, ``state.json`` guarded by ``lock``, ``pids/`` for
teardown, ``log/``).

Entry point: :func:`main` with the name the shim was called by (``systemctl``, ``systemd-run``,
``nix-env``, ``nix-store``, ``readlink``, ``mkdir``, ``rm``, ``rmdir``, ``cat``, ``tee``,
``ls``, ``sudo``, ``hostname``, ``rbtb-sim``); :func:`stc_main` for a store path's
``bin/switch-to-configuration``. Only the standard library is used, so shims start quickly
under any Python 3.11.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from rebuild.testbed.procs import PidRegistry, is_alive, proc_parent, proc_start_time, terminate
from rebuild.testbed.store import SimError, canonical_json, load_system

MAPPED_PREFIXES = ("/run", "/nix/var")
# `cat` also reads the host's SSH host public keys (what `invoke enroll` reads): the host's
# /etc/ssh is $SIM_ROOT/etc/ssh, whose ssh_host_*_key.pub link to the keys its sshd serves
HOST_KEY_RE = re.compile(r"^/etc/ssh/ssh_host_[a-z0-9]+_key\.pub$")
SIM_ROOT_MARKER = ".sim-root"
PROFILE = "/nix/var/nix/profiles/system"
SERVICE_MAX_SECONDS = 900.0  # hard cap for any simulated service (keeps every wait bounded)
UNIT_READY_TIMEOUT = 5.0
UNIT_SUFFIXES = (
    ".service",
    ".timer",
    ".socket",
    ".target",
    ".mount",
    ".path",
    ".slice",
    ".scope",
    ".device",
    ".swap",
    ".automount",
)


# --------------------------------------------------------------------------- host context


def find_sim_root() -> Path:
    """``$SIM_ROOT``; when a command runs under ``env -i`` or ``sudo`` (which drop it), the
    nearest ancestor process that has it (the SSH session's shell got it from sshd's SetEnv)."""
    value = os.environ.get("SIM_ROOT")
    if value:
        return Path(value)
    # each host's PATH directory holds a marker naming its state directory, and PATH survives
    # `env -i PATH=${PATH-} ...` as nixos-rebuild-ng runs remote commands
    marker = Path(sys.argv[0]).parent / SIM_ROOT_MARKER
    with contextlib.suppress(OSError):
        return Path(marker.read_text(encoding="utf-8").strip())
    pid = proc_parent(os.getpid())
    for _ in range(64):
        if pid is None or pid <= 1:
            break
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""
        for item in environ.split(b"\0"):
            if item.startswith(b"SIM_ROOT="):
                return Path(os.fsdecode(item[len(b"SIM_ROOT=") :]))
        pid = proc_parent(pid)
    raise SimError("SIM_ROOT is not set: this command only works on a rebuild test-bed host")


@dataclass
class Host:
    """A simulated host as seen from inside it."""

    root: Path
    info: dict[str, Any]

    @classmethod
    def load(cls, root: Path | None = None) -> Host:
        sim_root = root or find_sim_root()
        info = json.loads((sim_root / "sim" / "host.json").read_text(encoding="utf-8"))
        return cls(root=sim_root, info=info)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def store(self) -> str:
        return str(self.info["store"])

    @property
    def sim(self) -> Path:
        return self.root / "sim"

    @property
    def pids(self) -> PidRegistry:
        return PidRegistry(self.sim / "pids")

    def log(self, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
        return self.sim / "log" / f"{safe}.log"

    def map_path(self, arg: str) -> str:
        return map_arg(arg, self.root)

    def service_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": str(self.info["path"]),
            "SIM_ROOT": str(self.root),
            "LANG": "C.UTF-8",
            "INVOCATION_ID": secrets.token_hex(16),
        }
        home = os.environ.get("HOME")
        if home:
            env["HOME"] = home
        env.update(extra or {})
        return env

    def internal_argv(self, *args: str) -> list[str]:
        return [str(self.info["python"]), "-IS", str(self.info["entry"]), *args]


def map_arg(arg: str, root: Path) -> str:
    """Rewrite a host path under /run or /nix/var into the host's state directory."""
    for prefix in MAPPED_PREFIXES:
        if arg == prefix or arg.startswith(prefix + "/"):
            return f"{root}{arg}"
        # --option=/run/...
        if arg.startswith("-") and "=" in arg:
            key, _, value = arg.partition("=")
            if value == prefix or value.startswith(prefix + "/"):
                return f"{key}={root}{value}"
    return arg


def unmap_text(text: str, root: Path) -> str:
    """Show host paths as the host would: ``$SIM_ROOT/run/x`` -> ``/run/x``."""
    return re.sub(re.escape(str(root)) + r"(?=/run\b|/nix/var\b)", "", text)


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def locked_state(host: Host, *, write: bool = True) -> Iterator[dict[str, Any]]:
    """The host's systemd/activation state under the host lock (saved on exit when write)."""
    host.sim.mkdir(parents=True, exist_ok=True)
    lock_path = host.sim / "lock"
    handle: IO[bytes]
    try:
        handle = lock_path.open("a+b")
    except PermissionError:
        if write:  # a user without sudo changing the host's systemd state
            raise SimError("Access denied (this needs root: use sudo)") from None
        handle = lock_path.open("rb")  # reading state needs no privilege, as on NixOS
    with handle as lock:
        deadline = time.monotonic() + 60.0
        mode = fcntl.LOCK_EX if write else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(lock.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SimError(f"timed out waiting for the state lock {lock_path}") from None
                time.sleep(0.01)
        state_path = host.sim / "state.json"
        try:
            state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {}
        state.setdefault("units", {})
        state.setdefault("counter", 0)
        try:
            yield state
        finally:
            if write:
                tmp = host.sim / f".state.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
                tmp.replace(state_path)


def unit_view(unit: dict[str, Any], now: float | None = None) -> tuple[str, str]:
    """(ActiveState, SubState) of a unit record as systemd would report it right now."""
    moment = time.time() if now is None else now
    active = str(unit.get("active", "inactive"))
    sub = str(unit.get("sub", "dead"))
    if active == "active" and float(unit.get("activating_until") or 0) > moment:
        return "activating", "start"
    pid = unit.get("pid")
    if (
        active == "active"
        and sub == "running"
        and pid
        and not is_alive(int(pid), unit.get("pid_start"))
    ):
        return "failed", "failed"
    return active, sub


def system_state(units: dict[str, dict[str, Any]]) -> str:
    """What ``systemctl is-system-running`` prints: starting, degraded or running."""
    now = time.time()
    views = {n: unit_view(u, now)[0] for n, u in units.items()}
    if any(v == "activating" and units[n].get("origin") == "config" for n, v in views.items()):
        return "starting"
    if "failed" in views.values():
        return "degraded"
    return "running"


def mangle(name: str) -> str:
    """systemctl's name mangling: a name without a unit suffix means NAME.service."""
    if name.endswith(UNIT_SUFFIXES) or any(ch in name for ch in "*?["):
        return name
    return f"{name}.service"


def _default_description(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return f"{stem[:1].upper()}{stem[1:]} unit"


# --------------------------------------------------------------------------- units


def _server_def(udef: dict[str, Any], label: str) -> str:
    if udef.get("port"):
        return canonical_json({**udef, "_label": label})
    return canonical_json(udef)


def _start_server(host: Host, name: str, udef: dict[str, Any], label: str) -> tuple[int, int, str]:
    """Start the HTTP server of a unit with a port; (pid, start time, error text)."""
    read_fd, write_fd = os.pipe()
    argv = host.internal_argv(
        "unit-server",
        "--addr",
        host.address,
        "--port",
        str(int(udef["port"])),
        "--status",
        str(int(udef.get("http_status", 200))),
        "--body",
        f"{name} {label}".strip(),
        "--ready-fd",
        str(write_fd),
    )
    log = host.log(name)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(write_fd,),
                env=host.service_env(),
                cwd="/",
            )
    finally:
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], UNIT_READY_TIMEOUT)
        data = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    start = proc_start_time(proc.pid)
    if data.startswith(b"ok") and start is not None:
        host.pids.add(proc.pid, f"unit {name}")
        return proc.pid, start, ""
    terminate(proc.pid, start, timeout=1.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    except OSError:
        tail = []
    return 0, 0, (tail[0] if tail else "did not become ready")


def _stop_unit_process(host: Host, unit: dict[str, Any]) -> None:
    pid = unit.get("pid")
    if pid:
        terminate(int(pid), unit.get("pid_start"))
        host.pids.remove(int(pid))
    wrapper = unit.get("wrapper_pid")
    if wrapper:
        terminate(int(wrapper), unit.get("wrapper_start"))
        host.pids.remove(int(wrapper))


def _start_config_unit(host: Host, name: str, udef: dict[str, Any], label: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "origin": "config",
        "description": str(udef.get("description") or _default_description(name)),
        "def": _server_def(udef, label),
        "result": "success",
    }
    if udef.get("fail"):
        record.update(active="failed", sub="failed", result="exit-code", exit_status=1)
        return record
    if udef.get("inactive"):  # installed but not started (no wantedBy): loaded, inactive, dead
        record.update(active="inactive", sub="dead")
        return record
    if udef.get("port"):
        pid, start, error = _start_server(host, name, udef, label)
        if error:
            print(f"{name}: {error}", file=sys.stderr)
            record.update(active="failed", sub="failed", result="exit-code", exit_status=1)
            return record
        record.update(active="active", sub="running", pid=pid, pid_start=start)
        return record
    sub = {
        ".timer": "waiting",
        ".target": "active",
        ".socket": "listening",
        ".mount": "mounted",
        ".path": "waiting",
    }.get("." + name.rsplit(".", 1)[-1], "running")
    record.update(active="active", sub=sub)
    return record


def _units_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    units = config.get("units") or {}
    if isinstance(units, list):
        return {mangle(str(n)): {} for n in units}
    return {mangle(str(n)): dict(d or {}) for n, d in dict(units).items()}


def _ip_link(host: Host, up: bool) -> None:
    iface = host.info.get("iface")
    if not host.info.get("netns") or not iface:
        return
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"
    result = subprocess.run(
        [ip, "link", "set", "dev", str(iface), "up" if up else "down"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        print(f"warning: ip link set {iface}: {result.stderr.strip()}", file=sys.stderr)


def _set_current_system(host: Host, store_path: str) -> None:
    run = host.root / "run"
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".current-system.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(store_path)
    tmp.replace(run / "current-system")


def _failed_units(state: dict[str, Any]) -> list[str]:
    now = time.time()
    return sorted(n for n, u in state["units"].items() if unit_view(u, now)[0] == "failed")


def _status_lines(name: str, unit: dict[str, Any]) -> list[str]:
    active, sub = unit_view(unit)
    mark = "×" if active == "failed" else "●"
    result = unit.get("result", "success")
    return [
        f"{mark} {name} - {unit.get('description', name)}",
        f"     Loaded: loaded (/etc/systemd/system/{name}; enabled; preset: enabled)",
        f"     Active: {active} ({sub if active != 'failed' else 'Result: ' + str(result)})",
    ]


def activate(host: Host, store_path: str, action: str) -> int:
    """switch-to-configuration ACTION of ``store_path`` on ``host``."""
    _attr, config = load_system(store_path)
    label = str(config.get("label", ""))
    new_units = _units_of(config)
    out = sys.stderr
    if action == "boot":
        print("updating the boot loader configuration...", file=out)
        return 0
    with locked_state(host, write=action != "dry-activate") as state:
        units: dict[str, dict[str, Any]] = state["units"]
        old = {n: u for n, u in units.items() if u.get("origin") == "config"}
        now = time.time()

        def changed(name: str) -> bool:
            unit = old[name]
            if unit.get("def") != _server_def(new_units[name], label):
                return True
            return unit_view(unit, now)[0] == "failed" and not new_units[name].get("fail")

        to_stop = sorted(n for n in old if n not in new_units or changed(n))
        to_start = sorted(n for n in new_units if n not in old or n in to_stop)
        if action == "dry-activate":
            if to_stop:
                print(f"would stop the following units: {', '.join(to_stop)}", file=out)
            print("would activate the configuration...", file=out)
            if to_start:
                print(f"would start the following units: {', '.join(to_start)}", file=out)
            return 0
        if to_stop:
            print(f"stopping the following units: {', '.join(to_stop)}", file=out)
        for name in to_stop:
            _stop_unit_process(host, units[name])
            del units[name]
        if not config.get("cut_network"):
            _ip_link(host, up=True)
        print("activating the configuration...", file=out)
        print("setting up /etc...", file=out)
        _set_current_system(host, store_path)
        print("reloading user units for root...", file=out)
        restarted = [n for n in to_start if n in old]
        fresh = [n for n in to_start if n not in old]
        if restarted:
            print(f"starting the following units: {', '.join(restarted)}", file=out)
        starting = float(config.get("starting_seconds") or 0)
        for name in to_start:
            record = _start_config_unit(host, name, new_units[name], label)
            if starting > 0 and record["active"] == "active":
                record["activating_until"] = time.time() + starting
            units[name] = record
        for name in new_units:
            if name not in to_start:
                units[name]["description"] = str(
                    new_units[name].get("description") or _default_description(name)
                )
        if fresh:
            print(f"the following new units were started: {', '.join(fresh)}", file=out)
        state["activated"] = {"system": store_path, "at": time.time(), "action": action}
        if config.get("cut_network"):
            if host.info.get("netns"):
                _ip_link(host, up=False)
            else:
                print("note: cut_network ignored, host is not in a network namespace", file=out)
        failed = _failed_units(state)
        if failed:
            print(f"warning: the following units failed: {', '.join(failed)}", file=out)
            for name in failed:
                print("", file=out)
                for line in _status_lines(name, units[name]):
                    print(line, file=out)
            return 4
    return 0


def stc_main(script: str, argv: Sequence[str]) -> int:
    """``<store path>/bin/switch-to-configuration ACTION``."""
    store_path = str(Path(script).resolve().parent.parent)
    usage = "Usage: switch-to-configuration [switch|boot|test|dry-activate]"
    if len(argv) != 1 or argv[0] not in ("switch", "boot", "test", "dry-activate"):
        print(usage, file=sys.stderr)
        return 1
    try:
        return activate(Host.load(), store_path, argv[0])
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- systemctl


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
                    raise _Usage(f"systemctl: option '{key}' requires an argument")
                value = argv[i]
                i += 1
            opts.setdefault(key, []).append(value)
        elif key.startswith("-p") and len(key) > 2:
            opts.setdefault("-p", []).append(arg[2:])
        elif key in ("--user", "--global", "--host", "-H", "--machine", "-M"):
            raise _Usage(f"systemctl (rebuild test bed): option '{key}' is not simulated")
        elif key.startswith("--"):
            raise _Usage(f"systemctl: unrecognized option '{arg}'")
        else:
            raise _Usage(f"systemctl: invalid option -- '{arg[1:2]}'")
    return opts, positional


class _Usage(Exception):
    """A usage error: message to stderr, exit 1."""


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
    except _Usage as exc:
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
                if unit.get("origin") == "transient" and not _timer_refs(units, name):
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
        for line in _status_lines(name, unit):
            print(line)
        if unit.get("pid") and unit_view(unit)[0] == "active":
            print(f"   Main PID: {unit['pid']}")
        if unit_view(unit)[0] != "active":
            code = max(code, 3)
    return code


def _timer_refs(units: dict[str, dict[str, Any]], service: str) -> bool:
    return any(u.get("service") == service for n, u in units.items() if n.endswith(".timer"))


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
        _stop_unit_process(host, unit)
        if unit.get("origin") == "transient":
            if _timer_refs(units, name):
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
    defs = _units_of(config)
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
            _stop_unit_process(host, unit)
        record = _start_config_unit(host, name, defs[name], str(config.get("label", "")))
        units[name] = record
        if record["active"] == "failed":
            print(
                f"Job for {name} failed because the control process exited with error code.\n"
                f'See "systemctl status {name}" and "journalctl -xeu {name}" for details.',
                file=sys.stderr,
            )
            code = 1
    return code


# --------------------------------------------------------------------------- systemd-run

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
            raise _Usage(f"systemd-run (rebuild test bed): option '{key}' is not simulated")
        if key in _RUN_NOARG:
            if eq:
                raise _Usage(f"systemd-run: option '{key}' doesn't allow an argument")
            if not arg.startswith("--") and value:
                # grouped short flags such as -qG
                for ch in arg[1:]:
                    short = f"-{ch}"
                    if short not in _RUN_NOARG:
                        raise _Usage(f"systemd-run: invalid option -- '{ch}'")
                    flags.add(_RUN_NOARG[short])
                continue
            flags.add(_RUN_NOARG[key])
            continue
        if key in _RUN_ARG:
            if not eq and not value:
                if i >= len(argv):
                    raise _Usage(f"systemd-run: option requires an argument -- '{key.lstrip('-')}'")
                value = argv[i]
                i += 1
            values.setdefault(_RUN_ARG[key], []).append(value)
            continue
        if arg.startswith("--"):
            raise _Usage(f"systemd-run: unrecognized option '{arg}'")
        raise _Usage(f"systemd-run: invalid option -- '{arg[1:2]}'")
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
            raise _Usage("Command line to execute required.")
        delay = None
        if "on_active" in args.values:
            try:
                delay = parse_timespan(args.values["on_active"][-1])
            except ValueError:
                raise _Usage(
                    f"Failed to parse timer value: {args.values['on_active'][-1]}"
                ) from None
    except _Usage as exc:
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


def _spawn_internal(
    host: Host, args: list[str], env: dict[str, str], log: Path | None
) -> subprocess.Popen[bytes]:
    argv = host.internal_argv(*args)
    if log is None:  # --pipe / --pty: the service shares systemd-run's stdio
        return subprocess.Popen(argv, env=env, cwd="/", start_new_session=True, close_fds=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        return subprocess.Popen(
            argv,
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


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
        code = child.wait(timeout=SERVICE_MAX_SECONDS)
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
        elif _timer_refs(units, service):
            unit.update(active="inactive", sub="dead", result=result, exit_status=code, pid=None)
        else:
            del units[service]


def _internal_run_service(host: Host, argv: list[str]) -> int:
    opts, command = _internal_opts(argv)
    host.pids.add(os.getpid(), f"service {opts['--name']}")
    try:
        return _run_service_body(
            host, opts["--name"], command, opts.get("--cwd", "/"), "--collect" in opts
        )
    finally:
        host.pids.remove(os.getpid())


def _internal_timer(host: Host, argv: list[str]) -> int:
    opts, command = _internal_opts(argv)
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


def _internal_opts(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return opts, argv[i:]
        if arg in ("--collect",):
            opts[arg] = ""
        else:
            opts[arg] = argv[i]
            i += 1
    return opts, []


# --------------------------------------------------------------------------- unit server


def _unit_server(argv: list[str]) -> int:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    opts, _ = _internal_opts(argv)
    status = int(opts["--status"])
    body = (opts.get("--body", "") + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "rebuild-testbed"

        def _reply(self, with_body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(True)

        def do_HEAD(self) -> None:
            self._reply(False)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    ready_fd = int(opts["--ready-fd"])
    try:
        server = ThreadingHTTPServer((opts["--addr"], int(opts["--port"])), Handler)
    except OSError as exc:
        print(
            f"cannot listen on {opts['--addr']}:{opts['--port']}: {exc.strerror}", file=sys.stderr
        )
        sys.stderr.flush()
        os.close(ready_fd)
        return 1
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()
    return 0


# --------------------------------------------------------------------------- nix-env


def _profile_paths(profile: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if not profile.parent.is_dir():
        return out
    pattern = re.compile(rf"^{re.escape(profile.name)}-(\d+)-link$")
    for entry in profile.parent.iterdir():
        m = pattern.match(entry.name)
        if m:
            out[int(m.group(1))] = entry
    return out


def _current_generation(profile: Path) -> int | None:
    try:
        target = os.readlink(profile)  # noqa: PTH115 (need the raw link text)
    except OSError:
        return None
    m = re.match(rf"^{re.escape(profile.name)}-(\d+)-link$", Path(target).name)
    return int(m.group(1)) if m else None


def _switch_link(profile: Path, generation: int) -> None:
    tmp = profile.parent / f".{profile.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(f"{profile.name}-{generation}-link")
    tmp.replace(profile)


def nix_env(argv: Sequence[str]) -> int:
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    profile: Path | None = None
    op: str | None = None
    operand: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-p", "--profile"):
            if i >= len(args):
                print(f"error: flag '{arg}' requires 1 argument", file=sys.stderr)
                return 1
            profile = Path(host.map_path(args[i]))
            i += 1
        elif arg in ("--set", "--switch-generation", "-G", "--delete-generations"):
            op = arg
            while i < len(args) and not args[i].startswith("-"):
                operand.append(args[i])
                i += 1
        elif arg in ("--rollback", "--list-generations"):
            op = arg
        elif arg == "--version":
            print("nix-env (Nix) 2.28.3")
            return 0
        elif arg in ("--quiet", "-v", "--verbose", "-vv", "-vvv", "--show-trace"):
            continue
        elif arg == "--option":
            i += 2
        else:
            print(f"error: unrecognised flag '{arg}'", file=sys.stderr)
            print("Try 'nix-env --help' for more information.", file=sys.stderr)
            return 1
    if op is None:
        print("error: no operation specified", file=sys.stderr)
        print("Try 'nix-env --help' for more information.", file=sys.stderr)
        return 1
    if profile is None:
        print("error: the test bed's nix-env needs -p/--profile", file=sys.stderr)
        return 1
    with locked_state(host):
        return _nix_env_op(host, profile, op, operand)


def _nix_env_op(host: Host, profile: Path, op: str, operand: list[str]) -> int:
    gens = _profile_paths(profile)
    current = _current_generation(profile)
    if op == "--set":
        if len(operand) != 1:
            print("error: '--set' requires exactly one argument", file=sys.stderr)
            return 1
        target = operand[0]
        if not target.startswith(host.store.rstrip("/") + "/"):
            print(f"error: path '{target}' is not in the Nix store", file=sys.stderr)
            return 1
        target = f"{host.store}/{Path(target).relative_to(host.store).parts[0]}"
        if not Path(target).exists():
            print(f"error: path '{target}' is not valid", file=sys.stderr)
            return 1
        profile.parent.mkdir(parents=True, exist_ok=True)
        last = max(gens) if gens else None
        if last is not None and os.readlink(gens[last]) == target:  # noqa: PTH115
            number = last
        else:
            number = (last or 0) + 1
            link = profile.parent / f"{profile.name}-{number}-link"
            link.symlink_to(target)
        _switch_link(profile, number)
        return 0
    if op == "--list-generations":
        for number in sorted(gens):
            stamp = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(gens[number].lstat().st_mtime)
            )
            mark = "(current)" if number == current else ""
            print(f"{number:4d}   {stamp}   {mark}")
        return 0
    if op == "--rollback":
        older = [n for n in gens if current is not None and n < current]
        if not older:
            print(
                f"error: no generation older than the current ({current}) exists", file=sys.stderr
            )
            return 1
        target_gen = max(older)
        print(f"switching profile from version {current} to {target_gen}", file=sys.stderr)
        _switch_link(profile, target_gen)
        return 0
    if op in ("--switch-generation", "-G"):
        if len(operand) != 1 or not operand[0].isdigit():
            print(f"error: '{op}' requires one generation number", file=sys.stderr)
            return 1
        number = int(operand[0])
        if number not in gens:
            print(f"error: generation {number} does not exist", file=sys.stderr)
            return 1
        print(f"switching profile from version {current} to {number}", file=sys.stderr)
        _switch_link(profile, number)
        return 0
    # --delete-generations
    doomed: set[int] = set()
    for item in operand:
        if item == "old":
            doomed.update(n for n in gens if n != current)
        elif item.isdigit():
            doomed.add(int(item))
    if current in doomed:
        print(f"error: cannot delete current version of profile {profile}'", file=sys.stderr)
        return 1
    for number in sorted(doomed):
        if number in gens:
            print(f"removing profile version {number}", file=sys.stderr)
            gens[number].unlink()
    return 0


# --------------------------------------------------------------------------- nix-store


def nix_store(argv: Sequence[str]) -> int:
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = list(argv)
    if "--version" in args:
        print("nix-store (Nix) 2.28.3")
        return 0
    flags = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    known = {
        "--serve",
        "--write",
        "--realise",
        "-r",
        "--query",
        "-q",
        "--requisites",
        "-R",
        "--check-validity",
        "--verify-path",
        "--quiet",
        "-v",
    }
    for flag in flags:
        if flag not in known:
            print(f"error: unrecognised flag '{flag}'", file=sys.stderr)
            print("Try 'nix-store --help' for more information.", file=sys.stderr)
            return 1

    def valid(path: str) -> bool:
        return path.startswith(host.store.rstrip("/") + "/") and Path(path).exists()

    if "--serve" in flags:
        # the test bed's copy protocol: one store path per line in, "valid"/"invalid" per line out
        code = 0
        for line in sys.stdin:
            path = line.strip()
            if not path:
                continue
            ok = valid(path)
            code = code or (0 if ok else 1)
            print(f"{'valid' if ok else 'invalid'} {path}", flush=True)
        return code
    for path in paths:
        if not valid(path):
            print(f"error: path '{path}' is not valid", file=sys.stderr)
            return 1
    if {"--realise", "-r", "--query", "-q"} & set(flags):
        for path in paths:
            print(path)
    return 0


# --------------------------------------------------------------------------- small shims

_REAL = {
    "readlink": "readlink",
    "mkdir": "mkdir",
    "rm": "rm",
    "rmdir": "rmdir",
    "cat": "cat",
    "tee": "tee",
    "ls": "ls",
}


def _real_binary(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin")
    if found is None:
        raise SimError(f"{name}: not found in /usr/bin or /bin")
    return found


def path_shim(name: str, argv: Sequence[str]) -> int:
    """readlink/mkdir/rm/rmdir/cat/tee/ls with /run and /nix/var mapped into SIM_ROOT."""
    try:
        root = find_sim_root()
        real = _real_binary(_REAL[name])
    except SimError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    mapped = [map_arg(a, root) for a in argv]
    if name == "cat":
        mapped = [f"{root}{a}" if HOST_KEY_RE.match(a) else a for a in mapped]
    capture_out = name in ("readlink", "ls")
    result = subprocess.run(
        [name, *mapped],
        executable=real,
        stdout=subprocess.PIPE if capture_out else None,
        stderr=subprocess.PIPE,
        check=False,
    )
    if capture_out:
        sys.stdout.write(unmap_text(result.stdout.decode(errors="surrogateescape"), root))
        sys.stdout.flush()
    sys.stderr.write(unmap_text(result.stderr.decode(errors="surrogateescape"), root))
    return result.returncode


_SUDO_ARG_SHORT = set("CDgpRrtTUu")
_SUDO_ARG_LONG = {
    "--close-from",
    "--chdir",
    "--group",
    "--host",
    "--prompt",
    "--chroot",
    "--role",
    "--type",
    "--command-timeout",
    "--other-user",
    "--user",
}


def _exec(path: str, argv: list[str]) -> NoReturn:
    os.execv(path, argv)  # noqa: S606 (replacing the shim by the real program is the point)


def sudo_shim(argv: Sequence[str]) -> int:
    """Real sudo, but the command keeps the host's PATH and SIM_ROOT (sudo resets both)."""
    real = "/usr/bin/sudo"
    args = list(argv)
    i = 0
    shell_mode = False
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            key = arg.split("=", 1)[0]
            i += 1
            if key in _SUDO_ARG_LONG and "=" not in arg:
                i += 1
            if key in ("--login", "--shell"):
                shell_mode = True
            continue
        i += 1
        letters = arg[1:]
        for pos, ch in enumerate(letters):
            if ch in "is":
                shell_mode = True
            if ch in _SUDO_ARG_SHORT:
                if pos == len(letters) - 1:
                    i += 1
                break
    options, command = args[: min(i, len(args))], args[min(i, len(args)) :]
    if options and options[-1] == "--":
        options = options[:-1]
    if not command or shell_mode:
        _exec(real, [real, *args])
    try:
        root = find_sim_root()
    except SimError:
        _exec(real, [real, *args])
    assignments: list[str] = []
    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
        assignments.append(command.pop(0))
    if not command:
        _exec(real, [real, *args])
    command = [map_arg(a, root) for a in command]
    path = os.environ.get("PATH", "/usr/bin:/bin")
    env_cmd = ["/usr/bin/env", f"PATH={path}", f"SIM_ROOT={root}", *assignments]
    _exec(real, [real, *options, "--", *env_cmd, *command])


def hostname_shim(argv: Sequence[str]) -> int:
    """``hostname`` prints the simulated host's name (``-I``: its address)."""
    try:
        host = Host.load()
    except SimError:
        _exec("/usr/bin/hostname", ["hostname", *argv])
    if not argv or argv[0] in ("-s", "--short", "-f", "--fqdn", "--long", "-A"):
        print(host.name)
        return 0
    if argv[0] in ("-I", "--all-ip-addresses", "-i", "--ip-address"):
        print(host.address)
        return 0
    _exec("/usr/bin/hostname", ["hostname", *argv])


# --------------------------------------------------------------------------- dispatch


def internal(argv: Sequence[str]) -> int:
    """``rbtb-sim SUBCOMMAND``: helpers the other shims start."""
    if not argv:
        print("usage: rbtb-sim run-service|timer|unit-server|find-root ...", file=sys.stderr)
        return 2
    sub, rest = argv[0], list(argv[1:])
    if sub == "unit-server":
        return _unit_server(rest)
    if sub == "find-root":
        print(find_sim_root())
        return 0
    host = Host.load()
    if sub == "run-service":
        return _internal_run_service(host, rest)
    if sub == "timer":
        return _internal_timer(host, rest)
    print(f"rbtb-sim: unknown subcommand {sub}", file=sys.stderr)
    return 2


def main(name: str, argv: Sequence[str]) -> int:
    """Dispatch a shim invocation by the name it was installed as."""
    try:
        if name == "systemctl":
            return systemctl(argv)
        if name == "systemd-run":
            return systemd_run(argv)
        if name == "nix-env":
            return nix_env(argv)
        if name == "nix-store":
            return nix_store(argv)
        if name in _REAL:
            return path_shim(name, argv)
        if name == "sudo":
            return sudo_shim(argv)
        if name == "hostname":
            return hostname_shim(argv)
        if name == "rbtb-sim":
            return internal(argv)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141
    print(f"rebuild test bed: unknown shim {name}", file=sys.stderr)
    return 127


SHIM_NAMES = (
    "systemctl",
    "systemd-run",
    "nix-env",
    "nix-store",
    "readlink",
    "mkdir",
    "rm",
    "rmdir",
    "cat",
    "tee",
    "ls",
    "sudo",
    "hostname",
    "rbtb-sim",
)
