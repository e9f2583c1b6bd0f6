"""The tests' warm launcher for `python -m invoke` (tests/support/launcher.py): a run forked
from it is the same process to the program as a fresh interpreter's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import launcher

TASKS = textwrap.dedent(
    """
    import os, signal, sys
    from invoke import Exit, task

    @task
    def show(c, code=0, sleep=0):
        print(os.getcwd(), os.environ.get("PROBE"), sys.argv[0], sys.path[0])
        print(sys.stdout.encoding, sys.stdout.line_buffering, sys.stdin.read() == "")
        print(signal.getsignal(signal.SIGPIPE), signal.getsignal(signal.SIGINT))
        print("rebuild" in sys.modules, os.getppid())
        sys.stderr.write("to stderr\\n")
        if sleep:
            import time
            time.sleep(float(sleep))
        raise Exit(code=int(code))
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path


def argv(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", "--search-root", str(project), "show", *args]


def test_a_forked_run_is_what_a_fresh_one_is(project: Path) -> None:
    """Same output, streams, signal dispositions, exit code; only the parent differs."""
    env = {**os.environ, "PROBE": "seen"}
    fresh = subprocess.run(argv(project, "--code", "7"), env=env, cwd=project,
                           capture_output=True, text=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)  # fmt: skip
    forked = launcher.run(argv(project, "--code", "7"), env=env, cwd=project, timeout=60)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (
        7, "to stderr\n")  # fmt: skip
    *same, parent = fresh.stdout.rsplit(" ", 1)
    *same_forked, forked_parent = forked.stdout.rsplit(" ", 1)
    assert same == same_forked
    assert f"{project} seen " in fresh.stdout and "False" in fresh.stdout  # no rebuild yet
    assert int(parent) == os.getpid() != int(forked_parent)


def test_a_different_start_up_environment_runs_fresh(project: Path) -> None:
    """PYTHON* and locale variables act before any code runs: such a run is not forked."""
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    done = launcher.run(argv(project), env=env, cwd=project, timeout=60)
    assert done.returncode == 0
    assert int(done.stdout.split()[-1]) == os.getpid()


def test_a_run_past_its_timeout_is_killed(project: Path) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        launcher.run(argv(project, "--sleep", "60"), env=os.environ, cwd=project, timeout=1)
    assert time.monotonic() - started < 30


def test_an_ignored_signal_stays_ignored_as_through_exec(project: Path) -> None:
    """A caller that ignores SIGINT (a job started in the background) starts programs that
    ignore it too, and Python then leaves it ignored: a forked run inherits that as well."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fresh = subprocess.run(argv(project), capture_output=True, text=True, timeout=60,
                               check=False, stdin=subprocess.DEVNULL, cwd=project)  # fmt: skip
        forked = launcher.run(argv(project), env=os.environ, cwd=project, timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    ignored = f"{int(signal.SIG_IGN)} {int(signal.SIG_IGN)}"  # SIGPIPE's, SIGINT's (3rd line)
    assert fresh.stdout.splitlines()[2] == forked.stdout.splitlines()[2] == ignored


def test_runs_start_fresh_once_the_server_is_gone(project: Path) -> None:
    """A server that has ended takes no run: it runs in a fresh interpreter instead, once."""
    server = launcher._the_server()
    assert server is not None
    server.stop()
    try:
        done = launcher.run(argv(project, "--code", "3"), env=os.environ, cwd=project, timeout=60)
        assert done.returncode == 3
        assert int(done.stdout.split()[-1]) == os.getpid()  # its parent: this process
    finally:
        launcher._server.clear()  # the next test in this process starts a new one
