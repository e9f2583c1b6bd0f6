"""The one subprocess seam: every local program rebuild runs goes through here."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

TAIL_LINES = 20


@dataclass(frozen=True)
class Completed:
    """A finished program: its exit code, and its output (captured or the last lines)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 120,
) -> Completed:
    """Run a program to completion and capture its output (for git and nix eval)."""
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return Completed(tuple(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Completed(tuple(argv), 124, "", f"{argv[0]}: timed out after {timeout:g}s")
    return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child (and its process group): SIGINT, then SIGTERM, then SIGKILL, bounded."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_line: Callable[[str], None],
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> Completed:
    """Run a long program, handing every whole line of its output to `on_line` as it comes.

    The child runs in its own session, so Ctrl-C reaches rebuild only; rebuild then stops the
    child (KeyboardInterrupt is re-raised after it is gone). When `cancel` is set (Ctrl-C seen by
    another thread) the child is stopped the same way and the result's code is 130. `stderr` of
    the result holds the last lines of the merged output.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lock = threading.Lock()
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        return Completed(tuple(argv), 127, "", f"{argv[0]}: command not found")

    def pump(pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with lock:
                tail.append(line)
                on_line(line)

    readers = [
        threading.Thread(target=pump, args=(pipe,), daemon=True)
        for pipe in (proc.stdout, proc.stderr)
        if pipe is not None
    ]
    for reader in readers:
        reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                returncode = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                _stop(proc)
                returncode = 130
                tail.append(f"{argv[0]}: stopped (interrupted)")
                break
            if deadline is not None and time.monotonic() > deadline:
                _stop(proc)
                returncode = 124
                tail.append(f"{argv[0]}: timed out after {timeout:g}s")
                break
    except KeyboardInterrupt:
        _stop(proc)
        for reader in readers:
            reader.join(timeout=2)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if returncode < 0:
        returncode = 128 - returncode
    return Completed(tuple(argv), returncode, "", "\n".join(tail))
