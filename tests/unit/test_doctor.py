"""`invoke doctor`: each check is a pure function over gathered facts; each says ok, and each
fails (or warns) with its fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rebuild import doctor
from rebuild.doctor import (
    FAIL,
    OK,
    WARN,
    Check,
    Facts,
    FileFacts,
    HostFacts,
    Tool,
    check_flakes,
    check_git,
    check_identity_file,
    check_inventory,
    check_keyring,
    check_known_host,
    check_nix,
    check_nixos_rebuild,
    check_operator,
    check_ssh,
    check_state_dir,
    checks,
    detect_flavour,
    exit_code,
    render,
)
from rebuild.gitstate import GitState
from rebuild.identity import Identity
from rebuild.inventory import Loaded, parse
from rebuild.remote import Endpoint

UID = 1000
MACHINE = "0123456789abcdef0123456789abcdef"
ME = Identity("laptop", MACHINE)


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def loaded(tmp_path: Path, *, operators: bool = True, flake: str = ".") -> Loaded:
    text = f'flake = "{flake}"\n'
    if operators:
        text += f'[[operators]]\nname = "laptop"\nmachine_id = "{MACHINE}"\n'
    text += '[hosts.vps]\naddress = "203.0.113.10"\n'
    path = tmp_path / "inventory.toml"
    return Loaded(path, parse(path, text))


def endpoint(tmp_path: Path) -> Endpoint:
    return Endpoint("vps", "203.0.113.10", 22, "root", tmp_path / "known_hosts")


def facts(tmp_path: Path, **kw: object) -> Facts:
    """A machine where everything is fine; tests change one thing."""
    inv = loaded(tmp_path)
    base: dict[str, object] = {
        "uid": UID,
        "nixos_rebuild": Tool("nixos-rebuild", "/run/current-system/sw/bin/nixos-rebuild", 0,
                              "nixos-rebuild-ng 25.11",
                              "/nix/store/abc-nixos-rebuild-ng-25.11/bin/nixos-rebuild"),
        "nixos_rebuild_source": "the default, on PATH",
        "flavour": None,
        "nix": Tool("nix", "/usr/bin/nix", 0, "nix (Nix) 2.28.3"),
        "flakes": Tool("nix", "/usr/bin/nix", 0, "{}"),
        "ssh": Tool("ssh", "/usr/bin/ssh", 0, "OpenSSH_9.2p1 Debian-2+deb12u3"),
        "inventory_path": inv.path,
        "loaded": inv,
        "me": ME,
        "hosts": [HostFacts("vps", endpoint(tmp_path), True, None)],
        "state_dir": FileFacts(tmp_path / "state", True, True, 0o700, UID),
        "audit_log": FileFacts(tmp_path / "state" / "audit.jsonl", True, False, 0o600, UID),
        "git": GitState("a" * 40, "vps: nginx", (), True),
    }  # fmt: skip
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


class TestAllGood:
    def test_every_check_ok(self, tmp_path: Path) -> None:
        """A machine where everything is in place: every check ok, exit 0."""
        found = checks(facts(tmp_path))
        assert [c.level for c in found] == [OK] * len(found), render(found)
        assert [c.name for c in found] == [
            "inventory", "nixos-rebuild", "nix", "nix flakes", "ssh", "keyring",
            "operator allowlist", "known_hosts vps", "identity vps", "state folder",
            "flake tree",
        ]  # fmt: skip
        assert exit_code(found) == 0


def fails(check: Check, *, fix: str) -> None:
    assert check.level == FAIL and not check.ok, check
    assert check.fix is not None and fix in check.fix, check.fix


class TestEachCheckFails:
    def test_inventory(self, tmp_path: Path) -> None:
        f = facts(tmp_path, loaded=None, inventory_error="inventory.toml: hosts.vps.port: bad")
        fails(check_inventory(f), fix="fix the named key")
        assert check_operator(f).level == WARN  # the checks that need it say why they did not

    def test_nixos_rebuild_missing(self, tmp_path: Path) -> None:
        f = facts(tmp_path, nixos_rebuild=Tool("nixos-rebuild", None))
        fails(check_nixos_rebuild(f), fix="REBUILD_NIXOS_REBUILD")

    def test_nixos_rebuild_flavour_mismatch_warns(self, tmp_path: Path) -> None:
        """A classic nixos-rebuild where the inventory says ng (the default) is a warning."""
        classic = Tool("nixos-rebuild", "/x/nixos-rebuild", 1, "unknown option --version",
                       "/nix/store/abc-nixos-rebuild-24.11/bin/nixos-rebuild")  # fmt: skip
        check = check_nixos_rebuild(facts(tmp_path, nixos_rebuild=classic))
        assert check.level == WARN and check.ok
        assert check.fix is not None and 'nixos_rebuild_flavour = "classic"' in check.fix
        assert "no --version answer" in check.detail
        ok = check_nixos_rebuild(facts(tmp_path, nixos_rebuild=classic, flavour="classic"))
        assert ok.level == OK

    def test_flavour_detection(self) -> None:
        assert detect_flavour("/nix/store/x-nixos-rebuild-ng-25.05/bin/nixos-rebuild", "") == "ng"
        assert detect_flavour("/nix/store/x-nixos-rebuild-24.11/bin/nixos-rebuild", "") == (
            "classic"
        )
        assert detect_flavour("/usr/local/bin/nixos-rebuild", "nixos-rebuild-ng 25.11") == "ng"
        assert detect_flavour("/usr/local/bin/nixos-rebuild", "") is None

    def test_nix_missing(self, tmp_path: Path) -> None:
        f = facts(tmp_path, nix=Tool("nix", None))
        fails(check_nix(f), fix="install Nix")
        fails(check_flakes(f), fix="install Nix first")

    def test_nix_broken(self, tmp_path: Path) -> None:
        fails(check_nix(facts(tmp_path, nix=Tool("nix", "/usr/bin/nix", 1, ""))),
              fix="repair")  # fmt: skip

    def test_flakes(self, tmp_path: Path) -> None:
        """nix that cannot use flakes (or a flake that does not evaluate) fails with the exact
        command to try."""
        f = facts(tmp_path, flakes=Tool("nix", "/usr/bin/nix", 1, "error: unrecognised flag"))
        check = check_flakes(f)
        fails(check, fix="flake metadata")
        assert "error: unrecognised flag" in check.detail

    def test_ssh_missing(self, tmp_path: Path) -> None:
        fails(check_ssh(facts(tmp_path, ssh=Tool("ssh", None))), fix="openssh-client")

    def test_ssh_not_openssh_warns(self, tmp_path: Path) -> None:
        check = check_ssh(facts(tmp_path, ssh=Tool("ssh", "/bin/ssh", 0, "dropbear v2022")))
        assert check.level == WARN

    def test_keyring(self, tmp_path: Path) -> None:
        """Hosts with sudo = true need a keyring backend; without such hosts none is needed."""
        f = facts(tmp_path, sudo_hosts=("vps",), keyring_error="no OS keyring backend")
        fails(check_keyring(f), fix="keyrings.alt")
        backend = "keyrings.alt.file.PlaintextKeyring"
        assert check_keyring(facts(tmp_path, sudo_hosts=("vps",), keyring_backend=backend)).ok

    def test_operator_not_allowlisted(self, tmp_path: Path) -> None:
        f = facts(tmp_path, me=Identity("other", "f" * 32))
        fails(check_operator(f), fix="invoke operator --name NAME")
        empty = facts(tmp_path, loaded=loaded(tmp_path, operators=False))
        check = check_operator(empty)
        assert check.level == FAIL and "the allowlist is empty" in check.detail

    def test_known_host_missing(self, tmp_path: Path) -> None:
        host = HostFacts("vps", endpoint(tmp_path), False, None)
        check = check_known_host(host)
        fails(check, fix="ssh-keyscan 203.0.113.10 >>")

    @pytest.mark.parametrize(
        ("file", "fix"),
        [
            (FileFacts(Path("/k/id"), False), "ssh-keygen -t ed25519 -f /k/id"),
            (FileFacts(Path("/k/id"), True, True, 0o700, UID), "identity_file"),
            (FileFacts(Path("/k/id"), True, False, 0o644, UID), "chmod 600 /k/id"),
            (FileFacts(Path("/k/id"), True, False, 0o640, UID), "chmod 600 /k/id"),
            (FileFacts(Path("/k/id"), True, False, 0o600, 0), f"chown {UID} /k/id"),
        ],
        ids=["missing", "folder", "world-readable", "group-readable", "not-mine"],
    )
    def test_identity_file(self, tmp_path: Path, file: FileFacts, fix: str) -> None:
        fails(check_identity_file(HostFacts("vps", endpoint(tmp_path), True, file), UID), fix=fix)

    def test_identity_file_ok(self, tmp_path: Path) -> None:
        ok = FileFacts(Path("/k/id"), True, False, 0o600, UID)
        assert check_identity_file(HostFacts("vps", endpoint(tmp_path), True, ok), UID).ok

    @pytest.mark.parametrize(
        ("state", "log", "fix"),
        [
            (FileFacts(Path("/s"), True, True, 0o777, UID), None, "chmod go-w /s"),
            (FileFacts(Path("/s"), True, True, 0o720, UID), None, "chmod go-w /s"),
            (FileFacts(Path("/s"), True, True, 0o700, 0), None, f"chown {UID} /s"),
            (FileFacts(Path("/s"), True, False, 0o600, UID), None, "move it away"),
            (FileFacts(Path("/s"), True, True, 0o700, UID),
             FileFacts(Path("/s/audit.jsonl"), True, False, 0o666, UID), "chmod 600"),
        ],
        ids=["world-writable", "group-writable", "not-mine", "a-file", "log-writable"],
    )  # fmt: skip
    def test_state_dir(self, tmp_path: Path, state: FileFacts, log: FileFacts | None,
                       fix: str) -> None:  # fmt: skip
        fails(check_state_dir(facts(tmp_path, state_dir=state, audit_log=log)), fix=fix)

    def test_state_dir_missing_is_fine(self, tmp_path: Path) -> None:
        check = check_state_dir(facts(tmp_path, state_dir=FileFacts(Path("/s"), False)))
        assert check.level == OK and "does not exist yet" in check.detail

    def test_git(self, tmp_path: Path) -> None:
        dirty = GitState("a" * 40, "x", tuple(f"f{i}" for i in range(12)), True)
        check = check_git(facts(tmp_path, git=dirty))
        fails(check, fix="commit or stash")
        assert "(+2 more)" in check.detail
        fails(check_git(facts(tmp_path, git=GitState(None, "", (), False))), fix="commit the flake")

    def test_flake_url_has_no_tree(self, tmp_path: Path) -> None:
        url = facts(tmp_path, loaded=loaded(tmp_path, flake="github:o/r"), git=None)
        assert check_git(url).level == OK


class TestReport:
    def test_render_and_exit(self, tmp_path: Path) -> None:
        """One line per check; the fix under each problem; exit 3 when one failed."""
        found = checks(facts(tmp_path, ssh=Tool("ssh", None)))
        lines = render(found)
        i = lines.index("FAIL ssh: ssh not found")
        assert lines[i + 1].startswith("     fix: install the OpenSSH client")
        assert exit_code(found) == 3
        assert found[4].to_json() == {"name": "ssh", "ok": False, "detail": "ssh not found",
                                      "fix": found[4].fix}  # fmt: skip

    def test_warnings_do_not_fail(self, tmp_path: Path) -> None:
        found = [Check("x", WARN, "meh", "do y"), Check("y", OK, "fine")]
        assert exit_code(found) == 0
        assert render(found) == ["warn x: meh", "     fix: do y", "ok   y: fine"]


class TestGathering:
    def test_probe_tool_missing(self) -> None:
        assert doctor.probe_tool("no-such-program-rebuild", ["--version"]).path is None

    def test_probe_tool_answers(self) -> None:
        tool = doctor.probe_tool("sh", ["-c", "echo hello; echo there >&2; exit 3"])
        assert tool.returncode == 3 and tool.answer == "hello" and "there" in tool.output

    def test_file_facts(self, tmp_path: Path) -> None:
        path = tmp_path / "key"
        path.write_text("x")
        path.chmod(0o640)
        got = doctor.file_facts(path)
        assert (got.exists, got.is_dir, got.mode, got.uid) == (True, False, 0o640, os.getuid())
        assert not doctor.file_facts(tmp_path / "none").exists
