"""The flake's git state, read with the real git from real repositories."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rebuild.gitstate import GitState, parse_porcelain, read


@pytest.fixture(autouse=True)
def _git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A git that ignores the operator's own configuration and has an identity."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test Operator")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "operator@example.org")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one commit holding flake.nix and hosts/vps.nix."""
    path = tmp_path / "flake"
    (path / "hosts").mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "flake.nix").write_text("{ outputs = _: { }; }\n", encoding="utf-8")
    (path / "hosts" / "vps.nix").write_text("{ }\n", encoding="utf-8")
    (path / ".gitignore").write_text("result\n*.log\n", encoding="utf-8")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "vps: enable sshd")
    return path


class TestRead:
    def test_clean_tree(self, repo: Path) -> None:
        """A committed tree is clean, with the HEAD commit and its subject."""
        state = read(repo)
        assert state.is_repo
        assert not state.dirty
        assert state.dirty_files == ()
        assert state.commit == git(repo, "rev-parse", "HEAD")
        assert state.subject == "vps: enable sshd"
        assert state.short == state.commit[:12]

    def test_modified_file_is_dirty(self, repo: Path) -> None:
        """An edited tracked file makes the tree dirty and is listed."""
        (repo / "flake.nix").write_text("{ changed = true; }\n", encoding="utf-8")
        state = read(repo)
        assert state.dirty
        assert state.dirty_files == ("flake.nix",)

    def test_staged_file_is_dirty(self, repo: Path) -> None:
        """A staged but uncommitted change makes the tree dirty."""
        (repo / "hosts" / "vps.nix").write_text("{ x = 1; }\n", encoding="utf-8")
        git(repo, "add", "hosts/vps.nix")
        assert read(repo).dirty_files == ("hosts/vps.nix",)

    def test_untracked_file_is_dirty(self, repo: Path) -> None:
        """A new file nested in a new folder is listed by its full path."""
        (repo / "hosts" / "new").mkdir()
        (repo / "hosts" / "new" / "web.nix").write_text("{ }\n", encoding="utf-8")
        assert read(repo).dirty_files == ("hosts/new/web.nix",)

    def test_ignored_files_do_not_count(self, repo: Path) -> None:
        """Files matched by .gitignore (build results, logs) leave the tree clean."""
        (repo / "result").write_text("/nix/store/x\n", encoding="utf-8")
        (repo / "build.log").write_text("log\n", encoding="utf-8")
        assert not read(repo).dirty

    def test_rename_is_listed_once(self, repo: Path) -> None:
        """A staged rename is one entry, the new path."""
        git(repo, "mv", "hosts/vps.nix", "hosts/linode.nix")
        assert read(repo).dirty_files == ("hosts/linode.nix",)

    def test_all_kinds_together(self, repo: Path) -> None:
        """Modified, staged and untracked files are all listed, nothing twice."""
        (repo / "flake.nix").write_text("{ a = 1; }\n", encoding="utf-8")
        (repo / "hosts" / "vps.nix").write_text("{ b = 1; }\n", encoding="utf-8")
        git(repo, "add", "hosts/vps.nix")
        (repo / "notes.txt").write_text("todo\n", encoding="utf-8")
        assert sorted(read(repo).dirty_files) == ["flake.nix", "hosts/vps.nix", "notes.txt"]

    def test_intent_to_add_rename_is_listed_once(self, repo: Path) -> None:
        """A moved file announced with `git add -N` (as flake users do) is one entry."""
        (repo / "hosts" / "vps.nix").rename(repo / "hosts" / "linode.nix")
        git(repo, "add", "-N", "hosts/linode.nix")
        assert read(repo).dirty_files == ("hosts/linode.nix",)

    def test_file_name_with_spaces(self, repo: Path) -> None:
        """A path with spaces is listed verbatim, not quoted or split."""
        (repo / "my notes.txt").write_text("x\n", encoding="utf-8")
        assert read(repo).dirty_files == ("my notes.txt",)

    def test_not_a_repository(self, tmp_path: Path) -> None:
        """A plain folder is not a repo, has no commit, and counts as dirty."""
        plain = tmp_path / "plain"
        plain.mkdir()
        state = read(plain)
        assert state == GitState(commit=None, subject="", dirty_files=(), is_repo=False)
        assert state.dirty
        assert state.short == "unknown"

    def test_flake_in_a_subfolder_ignores_changes_elsewhere(self, repo: Path) -> None:
        """Only changes under the flake's folder count when the flake is a subfolder."""
        (repo / "flake.nix").write_text("{ a = 2; }\n", encoding="utf-8")
        state = read(repo / "hosts")
        assert state.is_repo
        assert state.dirty_files == ()


class TestParsePorcelain:
    def test_empty_output_is_clean(self) -> None:
        """No output means no dirty files."""
        assert parse_porcelain("") == ()

    def test_status_kinds(self) -> None:
        """Worktree-modified, staged, added and untracked entries give their paths."""
        out = " M flake.nix\0M  hosts/vps.nix\0A  new.nix\0?? notes.txt\0"
        assert parse_porcelain(out) == ("flake.nix", "hosts/vps.nix", "new.nix", "notes.txt")

    def test_rename_skips_the_source_path(self) -> None:
        """A rename's second NUL field is its old path and is not listed."""
        out = "R  hosts/new.nix\0hosts/old.nix\0 M flake.nix\0"
        assert parse_porcelain(out) == ("hosts/new.nix", "flake.nix")

    def test_copy_skips_the_source_path(self) -> None:
        """A copy entry carries its source like a rename."""
        assert parse_porcelain("C  b.nix\0a.nix\0") == ("b.nix",)

    def test_worktree_rename_skips_the_source_path(self) -> None:
        """An intent-to-add rename (' R new\\0old') lists only the new path."""
        assert parse_porcelain(" R hosts/new.nix\0hosts/old.nix\0") == ("hosts/new.nix",)

    def test_paths_with_spaces_and_arrows(self) -> None:
        """With -z nothing is quoted: spaces and ' -> ' stay part of the name."""
        assert parse_porcelain("?? a b -> c.txt\0") == ("a b -> c.txt",)

    def test_deleted_file(self) -> None:
        """A deleted file is listed."""
        assert parse_porcelain(" D hosts/vps.nix\0") == ("hosts/vps.nix",)
