"""One host's part of a run: its record, its SSH connection, and the facts rebuild reads
from it (what it runs, what HEAD evaluates to, the verification checks)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rebuild import audit, facts, nixos, process
from rebuild.errors import (
    BuildFailed,
)
from rebuild.inventory import Loaded, Target
from rebuild.remote import Endpoint, Remote, RemoteResult
from rebuild.verify import Report, run_checks

NIX_EVAL_TIMEOUT = 600


@dataclass
class HostRun:
    """Everything one host's part of a run knows; its record is written exactly once."""

    target: Target
    record: audit.Record
    endpoint: Endpoint
    action: str
    command: list[str] = field(default_factory=list)
    expected: str | None = None
    previous: str | None = None
    remote: Remote | None = None
    remote_locked: bool = False
    local_lock: IO[str] | None = None
    timer_armed_at: float | None = None
    timer_has_fired: bool = False
    report: Report | None = None
    rollback_report: Report | None = None
    started: float = field(default_factory=time.monotonic)
    responder: process.Responder | None = None  # answers nixos-rebuild's sudo password prompt
    sudo_complaint: str = ""  # a line where sudo refused nixos-rebuild

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def timer_wanted(self) -> bool:
        return self.action in ("switch", "test") and self.target.settings.rollback_timeout > 0

    def connection(self) -> Remote:
        """The host's one connection, reopened if it died."""
        if self.remote is not None:
            transport = self.remote.conn.client.get_transport()
            if transport is not None and transport.is_active():
                return self.remote
            self.remote.close()
            self.remote = None
        self.remote = Remote(self.endpoint).open()
        return self.remote

    def run(self, script: str, *, timeout: float = 60, privileged: bool = True) -> RemoteResult:
        return self.connection().run(script, timeout=timeout, privileged=privileged)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None


def endpoint_for(loaded: Loaded, target: Target, sudo_password: str | None = None) -> Endpoint:
    spec = target.settings
    return Endpoint(
        name=target.name,
        address=spec.address,
        port=spec.port,
        user=spec.user,
        known_hosts=loaded.known_hosts,
        identity_file=loaded.identity_file(target),
        connect_timeout=loaded.inventory.connect_timeout,
        sudo=spec.sudo,
        sudo_password=sudo_password,
    )


def ssh_settings(loaded: Loaded, target: Target) -> nixos.SshSettings:
    return nixos.SshSettings(
        port=target.settings.port,
        known_hosts=loaded.known_hosts,
        identity_file=loaded.identity_file(target),
        connect_timeout=loaded.inventory.connect_timeout,
        control_dir=control_dir(),
    )


def control_dir() -> Path:
    """A short private folder for ssh's ControlPath sockets (unix socket paths are short)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    path = base / f"rebuild-ssh-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def child_env(loaded: Loaded, target: Target) -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_SSHOPTS"] = nixos.nix_sshopts(ssh_settings(loaded, target), env.get("NIX_SSHOPTS", ""))
    return env


def expected_system(loaded: Loaded, target: Target, flake: str | None = None) -> str:
    argv = nixos.nix_eval_argv(loaded.inventory.nix, flake or loaded.flake, target.attr)
    done = process.run(argv, timeout=NIX_EVAL_TIMEOUT)
    path = done.stdout.strip()
    if not done.ok or not path.startswith("/"):
        tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise BuildFailed(f"{target.name}: cannot evaluate {target.attr}: {tail}")
    return path


def gather(hr: HostRun, *, boot: bool) -> facts.Facts:
    spec = hr.target.settings.verify
    script = facts.script(spec, services=not boot)
    result = hr.run(script, timeout=facts.script_timeout(spec), privileged=False)
    return facts.parse(result.stdout, spec)


def verify_host(hr: HostRun, expected: str | None, *, boot: bool = False,
                settle_timeout: float | None = None) -> Report:  # fmt: skip
    return run_checks(
        lambda: gather(hr, boot=boot),
        hr.target.settings.verify,
        expected,
        host=hr.name,
        boot=boot,
        settle_timeout=settle_timeout,
    )


def current_system(hr: HostRun) -> str | None:
    return facts.parse_store_path(
        hr.run(
            f"readlink -f {facts.CURRENT_SYSTEM}; true\n", timeout=20, privileged=False
        ).stdout.splitlines()
    )
