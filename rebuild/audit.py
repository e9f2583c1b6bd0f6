"""The audit trail (one JSON line per host per run) and structlog set-up."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from rebuild.errors import ConfigError
from rebuild.results import Result

RESULTS = tuple(str(r) for r in Result)
SECRET_WORDS = ("password", "passphrase", "secret", "token")


def is_secret_key(key: object) -> bool:
    """Keys whose values must never be written: any key naming a password, secret or token."""
    lowered = str(key).lower()
    return any(word in lowered for word in SECRET_WORDS)


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique, and safe in a systemd unit name: 20261125-193000-a1b2c3."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass
class Record:
    """One host's outcome of one run; filled in as the run goes, written exactly once."""

    run_id: str
    host: str
    address: str
    action: str
    flake: str
    attr: str
    operator: dict[str, str]
    event: str = "rebuild"
    timestamp: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    commit: str | None = None
    dirty: bool = False
    overrides: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    expected_system: str | None = None
    previous_system: str | None = None
    final_system: str | None = None
    result: str = "error"
    exit_code: int = 1
    message: str = ""
    checks: list[dict[str, object]] = field(default_factory=list)
    rollback_checks: list[dict[str, object]] = field(default_factory=list)
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        extra = data.pop("extra")
        data.update(extra)
        return data


def append(path: Path, record: Record) -> None:
    """Append one JSON line under an exclusive lock; the directory is created when missing."""
    line = json.dumps(redact_value(record.to_json()), sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path, host: str | None = None) -> list[dict[str, Any]]:
    """Every record (oldest first), optionally of one host; broken lines are skipped."""
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return records
    except OSError as exc:
        raise ConfigError(f"cannot read the audit log {path}: {exc}") from None
    for line in lines:
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and (host is None or data.get("host") == host):
                records.append(data)
    return records


def redact_value(value: Any) -> Any:
    """Drop values under secret-looking keys, recursively."""
    if isinstance(value, dict):
        return {
            k: ("[redacted]" if is_secret_key(k) else redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: no secret-looking key ever reaches a log line."""
    for key in list(event_dict):
        if is_secret_key(key):
            event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(*, json_output: bool, verbose: bool = False) -> None:
    """Logs go to stderr: human lines on a terminal, JSON lines with --json."""
    level = logging.DEBUG if verbose else logging.INFO
    renderer: Any
    if json_output:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        # plain tracebacks: rich's (the default when rich is installed) prints local
        # variables, and a local may hold a sudo password
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def iter_summary(records: list[dict[str, Any]]) -> Iterator[str]:
    """`invoke history` lines."""
    for r in records:
        commit = str(r.get("commit") or "-")[:12]
        yield (
            f"{r.get('timestamp', '?'):25} {r.get('run_id', '?'):22} {r.get('host', '?'):12} "
            f"{r.get('event', 'rebuild'):8} {r.get('action', '-'):12} {r.get('result', '?'):13} "
            f"exit {r.get('exit_code', '?'):<3} {commit:12} "
            f"{(r.get('operator') or {}).get('name', '?')}"
        )
