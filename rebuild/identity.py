"""This machine's identity and the operator allowlist decision."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from rebuild.inventory import Operator

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


@dataclass(frozen=True)
class Identity:
    """Who is deploying: the machine's hostname and /etc/machine-id."""

    hostname: str
    machine_id: str

    def operator_lines(self, name: str) -> str:
        """The exact `[[operators]]` entry that would authorize this machine."""
        return (
            "[[operators]]\n"
            f'name = "{name}"\n'
            f'machine_id = "{self.machine_id}"\n'
            f'hostname = "{self.hostname}"\n'
        )


def current(machine_id_files: tuple[Path, ...] = MACHINE_ID_FILES) -> Identity:
    """Read this machine's identity; an unreadable machine-id is empty and matches no operator."""
    machine_id = ""
    for path in machine_id_files:
        try:
            machine_id = path.read_text(encoding="ascii").strip().lower()
        except (OSError, UnicodeDecodeError):  # unreadable or not a machine-id: matches nobody
            continue
        if machine_id:
            break
    return Identity(hostname=socket.gethostname().split(".")[0], machine_id=machine_id)


def authorize(identity: Identity, operators: tuple[Operator, ...]) -> Operator | None:
    """The allowlist entry matching this machine (machine-id, and hostname when given), or None.

    An empty allowlist authorizes nobody: the gate fails closed.
    """
    if not identity.machine_id:
        return None
    for operator in operators:
        if operator.machine_id != identity.machine_id:
            continue
        if operator.hostname is not None and operator.hostname.split(".")[0] != identity.hostname:
            continue
        return operator
    return None
