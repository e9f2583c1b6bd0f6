"""A host's sudo password in the OS keyring (service ``rebuild``, one entry per host).

`keyring` is imported lazily: `invoke --list` and hosts without sudo never touch it. The
password only ever travels from the keyring to a remote sudo's stdin (rebuild's own commands)
or to nixos-rebuild's password prompt on a pseudo-terminal; it is never put in an argv, an
environment, a log line, an audit record or an error message.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

from rebuild.console import Console
from rebuild.errors import ConfigError, Declined, GateRefused
from rebuild.inventory import load

SERVICE = "rebuild"
OPERATIONS = ("set", "clear")


class KeyringUnavailable(ConfigError):
    """No usable keyring backend on this machine (a headless machine without Secret Service)."""


def no_backend_message(host: str, user: str | None = None) -> str:
    who = f"the deploy user ({user})" if user else "the deploy user"
    return (
        f"no OS keyring is available on this machine to hold the sudo password of {host}; "
        f"either allow passwordless sudo for {who} on {host} (a NOPASSWD rule), or install a "
        "keyring backend (a desktop Secret Service, or e.g. keyrings.alt on a headless "
        "machine) or select one with PYTHON_KEYRING_BACKEND"
    )


def _keyring_errors() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    from keyring.errors import KeyringError, NoKeyringError, PasswordDeleteError

    return NoKeyringError, PasswordDeleteError, KeyringError


def get(host: str, user: str | None = None) -> str | None:
    """The stored sudo password of `host`, or None. Raises KeyringUnavailable."""
    import keyring

    no_keyring, _, keyring_error = _keyring_errors()
    try:
        value = keyring.get_password(SERVICE, host)
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(host, user)) from None
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring could not be read for {host} ({type(exc).__name__}); unlock it, "
            "or allow passwordless sudo for the deploy user"
        ) from None
    return value or None


def store(host: str, password: str, user: str | None = None) -> None:
    """Store (or replace) the sudo password of `host`."""
    import keyring

    no_keyring, _, keyring_error = _keyring_errors()
    try:
        keyring.set_password(SERVICE, host, password)
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(host, user)) from None
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring refused to store the password of {host} ({type(exc).__name__})"
        ) from None


def clear(host: str, user: str | None = None) -> bool:
    """Remove the stored password of `host`; False when there was none."""
    import keyring

    no_keyring, delete_error, keyring_error = _keyring_errors()
    try:
        keyring.delete_password(SERVICE, host)
    except no_keyring:
        raise KeyringUnavailable(no_backend_message(host, user)) from None
    except delete_error:
        return False
    except keyring_error as exc:
        raise KeyringUnavailable(
            f"the OS keyring refused to remove the password of {host} ({type(exc).__name__})"
        ) from None
    return True


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
        removed = clear(target.name, user)
        console.say(
            f"removed the sudo password of {target.name} from the keyring"
            if removed
            else f"no sudo password of {target.name} was stored; nothing to remove"
        )
        return 0
    # check the backend before asking, so nobody types a password for nothing
    get(target.name, user)
    password = read_password(target.name, from_stdin=from_stdin)
    store(target.name, password, user)
    note = "" if target.settings.sudo else (
        f"; note: {target.name} has sudo = false in {loaded.path}, so it is used only once "
        "you set sudo = true"
    )  # fmt: skip
    console.say(
        f"stored the sudo password of {target.name} ({user}@{target.address}) in the keyring "
        f"(service {SERVICE!r}, backend {backend_name()}){note}"
    )
    return 0
