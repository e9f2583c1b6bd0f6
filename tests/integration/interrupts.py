"""Helpers for the Ctrl-C tests: a loaded machine, a running `invoke` whose output is watched
for the line that marks the phase to interrupt, and SIGINT inherited as ignored.

An operator's Ctrl-C must work at every moment, on a busy machine too, and also when rebuild
was started with SIGINT ignored: a background job of a non-interactive shell (a CI runner, a
script with `&`) inherits that, and Python then installs no KeyboardInterrupt handler.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

BUSY_SECONDS = 300  # each busy loop ends by itself after this, whatever happens to the test
BUSY_LOOP = (
    "import time\n"
    f"end = time.monotonic() + {BUSY_SECONDS}\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)

# Runs `argv` with SIGINT ignored, as a background job of a non-interactive shell would.
IGNORING_SIGINT = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)

SIGINT_DISPOSITIONS = ("default", "ignored")


def launch(argv: Sequence[str], sigint: str) -> list[str]:
    """`argv` as started with SIGINT at its default or ignored (inherited)."""
    if sigint == "default":
        return list(argv)
    return [sys.executable, "-c", IGNORING_SIGINT, *argv]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def busy_cores(count: int | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every core kept busy by a busy loop (bounded by BUSY_SECONDS), killed by PID at the
    end. The loops must still be running at the end and have used CPU: always runnable, they
    competed with the test for the whole time."""
    loops = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)
        for _ in range(count or os.cpu_count() or 2)
    ]
    try:
        yield loops
        running = [loop.poll() is None for loop in loops]
        used = [cpu_seconds(loop.pid) for loop in loops]
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait(timeout=10)
    assert all(running) and all(seconds > 0.2 for seconds in used), (running, used)


class Watched:
    """A running command whose stdout and stderr lines are collected as they come."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(pipe, lines), daemon=True)
            for pipe, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, pipe: object, lines: list[str]) -> None:
        for line in iter(pipe.readline, ""):  # type: ignore[attr-defined]
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        """Until a line of stdout contains `text` (the phase has begun); fails after
        `timeout` seconds or when the command ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.out):
                left = deadline - time.monotonic()
                assert left > 0, f"no line with {text!r} in {timeout}s:\n{self.transcript()}"
                assert self.proc.poll() is None, f"ended before {text!r}:\n{self.transcript()}"
                self._changed.wait(min(left, 0.5))

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the end: (exit code, stdout, stderr)."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code, "".join(self.out), "".join(self.err)

    def transcript(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
