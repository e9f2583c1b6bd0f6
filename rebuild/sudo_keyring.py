"""A host's sudo password in the OS keyring (service ``rebuild``, one entry per host).

The entry is bound to the host's name, deploy user, address and port (`entry_name`): when the
inventory sends the host somewhere else, or logs in as someone else, the stored password is not
found, so it can never be typed into another machine's sudo. An entry of an older rebuild,
keyed by the host name alone, is never used; a deploy that finds one is refused until the
password is stored again (`invoke secret set`) or the old entry removed (`invoke secret clear`).

`keyring` is imported lazily: `invoke --list` and hosts without sudo never touch it. The
password only ever travels from the keyring to a remote sudo's stdin (rebuild's own commands)
or to nixos-rebuild's exact sudo prompt on a pseudo-terminal; it is never put in an argv, an
environment, a log line, an audit record or an error message. Before it is read, this process
stops being able to dump core (`protect_memory`).
"""

from __future__ import annotations

import contextlib
import getpass
import sys
from typing import TextIO

from rebuild.console import Console
from rebuild.errors import ConfigError, Declined, GateRefused
from rebuild.inventory import Target, load

SERVICE = "rebuild"
OPERATIONS = ("set", "clear")
PR_SET_DUMPABLE = 4  # <linux/prctl.h>


class KeyringUnavailable(ConfigError):
    """No usable keyring backend on this machine (a headless machine without Secret Service)."""


class UnboundEntry(GateRefused):
    """Only an older rebuild's entry (keyed by the host name alone) holds the password."""


def entry_name(target: Target) -> str:
    """The keyring user name of a host's entry: `NAME:USER@ADDRESS:PORT` (an IPv6 address in
    brackets), so that the password belongs to that login on that machine only."""
    spec = target.settings
    address = f"[{spec.address}]" if ":" in spec.address else spec.address
    return f"{target.name}:{spec.user}@{address}:{spec.port}"


def protect_memory() -> None:
    """No core dump of this process (or of its children: the limit is inherited) while it may
    hold a password; on Linux also not dumpable at all (no core, no ptrace attach by the same
    user, /proc/PID/mem and environ closed to others). Failures to drop dumpability are
    ignored; the core limit always applies."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def no_backend_message(host: str, user: str | None = None) -> str:
    who = f"the deploy user ({user})" if user else "the deploy user"
    return (
        f"no OS keyring is available on this machine to hold the sudo password of {host}; "
        f"either allow passwordless sudo for {who} on {host} (a NOPASSWD rule), or install a "
        "keyring backend (a desktop Secret Service, or e.g. keyrings.alt on a headless "
        "machine) or select one with PYTHON_KEYRING_BACKEND"
    )


def unbound_message(target: Target) -> str:
    spec = target.settings
    return (
        f"the keyring holds a sudo password for {target.name} stored by an older rebuild under "
        "the host name alone, not bound to a user and address, so rebuild does not use it; "
        f"store it again with `invoke secret set --host {target.name}` (bound to "
        f"{spec.user}@{spec.address} port {spec.port}), or remove it with "
        f"`invoke secret clear --host {target.name}` if sudo needs no password"
    )


def _keyring_errors() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    from keyring.errors import KeyringError, NoKeyringError, PasswordDeleteError

    return NoKeyringError, PasswordDeleteError, KeyringError


def _read(target: Target, username: str) -> str | None:
    import keyring

    no_keyring, _, keyring_error = _keyring_errors()
    user = target.settings.user
    try:
        return keyring.get_password(SERVICE, username) or None
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(target.name, user)) from None
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring could not be read for {target.name} ({type(exc).__name__}); "
            "unlock it, or allow passwordless sudo for the deploy user"
        ) from None


def get(target: Target) -> str | None:
    """The stored sudo password of `target` (its bound entry), or None. Core dumps are off
    before it is read. Raises KeyringUnavailable, and UnboundEntry when only an older entry
    keyed by the host name exists."""
    protect_memory()
    password = _read(target, entry_name(target))
    if password is None and _read(target, target.name) is not None:
        raise UnboundEntry(unbound_message(target))
    return password


def store(target: Target, password: str) -> None:
    """Store (or replace) the sudo password of `target` under its bound entry."""
    import keyring

    no_keyring, _, keyring_error = _keyring_errors()
    try:
        keyring.set_password(SERVICE, entry_name(target), password)
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(target.name, target.settings.user)) from None
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring refused to store the password of {target.name}: " + type(exc).__name__
        ) from None


def _delete(target: Target, username: str) -> bool:
    import keyring

    no_keyring, delete_error, keyring_error = _keyring_errors()
    try:
        keyring.delete_password(SERVICE, username)
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(target.name, target.settings.user)) from None
    except delete_error:
        return False
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring refused to remove the password of {target.name}: " + type(exc).__name__
        ) from None
    return True


def clear(target: Target) -> bool:
    """Remove the stored password of `target` (its bound entry, and an older rebuild's entry
    under the host name); False when there was none."""
    bound = _delete(target, entry_name(target))
    old = _delete(target, target.name)
    return bound or old


def backend_name() -> str:
    import keyring

    backend = keyring.get_keyring()
    return f"{type(backend).__module__}.{type(backend).__name__}"


def read_password(host: str, *, from_stdin: bool, stdin: TextIO | None = None) -> str:
    """The password from one line of stdin (--stdin) or asked twice on the terminal, unechoed."""
    source = stdin or sys.stdin
    if from_stdin:
        line = source.readline()
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
    else:
        try:
            interactive = source.isatty()
        except (ValueError, OSError):
            interactive = False
        if not interactive:
            raise GateRefused(
                "no terminal to ask for the password; pass --stdin to read it from standard "
                "input (one line)"
            )
        password = getpass.getpass(f"sudo password for {host}: ")
        again = getpass.getpass("again, to confirm: ")
        if password != again:
            raise Declined("the two passwords differ; nothing was stored")
    if not password:
        raise ConfigError("the password is empty; nothing was stored")
    return password


def run(inventory: str | None, op: str, host: str, *, from_stdin: bool) -> int:
    """`invoke secret set|clear --host NAME`."""
    if op not in OPERATIONS:
        raise ConfigError(f"unknown operation {op!r}; use `invoke secret set --host NAME` or "
                          "`invoke secret clear --host NAME`")  # fmt: skip
    if not host:
        raise ConfigError("give the host: --host NAME")
    loaded = load(inventory)
    target = loaded.target(host)
    user = target.settings.user
    console = Console()
    if op == "clear":
        removed = clear(target)
        console.say(
            f"removed the sudo password of {target.name} from the keyring"
            if removed
            else f"no sudo password of {target.name} was stored; nothing to remove"
        )
        return 0
    protect_memory()  # before the password is typed
    # check the backend before asking, so nobody types a password for nothing
    _read(target, entry_name(target))
    password = read_password(target.name, from_stdin=from_stdin)
    store(target, password)
    replaced = _delete(target, target.name)  # an older, unbound entry is not kept
    note = "" if target.settings.sudo else (
        f"; note: {target.name} has sudo = false in {loaded.path}, so it is used only once "
        "you set sudo = true"
    )  # fmt: skip
    old = "; the older entry under the host name alone was removed" if replaced else ""
    console.say(
        f"stored the sudo password of {target.name} ({user}@{target.address} port "
        f"{target.settings.port}) in the keyring (service {SERVICE!r}, entry "
        f"{entry_name(target)!r}, backend {backend_name()}){old}{note}"
    )
    return 0
