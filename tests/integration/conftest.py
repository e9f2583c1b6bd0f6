"""Fixtures for integration tests: a real sshd test host, a real git flake, an inventory that
authorizes this machine, and the real `invoke` run as a subprocess."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rebuild import identity
from testbed import SimHost, Testbed
from testbed.testbed import FAST_KEX
from tests.support import launcher

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(label: str, web_port: int, **extra: Any) -> dict[str, Any]:
    units: dict[str, Any] = {"sshd.service": {}, "web.service": {"port": web_port}}
    units.update(extra.pop("units", {}))
    return {"units": units, "label": label, **extra}


@dataclass
class Deployment:
    """One simulated host, its flake and an inventory for it; `invoke()` runs the real tool."""

    tb: Testbed
    host: SimHost
    flake: Path
    inventory: Path
    web_port: int
    calls: Path  # every nixos-rebuild invocation is appended here
    hosts: dict[str, SimHost] = field(default_factory=dict)

    @property
    def audit_log(self) -> Path:
        return self.tb.root / "audit.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **self.tb.env()}
        env.pop("REBUILD_INVENTORY", None)
        env["REBUILD_NIXOS_REBUILD"] = str(self.tb.root / "recording-nixos-rebuild")
        env["XDG_RUNTIME_DIR"] = str(self.tb.root)
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args,
                "--inventory", str(self.inventory)]  # fmt: skip

    def invoke(
        self, *args: str, timeout: float = 240, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return launcher.run(self.argv(*args), env=self.env(**env), timeout=timeout)

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def nixos_rebuild_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def set_config(self, attr: str, cfg: dict[str, Any], *, commit: bool = True) -> None:
        (self.flake / "hosts" / f"{attr}.json").write_text(
            json.dumps(cfg, indent=2, sort_keys=True)
        )
        if commit:
            git(self.flake, "add", "-A")
            git(self.flake, "commit", "-qm", f"{attr}: {cfg.get('label', 'change')}")

    def expected(self, attr: str, cfg: dict[str, Any]) -> str:
        return self.tb.store_path(attr, cfg)


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


def inventory_text(d_root: Path, flake: Path, known_hosts: Path, key: Path,
                   hosts: dict[str, tuple[SimHost, int, dict[str, Any]]],
                   *, operators: bool = True) -> str:  # fmt: skip
    me = identity.current()
    lines = [
        f'flake = "{flake}"',
        f'known_hosts = "{known_hosts}"',
        f'audit_log = "{d_root / "audit.jsonl"}"',
        "connect_timeout = 5",
    ]
    if operators:
        lines += ["", "[[operators]]", 'name = "ci"', f'machine_id = "{me.machine_id}"']
    for name, (host, web_port, extra) in hosts.items():
        lines += [
            "",
            f"[hosts.{name}]",
            f'address = "{host.address}"',
            f"port = {host.port}",
            f'user = "{host.user}"',
            f'identity_file = "{key}"',
            f"rollback_timeout = {extra.get('rollback_timeout', 30)}",
            f"tags = {json.dumps(extra.get('tags', ['test']))}",
            "",
            f"[hosts.{name}.verify]",
            f"units = {json.dumps(['sshd.service', 'web.service', *extra.get('extra_units', [])])}",
            f"ports = {json.dumps([web_port, *extra.get('extra_ports', [])])}",
            f"settle_timeout = {extra.get('settle_timeout', 3)}",
            f"command_timeout = {extra.get('command_timeout', 30)}",
            f"[[hosts.{name}.verify.http]]",
            f'url = "http://{host.address}:{web_port}/"',
            "status = 200",
        ]
        for check_name, run in extra.get("commands", {}).items():
            lines += [
                f"[[hosts.{name}.verify.commands]]",
                f"name = {json.dumps(check_name)}",
                f"run = {json.dumps(run)}",
            ]
    return "\n".join(lines) + "\n"


def recording_wrapper(tb: Testbed, calls: Path) -> None:
    """A nixos-rebuild that records its argv, then runs the test bed's stand-in."""
    real = tb.env()["REBUILD_NIXOS_REBUILD"]
    wrapper = tb.root / "recording-nixos-rebuild"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{calls}'\nexec '{real}' \"$@\"\n")
    wrapper.chmod(0o755)


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    with Testbed(kex=FAST_KEX) as tb:
        yield tb


def make_deployment(
    tb: Testbed, *, netns: bool = False, latency_ms: int = 0, **host_extra: Any
) -> Deployment:
    """One host named vps running config v0, with a flake whose HEAD is v1."""
    web_port = free_port()
    host = tb.add_host("vps", netns=netns, latency_ms=latency_ms)
    v0, v1 = config("v0", web_port), config("v1", web_port)
    flake = tb.make_flake(tb.root / "flake", {"vps": v1})
    host.activate(tb.build("vps", v0))
    calls = tb.root / "nixos-rebuild-calls.log"
    recording_wrapper(tb, calls)
    inventory = tb.root / "inventory.toml"
    inventory.write_text(
        inventory_text(
            tb.root, flake, tb.known_hosts, tb.client_key, {"vps": (host, web_port, host_extra)}
        )
    )
    return Deployment(tb, host, flake, inventory, web_port, calls, {"vps": host})


@pytest.fixture
def deployment(testbed: Testbed) -> Deployment:
    """One loopback host named vps running config v0, with a flake whose HEAD is v1."""
    return make_deployment(testbed)


def netns_or_skip() -> None:
    from testbed import netns_available

    why = netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")


def whoami() -> str:
    return getpass.getuser()
