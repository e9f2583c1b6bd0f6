"""The audit trail: run ids, one JSON line per host per run, reading back, redaction."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from rebuild.audit import (
    Record,
    append,
    check_writable,
    iter_summary,
    new_run_id,
    read,
    redact_value,
)
from rebuild.errors import ConfigError, GateRefused
from rebuild.logs import redact
from rebuild.verify import Check

CONTRACT_FIELDS = {
    "run_id", "timestamp", "operator", "host", "address", "action", "flake", "attr", "commit",
    "dirty", "overrides", "command", "expected_system", "result", "exit_code", "checks",
    "duration_s",
}  # fmt: skip
OPERATOR = {"name": "work-laptop", "hostname": "laptop", "machine_id": "0" * 32}
# systemd unit names: ASCII letters, digits, ":", "_", ".", "\", "-" (and "@" for templates).
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+\.timer$")


def record(host: str = "vps", **fields: Any) -> Record:
    rec = Record(
        run_id="20261125-193000-a1b2c3",
        host=host,
        address="203.0.113.10",
        action="switch",
        flake="/srv/infra",
        attr=host,
        operator=dict(OPERATOR),
    )
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


class TestRunId:
    def test_shape(self) -> None:
        """A run id is the UTC date and time plus six hex digits."""
        run_id = new_run_id(dt.datetime(2026, 11, 25, 19, 30, 0, tzinfo=dt.UTC))
        assert re.fullmatch(r"20261125-193000-[0-9a-f]{6}", run_id)

    def test_default_is_now(self) -> None:
        """Without a time the run id starts with today's UTC date."""
        assert new_run_id().startswith(dt.datetime.now(dt.UTC).strftime("%Y%m%d"))

    def test_safe_in_a_systemd_unit_name(self) -> None:
        """The dead-man timer unit built from a run id is a valid systemd unit name."""
        assert UNIT_NAME.fullmatch(f"rebuild-rollback-{new_run_id()}.timer")

    def test_unique(self) -> None:
        """Two runs started in the same second still get different ids."""
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        assert len({new_run_id(now) for _ in range(50)}) > 45

    def test_sortable(self) -> None:
        """A later run sorts after an earlier one."""
        early = new_run_id(dt.datetime(2026, 1, 1, 9, 0, 0, tzinfo=dt.UTC))
        late = new_run_id(dt.datetime(2026, 1, 1, 10, 0, 0, tzinfo=dt.UTC))
        assert early < late


class TestAppendAndRead:
    def test_two_records_read_back_in_order(self, tmp_path: Path) -> None:
        """Appended records come back oldest first, field for field."""
        log = tmp_path / "state" / "rebuild" / "audit.jsonl"
        first = record(result="ok", exit_code=0)
        second = record(host="web", result="refused", exit_code=3)
        append(log, first)
        append(log, second)
        back = read(log)[0]
        assert [(r["host"], r["result"], r["exit_code"]) for r in back] == [
            ("vps", "ok", 0),
            ("web", "refused", 3),
        ]
        assert back[0] == json.loads(json.dumps(first.to_json()))

    def test_one_line_per_record(self, tmp_path: Path) -> None:
        """A multi-line message still makes exactly one JSON line."""
        log = tmp_path / "audit.jsonl"
        append(log, record(message="nixos-rebuild failed:\nerror: builder failed"))
        append(log, record())
        lines = log.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 2
        assert json.loads(lines[0])["message"] == "nixos-rebuild failed:\nerror: builder failed"

    def test_host_filter(self, tmp_path: Path) -> None:
        """Reading for one host returns only that host's records."""
        log = tmp_path / "audit.jsonl"
        for host in ("vps", "web", "vps"):
            append(log, record(host=host))
        assert [r["host"] for r in read(log, host="vps")[0]] == ["vps", "vps"]
        assert read(log, host="lab")[0] == []

    def test_broken_lines_are_skipped(self, tmp_path: Path) -> None:
        """A truncated or foreign line does not hide the good records around it."""
        log = tmp_path / "audit.jsonl"
        append(log, record(host="vps"))
        with log.open("a", encoding="utf-8") as handle:
            handle.write('{"run_id": "cut short\n[1, 2]\n\n')
        append(log, record(host="web"))
        assert [r["host"] for r in read(log)[0]] == ["vps", "web"]

    def test_a_partial_last_line_does_not_swallow_the_next_record(self, tmp_path: Path) -> None:
        """A crash left half a line: the next append ends it first, so its record survives
        (and the broken line is counted, not read)."""
        log = tmp_path / "audit.jsonl"
        append(log, record(host="vps"))
        with log.open("a", encoding="utf-8") as handle:
            handle.write('{"run_id": "cut sho')
        append(log, record(host="web"))
        records, skipped = read(log)
        assert [r["host"] for r in records] == ["vps", "web"] and skipped == 1

    def test_lines_that_are_not_utf8_are_skipped_and_counted(self, tmp_path: Path) -> None:
        """`invoke history` on a log with garbage bytes shows the good records and counts the
        rest, instead of failing."""
        log = tmp_path / "audit.jsonl"
        append(log, record(host="vps"))
        with log.open("ab") as handle:
            handle.write(b"\xff\xfe garbage\n")
        append(log, record(host="web"))
        records, skipped = read(log)
        assert [r["host"] for r in records] == ["vps", "web"] and skipped == 1

    @pytest.mark.parametrize("target", ["symlink", "devnull", "folder"])
    def test_a_log_that_is_not_a_plain_file_is_refused(self, tmp_path: Path, target: str) -> None:
        """The audit log through a symlink (another file would grow), /dev/null (records lost)
        or a folder: refused among the gates (exit 3), nothing written anywhere."""
        log = tmp_path / "audit.jsonl"
        victim = tmp_path / "victim"
        victim.write_text("precious\n", encoding="utf-8")
        if target == "symlink":
            log.symlink_to(victim)
        elif target == "devnull":
            log.symlink_to("/dev/null")
        else:
            log.mkdir()
        with pytest.raises(GateRefused) as caught:
            check_writable(log)
        assert caught.value.exit_code == 3 and str(log) in str(caught.value)
        with pytest.raises(GateRefused):
            append(log, record())
        assert victim.read_text(encoding="utf-8") == "precious\n"

    def test_a_state_folder_that_cannot_be_created_is_refused(self, tmp_path: Path) -> None:
        """A state folder under a file: exit 3 with the mkdir that would fix it."""
        (tmp_path / "file").write_text("", encoding="utf-8")
        with pytest.raises(GateRefused, match="mkdir -p -m 700") as caught:
            check_writable(tmp_path / "file" / "rebuild" / "audit.jsonl")
        assert caught.value.exit_code == 3

    def test_missing_log_is_empty(self, tmp_path: Path) -> None:
        """No audit log yet means no history, not an error."""
        assert read(tmp_path / "none.jsonl")[0] == []

    def test_unreadable_log_is_a_config_error(self, tmp_path: Path) -> None:
        """An audit_log path that is a folder is reported (exit 2) with the path."""
        with pytest.raises(ConfigError, match=str(tmp_path)) as caught:
            read(tmp_path)[0]
        assert caught.value.exit_code == 2

    def test_file_and_folder_are_private(self, tmp_path: Path) -> None:
        """The log is created 0600 in a 0700 folder."""
        log = tmp_path / "state" / "audit.jsonl"
        append(log, record())
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


class TestRecordJson:
    def test_every_contract_field(self, tmp_path: Path) -> None:
        """Each line carries every field the contract lists, with the operator's three keys."""
        log = tmp_path / "audit.jsonl"
        checks = [Check("ssh", True, "host answers").to_json()]
        append(log, record(
            commit="0123456789abcdef0123456789abcdef01234567", dirty=True,
            overrides=["allow-dirty"], command=["nixos-rebuild", "switch"],
            expected_system="/nix/store/x-nixos-system-vps", result="ok", exit_code=0,
            checks=checks, duration_s=12.5,
        ))  # fmt: skip
        (data,) = read(log)[0]
        assert set(data) >= CONTRACT_FIELDS
        assert data["operator"] == OPERATOR
        assert data["checks"] == [{"name": "ssh", "ok": True, "detail": "host answers"}]
        assert data["overrides"] == ["allow-dirty"]
        assert data["command"] == ["nixos-rebuild", "switch"]
        assert (data["dirty"], data["duration_s"]) == (True, 12.5)

    def test_timestamp_is_utc_iso(self) -> None:
        """The timestamp is an ISO 8601 UTC time."""
        stamp = dt.datetime.fromisoformat(str(record().to_json()["timestamp"]))
        assert stamp.utcoffset() == dt.timedelta(0)

    def test_extra_fields_are_flattened(self) -> None:
        """Extra fields appear at the top level of the line, not under 'extra'."""
        data = record(extra={"batch": 2}).to_json()
        assert data["batch"] == 2
        assert "extra" not in data


class TestRedaction:
    def test_secret_keys_never_reach_the_file(self, tmp_path: Path) -> None:
        """Values under password/token/secret keys are replaced before writing, at any depth."""
        log = tmp_path / "audit.jsonl"
        append(log, record(extra={
            "sudo_password": "hunter2",
            "auth": {"Token": "ghp_abcdef", "user": "root"},
            "steps": [{"secret": "s3cr3t"}],
        }))  # fmt: skip
        text = log.read_text(encoding="utf-8")
        for secret in ("hunter2", "ghp_abcdef", "s3cr3t"):
            assert secret not in text
        (data,) = read(log)[0]
        assert data["sudo_password"] == "[redacted]"
        assert data["auth"] == {"Token": "[redacted]", "user": "root"}
        assert data["steps"] == [{"secret": "[redacted]"}]

    def test_ordinary_values_are_kept(self) -> None:
        """Keys that are not secret keep their values."""
        value = {"host": "vps", "command": ["nixos-rebuild", "switch"], "n": 1}
        assert redact_value(value) == value

    def test_log_processor(self) -> None:
        """The structlog processor blanks secret-looking keys of a log event."""
        event = redact(None, "info", {"event": "connect", "password": "hunter2", "host": "vps"})
        assert event == {"event": "connect", "password": "[redacted]", "host": "vps"}

    def test_keys_containing_secret_words(self) -> None:
        """Keys that contain password/token/secret (github_token, db_password) are redacted."""
        data = redact_value({"github_token": "ghp_x", "db_password": "pw"})
        assert data == {"github_token": "[redacted]", "db_password": "[redacted]"}


class TestSummary:
    def test_history_line(self) -> None:
        """`invoke history` shows time, run, host, action, result, exit code, commit, operator."""
        data = record(commit="0123456789abcdef0123", result="rolled_back", exit_code=7).to_json()
        (line,) = iter_summary([data])
        for part in ("20261125-193000-a1b2c3", "vps", "switch", "rolled_back", "exit 7",
                     "0123456789ab", "work-laptop"):  # fmt: skip
            assert part in line
        assert "0123456789abc" not in line

    def test_history_tolerates_missing_fields(self) -> None:
        """An old or partial record still gives a line."""
        (line,) = iter_summary([{"host": "vps"}])
        assert "vps" in line
