"""The safety gates of a deploy: operator allowlist, git tree, terminal, local host lock."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rebuild.errors import GateRefused
from rebuild.gates import git_gate, operator_gate, terminal_gate
from rebuild.gitstate import GitState
from rebuild.identity import Identity
from rebuild.inventory import Loaded, load
from rebuild.locks import release_local_lock, take_local_lock

MID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
HOST = '[hosts.vps]\naddress = "203.0.113.10"\n'
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def inventory(tmp_path: Path, text: str) -> Loaded:
    path = tmp_path / "inventory.toml"
    path.write_text(text, encoding="utf-8")
    return load(str(path))


def allowlist(tmp_path: Path) -> Loaded:
    return inventory(
        tmp_path,
        f'[[operators]]\nname = "work-laptop"\nmachine_id = "{MID}"\nhostname = "laptop"\n' + HOST,
    )


class FakeStdin:
    """A stdin that is not a terminal (a pipe, CI, cron)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class TestOperatorGate:
    def test_listed_machine_passes_with_its_name(self, tmp_path: Path) -> None:
        """An allowlisted machine may deploy and is recorded under its operator name."""
        assert operator_gate(allowlist(tmp_path), Identity("laptop", MID)) == "work-laptop"

    def test_unlisted_machine_is_refused(self, tmp_path: Path) -> None:
        """Another machine is refused (exit 3), told why and how to get authorized."""
        loaded = allowlist(tmp_path)
        with pytest.raises(GateRefused) as caught:
            operator_gate(loaded, Identity("desktop", OTHER))
        message = str(caught.value)
        assert caught.value.exit_code == 3
        assert "invoke operator" in message
        assert "not listed" in message
        assert OTHER in message
        assert str(loaded.path) in message

    def test_empty_allowlist_refuses_everyone(self, tmp_path: Path) -> None:
        """With no [[operators]] nobody may deploy, and the message says the list is empty."""
        with pytest.raises(GateRefused, match="allowlist is empty") as caught:
            operator_gate(inventory(tmp_path, HOST), Identity("laptop", MID))
        assert "invoke operator" in str(caught.value)

    def test_wrong_hostname_is_refused(self, tmp_path: Path) -> None:
        """The right machine-id under another hostname is refused."""
        with pytest.raises(GateRefused):
            operator_gate(allowlist(tmp_path), Identity("desktop", MID))

    def test_unknown_machine_id(self, tmp_path: Path) -> None:
        """A machine without a readable machine-id is refused and shown as unknown."""
        with pytest.raises(GateRefused, match="machine-id unknown"):
            operator_gate(allowlist(tmp_path), Identity("laptop", ""))


class TestGitGate:
    def test_clean_tree_passes(self) -> None:
        """A clean committed tree needs no override."""
        assert git_gate(GitState(COMMIT, "x", (), True), allow_dirty=False) == []

    def test_flake_url_passes(self) -> None:
        """A flake URL has no local tree to check."""
        assert git_gate(None, allow_dirty=False) == []

    def test_dirty_tree_is_refused_with_the_files(self) -> None:
        """A dirty tree is refused (exit 3) naming the files and --allow-dirty."""
        state = GitState(COMMIT, "x", ("flake.nix", "hosts/vps.nix"), True)
        with pytest.raises(GateRefused) as caught:
            git_gate(state, allow_dirty=False)
        assert caught.value.exit_code == 3
        assert "flake.nix, hosts/vps.nix" in str(caught.value)
        assert "--allow-dirty" in str(caught.value)
        assert "more" not in str(caught.value)

    def test_lists_at_most_ten_files(self) -> None:
        """With 14 dirty files the first 10 are named and the rest counted."""
        files = tuple(f"hosts/h{i:02}.nix" for i in range(14))
        with pytest.raises(GateRefused) as caught:
            git_gate(GitState(COMMIT, "x", files, True), allow_dirty=False)
        message = str(caught.value)
        assert "hosts/h09.nix (+4 more)" in message
        assert "hosts/h10.nix" not in message

    def test_exactly_ten_files_has_no_more(self) -> None:
        """Ten dirty files are all named with no 'more'."""
        files = tuple(f"f{i}.nix" for i in range(10))
        with pytest.raises(GateRefused) as caught:
            git_gate(GitState(COMMIT, "x", files, True), allow_dirty=False)
        assert "f9.nix" in str(caught.value)
        assert "more" not in str(caught.value)

    def test_allow_dirty_is_recorded(self) -> None:
        """--allow-dirty lets a dirty tree through and reports the override for the audit."""
        state = GitState(COMMIT, "x", ("flake.nix",), True)
        assert git_gate(state, allow_dirty=True) == ["allow-dirty"]

    def test_not_a_repository(self) -> None:
        """A local flake outside git is refused: the deploy could not be traced to a commit."""
        with pytest.raises(GateRefused, match="not in a git repository"):
            git_gate(GitState(None, "", (), False), allow_dirty=False)
        assert git_gate(GitState(None, "", (), False), allow_dirty=True) == ["allow-dirty"]


class TestTerminalGate:
    def test_no_terminal_without_yes_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a terminal to ask on and without --yes, the run is refused (exit 3)."""
        monkeypatch.setattr(sys, "stdin", FakeStdin(tty=False))
        with pytest.raises(GateRefused, match="--yes") as caught:
            terminal_gate(yes=False, dry_run=False)
        assert caught.value.exit_code == 3

    def test_yes_passes_without_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--yes needs no terminal."""
        monkeypatch.setattr(sys, "stdin", FakeStdin(tty=False))
        terminal_gate(yes=True, dry_run=False)

    def test_dry_run_passes_without_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--dry-run asks nothing, so it needs no terminal."""
        monkeypatch.setattr(sys, "stdin", FakeStdin(tty=False))
        terminal_gate(yes=False, dry_run=True)

    def test_terminal_passes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With a terminal the prompt can be shown."""
        monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
        terminal_gate(yes=False, dry_run=False)

    def test_closed_stdin_is_no_terminal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A closed stdin counts as no terminal rather than crashing."""
        closed = open(os.devnull, encoding="utf-8")  # noqa: SIM115
        closed.close()
        monkeypatch.setattr(sys, "stdin", closed)
        with pytest.raises(GateRefused):
            terminal_gate(yes=False, dry_run=False)


class TestLocalLock:
    def test_second_take_is_refused_naming_the_holder(self, tmp_path: Path) -> None:
        """While one run holds a host, another take is refused (exit 3) naming that run."""
        first = take_local_lock(tmp_path, "vps", "20261125-193000-a1b2c3")
        try:
            with pytest.raises(GateRefused) as caught:
                take_local_lock(tmp_path, "vps", "20261125-193100-d4e5f6")
            assert caught.value.exit_code == 3
            assert "vps" in str(caught.value)
            assert f"run 20261125-193000-a1b2c3 (pid {os.getpid()})" in str(caught.value)
        finally:
            release_local_lock(first)

    def test_release_makes_it_takeable_again(self, tmp_path: Path) -> None:
        """After the holder releases, the next run takes the lock and is recorded as holder."""
        release_local_lock(take_local_lock(tmp_path, "vps", "run-1"))
        second = take_local_lock(tmp_path, "vps", "run-2")
        try:
            with pytest.raises(GateRefused, match="run run-2"):
                take_local_lock(tmp_path, "vps", "run-3")
        finally:
            release_local_lock(second)

    def test_hosts_are_locked_separately(self, tmp_path: Path) -> None:
        """Holding one host does not block another."""
        vps = take_local_lock(tmp_path, "vps", "run-1")
        web = take_local_lock(tmp_path, "web", "run-1")
        for handle in (vps, web):
            release_local_lock(handle)

    def test_lock_folder_is_private(self, tmp_path: Path) -> None:
        """The lock folder is created 0700."""
        release_local_lock(take_local_lock(tmp_path / "state", "vps", "run-1"))
        assert (tmp_path / "state" / "locks").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "state" / "locks" / "vps.lock").stat().st_mode & 0o777 == 0o600

    def test_lock_file_through_a_symlink_is_refused(self, tmp_path: Path) -> None:
        """A lock file that is a symlink (to a file someone wants truncated) is refused (exit 3)
        and the file it points to is untouched."""
        victim = tmp_path / "victim"
        victim.write_text("precious\n", encoding="utf-8")
        (tmp_path / "state" / "locks").mkdir(parents=True, mode=0o700)
        (tmp_path / "state" / "locks" / "vps.lock").symlink_to(victim)
        with pytest.raises(GateRefused, match="symlink"):
            take_local_lock(tmp_path / "state", "vps", "run-1")
        assert victim.read_text(encoding="utf-8") == "precious\n"

    def test_a_world_writable_state_folder_is_refused(self, tmp_path: Path) -> None:
        """A state folder others can write to (they could swap the files) is refused, with the
        chmod that fixes it."""
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        state.chmod(0o777)
        with pytest.raises(GateRefused, match="chmod go-w"):
            take_local_lock(state, "vps", "run-1")
