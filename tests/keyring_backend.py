"""Keyring backends selected explicitly by tests (never a runtime dependency of rebuild).

- ``FileKeyring``: passwords in a JSON file named by ``$RBTEST_KEYRING`` (mode 0600);
  a subprocess selects it with ``PYTHON_KEYRING_BACKEND=tests.keyring_backend.FileKeyring``.
- ``MemoryKeyring``: in this process only, for ``keyring.set_keyring(MemoryKeyring())``.

Both have a negative priority, so keyring's own detection never picks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

ENV = "RBTEST_KEYRING"


class MemoryKeyring(KeyringBackend):
    """Passwords in a dict."""

    priority = -1  # type: ignore[assignment]  # only ever selected explicitly

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.store.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


class FileKeyring(KeyringBackend):
    """Passwords in the JSON file $RBTEST_KEYRING."""

    priority = -1  # type: ignore[assignment]  # only ever selected explicitly

    @staticmethod
    def _path() -> Path:
        return Path(os.environ[ENV])

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self._path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def _save(self, data: dict[str, str]) -> None:
        path = self._path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}/{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}/{username}"] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}/{username}", None) is None:
            raise PasswordDeleteError("not found")
        self._save(data)
