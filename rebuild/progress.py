"""Live progress of a fleet rollout on a terminal: one line per host (its phase, the time spent
in it, the last line it printed) redrawn in place, and the waits that take time counting down
(settling checks, the dead-man wait for a lost host, a reboot).

Without a terminal, or for a single host, nothing here draws: every line is printed as it
comes, prefixed with its host, as before. The state is a small dict guarded by a lock; the
drawing is a pure function of it (`render`), tested without a terminal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

REFRESH = 0.5  # seconds between redraws
WIDTH = 120  # a live line is cut to this many characters
CLEAR_LINE = "\x1b[2K"


def up(lines: int) -> str:
    return f"\x1b[{lines}A" if lines > 0 else ""


@dataclass
class HostLine:
    phase: str = "waiting"
    since: float = 0.0
    deadline: float | None = None  # a wait that counts down
    last: str = ""  # the last line the host's programs printed
    done: str = ""  # the result, once finished


def render(hosts: dict[str, HostLine], now: float, width: int = WIDTH) -> list[str]:
    """The live lines: `[host] phase 12s (43s left) | last line` or `[host] ok`."""
    name_width = max((len(name) for name in hosts), default=0)
    lines = []
    for name, state in hosts.items():
        head = f"[{name}]".ljust(name_width + 2)
        if state.done:
            lines.append(f"{head} {state.done}"[:width])
            continue
        text = f"{head} {state.phase} {max(0.0, now - state.since):.0f}s"
        if state.deadline is not None:
            text += f" ({max(0.0, state.deadline - now):.0f}s left)"
        if state.last:
            text += f" | {state.last}"
        lines.append(text[:width])
    return lines


@dataclass
class Progress:
    """One live line per host, redrawn in place on `out` (a terminal)."""

    out: TextIO
    names: list[str]
    clock: Callable[[], float] = time.monotonic
    hosts: dict[str, HostLine] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _drawn: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        now = self.clock()
        self.hosts = {name: HostLine(since=now) for name in self.names}

    def phase(self, host: str, phase: str, deadline: float | None = None) -> None:
        """A host enters a phase; once drawing has started it is drawn at once, so that even
        a phase shorter than the refresh shows (a fast host's switch and verification)."""
        with self._lock:
            state = self.hosts.setdefault(host, HostLine())
            state.phase, state.since, state.deadline = phase, self.clock(), deadline
        if self._thread is not None and not self._stop.is_set():
            self.draw()

    def line(self, host: str, text: str) -> None:
        with self._lock:
            self.hosts.setdefault(host, HostLine()).last = text.strip()

    def finish(self, host: str, result: str) -> None:
        with self._lock:
            self.hosts.setdefault(host, HostLine()).done = result

    def draw(self) -> None:
        with self._lock:
            lines = render(self.hosts, self.clock())
            self.out.write(up(self._drawn) + "".join(f"{CLEAR_LINE}{x}\n" for x in lines))
            self.out.flush()
            self._drawn = len(lines)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(REFRESH):
                self.draw()

        self.draw()
        self._thread = threading.Thread(target=loop, daemon=True, name="progress")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.draw()
