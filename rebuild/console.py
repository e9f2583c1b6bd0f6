"""The one place that prints to the operator and reads the confirmation."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from rebuild.verify import Report


class Console:
    """Thread-safe, whole-line output; with --json human output goes to stderr."""

    def __init__(self, *, json_mode: bool = False, out: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.out = out or (sys.stderr if json_mode else sys.stdout)
        self._lock = threading.Lock()

    def say(self, text: str = "") -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def host_line(self, host: str, line: str) -> None:
        self.say(f"[{host}] {line}")

    def error(self, text: str) -> None:
        with self._lock:
            sys.stderr.write(f"error: {text}\n")
            sys.stderr.flush()

    def report(self, report: Report, title: str = "verification") -> None:
        lines = [f"[{report.host}] {title}: {'PASS' if report.ok else 'FAIL'}"]
        for check in report.checks:
            mark = "ok  " if check.ok else "FAIL"
            lines.append(f"[{report.host}]   {mark} {check.name}: {check.detail}")
        self.say("\n".join(lines))

    def ask(self, question: str) -> str:
        """Ask on the terminal; EOF is an empty answer. Ctrl-C propagates."""
        with self._lock:
            self.out.write(question)
            self.out.flush()
        try:
            return sys.stdin.readline().strip() if not sys.stdin.closed else ""
        except (EOFError, OSError):
            return ""


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (ValueError, OSError):
        return False
