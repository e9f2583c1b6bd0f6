"""Verification: facts + inventory → checks, and the retry loop while the system settles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rebuild.errors import RemoteError
from rebuild.facts import CommandOutcome, Facts, UnitState, parse
from rebuild.inventory import CommandCheck, HttpCheck, VerifySpec
from rebuild.verify import Check, Report, evaluate, run_checks, settled

DATA = Path(__file__).parent / "data"
NEW = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-24.11.20241120.2ac5bf0"
OLD = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-24.11.20241101.1e2f3a4"

SPEC = VerifySpec(
    units=("sshd.service", "nginx.service"),
    ports=(22, 443),
    http=(HttpCheck(url="https://127.0.0.1/", status=200),),
    commands=(CommandCheck(name="secrets decrypted", run="test -s /run/secrets/example"),),
    settle_timeout=30,
)

ACTIVE = UnitState("loaded", "active", "running")


def healthy(**overrides: Any) -> Facts:
    values: dict[str, Any] = {
        "current_system": NEW,
        "profile_system": NEW,
        "system_state": "running",
        "failed_units": (),
        "units": {"sshd.service": ACTIVE, "nginx.service": ACTIVE},
        "listening": frozenset({22, 443}),
        "http": {0: "200"},
        "commands": {0: CommandOutcome(0, "")},
    }
    values.update(overrides)
    return Facts(**values)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


class TestEvaluate:
    def test_healthy(self) -> None:
        """A host on the expected system with everything up passes every check."""
        checks = evaluate(healthy(), SPEC, NEW)
        assert [c.name for c in checks] == [
            "ssh", "current-system", "system-state", "failed-units",
            "unit sshd.service", "unit nginx.service", "port 22", "port 443",
            "http https://127.0.0.1/", "command secrets decrypted",
        ]  # fmt: skip
        assert all(c.ok for c in checks)

    def test_healthy_recording(self) -> None:
        """The recorded output of a healthy NixOS host passes."""
        facts = parse((DATA / "facts_healthy.txt").read_text(encoding="utf-8"), SPEC)
        assert all(c.ok for c in evaluate(facts, SPEC, NEW))

    def test_drift_names_both_systems(self) -> None:
        """A host on another system fails current-system, naming running and expected paths."""
        check = by_name(evaluate(healthy(current_system=OLD), SPEC, NEW))["current-system"]
        assert not check.ok
        assert not check.pending
        assert OLD in check.detail
        assert NEW in check.detail
        assert check.detail.startswith("drift")

    def test_unknown_current_system(self) -> None:
        """An unreadable /run/current-system is drift from the expected system."""
        check = by_name(evaluate(healthy(current_system=None), SPEC, NEW))["current-system"]
        assert not check.ok
        assert "unknown" in check.detail

    def test_no_expected_system(self) -> None:
        """`invoke verify` without an expectation only requires a known running system."""
        assert by_name(evaluate(healthy(), SPEC, None))["current-system"].ok
        assert not by_name(evaluate(healthy(current_system=None), SPEC, None))["current-system"].ok

    def test_degraded_lists_failed_units(self) -> None:
        """A degraded system fails for good and names its failed units."""
        facts = healthy(system_state="degraded", failed_units=("nginx.service", "acme.service"))
        checks = by_name(evaluate(facts, SPEC, NEW))
        assert checks["system-state"].detail == (
            "degraded; failed units: nginx.service, acme.service"
        )
        assert not checks["system-state"].pending
        assert not checks["failed-units"].ok
        assert checks["failed-units"].detail == "nginx.service, acme.service"

    def test_degraded_recording(self) -> None:
        """The recorded degraded host fails state, units, port, URL and command."""
        facts = parse((DATA / "facts_degraded.txt").read_text(encoding="utf-8"), SPEC)
        failing = {c.name for c in evaluate(facts, SPEC, NEW) if not c.ok}
        assert failing == {
            "system-state", "failed-units", "unit nginx.service", "port 443",
            "http https://127.0.0.1/", "command secrets decrypted",
        }  # fmt: skip

    @pytest.mark.parametrize("state", ["starting", "initializing"])
    def test_starting_is_pending(self, state: str) -> None:
        """A system still starting fails only for now (pending)."""
        check = by_name(evaluate(healthy(system_state=state), SPEC, NEW))["system-state"]
        assert not check.ok
        assert check.pending
        assert "settling" in check.detail

    @pytest.mark.parametrize("state", ["maintenance", "stopping", ""])
    def test_other_states_fail(self, state: str) -> None:
        """Any state other than running fails and is not waited for."""
        check = by_name(evaluate(healthy(system_state=state), SPEC, NEW))["system-state"]
        assert not check.ok
        assert not check.pending
        assert check.detail == (state or "unknown")

    @pytest.mark.parametrize(
        ("state", "pending", "detail"),
        [
            (UnitState("loaded", "inactive", "dead"), True, "inactive (dead)"),
            (UnitState("loaded", "activating", "start"), True, "activating (start)"),
            (UnitState("loaded", "failed", "failed"), False, "failed (failed)"),
            (UnitState("not-found", "inactive", "dead"), False, "not found"),
        ],
    )
    def test_unit_not_active(self, state: UnitState, pending: bool, detail: str) -> None:
        """A listed unit that is not active fails, with its state in the detail."""
        facts = healthy(units={"sshd.service": ACTIVE, "nginx.service": state})
        check = by_name(evaluate(facts, SPEC, NEW))["unit nginx.service"]
        assert (check.ok, check.pending, check.detail) == (False, pending, detail)

    def test_unit_missing_from_output(self) -> None:
        """A unit systemctl said nothing about is not found."""
        facts = healthy(units={"sshd.service": ACTIVE})
        check = by_name(evaluate(facts, SPEC, NEW))["unit nginx.service"]
        assert (check.ok, check.detail) == (False, "not found")

    def test_unit_active_detail(self) -> None:
        """An active unit passes and shows its sub-state."""
        assert by_name(evaluate(healthy(), SPEC, NEW))["unit sshd.service"].detail == (
            "active (running)"
        )

    def test_unit_listed_by_alias(self) -> None:
        """A unit listed under an alias is found through systemctl's answer for it."""
        spec = VerifySpec(units=("dbus.service",))
        output = (
            "@@rebuild-fact@@ units\n"
            "Id=dbus-broker.service\nLoadState=loaded\nActiveState=active\nSubState=running\n"
        )
        check = by_name(evaluate(parse(output, spec), spec, None))["unit dbus.service"]
        assert check.ok

    def test_port_closed(self) -> None:
        """A port nobody listens on fails as not listening (pending: it may still open)."""
        check = by_name(evaluate(healthy(listening=frozenset({22})), SPEC, NEW))["port 443"]
        assert (check.ok, check.detail, check.pending) == (False, "not listening", True)

    def test_http_wrong_status(self) -> None:
        """A URL answering 500 when 200 is expected fails with both codes."""
        check = by_name(evaluate(healthy(http={0: "500"}), SPEC, NEW))["http https://127.0.0.1/"]
        assert (check.ok, check.detail) == (False, "answered 500, expected 200")

    def test_http_expected_non_200(self) -> None:
        """A check expecting 401 passes on 401."""
        spec = VerifySpec(http=(HttpCheck(url="http://127.0.0.1/admin", status=401),))
        facts = healthy(http={0: "401"})
        assert by_name(evaluate(facts, spec, NEW))["http http://127.0.0.1/admin"].ok

    def test_http_no_answer(self) -> None:
        """A connection failure is shown as no answer with curl's message."""
        facts = healthy(http={0: "curl: (7) Failed to connect 000"})
        check = by_name(evaluate(facts, SPEC, NEW))["http https://127.0.0.1/"]
        assert not check.ok
        assert check.detail == "no answer (curl: (7) Failed to connect 000), expected 200"

    def test_command_failing_shows_tail(self) -> None:
        """A failing command shows its exit code and the tail of its output."""
        facts = healthy(commands={0: CommandOutcome(1, "no such file\ndecrypt failed")})
        check = by_name(evaluate(facts, SPEC, NEW))["command secrets decrypted"]
        assert (check.ok, check.detail) == (False, "exit 1: no such file | decrypt failed")

    def test_command_failing_silently(self) -> None:
        """A failing command without output shows just its exit code."""
        facts = healthy(commands={0: CommandOutcome(2, "")})
        assert by_name(evaluate(facts, SPEC, NEW))["command secrets decrypted"].detail == "exit 2"

    def test_boot_checks_the_profile(self) -> None:
        """After boot only the system profile is checked, and it must be the expected system."""
        facts = healthy(current_system=OLD, system_state="degraded")
        checks = evaluate(facts, SPEC, NEW, boot=True)
        assert [(c.name, c.ok) for c in checks] == [("ssh", True), ("system-profile", True)]

    def test_boot_profile_mismatch(self) -> None:
        """A profile still on the old system fails and names both paths."""
        checks = by_name(evaluate(healthy(profile_system=OLD), SPEC, NEW, boot=True))
        assert not checks["system-profile"].ok
        assert checks["system-profile"].detail == f"profile is {OLD}, expected {NEW}"


class TestSettled:
    def test_all_passing(self) -> None:
        """Nothing failing: done."""
        assert settled([Check("a", True, "")])

    def test_only_pending_failures(self) -> None:
        """Only failures that may still clear: keep waiting."""
        assert not settled([Check("a", True, ""), Check("b", False, "", pending=True)])

    def test_a_permanent_failure(self) -> None:
        """One failure that waiting cannot fix: stop now."""
        assert settled([Check("a", False, "", pending=True), Check("b", False, "")])


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def sequence(*facts: Facts) -> tuple[Callable[[], Facts], list[int]]:
    """A gather function returning `facts` in turn (the last one forever), counting calls."""
    calls = [0]
    items: Iterator[Facts] = iter(facts)
    last = [facts[0]]

    def gather() -> Facts:
        calls[0] += 1
        last[0] = next(items, last[0])
        return last[0]

    return gather, calls


class TestRunChecks:
    def test_retries_until_the_system_settles(self) -> None:
        """starting → starting → running: retried, then passes without waiting any longer."""
        time = FakeTime()
        starting = healthy(system_state="starting")
        gather, calls = sequence(starting, starting, healthy())
        report = run_checks(gather, SPEC, NEW, host="vps", clock=time.clock, sleep=time.sleep)
        assert report.ok
        assert calls[0] == 3
        assert time.sleeps == [1.0, 1.0]
        assert report.current_system == NEW

    def test_gives_up_at_settle_timeout_with_last_reason(self) -> None:
        """A system that never settles fails at settle_timeout, with the last reason."""
        time = FakeTime()
        gather, calls = sequence(
            healthy(system_state="starting"), healthy(system_state="starting", http={0: "502"})
        )
        report = run_checks(gather, SPEC, NEW, host="vps", clock=time.clock, sleep=time.sleep)
        assert not report.ok
        assert time.now == pytest.approx(30)
        assert sum(time.sleeps) == pytest.approx(30)
        assert calls[0] == 31
        failing = {c.name: c.detail for c in report.checks if not c.ok}
        assert failing == {
            "system-state": "starting (still settling)",
            "http https://127.0.0.1/": "answered 502, expected 200",
        }

    def test_explicit_settle_timeout(self) -> None:
        """An explicit settle_timeout replaces the inventory's."""
        time = FakeTime()
        gather, _ = sequence(healthy(system_state="starting"))
        run_checks(gather, SPEC, NEW, host="vps", settle_timeout=3.5, clock=time.clock,
                   sleep=time.sleep)  # fmt: skip
        assert time.now == pytest.approx(3.5)

    def test_permanent_failure_is_not_retried(self) -> None:
        """Drift fails at once: no point waiting for the system to change by itself."""
        time = FakeTime()
        gather, calls = sequence(healthy(current_system=OLD, system_state="starting"))
        report = run_checks(gather, SPEC, NEW, host="vps", clock=time.clock, sleep=time.sleep)
        assert not report.ok
        assert calls[0] == 1
        assert time.sleeps == []

    def test_unreachable_host(self) -> None:
        """When facts cannot be gathered the report fails on ssh with the reason."""

        def gather() -> Facts:
            raise RemoteError("vps: connection refused")

        report = run_checks(gather, SPEC, NEW, host="vps", clock=FakeTime().clock)
        assert not report.ok
        assert [c.to_json() for c in report.checks] == [
            {"name": "ssh", "ok": False, "detail": "vps: connection refused"}
        ]

    def test_boot_reports_the_profile(self) -> None:
        """After boot the report's current system is the profile's."""
        gather, _ = sequence(healthy(current_system=OLD))
        report = run_checks(gather, SPEC, NEW, host="vps", boot=True, clock=FakeTime().clock)
        assert report.ok
        assert report.current_system == NEW


class TestReport:
    def test_json_shape(self) -> None:
        """`invoke verify --json` prints host, ok, both systems and name/ok/detail checks."""
        checks = (
            Check("ssh", True, "host answers"),
            Check("port 22", False, "not listening", pending=True),
        )
        report = Report("vps", OLD, NEW, checks)
        assert report.to_json() == {
            "host": "vps",
            "ok": False,
            "current_system": OLD,
            "expected_system": NEW,
            "checks": [
                {"name": "ssh", "ok": True, "detail": "host answers"},
                {"name": "port 22", "ok": False, "detail": "not listening"},
            ],
        }

    def test_no_checks_is_not_ok(self) -> None:
        """A report without a single check never counts as verified."""
        assert not Report("vps", NEW, NEW, ()).ok
