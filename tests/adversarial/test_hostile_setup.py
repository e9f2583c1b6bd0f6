"""The rails against a hostile machine set-up, on a real sshd test host: an ssh_config, an
inherited NIX_SSHOPTS and Fabric config files that try to redirect or weaken the connection,
known_hosts entries that must not be trusted (a key of another type only, @revoked), and a port
that does not speak SSH. Each proves the host was reached only as the inventory says, or not
at all."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rebuild.errors import GateRefused
from rebuild.remote import Endpoint, Remote
from testbed import Testbed
from tests.integration.conftest import Deployment, make_deployment
from tests.support.pytest_fixtures import testbed  # noqa: F401

OK, REFUSED, HOST_LOST = 0, 3, 6


@pytest.fixture
def deployment(testbed: Testbed) -> Deployment:  # noqa: F811
    return make_deployment(testbed)


def untouched(d: Deployment, before: list[tuple[int, str]]) -> None:
    """Nothing ran on the host: same generations, no nixos-rebuild call."""
    assert d.host.generations() == before
    assert d.nixos_rebuild_calls() == []


def home_with(d: Deployment, files: dict[str, str]) -> Path:
    home = d.tb.root / "home"
    for rel, text in files.items():
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return home


class TestNothingRedirectsSsh:
    def test_a_hostile_ssh_config_is_not_read(self, deployment: Deployment) -> None:
        """~/.ssh/config with a ProxyCommand, StrictHostKeyChecking no and a null
        known_hosts for every host: the deploy goes to the inventory's host, strictly, and the
        ProxyCommand never runs (nixos-rebuild's ssh has -F none; Fabric reads no ssh_config)."""
        d = deployment
        marker = d.tb.root / "proxy-ran"
        home = home_with(d, {".ssh/config": (
            "Host *\n"
            f"  ProxyCommand sh -c 'touch {marker}; exec nc %h %p'\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  HostName 127.0.0.254\n"
        )})  # fmt: skip
        done = d.invoke("rebuild", "--host", "vps", "--yes", HOME=str(home))
        assert done.returncode == OK, done.stdout + done.stderr
        assert not marker.exists()
        assert d.host.current_system() == d.records()[-1]["expected_system"]

    def test_a_hostile_system_ssh_config_is_not_read(
        self, deployment: Deployment, system_ssh_config_drop_in: Path
    ) -> None:
        """An ssh_config that redirects this host through a ProxyCommand and turns host-key
        checking off: nixos-rebuild's ssh (-F none) never reads it."""
        d = deployment
        marker = d.tb.root / "proxy-ran"
        system_ssh_config_drop_in.write_text(
            f'Match host {d.host.address} exec "test %p = {d.host.port}"\n'
            f"  ProxyCommand sh -c 'touch {marker}; exec nc %h %p'\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        )
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == OK, done.stdout + done.stderr
        assert not marker.exists()

    def test_an_inherited_nix_sshopts_is_ignored(self, deployment: Deployment) -> None:
        """NIX_SSHOPTS from the environment (a ProxyCommand, no host-key checking) is dropped
        with a warning; the deploy stays strict and goes where the inventory says."""
        d = deployment
        marker = d.tb.root / "proxy-ran"
        hostile = (
            f"-o ProxyCommand=sh\\ -c\\ 'touch\\ {marker};\\ exec\\ nc\\ %h\\ %p' "
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o HostKeyAlias=x"
        )
        done = d.invoke("rebuild", "--host", "vps", "--yes", NIX_SSHOPTS=hostile)
        assert done.returncode == OK, done.stdout + done.stderr
        assert "NIX_SSHOPTS from the environment is ignored" in done.stderr
        assert not marker.exists()

    def test_fabric_config_files_are_not_read(self, deployment: Deployment) -> None:
        """~/.fabric.yaml (a gateway) and ~/.fabric.py (code) are neither used nor run."""
        d = deployment
        marker = d.tb.root / "fabric-py-ran"
        home = home_with(d, {
            ".fabric.yaml": "gateway: nobody@127.0.0.254\nconnect_kwargs:\n  password: x\n",
            ".fabric.py": f"open({str(marker)!r}, 'w').close()\n",
        })  # fmt: skip
        assert d.invoke("rebuild", "--host", "vps", "--yes").returncode == OK
        done = d.invoke("verify", "--host", "vps", HOME=str(home))
        assert done.returncode == OK, done.stdout + done.stderr
        assert not marker.exists()


@pytest.fixture
def system_ssh_config_drop_in(deployment: Deployment) -> Iterator[Path]:
    """A drop-in in /etc/ssh/ssh_config.d (read through Debian's `Include`), matching only this
    test host (address and port), removed afterwards. ssh finds the user's ~/.ssh/config
    through the password database, not $HOME, so the system folder is the way to hand
    nixos-rebuild's ssh a hostile config without touching a real user's files."""
    folder = Path("/etc/ssh/ssh_config.d")
    main = Path("/etc/ssh/ssh_config")
    if os.getuid() != 0 or not folder.is_dir() or "ssh_config.d" not in main.read_text():
        pytest.skip("needs root and an ssh_config that includes /etc/ssh/ssh_config.d")
    path = folder / f"rebuild-test-{os.getpid()}.conf"
    yield path
    path.unlink(missing_ok=True)


class TestUntrustedKeys:
    def test_a_key_of_another_type_only_is_refused(self, deployment: Deployment) -> None:
        """known_hosts has an RSA key under the host's name while the host offers ed25519:
        the local pre-check passes (a key is known); the connection refuses (exit 3): paramiko
        compares a key of another type with the known one, as a changed key. (The policy for
        a host with no key at all is proven by the next test, past the pre-check.)"""
        d = deployment
        rsa = d.tb.root / "other_rsa"
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)],
                       check=True, capture_output=True)  # fmt: skip
        blob = " ".join(Path(f"{rsa}.pub").read_text().split()[:2])
        where = d.host.known_hosts_line.split()[0]
        d.tb.known_hosts.write_text(f"{where} {blob}\n")
        before = d.host.generations()
        for args in (("verify", "--host", "vps"), ("rebuild", "--host", "vps", "--yes")):
            done = d.invoke(*args)
            assert done.returncode == REFUSED, done.stdout + done.stderr
            assert "not in" in done.stderr or "CHANGED" in done.stderr, done.stderr
        untouched(d, before)
        assert d.tb.known_hosts.read_text() == f"{where} {blob}\n"  # nothing was added

    def test_the_connection_itself_refuses_an_unknown_host(self, deployment: Deployment) -> None:
        """Past the local pre-check, the SSH seam's own policy refuses a host that is not in
        known_hosts (paramiko's RejectPolicy, never Fabric's AutoAddPolicy), and adds nothing."""
        d = deployment
        empty = d.tb.root / "empty_known_hosts"
        empty.write_text("")
        endpoint = Endpoint(name="vps", address=d.host.address, port=d.host.port,
                            user=d.host.user, known_hosts=empty,
                            identity_file=d.tb.client_key, connect_timeout=5)  # fmt: skip
        with pytest.raises(GateRefused, match="not in"):
            Remote(endpoint).open()
        assert empty.read_text() == ""

    def test_a_revoked_key_is_refused_on_every_path(self, deployment: Deployment) -> None:
        """The host's own key, listed and also marked @revoked: verify and rebuild refuse."""
        d = deployment
        line = d.host.known_hosts_line
        d.tb.known_hosts.write_text(f"{line}\n@revoked {line}\n")
        before = d.host.generations()
        for args in (("verify", "--host", "vps"), ("rebuild", "--host", "vps", "--yes")):
            done = d.invoke(*args)
            assert done.returncode == REFUSED, done.stdout + done.stderr
            assert "@revoked" in done.stderr
        untouched(d, before)


class NotSsh:
    """A port on the host's address that answers with something that is not SSH."""

    def __init__(self, address: str) -> None:
        self.server = socket.socket()
        self.server.bind((address, 0))
        self.server.listen(8)
        self.server.settimeout(0.2)
        self.port = int(self.server.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\x00\xff" * 64)
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.server.close()


@pytest.fixture
def not_ssh(deployment: Deployment) -> Iterator[NotSsh]:
    server = NotSsh(deployment.host.address)
    yield server
    server.close()


def test_a_port_that_does_not_speak_ssh(deployment: Deployment, not_ssh: NotSsh) -> None:
    """One clear line and no paramiko traceback; the deploy is refused before anything changed
    (exit 3), verification reports the host as not answering (exit 6)."""
    d = deployment
    text = d.inventory.read_text().replace(f"port = {d.host.port}", f"port = {not_ssh.port}")
    d.inventory.write_text(text)
    with d.tb.known_hosts.open("a") as fh:
        fh.write(f"[{d.host.address}]:{not_ssh.port} {d.host.host_key_line}\n")
    before = d.host.generations()
    for args, code in ((("verify", "--host", "vps"), HOST_LOST),
                       (("rebuild", "--host", "vps", "--yes"), REFUSED)):  # fmt: skip
        done = d.invoke(*args)
        output = done.stdout + done.stderr
        assert done.returncode == code, output
        assert "Traceback" not in output and "paramiko" not in output.lower(), output
        assert "error reading SSH protocol banner" in output or "SSH" in output, output
    untouched(d, before)
