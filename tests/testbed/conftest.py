"""Fixtures and helpers for the test bed's own tests (real sshd, no mocks)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from testbed import SimHost, Testbed
from tests.support.pytest_fixtures import netns_required, testbed  # noqa: F401

V1 = {"units": {"sshd.service": {}, "web.service": {}}, "label": "v1"}


def rebuild(
    tb: Testbed,
    host: SimHost,
    flake: Path,
    attr: str,
    action: str = "switch",
    *,
    sshopts: str | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 60,
    flavour: str = "ng",
    reexec: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the nixos-rebuild stand-in of a flavour against a host; like rebuild, without the
    re-exec into the configuration's own nixos-rebuild unless `reexec`."""
    if not reexec:
        extra = ("--no-reexec" if flavour == "ng" else "--fast", *extra)
    env = {
        **os.environ,
        **tb.env(flavour),
        "NIX_SSHOPTS": sshopts if sshopts is not None else host.nix_sshopts(),
    }
    return subprocess.run(
        [
            str(tb.nixos_rebuild(flavour)),
            action,
            "--flake",
            f"{flake}#{attr}",
            "--target-host",
            host.destination,
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=flake,
        check=False,
    )


def ssh(
    host: SimHost, command: str, *, timeout: float = 30, connect_timeout: int = 5
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*host.ssh_argv(connect_timeout=connect_timeout), "--", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def curl(url: str) -> tuple[str, str]:
    """(status code, body) via the real curl."""
    result = subprocess.run(
        ["curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    body, _, code = result.stdout.rpartition("\n")
    return code, body.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def web_config(label: str, port: int, **extra: object) -> dict[str, object]:
    return {"units": {"sshd.service": {}, "web.service": {"port": port}}, "label": label, **extra}
