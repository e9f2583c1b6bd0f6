"""Process helpers for the test bed: start detached processes, record them, end exactly those.

Every process the test bed (or a simulated host) starts in the background is recorded by pid
*and* kernel start time, so that teardown never signals a recycled pid that now belongs to
somebody else.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def proc_start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of a live process, None if gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    try:
        rest = data[data.rindex(")") + 2 :].split()
        state = rest[0]
        start = int(rest[19])
    except (ValueError, IndexError):
        return None
    if state in ("Z", "X", "x"):
        return None
    return start


def proc_parent(pid: int) -> int | None:
    """Parent pid of a process, None if it cannot be read."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return int(data[data.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def children_of(pid: int) -> list[int]:
    """Direct children of a process (scans /proc; fine for a test bed)."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_parent(int(entry.name)) == pid:
            kids.append(int(entry.name))
    return kids


def is_alive(pid: int, start: int | None = None) -> bool:
    """True when pid is a live (non-zombie) process, and the same one when start is given."""
    current = proc_start_time(pid)
    return current is not None and (start is None or current == start)


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def terminate(pid: int, start: int | None, *, timeout: float = 3.0) -> bool:
    """Stop one recorded process (its whole process group when it leads one).

    SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns True when the process is
    gone afterwards. Does nothing when the pid now belongs to another process.
    """
    if not is_alive(pid, start):
        return True
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return True
    _signal(pid, signal.SIGTERM, group)
    deadline = time.monotonic() + timeout
    pause = 0.001  # most processes are gone within a millisecond or two: look again soon
    while time.monotonic() < deadline:
        if not is_alive(pid, start):
            if group:
                # the leader is gone; make sure nothing else of its group survives
                _signal(pid, signal.SIGKILL, True)
            return True
        time.sleep(pause)
        pause = min(0.02, pause * 2)
    if is_alive(pid, start):
        _signal(pid, signal.SIGKILL, group)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and is_alive(pid, start):
        time.sleep(0.02)
    return not is_alive(pid, start)


def wait_child(proc: subprocess.Popen[Any], timeout: float) -> int:
    """``proc.wait(timeout)`` that returns the moment the child ends. CPython's own polls with
    sleeps growing to 50 ms, so every simulated command waited on that way ended up to 50 ms
    late, where the real program (a blocking ``wait``) does not. Raises TimeoutExpired."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return proc.wait(timeout=timeout)
    try:
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        if not waiter.poll(max(0.0, timeout) * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def run_unpiped(argv: Sequence[str], *, timeout: float, **popen: Any) -> int:
    """``subprocess.run(argv, timeout=...).returncode`` for a child with no pipes of ours,
    without the 50 ms poll (see `wait_child`); the child is killed past its timeout."""
    with subprocess.Popen(list(argv), **popen) as proc:
        try:
            return wait_child(proc, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


class PidRegistry:
    """A directory of ``<pid>`` files holding ``<start time> <label>``: what teardown must end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, pid: int, label: str) -> None:
        start = proc_start_time(pid)
        if start is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name: a process and the one that started it may both
        # register it at once (systemd-run's wrapper), and one temporary file would race
        tmp = self.directory / f".{pid}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        tmp.write_text(f"{start} {label}\n", encoding="utf-8")
        tmp.replace(self.directory / str(pid))

    def remove(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / str(pid)).unlink()

    def entries(self) -> list[tuple[int, int, str]]:
        """(pid, start time, label) of every recorded process."""
        out: list[tuple[int, int, str]] = []
        if not self.directory.is_dir():
            return out
        for entry in sorted(self.directory.iterdir()):
            if not entry.name.isdigit():
                continue
            try:
                start_text, _, label = entry.read_text(encoding="utf-8").strip().partition(" ")
                out.append((int(entry.name), int(start_text), label))
            except (OSError, ValueError):
                continue
        return out

    def terminate_all(self, *, timeout: float = 3.0) -> list[str]:
        """End every recorded process that is still the one recorded; returns failures."""
        failures: list[str] = []
        entries = self.entries()
        # signal everything first so that many processes do not cost many timeouts
        for pid, start, _label in entries:
            if is_alive(pid, start):
                try:
                    group = os.getpgid(pid) == pid
                except ProcessLookupError:
                    continue
                _signal(pid, signal.SIGTERM, group)
        for pid, start, label in entries:
            if not terminate(pid, start, timeout=timeout):
                failures.append(f"{pid} ({label})")
            self.remove(pid)
        return failures


def spawn_detached(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path | None,
    cwd: str = "/",
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a process in its own session with no tie to the caller's terminal or pipes.

    Output goes to ``log`` (appended) unless explicit stdout/stderr are given, so that an SSH
    session that started it can end without waiting for it.
    """
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            return subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                env=dict(env),
                cwd=cwd,
            )
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        env=dict(env),
        cwd=cwd,
    )
