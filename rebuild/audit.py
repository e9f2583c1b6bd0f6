"""The audit trail (one JSON line per host per run)."""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rebuild.errors import ConfigError, GateRefused
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


def now_iso() -> str:
    """The current time as the audit writes it: ISO 8601 UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    timestamp: str = field(default_factory=now_iso)
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
    remote_commands: int = 0  # commands over rebuild's own SSH connection: one round trip each
    changes: dict[str, object] | None = None  # the preview (see rebuild.preview.Changes)
    tools: dict[str, dict[str, str]] = field(default_factory=dict)  # path and version
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        data = dict(self.__dict__)
        extra = data.pop("extra")
        data.update(extra)
        return data


class AuditError(GateRefused):
    """The audit log cannot be written: refused among the gates (exit 3), loud at the end."""


def private_dir(path: Path) -> None:
    """Create the folder (0700) or check it: a real folder (not a link), ours, and not writable
    by group or others, so that nobody else can swap the files rebuild writes in it."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.lstat(path)
    except OSError as exc:
        raise AuditError(
            f"cannot create the state folder {path}: {exc.strerror}; create it (mkdir -p -m 700 "
            f"{path}) or point audit_log at a folder you own"
        ) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise AuditError(f"the state folder {path} is not a folder (a link?); remove it")
    if info.st_uid != os.getuid():
        raise AuditError(
            f"the state folder {path} belongs to uid {info.st_uid}, not to you; use a folder you "
            "own for audit_log"
        )
    if info.st_mode & 0o022:
        raise AuditError(
            f"the state folder {path} is writable by others (mode {stat.S_IMODE(info.st_mode):o});"
            f" fix it: chmod go-w {path}"
        )


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open (creating 0600) a state file in a private folder, never through a symlink, and only
    if it is a regular file of ours."""
    private_dir(path.parent)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise AuditError(f"cannot open {path}: {why}; remove it or fix its permissions") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise AuditError(f"{path} is not a regular file of yours; remove it")
    return fd


def check_writable(path: Path) -> None:
    """The audit gate: the log can be appended to (exit 3 before anything runs, if not)."""
    os.close(open_private(path))


def append(path: Path, record: Record) -> None:
    """Append one JSON line under an exclusive lock; a partial last line left by a crash is
    ended first, so that it cannot swallow this record."""
    line = json.dumps(redact_value(record.to_json()), sort_keys=True) + "\n"
    fd = open_private(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            reader = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                last = os.pread(reader, 1, size - 1)
            finally:
                os.close(reader)
            if last != b"\n":
                line = "\n" + line
        data = line.encode("utf-8")
        if os.write(fd, data) != len(data):
            raise AuditError(f"{path}: short write (disk full?)")
        os.fsync(fd)
    except OSError as exc:
        raise AuditError(f"cannot append to {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read(path: Path, host: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Every record (oldest first), optionally of one host, and how many lines could not be
    read (broken JSON, not UTF-8): they are skipped."""
    records: list[dict[str, Any]] = []
    skipped = 0
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return records, 0
    except OSError as exc:
        raise ConfigError(f"cannot read the audit log {path}: {exc.strerror}") from None
    for chunk in raw.splitlines():
        if not chunk.strip():
            continue
        try:
            data = json.loads(chunk.decode("utf-8"))
        except ValueError:
            skipped += 1
            continue
        if not isinstance(data, dict):
            skipped += 1
        elif host is None or data.get("host") == host:
            records.append(data)
    return records, skipped


def redact_value(value: Any) -> Any:
    """Drop values under secret-looking keys, recursively."""
    if isinstance(value, dict):
        return {
            k: ("[redacted]" if is_secret_key(k) else redact_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


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
