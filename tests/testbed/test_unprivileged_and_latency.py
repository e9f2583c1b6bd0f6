"""Loopback mode as an unprivileged user; the latency proxy."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import LatencyProxy, Testbed
from testbed.store import PACKAGE_PARENT

from .conftest import ssh

UNPRIVILEGED_USER = f"rbtb-u{os.getpid()}"  # per test process: runs may overlap

SCRIPT = textwrap.dedent(
    """
    import os, socket, subprocess, sys
    sys.path.insert(0, {package!r})
    from testbed import Testbed

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    assert os.geteuid() != 0
    port = free_port()
    with Testbed() as tb:
        host = tb.add_host("vps")
        out = subprocess.run([*host.ssh_argv(), "--", "id -u; systemctl is-system-running"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(os.geteuid()), "running"], out.stdout
        cfg = {{"units": {{"sshd.service": {{}}, "web.service": {{"port": port}}}}, "label": "u1"}}
        flake = tb.make_flake(tb.root / "flake", {{"vps": cfg}})
        env = {{**os.environ, **tb.env(), "NIX_SSHOPTS": host.nix_sshopts()}}
        argv = [tb.env()["REBUILD_NIXOS_REBUILD"], "switch", "--flake", f"{{flake}}#vps",
                "--target-host", host.destination]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=flake)
        assert r.returncode == 0, r.stderr
        assert host.current_system() == tb.store_path("vps", cfg)
        url = f"http://{{host.address}}:{{port}}/"
        c = subprocess.run(["curl", "-s", url], capture_output=True, text=True, timeout=15)
        assert c.stdout.strip() == "web.service u1", c.stdout
        root = tb.root
    assert not root.exists()
    print("UNPRIVILEGED-OK")
    """
)


@pytest.fixture
def unprivileged_user() -> Iterator[str | None]:
    """A user with a login shell to run as (created when root), None when already unprivileged."""
    if os.geteuid() != 0:
        yield None
        return
    if shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("useradd/runuser missing")
    created = False
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", UNPRIVILEGED_USER],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot create a user: {result.stderr.strip()}")
        created = True
    try:
        yield UNPRIVILEGED_USER
    finally:
        if created:
            subprocess.run(
                ["userdel", "--remove", UNPRIVILEGED_USER],
                capture_output=True,
                timeout=30,
                check=False,
            )


def test_loopback_mode_works_unprivileged(unprivileged_user: str | None) -> None:
    python = sys.executable
    if unprivileged_user is not None:
        # the interpreter must be executable by that user (a venv under /root is not)
        probe = subprocess.run(
            ["runuser", "-u", unprivileged_user, "--", python, "-c", "pass"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode != 0:
            python = "/usr/bin/python3"
        probe = subprocess.run(
            [
                "runuser",
                "-u",
                unprivileged_user,
                "--",
                python,
                "-c",
                f"import sys; sys.path.insert(0, {PACKAGE_PARENT!r}); import testbed",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(f"no Python 3.11 usable by {unprivileged_user}: {probe.stderr.strip()}")
    with tempfile.TemporaryDirectory(prefix="rbtb-unpriv-") as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(SCRIPT.format(package=PACKAGE_PARENT))
        Path(tmp).chmod(0o755)
        script.chmod(0o644)
        argv = [python, str(script)]
        if unprivileged_user is not None:
            argv = ["runuser", "-u", unprivileged_user, "--", *argv]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=90, cwd=tmp, check=False
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "UNPRIVILEGED-OK" in result.stdout


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


def _round_trip(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        return time.monotonic() - start


def test_latency_proxy_delays_each_round_trip() -> None:
    server, port = _echo_server()
    with server:
        direct = _round_trip(port)
    server, port = _echo_server()
    with server, LatencyProxy("127.0.0.1", "127.0.0.1", port, latency_ms=200) as proxy:
        delayed = _round_trip(proxy.port)
    assert direct < 0.1
    assert delayed >= 0.2
    assert delayed < 2.0


def test_latency_host_is_slower_over_ssh(testbed: Testbed) -> None:
    fast = testbed.add_host("fast", initial_config=None)
    slow = testbed.add_host("slow", latency_ms=100, initial_config=None)
    assert slow.port != slow.sshd_port
    assert slow.known_hosts_line.startswith(f"[{slow.address}]:{slow.port} ")

    def timed(host: object) -> float:
        start = time.monotonic()
        assert ssh(host, "true").returncode == 0  # type: ignore[arg-type]
        return time.monotonic() - start

    fast_time = min(timed(fast) for _ in range(2))
    slow_time = min(timed(slow) for _ in range(2))
    # an ssh connection takes several round trips; each costs 100 ms more through the proxy
    assert slow_time - fast_time >= 0.3, (fast_time, slow_time)
