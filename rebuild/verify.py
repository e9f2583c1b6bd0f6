"""Verification: facts + inventory → check results (pure), retried while the system settles."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rebuild.errors import RemoteError
from rebuild.facts import Facts
from rebuild.inventory import VerifySpec

RETRY_INTERVAL = 1.0


@dataclass(frozen=True)
class Check:
    """One line of the verification report."""

    name: str
    ok: bool
    detail: str
    pending: bool = False  # may still pass while the system settles

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("pending")
        return data


@dataclass(frozen=True)
class Report:
    host: str
    current_system: str | None
    expected_system: str | None
    checks: tuple[Check, ...]
    reachable: bool = True  # False: the host stopped answering (the only check is `ssh`)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "ok": self.ok,
            "current_system": self.current_system,
            "expected_system": self.expected_system,
            "checks": [c.to_json() for c in self.checks],
        }


def evaluate(
    facts: Facts, spec: VerifySpec, expected: str | None, *, boot: bool = False
) -> list[Check]:
    """Every check for one set of facts; `boot` checks the profile only (services unchanged)."""
    checks = [Check("ssh", True, "host answers")]
    if boot:
        got = facts.profile_system
        checks.append(
            Check("system-profile", got == expected or expected is None,
                  f"profile is {got or 'unknown'}" if got == expected or expected is None
                  else f"profile is {got or 'unknown'}, expected {expected}")
        )  # fmt: skip
        return checks
    got = facts.current_system
    if expected is None:
        checks.append(Check("current-system", got is not None, f"running {got or 'unknown'}"))
    elif got == expected:
        checks.append(Check("current-system", True, f"running {got}"))
    else:
        detail = f"drift: running {got or 'unknown'}, expected {expected}"
        checks.append(Check("current-system", False, detail))
    state = facts.system_state or "unknown"
    if state == "running":
        checks.append(Check("system-state", True, "running"))
    elif state in ("starting", "initializing"):
        checks.append(Check("system-state", False, f"{state} (still settling)", pending=True))
    elif state == "degraded":
        failed = ", ".join(facts.failed_units) or "none listed"
        checks.append(Check("system-state", False, f"degraded; failed units: {failed}"))
    else:
        checks.append(Check("system-state", False, state))
    if facts.failed_units:
        checks.append(Check("failed-units", False, ", ".join(facts.failed_units)))
    else:
        checks.append(Check("failed-units", True, "none"))
    for unit in spec.units:
        st = facts.units.get(unit)
        if st is None or st.load == "not-found":
            checks.append(Check(f"unit {unit}", False, "not found"))
        elif st.active == "active":
            checks.append(Check(f"unit {unit}", True, f"active ({st.sub})"))
        else:
            pending = st.active in ("activating", "reloading", "inactive")
            checks.append(Check(f"unit {unit}", False, f"{st.active} ({st.sub})", pending=pending))
    for port in spec.ports:
        listening = port in facts.listening
        checks.append(
            Check(f"port {port}", listening, "listening" if listening else "not listening",
                  pending=not listening)
        )  # fmt: skip
    for i, http in enumerate(spec.http):
        got_status = facts.http.get(i, "")
        ok = got_status == str(http.status)
        detail = (
            f"answered {got_status}"
            if got_status.isdigit() and got_status != "000"
            else (f"no answer ({got_status or 'nothing'})")
        )
        if not ok:
            detail += f", expected {http.status}"
        checks.append(Check(f"http {http.url}", ok, detail, pending=not ok))
    for i, command in enumerate(spec.commands):
        outcome = facts.commands.get(i)
        if outcome is None:
            checks.append(Check(f"command {command.name}", False, "did not run", pending=True))
        elif outcome.returncode == 0:
            checks.append(Check(f"command {command.name}", True, "exit 0"))
        else:
            tail = outcome.tail.replace("\n", " | ")
            detail = f"exit {outcome.returncode}" + (f": {tail}" if tail else "")
            checks.append(Check(f"command {command.name}", False, detail, pending=True))
    return checks


def settled(checks: list[Check]) -> bool:
    """Stop retrying when all pass, or when a failure cannot go away by waiting."""
    failing = [c for c in checks if not c.ok]
    return not failing or any(not c.pending for c in failing)


def run_checks(
    gather: Callable[[], Facts],
    spec: VerifySpec,
    expected: str | None,
    *,
    host: str,
    boot: bool = False,
    settle_timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Report:
    """Gather facts and evaluate, retrying pending failures until settle_timeout."""
    deadline = clock() + (spec.settle_timeout if settle_timeout is None else settle_timeout)
    attempts = 0
    while True:
        attempts += 1
        try:
            facts = gather()
        except RemoteError as exc:
            return Report(host, None, expected, (Check("ssh", False, str(exc)),), reachable=False)
        checks = evaluate(facts, spec, expected, boot=boot)
        if settled(checks) or clock() >= deadline or attempts >= 10_000:
            return Report(host, facts.current_system if not boot else facts.profile_system,
                          expected, tuple(checks))  # fmt: skip
        sleep(min(RETRY_INTERVAL, max(0.0, deadline - clock())))
