"""Host keys for onboarding a host: what it offers, how an operator compares it, how it is pinned.

`scan` opens one SSH transport handshake per key family (Ed25519, ECDSA, RSA), each restricted
to that family, and keeps the server's key: no authentication, no command, nothing trusted. The
rest is pure: fingerprints as `ssh-keygen -lf` prints them (`SHA256:<base64, no padding>`),
known_hosts lines as ssh writes them (`[address]:port` for a port other than 22), the decision
new / known / changed against what known_hosts already holds, and removing a host's old lines.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import paramiko
from paramiko.hostkeys import HostKeys

# One handshake per family; the server picks its key of that family (a host has at most one).
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ED25519", ("ssh-ed25519",)),
    ("ECDSA", ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")),
    ("RSA", ("rsa-sha2-512", "rsa-sha2-256")),
)
_FAMILY_OF_KEYTYPE = {
    "ssh-ed25519": "ED25519",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "ssh-rsa": "RSA",
}
FINGERPRINT_RE = re.compile(r"^SHA256:([A-Za-z0-9+/]{43})=?$")
_LOG_CHANNEL = "rebuild.hostkeys.paramiko"


class ScanError(Exception):
    """The host could not be reached, or did not speak SSH."""


@dataclass(frozen=True)
class HostKey:
    """One public host key: its type as known_hosts names it, its wire blob and size."""

    keytype: str  # ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...
    blob: bytes
    bits: int

    @property
    def base64(self) -> str:
        return base64.b64encode(self.blob).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """`SHA256:...` as `ssh-keygen -lf` prints it."""
        return fingerprint(self.blob)

    @property
    def family(self) -> str:
        """ED25519, ECDSA, RSA (what `ssh-keygen -lf` shows in parentheses)."""
        return _FAMILY_OF_KEYTYPE.get(self.keytype, self.keytype.upper())

    def describe(self) -> str:
        """`256 SHA256:... (ED25519)`, the shape of `ssh-keygen -lf`'s line."""
        return f"{self.bits} {self.fingerprint} ({self.family})"

    @classmethod
    def from_pkey(cls, key: paramiko.PKey) -> HostKey:
        return cls(keytype=key.get_name(), blob=key.asbytes(), bits=int(key.get_bits()))


def fingerprint(blob: bytes) -> str:
    """The SHA256 fingerprint of a key blob: `SHA256:` and unpadded base64 of its digest."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_fingerprint(text: str) -> str:
    """A `--fingerprint` value in the `SHA256:...` form, normalised (no `=` padding)."""
    value = text.strip()
    match = FINGERPRINT_RE.match(value)
    if match is None:
        hint = (
            " (that is an MD5 fingerprint; `ssh-keygen -lf FILE` prints the SHA256 one)"
            if value.upper().startswith("MD5:") or value.count(":") > 8
            else ""
        )
        raise ValueError(
            f"{value!r} is not a SHA256 fingerprint: want SHA256: and 43 base64 characters, "
            f"as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it{hint}"
        )
    return f"SHA256:{match.group(1)}"


def key_name(address: str, port: int) -> str:
    """The name ssh files a host's keys under in known_hosts."""
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_line(name: str, key: HostKey) -> str:
    """One known_hosts line, as ssh-keyscan and ssh write it (no newline)."""
    return f"{name} {key.keytype} {key.base64}"


class KeyStatus(Enum):
    """What known_hosts says about the keys a host offers."""

    NEW = "new"  # known_hosts has no key for the host
    KNOWN = "known"  # a key matches and none of the same family differs
    CHANGED = "changed"  # a key of the same family differs, or no offered key is known


def known_keys(keys: HostKeys, name: str) -> tuple[HostKey, ...]:
    """The keys known_hosts holds for a host (plain or hashed entries)."""
    entry = keys.lookup(name)
    if entry is None:
        return ()
    return tuple(HostKey.from_pkey(key) for key in entry.values())


def compare(offered: Iterable[HostKey], known: Iterable[HostKey]) -> KeyStatus:
    """Decide new / known / changed, per key family (as ssh does)."""
    known_by_family: dict[str, set[bytes]] = {}
    for key in known:
        known_by_family.setdefault(key.family, set()).add(key.blob)
    if not known_by_family:
        return KeyStatus.NEW
    matched = False
    for key in offered:
        blobs = known_by_family.get(key.family)
        if blobs is None:
            continue
        if key.blob not in blobs:
            return KeyStatus.CHANGED
        matched = True
    return KeyStatus.KNOWN if matched else KeyStatus.CHANGED


def matching(offered: Iterable[HostKey], wanted: str) -> HostKey | None:
    """The offered key whose fingerprint is `wanted` (normalised), if any."""
    for key in offered:
        if key.fingerprint == wanted:
            return key
    return None


def _names_host(field: str, name: str) -> bool:
    for pattern in field.split(","):
        if pattern == name:
            return True
        if pattern.startswith("|1|") and HostKeys.hash_host(name, pattern) == pattern:
            return True
    return False


def without_host(text: str, name: str) -> tuple[str, int]:
    """known_hosts text without the lines for `name` (plain or hashed), like `ssh-keygen -R`;
    comments, marker lines (`@cert-authority`, `@revoked`) and other hosts stay."""
    kept: list[str] = []
    removed = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "@")):
            field = stripped.split(None, 1)[0]
            if _names_host(field, name):
                removed += 1
                continue
        kept.append(line)
    return "".join(kept), removed


def with_keys(text: str, name: str, keys: Iterable[HostKey]) -> str:
    """known_hosts text with one line per key for `name` appended (a newline ends the file)."""
    lines = "".join(known_hosts_line(name, key) + "\n" for key in keys)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + lines


def by_family(keys: Iterable[HostKey]) -> Mapping[str, HostKey]:
    return {key.family: key for key in keys}


# --- IO: one handshake per key family ------------------------------------------------------


def _quiet_logger() -> None:
    """paramiko logs a negotiation failure (a family the host does not offer) with a traceback;
    without a handler Python prints it on stderr. These transports log to a silent channel."""
    logger = logging.getLogger(_LOG_CHANNEL)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the name ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _handshake(
    address: str, port: int, keytypes: tuple[str, ...], timeout: float
) -> HostKey | None:
    """The server's key among `keytypes`, or None when it offers none of them."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise ScanError(f"cannot reach {key_name(address, port)}: {_reason(exc)}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.set_log_channel(_LOG_CHANNEL)
        transport.banner_timeout = timeout
        transport.get_security_options().key_types = keytypes
        transport.start_client(timeout=timeout)
        return HostKey.from_pkey(transport.get_remote_server_key())
    except paramiko.IncompatiblePeer:
        return None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise ScanError(
            f"{key_name(address, port)} did not complete an SSH handshake: {_reason(exc)}"
        ) from None
    finally:
        transport.close()
        sock.close()


def scan(address: str, port: int, *, timeout: float = 10) -> tuple[HostKey, ...]:
    """Every host key the server offers (Ed25519, ECDSA, RSA), one handshake per family.

    Raises ScanError when the host cannot be reached or offers no key paramiko can read.
    """
    _quiet_logger()
    found: list[HostKey] = []
    for _family, keytypes in FAMILIES:
        key = _handshake(address, port, keytypes, timeout)
        if key is not None:
            found.append(key)
    if not found:
        raise ScanError(f"{key_name(address, port)} offers no Ed25519, ECDSA or RSA host key")
    return tuple(found)
