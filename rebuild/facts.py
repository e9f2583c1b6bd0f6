"""Remote facts: one POSIX sh script gathers everything verification needs in one round trip,
and pure parsers turn its output into data (pyinfra's facts pattern)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from shlex import quote

from rebuild.inventory import VerifySpec

CURRENT_SYSTEM = "/run/current-system"
SYSTEM_PROFILE = "/nix/var/nix/profiles/system"
MARK = "@@rebuild-fact@@"
HTTP_TIMEOUT = 10
BASE_TIMEOUT = 15
OUTPUT_TAIL = 5


@dataclass(frozen=True)
class UnitState:
    """`systemctl show` of one unit."""

    load: str
    active: str
    sub: str


@dataclass(frozen=True)
class CommandOutcome:
    returncode: int
    tail: str


@dataclass(frozen=True)
class Facts:
    """What the host told us in one round trip."""

    current_system: str | None = None
    profile_system: str | None = None
    system_state: str = ""
    failed_units: tuple[str, ...] = ()
    units: dict[str, UnitState] = field(default_factory=dict)
    listening: frozenset[int] = frozenset()
    http: dict[int, str] = field(default_factory=dict)
    commands: dict[int, CommandOutcome] = field(default_factory=dict)


def script(spec: VerifySpec, *, services: bool = True) -> str:
    """The sh that gathers every fact for `spec`; each section starts with a marker line.

    The HTTP and command checks start first, each in the background with its output in a
    private temporary folder, so they run alongside each other and the systemctl/ss reads
    (50 checks cost about as much as the slowest one, not the sum); their sections are printed
    in order once each has ended. Each check is still bounded by its own timeout."""
    lines = [
        f"echo '{MARK} current'; readlink -f {CURRENT_SYSTEM} 2>/dev/null",
        f"echo '{MARK} profile'; readlink -f {SYSTEM_PROFILE} 2>/dev/null",
    ]
    if services:
        jobs = bool(spec.http or spec.commands)
        if jobs:
            lines.append("d=$(mktemp -d 2>/dev/null) || d=")
            started = [
                f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time {HTTP_TIMEOUT} "
                f'-- {quote(check.url)} >"$d/h{i}" 2>&1 & h{i}=$!'
                for i, check in enumerate(spec.http)
            ] + [
                f"timeout {spec.command_timeout} sh -c {quote(command.run)} "
                f'</dev/null >"$d/c{i}" 2>&1 & c{i}=$!'
                for i, command in enumerate(spec.commands)
            ]
            lines.append('if [ -n "$d" ]; then ' + "; ".join(started) + "; fi")
        lines += [
            f"echo '{MARK} state'; systemctl is-system-running 2>/dev/null",
            f"echo '{MARK} failed'; "
            "systemctl list-units --state=failed --no-legend --plain --no-pager 2>/dev/null",
        ]
        if spec.units:
            units = " ".join(quote(u) for u in spec.units)
            lines.append(
                f"echo '{MARK} units'; systemctl show -p Id,LoadState,ActiveState,SubState "
                f"--no-pager -- {units} 2>/dev/null"
            )
        if spec.ports:
            lines.append(f"echo '{MARK} ports'; ss -Htln 2>/dev/null")
        no_tmp = "echo 'rebuild: mktemp -d failed on the host'"
        for i in range(len(spec.http)):
            lines.append(
                f'echo \'{MARK} http {i}\'; if [ -n "$d" ]; then wait "$h{i}"; '
                f'tail -n {OUTPUT_TAIL} "$d/h{i}"; else {no_tmp}; fi; echo'
            )
        for i in range(len(spec.commands)):
            lines.append(
                f'echo \'{MARK} command {i}\'; if [ -n "$d" ]; then wait "$c{i}"; r=$?; '
                f'[ -s "$d/c{i}" ] && tail -n {OUTPUT_TAIL} "$d/c{i}"; else r=255; {no_tmp}; '
                f"fi; echo '{MARK} rc' \"$r\""
            )
        if jobs:
            lines.append('[ -n "$d" ] && rm -rf -- "$d"')
    lines.append(f"echo '{MARK} end'")
    return "\n".join(f"{line}; true" for line in lines) + "\n"


def script_timeout(spec: VerifySpec) -> float:
    """How long one run of the facts script may take: a host that stops answering fails then.
    The checks run side by side, so the longest of their own timeouts bounds them."""
    http = HTTP_TIMEOUT if spec.http else 0
    commands = spec.command_timeout if spec.commands else 0
    return BASE_TIMEOUT + max(http, commands)


def split_sections(output: str, mark: str = MARK) -> dict[str, list[str]]:
    """Marker-delimited sections of a remote script's output (`<mark> name` starts one)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(mark + " "):
            name = line[len(mark) + 1 :].strip()
            if name.startswith("rc ") and current is not None:
                current.append(line)
                continue
            current = sections.setdefault(name, [])
        elif current is not None:
            current.append(line)
    return sections


def parse_store_path(lines: list[str]) -> str | None:
    for line in lines:
        if line.strip().startswith("/"):
            return line.strip()
    return None


def parse_failed_units(lines: list[str]) -> tuple[str, ...]:
    """`systemctl list-units --state=failed --plain --no-legend`: the first column."""
    units = []
    for line in lines:
        words = line.replace("●", " ").split()
        if words:
            units.append(words[0])
    return tuple(units)


def parse_show(lines: list[str], names: tuple[str, ...] = ()) -> dict[str, UnitState]:
    """`systemctl show -p Id,LoadState,ActiveState,SubState a b`: blank-line separated blocks,
    one per argument in order. Blocks are matched to the asked `names` by position (an alias
    such as dbus.service answers with its canonical Id), else by Id."""
    blocks: list[dict[str, str]] = []
    block: dict[str, str] = {}
    for line in [*lines, ""]:
        if not line.strip():
            if block:
                blocks.append(block)
                block = {}
            continue
        key, _, value = line.partition("=")
        block[key.strip()] = value.strip()
    states = [
        UnitState(b.get("LoadState", ""), b.get("ActiveState", ""), b.get("SubState", ""))
        for b in blocks
    ]
    if names and len(blocks) == len(names):
        return dict(zip(names, states, strict=True))
    return {b["Id"]: st for b, st in zip(blocks, states, strict=True) if "Id" in b}


_PORT_RE = re.compile(r":(\d+)$")


def parse_listening(lines: list[str]) -> frozenset[int]:
    """`ss -Htln`: the local ports of listening TCP sockets."""
    ports = set()
    for line in lines:
        words = line.split()
        if len(words) < 4:
            continue
        local = words[3]
        match = _PORT_RE.search(local)
        if match:
            ports.add(int(match.group(1)))
    return frozenset(ports)


def parse_command(lines: list[str]) -> CommandOutcome:
    out = [line for line in lines if not line.startswith(MARK + " rc")]
    rc_lines = [line for line in lines if line.startswith(MARK + " rc")]
    try:
        rc = int(rc_lines[-1].split()[-1]) if rc_lines else 255
    except ValueError:
        rc = 255
    return CommandOutcome(rc, "\n".join(x for x in out if x.strip()))


def parse(output: str, spec: VerifySpec) -> Facts:
    """All facts from one run of `script(spec)`."""
    s = split_sections(output)
    units = parse_show(s.get("units", []), spec.units)
    http = {i: " ".join(s.get(f"http {i}", [])).strip() for i in range(len(spec.http))}
    commands = {i: parse_command(s.get(f"command {i}", [])) for i in range(len(spec.commands))}
    state = s.get("state", [])
    return Facts(
        current_system=parse_store_path(s.get("current", [])),
        profile_system=parse_store_path(s.get("profile", [])),
        system_state=state[0].strip() if state else "",
        failed_units=parse_failed_units(s.get("failed", [])),
        units=units,
        listening=parse_listening(s.get("ports", [])),
        http=http,
        commands=commands,
    )
