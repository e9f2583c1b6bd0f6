"""The flake's git state: commit, subject and the files that make the tree dirty (real git)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rebuild import process

MAX_LISTED = 10


@dataclass(frozen=True)
class GitState:
    """What the flake's checkout is: None for commit when it is not a git tree."""

    commit: str | None
    subject: str
    dirty_files: tuple[str, ...]
    is_repo: bool

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_files) or not self.is_repo

    @property
    def short(self) -> str:
        return (self.commit or "unknown")[:12]


def parse_porcelain(output: str) -> tuple[str, ...]:
    """Paths from `git status --porcelain=v1 -z`: modified, staged, untracked (not ignored)."""
    entries = output.split("\0")
    paths: list[str] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        paths.append(path)
        if "R" in status or "C" in status:  # a rename carries its source path next
            i += 1
    return tuple(paths)


def read(flake_dir: Path) -> GitState:
    """Inspect the flake's git checkout with the real git."""
    base = ["git", "-C", str(flake_dir)]
    top = process.run([*base, "rev-parse", "--show-toplevel"], timeout=30)
    if not top.ok:
        return GitState(commit=None, subject="", dirty_files=(), is_repo=False)
    head = process.run([*base, "log", "-1", "--format=%H%x00%s"], timeout=30)
    commit, _, subject = head.stdout.strip().partition("\0") if head.ok else ("", "", "")
    status = process.run(
        [*base, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", "."],
        timeout=60,
    )
    dirty = parse_porcelain(status.stdout) if status.ok else ("(git status failed)",)
    return GitState(commit=commit or None, subject=subject, dirty_files=dirty, is_repo=True)
