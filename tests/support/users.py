"""Real local users for the test bed's hosts: deploy users with passwordless sudo, with
password sudo, or without sudo (root only; the hosts' sshd runs as root and logs them in).

Each user is a real Linux account (``useradd``) with a sudoers drop-in under
``/etc/sudoers.d`` (checked with ``visudo -c``). Its comment field records the creating
process (pid and start time) so that :func:`cleanup_stale_users` removes only users whose
creator is gone. :func:`remove_user` deletes the account, its home, its drop-in and what sudo
kept for it (timestamps). Use with ``Testbed(other_users=True)``, whose shims every user can
run; a user without sudo cannot change a host's state (``$SIM_ROOT`` belongs to root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from testbed.procs import is_alive, proc_start_time

SUDOERS_DIR = Path("/etc/sudoers.d")
COMMENT_PREFIX = "rebuild test bed user"
SUDO_STATE = (Path("/run/sudo/ts"), Path("/var/lib/sudo/lectured"), Path("/var/lib/sudo/ts"))

Kind = Literal["nopasswd", "password", "nosudo", "mixed"]
_SHORT = {"nopasswd": "nopw", "password": "pw", "nosudo": "nosu", "mixed": "mix"}


class UsersUnavailable(RuntimeError):
    """Test users cannot be made here (not root, or a tool is missing)."""


@dataclass(frozen=True)
class TestUser:
    """A local account the test bed's hosts log in, with its sudo rule."""

    __test__ = False  # not a pytest test class

    name: str
    kind: Kind
    password: str | None = field(default=None, repr=False)

    @property
    def sudoers_file(self) -> Path:
        return SUDOERS_DIR / f"rbtb-{self.name}"


def unavailable() -> str | None:
    """Why test users cannot be created here, or None."""
    if os.geteuid() != 0:
        return "creating test users needs root"
    for tool in ("useradd", "userdel", "usermod", "chpasswd", "visudo"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian: apt-get install passwd sudo)"
    if not Path("/usr/bin/sudo").exists():
        return "/usr/bin/sudo is missing (Debian: apt-get install sudo)"
    if not SUDOERS_DIR.is_dir():
        return f"{SUDOERS_DIR} is missing"
    return None


def _run(argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        # the password, if any, went on stdin and never into this message
        raise UsersUnavailable(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")


def sudoers_rules(user: TestUser) -> str:
    """The drop-in for a user: the sudo rights its kind stands for."""
    name = user.name
    lines = [
        f"# {COMMENT_PREFIX}: removed by tests.support.users",
        f"Defaults:{name} lecture=never",
    ]
    if user.kind == "nopasswd":
        lines.append(f"{name} ALL=(ALL:ALL) NOPASSWD: ALL")
    elif user.kind == "password":
        lines.append(f"{name} ALL=(ALL:ALL) ALL")
    elif user.kind == "mixed":
        # a common real set-up: some commands without a password, the rest with one; here
        # rebuild's own `sh -c` scripts (the test bed's sudo shim runs them under env)
        lines.append(f"{name} ALL=(ALL:ALL) ALL")
        lines.append(f"{name} ALL=(ALL:ALL) NOPASSWD: /usr/bin/env PATH=* SIM_ROOT=* sh -c *")
    return "\n".join(lines) + "\n"


def create_user(kind: Kind, password: str | None = None) -> TestUser:
    """Create a deploy user of this kind; `password` (for "password"/"mixed") is set with
    chpasswd on stdin. Remove it with :func:`remove_user` (also when the test failed)."""
    why = unavailable()
    if why:
        raise UsersUnavailable(why)
    if kind in ("password", "mixed") and not password:
        raise UsersUnavailable(f"a {kind} user needs a password")
    name = f"rbtb-{_SHORT[kind]}-{secrets.token_hex(3)}"
    user = TestUser(name=name, kind=kind, password=password)
    comment = f"{COMMENT_PREFIX} pid={os.getpid()} start={proc_start_time(os.getpid())}"
    _run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment", comment, name])
    try:
        if password:
            _run(["chpasswd"], stdin=f"{name}:{password}\n")
        else:
            # no password, but not locked: sshd (UsePAM no) refuses locked accounts
            _run(["usermod", "-p", "*", name])
        if kind != "nosudo":
            _install_sudoers(user)
    except BaseException:
        remove_user(user)
        raise
    return user


def _install_sudoers(user: TestUser) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="rbtb-sudoers-", delete=False) as handle:
        handle.write(sudoers_rules(user))
        draft = Path(handle.name)
    try:
        _run(["visudo", "-c", "-q", "-f", str(draft)])
        draft.chmod(0o440)
        shutil.move(str(draft), user.sudoers_file)
    finally:
        draft.unlink(missing_ok=True)


def remove_user(user: TestUser | str) -> list[str]:
    """Delete the account, its home, its sudoers drop-in and sudo's records of it."""
    name = user if isinstance(user, str) else user.name
    problems: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        (SUDOERS_DIR / f"rbtb-{name}").unlink()
    for state in SUDO_STATE:
        with contextlib.suppress(FileNotFoundError):
            (state / name).unlink()
    try:
        pwd.getpwnam(name)
    except KeyError:
        return problems
    done = subprocess.run(
        ["userdel", "--force", "--remove", name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # 12: the home or mail spool could not be removed (e.g. there was none)
    if done.returncode not in (0, 12):
        problems.append(f"userdel {name}: {done.stderr.strip()}")
    return problems


def cleanup_stale_users() -> list[str]:
    """Remove test users whose creating process is gone (a crashed earlier run)."""
    removed: list[str] = []
    for entry in pwd.getpwall():
        if not entry.pw_name.startswith("rbtb-") or not entry.pw_gecos.startswith(COMMENT_PREFIX):
            continue
        fields = dict(part.split("=", 1) for part in entry.pw_gecos.split() if "=" in part)
        try:
            pid = int(fields.get("pid", ""))
        except ValueError:
            continue
        start = fields.get("start", "")
        if is_alive(pid, int(start) if start.isdigit() else None):
            continue
        if not remove_user(entry.pw_name):
            removed.append(entry.pw_name)
    return removed
