"""Every task answers `invoke TASK --help` with its flags, and a missing --host is exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import launcher

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args]
    return launcher.run(argv, env=os.environ, cwd=REPO, timeout=60)


def tasks() -> list[str]:
    listing = json.loads(invoke("--list-format=json", "--list").stdout)
    return sorted(t["name"] for t in listing["tasks"])


@pytest.mark.parametrize("task", tasks())
def test_task_help(task: str) -> None:
    """`invoke TASK --help` prints the task's usage and exits 0 (never runs the task)."""
    done = invoke(task, "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.parametrize("task", ["verify", "rollback", "image", "enroll"])
def test_missing_host_is_usage_error(task: str) -> None:
    """A one-host task without --host exits 2 with a one-line error."""
    done = invoke(task)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --host NAME is required (see `invoke hosts`)"


def test_rebuild_help_documents_every_flag() -> None:
    """`invoke --help rebuild` lists every flag of the contract."""
    out = invoke("--help", "rebuild").stdout
    for flag in ("--host", "--tag", "--all", "--action", "--yes", "--dry-run", "--allow-dirty",
                 "--no-verify", "--no-rollback", "--json", "--batch", "--canary", "--max-fail",
                 "--jobs", "--inventory"):  # fmt: skip
        assert flag in out, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("rebuild", "--host", "vps", "--batch", "abc"), "bad flag value"),
        (("rebuild", "--host", "vps", "--bogus"), "No idea what '--bogus' is"),
        (("nosuchtask",), "No idea what 'nosuchtask' is"),
        (("rebuild", "--host", "vps", "--action", "reboot"), "unknown --action 'reboot'"),
    ],
)
def test_bad_usage_is_exit_2_without_traceback(args: tuple[str, ...], message: str) -> None:
    """A bad flag, flag value or task name is one error line and exit 2, never a traceback."""
    done = invoke(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
