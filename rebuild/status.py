"""`invoke status`: the fleet at a glance.

Per host, in parallel, one SSH connection (strict host keys) and one remote POSIX sh script
(the facts pattern: marker sections, pure parsers) tell what the host runs, what it booted,
whether a reboot is due (kernel, initrd or kernel modules of the booted system differ from the
current one), which units failed, and the last deploy from the host's own record
(`/var/lib/rebuild/deployments.jsonl`). While the connections run, HEAD of the flake is evaluated
once per distinct attribute (the evaluation starts first, the connections right after); a
reachable host that does not run it drifts. Nothing changes on any host. One audit record per
host (`event` `status`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rebuild import audit, gitstate, identity
from rebuild.console import Console
from rebuild.errors import GateRefused, RebuildError
from rebuild.facts import MARK, parse_failed_units, split_sections
from rebuild.gates import host_key_gate, operator_gate
from rebuild.inventory import Loaded, Target
from rebuild.remote import Endpoint, Remote
from rebuild.results import Result, most_severe

CURRENT = "/run/current-system"
BOOTED = "/run/booted-system"
BOOT_LINKS = ("kernel", "initrd", "kernel-modules")
DEPLOYMENTS = "/var/lib/rebuild/deployments.jsonl"
DEPLOYMENTS_TAIL = 5
SCRIPT_TIMEOUT = 30.0
MAX_CONNECTIONS = 64  # hosts probed at once
MAX_EVALUATIONS = 4  # `nix eval` processes at once (each is CPU and memory hungry)
LAST_DEPLOY_KEYS = ("run_id", "timestamp", "operator", "commit", "result")

# exit codes of `invoke status` (from the one table in rebuild.results)
EXIT_OK = Result.OK.exit_code  # 0: every host reachable, no drift, no failed unit
EXIT_PROBLEM = Result.VERIFY_FAILED.exit_code  # 6: a host unreachable, drifting or with failures
EXIT_REFUSED = Result.REFUSED.exit_code  # 3: a gate (allowlist, host key unknown or changed)
EXIT_EVAL_FAILED = Result.BUILD_FAILED.exit_code  # 5: HEAD did not evaluate for some host


def script() -> str:
    """The one remote sh of a status probe; each section starts with a marker line.

    `readlink -f SYSTEM SYSTEM/kernel SYSTEM/initrd SYSTEM/kernel-modules` answers one line per
    argument as long as SYSTEM exists (-f resolves a missing last component to itself, which
    `boot_links` reads as "no such link", as in a container's system).
    """
    current = " ".join([CURRENT, *(f"{CURRENT}/{link}" for link in BOOT_LINKS)])
    booted = " ".join([BOOTED, *(f"{BOOTED}/{link}" for link in BOOT_LINKS)])
    lines = [
        f"echo '{MARK} current'; readlink -f {current} 2>/dev/null",
        f"echo '{MARK} booted'; readlink -f {booted} 2>/dev/null",
        f"echo '{MARK} failed'; "
        "systemctl list-units --state=failed --no-legend --plain --no-pager 2>/dev/null",
        f"echo '{MARK} deploys'; tail -n {DEPLOYMENTS_TAIL} {DEPLOYMENTS} 2>/dev/null",
        f"echo '{MARK} end'",
    ]
    return "\n".join(f"{line}; true" for line in lines) + "\n"


@dataclass(frozen=True)
class System:
    """A system link (/run/current-system or /run/booted-system) and its boot links."""

    path: str | None
    links: dict[str, str | None] = field(default_factory=dict)  # None: the system has no such link


def parse_system(lines: list[str], queried: str) -> System:
    """`readlink -f SYSTEM SYSTEM/kernel SYSTEM/initrd SYSTEM/kernel-modules`.

    A missing SYSTEM answers itself (`/run/booted-system`) and nothing for its links: no system.
    A link that resolves inside the system itself did not resolve (no such link).
    """
    answers = [line.strip() for line in lines if line.strip().startswith("/")]
    if not answers or answers[0] == queried:
        return System(None)
    path = answers[0]
    if len(answers) != 1 + len(BOOT_LINKS):
        return System(path)
    links = {
        name: (None if value == f"{path}/{name}" else value)
        for name, value in zip(BOOT_LINKS, answers[1:], strict=True)
    }
    return System(path, links)


def reboot_reasons(booted: System, current: System) -> tuple[str, ...]:
    """The boot links (kernel, initrd, kernel-modules) that differ between the booted and the
    current system; none when either side is unknown or both are the same system."""
    if booted.path is None or current.path is None or booted.path == current.path:
        return ()
    if not booted.links or not current.links:
        return ()
    return tuple(link for link in BOOT_LINKS if booted.links.get(link) != current.links.get(link))


def parse_last_deploy(lines: list[str]) -> dict[str, Any] | None:
    """The last line of the host's deployments.jsonl that is a JSON object, with the fields
    `invoke status` shows; None when there is none (never deployed, or unreadable)."""
    for line in reversed(lines):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            return {key: data.get(key) for key in LAST_DEPLOY_KEYS}
    return None


@dataclass(frozen=True)
class Probe:
    """What one host told us in its one round trip."""

    current: System
    booted: System
    failed_units: tuple[str, ...]
    last_deploy: dict[str, Any] | None
    complete: bool  # the script ran to its end


def parse(output: str) -> Probe:
    sections = split_sections(output)
    return Probe(
        current=parse_system(sections.get("current", []), CURRENT),
        booted=parse_system(sections.get("booted", []), BOOTED),
        failed_units=parse_failed_units(sections.get("failed", [])),
        last_deploy=parse_last_deploy(sections.get("deploys", [])),
        complete="end" in sections,
    )


@dataclass(frozen=True)
class HostStatus:
    """One row of `invoke status`."""

    host: str
    reachable: bool
    current_system: str | None = None
    booted_system: str | None = None
    expected_system: str | None = None
    reboot_reasons: tuple[str, ...] = ()
    failed_units: tuple[str, ...] = ()
    last_deploy: dict[str, Any] | None = None
    error: str | None = None  # why the host is not reachable
    refused: bool = False  # its host key changed: a gate, not a network problem

    @property
    def drift(self) -> bool:
        """Reachable and not running what HEAD evaluates to."""
        return (
            self.reachable
            and self.expected_system is not None
            and self.current_system != self.expected_system
        )

    @property
    def reboot_needed(self) -> bool:
        return bool(self.reboot_reasons)

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.drift and not self.failed_units

    def to_json(self) -> dict[str, Any]:
        """The contract's row of `invoke status --json` (with `error` for an unreachable host)."""
        data: dict[str, Any] = {
            "host": self.host,
            "reachable": self.reachable,
            "current_system": self.current_system,
            "booted_system": self.booted_system,
            "expected_system": self.expected_system,
            "drift": self.drift,
            "reboot_needed": self.reboot_needed,
            "failed_units": list(self.failed_units),
            "last_deploy": self.last_deploy,
        }
        if not self.reachable:
            data["error"] = self.error
        return data


def host_status(host: str, probe: Probe, expected: str | None) -> HostStatus:
    """A reachable host's row from its probe and the system HEAD evaluates to."""
    return HostStatus(
        host=host,
        reachable=True,
        current_system=probe.current.path,
        booted_system=probe.booted.path,
        expected_system=expected,
        reboot_reasons=reboot_reasons(probe.booted, probe.current),
        failed_units=probe.failed_units,
        last_deploy=probe.last_deploy,
    )


def exit_code(rows: Iterable[HostStatus], *, evaluation_failed: bool = False) -> int:
    """3 when a host's key changed; else 6 when a host is unreachable, drifts or has failed
    units; else 5 when HEAD did not evaluate (drift unknown); else 0."""
    rows = list(rows)
    if any(row.refused for row in rows):
        return EXIT_REFUSED
    if not all(row.healthy for row in rows):
        return EXIT_PROBLEM
    return EXIT_EVAL_FAILED if evaluation_failed else EXIT_OK


def result_of(row: HostStatus) -> Result:
    if row.refused:
        return Result.REFUSED
    if not row.healthy:
        return Result.VERIFY_FAILED
    if row.reachable and row.expected_system is None:
        return Result.BUILD_FAILED
    return Result.OK


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def table_rows(rows: list[HostStatus]) -> list[tuple[str, ...]]:
    """The terminal table: host, reachable, drift, reboot, failed units, last deploy."""
    out: list[tuple[str, ...]] = [
        ("host", "reachable", "drift", "reboot", "failed units", "last deploy")
    ]
    for row in rows:
        if not row.reachable:
            out.append((row.host, "no", "-", "-", "-", "-"))
            continue
        drift = "?" if row.expected_system is None else _yes_no(row.drift)
        reboot = f"yes ({', '.join(row.reboot_reasons)})" if row.reboot_needed else "no"
        failed = ", ".join(row.failed_units) or "-"
        out.append((row.host, "yes", drift, reboot, failed, describe_deploy(row.last_deploy)))
    return out


def describe_deploy(deploy: dict[str, Any] | None) -> str:
    """who, when, commit[:12], result; `-` when the host has no deploy record."""
    if deploy is None:
        return "-"
    operator = deploy.get("operator")
    who = operator.get("name") if isinstance(operator, dict) else operator
    commit = str(deploy.get("commit") or "-")[:12]
    parts = [str(who or "?"), str(deploy.get("timestamp") or "?"), commit,
             str(deploy.get("result") or "?")]  # fmt: skip
    return " ".join(parts)


def summary(rows: list[HostStatus]) -> str:
    counts = [
        (sum(not r.reachable for r in rows), "unreachable"),
        (sum(r.drift for r in rows), "drifting from HEAD"),
        (sum(r.reboot_needed for r in rows), "need a reboot"),
        (sum(bool(r.failed_units) for r in rows), "with failed units"),
    ]
    told = ", ".join(f"{n} {what}" for n, what in counts if n)
    hosts = f"{len(rows)} host{'s' if len(rows) != 1 else ''}"
    return f"{hosts}: {told or 'all reachable, on HEAD, no failed units'}"


# --------------------------------------------------------------------------- the IO shell


def probe(endpoint: Endpoint) -> Probe:
    """One connection, one remote script. Raises GateRefused (changed key) or RemoteError."""
    with Remote(endpoint) as remote:
        result = remote.run(script(), timeout=SCRIPT_TIMEOUT, privileged=False)
    return parse(result.stdout)


@dataclass
class Gathered:
    rows: list[HostStatus]
    evaluation_errors: list[str]
    state: gitstate.GitState | None


def eval_key(target: Target) -> tuple[str, ...]:
    """The flags that change what a host's attribute evaluates to."""
    from rebuild.nixos import evaluation_args

    return tuple(evaluation_args(target.settings.extra_args))


def gather(
    loaded: Loaded,
    targets: list[Target],
    endpoints: dict[str, Endpoint],
    *,
    probe_host: Callable[[Endpoint], Probe] = probe,
) -> Gathered:
    """Every host's probe in parallel with the evaluations of HEAD.

    The evaluations start first: they are the long pole of a fleet (CPU-bound, one process per
    set of flags), and the git read they need takes a few milliseconds, where twenty
    connections' handshakes, started first, held the interpreter long enough to delay it
    (measured with 20 hosts: the evaluator started 165 ms after the connections, not 6 ms)."""
    from rebuild.deploy import head_flake_ref
    from rebuild.hostrun import expected_systems

    connections = ThreadPoolExecutor(max_workers=max(1, min(MAX_CONNECTIONS, len(targets))))
    evaluations = ThreadPoolExecutor(max_workers=MAX_EVALUATIONS)
    try:
        state = gitstate.read(loaded.flake_dir) if loaded.flake_dir else None
        flake = head_flake_ref(loaded, state)
        # one evaluator for every host that evaluates with the same flags
        groups: dict[tuple[str, ...], list[Target]] = {}
        for target in targets:
            groups.setdefault(eval_key(target), []).append(target)
        futures = {
            key: evaluations.submit(expected_systems, loaded, group, flake)
            for key, group in groups.items()
        }
        probes = {t.name: connections.submit(probe_host, endpoints[t.name]) for t in targets}
        expected: dict[tuple[tuple[str, ...], str], str | None] = {}
        errors: list[str] = []
        for key, future in futures.items():
            for attr, system in future.result().items():
                expected[key, attr] = system if isinstance(system, str) else None
                if not isinstance(system, str):
                    errors.append(str(system))
        rows = []
        for target in targets:
            try:
                found = probes[target.name].result()
            except GateRefused as exc:
                rows.append(HostStatus(target.name, False, error=str(exc), refused=True))
                continue
            except RebuildError as exc:
                rows.append(HostStatus(target.name, False, error=str(exc)))
                continue
            rows.append(host_status(target.name, found, expected[eval_key(target), target.attr]))
        return Gathered(rows, errors, state)
    finally:
        connections.shutdown(wait=True)
        evaluations.shutdown(wait=True)


def _checks(row: HostStatus) -> list[dict[str, object]]:
    if not row.reachable:
        return [{"name": "reachable", "ok": False, "detail": row.error or "unreachable"}]
    drift = (
        "HEAD did not evaluate"
        if row.expected_system is None
        else f"runs {row.current_system}, HEAD is {row.expected_system}"
        if row.drift
        else f"runs {row.current_system} (HEAD)"
    )
    return [
        {"name": "reachable", "ok": True, "detail": "answered"},
        {"name": "no drift", "ok": row.expected_system is not None and not row.drift,
         "detail": drift},
        {"name": "no failed units", "ok": not row.failed_units,
         "detail": ", ".join(row.failed_units) or "none"},
    ]  # fmt: skip


def record(run_id: str, loaded: Loaded, target: Target, operator: dict[str, str],
           state: gitstate.GitState | None, started: float) -> audit.Record:  # fmt: skip
    return audit.Record(
        run_id=run_id,
        host=target.name,
        address=target.address,
        action="status",
        flake=loaded.flake,
        attr=target.attr,
        operator=operator,
        event="status",
        commit=state.commit if state else None,
        dirty=bool(state and state.dirty),
        duration_s=round(time.monotonic() - started, 3),
    )


def run(loaded: Loaded, targets: list[Target], console: Console, *, json_mode: bool = False) -> int:
    """`invoke status`; returns the exit code (see `exit_code`)."""
    from rebuild.hostrun import endpoint_for

    started = time.monotonic()
    run_id = audit.new_run_id()
    me = identity.current()
    operator = {"name": "", "hostname": me.hostname, "machine_id": me.machine_id}
    endpoints = {t.name: endpoint_for(loaded, t) for t in targets}
    audit.check_writable(loaded.audit_log)  # the audit gate: nothing runs unrecorded (exit 3)
    try:
        operator["name"] = operator_gate(loaded, me)
        host_key_gate(endpoints.values())
    except RebuildError as exc:
        for target in targets:
            refused = record(run_id, loaded, target, operator, None, started)
            refused.result, refused.exit_code, refused.message = (
                str(exc.result), exc.exit_code, str(exc))  # fmt: skip
            _append(loaded, refused, console)
        raise
    audited = True
    gathered = gather(loaded, targets, endpoints)
    by_name = {t.name: t for t in targets}
    for row in gathered.rows:
        rec = record(run_id, loaded, by_name[row.host], operator, gathered.state, started)
        result = result_of(row)
        rec.result, rec.exit_code = str(result), result.exit_code
        rec.message = row.error or summary([row])
        rec.expected_system = row.expected_system
        rec.final_system = row.current_system
        rec.checks = _checks(row)
        rec.extra.update(
            booted_system=row.booted_system, drift=row.drift, reachable=row.reachable,
            reboot_needed=row.reboot_needed, reboot_reasons=list(row.reboot_reasons),
            failed_units=list(row.failed_units), last_deploy=row.last_deploy,
        )  # fmt: skip
        audited = _append(loaded, rec, console) and audited
    for message in gathered.evaluation_errors:
        console.error(f"{message}; drift is unknown for its hosts")
    code = exit_code(gathered.rows, evaluation_failed=bool(gathered.evaluation_errors))
    if not audited:  # as for a deploy: a record that could not be written fails the run
        code = most_severe([code, Result.ERROR.exit_code])
    if json_mode:
        console.json({"hosts": [row.to_json() for row in gathered.rows]})
        return code
    console.table(table_rows(gathered.rows))
    for row in gathered.rows:
        if not row.reachable:
            console.say(f"{row.host}: unreachable: {row.error}")
        elif row.drift:
            console.say(f"{row.host}: runs {row.current_system}, HEAD is {row.expected_system}")
    console.say(summary(gathered.rows))
    return code


def _append(loaded: Loaded, rec: audit.Record, console: Console) -> bool:
    """Append the record; when it cannot be written it is shown on stderr (never lost)."""
    try:
        audit.append(loaded.audit_log, rec)
    except (RebuildError, OSError) as exc:
        console.error(f"the audit record of {rec.host} was not written: {exc}; it follows")
        console.notice(json.dumps(audit.redact_value(rec.to_json()), sort_keys=True))
        return False
    return True
