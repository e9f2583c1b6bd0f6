"""The SSH seam's pure parts: what known_hosts trusts, and the commands it prints."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from rebuild import hostrun
from rebuild.remote import Endpoint, host_key_problem, keyscan_hint, read_known_hosts

ED = "AAAAC3NzaC1lZDI1NTE5AAAAIBu3w5Y1m1ZTeBOEmQwRc6S5Q2bxv0dtAVnFwe1HQb9X"
OTHER = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def endpoint(known: Path, address: str = "203.0.113.10", port: int = 22) -> Endpoint:
    return Endpoint(name="vps", address=address, port=port, user="root", known_hosts=known)


class TestKnownHosts:
    def test_plain_key_is_trusted(self, tmp_path: Path) -> None:
        """A plain line for the host: the gate lets it through."""
        known = tmp_path / "known_hosts"
        known.write_text(f"203.0.113.10 ssh-ed25519 {ED}\n")
        assert host_key_problem(endpoint(known)) is None

    def test_revoked_key_is_never_trusted(self, tmp_path: Path) -> None:
        """@revoked marks a key bad for every host, even when a plain line lists it too."""
        known = tmp_path / "known_hosts"
        known.write_text(f"203.0.113.10 ssh-ed25519 {ED}\n@revoked * ssh-ed25519 {ED}\n")
        problem = host_key_problem(endpoint(known))
        assert problem is not None and "@revoked" in problem
        assert read_known_hosts(known).revoked == frozenset({ED})

    def test_another_unrevoked_key_still_counts(self, tmp_path: Path) -> None:
        """A host with one revoked and one good key passes the pre-check (the connection then
        accepts only the good one)."""
        known = tmp_path / "known_hosts"
        known.write_text(
            f"203.0.113.10 ssh-ed25519 {ED}\n203.0.113.10 ssh-ed25519 {OTHER}\n"
            f"@revoked * ssh-ed25519 {ED}\n"
        )
        assert host_key_problem(endpoint(known)) is None

    def test_cert_authority_is_refused_clearly(self, tmp_path: Path) -> None:
        """A host vouched for by @cert-authority: refused, saying why and what to pin instead."""
        known = tmp_path / "known_hosts"
        known.write_text(f"@cert-authority [203.0.113.10]:2200 ssh-ed25519 {ED}\n")
        problem = host_key_problem(endpoint(known, port=2200))
        assert problem is not None and "@cert-authority" in problem and "ssh-keyscan" in problem

    def test_unknown_host(self, tmp_path: Path) -> None:
        """No line for the host: refused with the out-of-band check and the keyscan command."""
        known = tmp_path / "known_hosts"
        known.write_text(f"198.51.100.1 ssh-ed25519 {ED}\n")
        problem = host_key_problem(endpoint(known))
        assert problem is not None and "ssh-keygen -lf" in problem


class TestPrintedCommands:
    @pytest.mark.parametrize("address", ["fe80::1%eth0", "203.0.113.10", "vps.example.org"])
    def test_keyscan_hint_is_quoted(self, tmp_path: Path, address: str) -> None:
        """The suggested command splits back into exactly its words, whatever the folder."""
        known = tmp_path / "my infra" / "known_hosts"
        hint = keyscan_hint(endpoint(known, address, 2200))
        command, _, target = hint.partition(" >> ")
        assert shlex.split(command) == ["ssh-keyscan", "-p", "2200", address]
        assert shlex.split(target) == [str(known)]


class TestControlFolder:
    def test_a_fresh_private_folder_per_process(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Control sockets live in a new 0700 folder (never one someone else made, such as a
        world-writable /tmp/rebuild-ssh-<uid>), removed at the end of the run."""
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        hostrun.remove_run_dir()
        squatted = tmp_path / "rebuild-ssh-0"
        squatted.mkdir(mode=0o777)
        first = hostrun.run_dir()
        assert first.parent == tmp_path and first != squatted
        assert first.stat().st_mode & 0o777 == 0o700
        assert hostrun.run_dir() == first  # one per run
        hostrun.remove_run_dir()
        assert not first.exists()
        assert hostrun.run_dir() != first
        hostrun.remove_run_dir()
