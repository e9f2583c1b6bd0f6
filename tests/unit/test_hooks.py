"""Hooks: `[[hooks]]` validation, which hooks a result runs, and the runner under a real sh
(stdin, environment, exit codes, the time bound)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from rebuild import audit
from rebuild.console import Console
from rebuild.errors import ConfigError
from rebuild.hooks import hook_env, record_json, run_hook, run_hooks, shown, wanted
from rebuild.inventory import Hook, Loaded, parse


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def record(result: str = "rolled_back", exit_code: int = 7, **kw: object) -> audit.Record:
    rec = audit.Record(
        run_id="20261130-170000-abcdef", host="vps", address="203.0.113.10", action="switch",
        flake="/src/flake", attr="vps",
        operator={"name": "work-laptop", "hostname": "laptop", "machine_id": "0" * 32},
        commit="4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b", result=result, exit_code=exit_code,
    )  # fmt: skip
    for key, value in kw.items():
        setattr(rec, key, value)
    return rec


def loaded(tmp_path: Path, hooks: str) -> Loaded:
    path = tmp_path / "inventory.toml"
    return Loaded(path, parse(path, '[hosts.vps]\naddress = "203.0.113.10"\n' + hooks))


def capture() -> tuple[Console, io.StringIO]:
    err = io.StringIO()
    return Console(out=io.StringIO(), data=io.StringIO(), err=err), err


class TestInventory:
    def test_hooks_parse(self, tmp_path: Path) -> None:
        inv = loaded(tmp_path, '[[hooks]]\non = ["ok", "error"]\nrun = "true"\n'
                               '[[hooks]]\nrun = "echo all"\n').inventory  # fmt: skip
        assert inv.hooks == (Hook(on=("ok", "error"), run="true"), Hook(run="echo all"))
        assert loaded(tmp_path, "").inventory.hooks == ()

    @pytest.mark.parametrize(
        ("text", "where"),
        [
            ('[[hooks]]\non = ["okay"]\nrun = "true"\n', "hooks[0].on[0]"),
            ('[[hooks]]\nrun = ""\n', "hooks[0].run"),
            ("[[hooks]]\non = []\n", "hooks[0].run"),
            ('[[hooks]]\nrun = "true"\nwhen = "always"\n', "hooks[0].when"),
        ],
        ids=["unknown-result", "empty-run", "no-run", "unknown-key"],
    )
    def test_bad_hooks_are_exit_2(self, tmp_path: Path, text: str, where: str) -> None:
        with pytest.raises(ConfigError) as caught:
            loaded(tmp_path, text)
        assert caught.value.exit_code == 2
        assert where in str(caught.value)


class TestSelection:
    def test_on(self) -> None:
        every, failures = Hook(run="a"), Hook(on=("rolled_back", "error"), run="b")
        assert wanted((every, failures), "ok") == [every]
        assert wanted((every, failures), "rolled_back") == [every, failures]
        assert wanted((), "ok") == []

    def test_environment(self) -> None:
        env = hook_env(record(commit=None), {"PATH": "/bin", "REBUILD_HOST": "stale"})
        assert env == {
            "PATH": "/bin", "REBUILD_RUN_ID": "20261130-170000-abcdef", "REBUILD_HOST": "vps",
            "REBUILD_RESULT": "rolled_back", "REBUILD_EXIT_CODE": "7", "REBUILD_COMMIT": "",
            "REBUILD_OPERATOR": "work-laptop",
        }  # fmt: skip

    def test_stdin_is_the_redacted_record(self) -> None:
        rec = record()
        rec.extra["sudo_password"] = "hunter2"
        data = json.loads(record_json(rec))
        assert data["host"] == "vps" and data["result"] == "rolled_back"
        assert data["sudo_password"] == "[redacted]"

    def test_shown_is_short(self) -> None:
        assert shown(Hook(run="echo   a\n b")) == "echo a b"
        assert len(shown(Hook(run="x" * 200))) == 60


class TestRunner:
    def test_stdin_env_and_output(self) -> None:
        """The hook reads the record on stdin and sees the REBUILD_* variables."""
        hook = Hook(run='read -r line; printf "%s %s\\n" "$REBUILD_HOST" "${#line}"; exit 0')
        done = run_hook(hook, '{"a": 1}\n', {"PATH": os.environ["PATH"], "REBUILD_HOST": "vps"})
        assert done.ok and done.output == "vps 8\n"

    def test_exit_code(self) -> None:
        done = run_hook(Hook(run="echo bad >&2; exit 9"), "", {"PATH": os.environ["PATH"]})
        assert done.returncode == 9 and not done.ok and done.problem == "exit code 9"
        assert done.output == "bad\n"

    def test_hook_that_ignores_stdin(self) -> None:
        """A hook that exits without reading a large stdin still reports its exit code."""
        done = run_hook(Hook(run="exit 0"), "x" * 1_000_000, {"PATH": os.environ["PATH"]})
        assert done.ok

    def test_timeout_kills_the_group(self, tmp_path: Path) -> None:
        """A hook past its time is killed with its children, in bounded time."""
        marker = tmp_path / "child"
        hook = Hook(run=f"(sleep 30; touch {marker}) & sleep 30")
        started = time.monotonic()
        done = run_hook(hook, "", {"PATH": os.environ["PATH"]}, timeout=0.5)
        assert time.monotonic() - started < 10
        assert done.returncode is None and "timed out after 0.5s" in (done.problem or "")
        assert not marker.exists()


class TestRunHooks:
    def test_runs_the_wanted_hooks_in_order(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        text = (
            f'[[hooks]]\nrun = "echo first >> {out}"\n'
            f'[[hooks]]\non = ["ok"]\nrun = "echo never >> {out}"\n'
            f'[[hooks]]\non = ["rolled_back"]\nrun = "echo third >> {out}"\n'
        )
        inv = loaded(tmp_path, text)
        console, err = capture()
        done = run_hooks(inv, record(), console)
        assert [d.ok for d in done] == [True, True]
        assert out.read_text() == "first\nthird\n"
        assert err.getvalue() == ""

    def test_failure_is_one_line_and_never_raises(self, tmp_path: Path) -> None:
        inv = loaded(tmp_path, '[[hooks]]\nrun = "exit 4"\n[[hooks]]\nrun = "true"\n')
        console, err = capture()
        done = run_hooks(inv, record(), console)
        assert [d.returncode for d in done] == [4, 0]
        assert err.getvalue() == (
            "warning: [vps] hook `exit 4` failed: exit code 4 (the run's exit code is unchanged)\n"
        )

    def test_output_goes_to_stderr_prefixed(self, tmp_path: Path) -> None:
        inv = loaded(tmp_path, '[[hooks]]\nrun = "echo posted"\n')
        console, err = capture()
        run_hooks(inv, record(), console)
        assert err.getvalue() == "[vps] hook: posted\n"

    def test_dry_run_runs_nothing(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        inv = loaded(tmp_path, f'[[hooks]]\nrun = "touch {out}"\n')
        console, _ = capture()
        assert run_hooks(inv, record("ok", 0, overrides=["dry-run"]), console) == []
        assert not out.exists()
