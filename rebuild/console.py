"""The one place that prints to the operator and reads the confirmation."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from rebuild.progress import Progress
from rebuild.verify import Report


class Console:
    """Thread-safe, whole-line output; with --json human output goes to stderr.

    Human lines (`say`, `host_line`, `report`, `table`, `ask`) go to `out`: stdout, or stderr
    in --json mode so that stdout carries only the JSON (`json`). Errors and warnings
    (`error`, `notice`) always go to stderr.
    """

    def __init__(
        self,
        *,
        json_mode: bool = False,
        out: TextIO | None = None,
        data: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.out = out or (sys.stderr if json_mode else sys.stdout)
        self.data = data or sys.stdout
        self.err = err
        self._lock = threading.Lock()
        self.progress: Progress | None = None  # a fleet's live lines on a terminal

    def is_terminal(self) -> bool:
        try:
            return self.out.isatty()
        except (ValueError, OSError):
            return False

    def attach(self, progress: Progress | None) -> None:
        """While a fleet rollout draws live lines, host lines feed them instead of printing."""
        self.progress = progress

    def phase(self, host: str, phase: str, deadline: float | None = None) -> None:
        """A host entered a phase (with a deadline: a wait that counts down). Only the live
        display shows phases; plain output keeps its lines."""
        if self.progress is not None:
            self.progress.phase(host, phase, deadline)

    def _write(self, stream: TextIO, text: str) -> None:
        with self._lock:
            stream.write(text)
            stream.flush()

    def say(self, text: str = "") -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def host_line(self, host: str, line: str) -> None:
        if self.progress is not None:
            self.progress.line(host, line)
            return
        self.say(f"[{host}] {line}")

    def error(self, text: str) -> None:
        self.notice(f"error: {text}")

    def notice(self, text: str) -> None:
        """A line on stderr as given, whatever the mode: a problem, a warning, a note."""
        self._write(self.err or sys.stderr, text + "\n")

    def json(self, obj: object) -> None:
        """One JSON document on one line of stdout (keys sorted), the machine-readable output."""
        self._write(self.data, json.dumps(obj, sort_keys=True) + "\n")

    def table(self, rows: Sequence[Sequence[str]]) -> None:
        """Rows as left-aligned columns two spaces apart (the first row is usually a header)."""
        if not rows:
            return
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        self.say(
            "\n".join(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                for row in rows
            )
        )

    def report(self, report: Report, title: str = "verification") -> None:
        if self.progress is not None:
            failing = [c.name for c in report.checks if not c.ok]
            state = "PASS" if report.ok else "FAIL: " + ", ".join(failing)
            self.progress.line(report.host, f"{title}: {state}")
            return
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
