"""`invoke doctor` as the operator runs it: all ok on a machine set up right (exit 0), and each
check failing once, on its own, with its fix printed under it (exit 3). No host is contacted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import pytest

from tests.integration.conftest import Deployment

CHECKS = [
    "inventory", "nixos-rebuild", "nix", "nix flakes", "ssh", "keyring", "operator allowlist",
    "known_hosts vps", "identity vps", "state folder", "flake tree",
]  # fmt: skip


def edit_inventory(d: Deployment, old: str, new: str) -> None:
    text = d.inventory.read_text()
    assert old in text, old
    d.inventory.write_text(text.replace(old, new))


def minimal_path(d: Deployment, *, without: str) -> str:
    """A PATH folder with links to the programs doctor runs, less one."""
    folder = d.tb.root / "minbin"
    folder.mkdir()
    for name in ("git", "sh", "ssh"):
        found = shutil.which(name)
        if name != without and found is not None:
            (folder / name).symlink_to(found)
    return str(folder)


def break_inventory(d: Deployment) -> dict[str, str]:
    edit_inventory(d, "connect_timeout = 5", "connect_timeout = 0")
    return {}


def break_nixos_rebuild(d: Deployment) -> dict[str, str]:
    return {"REBUILD_NIXOS_REBUILD": str(d.tb.root / "no-such-nixos-rebuild")}


def break_nix(d: Deployment) -> dict[str, str]:
    return {"REBUILD_NIX": str(d.tb.root / "no-such-nix")}


def break_flakes(d: Deployment) -> dict[str, str]:
    """A nix that answers --version but knows no flakes (Nix before 2.4)."""
    old_nix = d.tb.root / "old-nix"
    old_nix.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "nix (Nix) 2.3.16"; exit 0; }\n'
        "echo \"error: unrecognised flag '--extra-experimental-features'\" >&2; exit 1\n"
    )
    old_nix.chmod(0o755)
    return {"REBUILD_NIX": str(old_nix)}


def break_ssh(d: Deployment) -> dict[str, str]:
    return {"PATH": minimal_path(d, without="ssh")}


def break_keyring(d: Deployment) -> dict[str, str]:
    edit_inventory(d, 'user = "', 'sudo = true\nuser = "')
    return {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


def break_operator(d: Deployment) -> dict[str, str]:
    edit_inventory(d, 'name = "ci"', 'name = "ci"\nhostname = "somebody-else"')
    return {}


def break_known_hosts(d: Deployment) -> dict[str, str]:
    d.tb.known_hosts.write_text("")
    return {}


def break_identity(d: Deployment) -> dict[str, str]:
    loose = d.tb.root / "loose_key"
    shutil.copyfile(d.tb.client_key, loose)
    loose.chmod(0o644)
    edit_inventory(d, str(d.tb.client_key), str(loose))
    return {}


def break_state_folder(d: Deployment) -> dict[str, str]:
    shared = d.tb.root / "shared-state"
    shared.mkdir()
    shared.chmod(0o777)
    edit_inventory(d, str(d.audit_log), str(shared / "audit.jsonl"))
    return {}


def break_flake_tree(d: Deployment) -> dict[str, str]:
    (d.flake / "hosts" / "vps.json").write_text("{}\n")
    return {}


BREAKERS: dict[str, tuple[Callable[[Deployment], dict[str, str]], str]] = {
    "inventory": (break_inventory, "fix the named key"),
    "nixos-rebuild": (break_nixos_rebuild, "REBUILD_NIXOS_REBUILD to its path"),
    "nix": (break_nix, "install Nix"),
    "nix flakes": (break_flakes, "flake metadata"),
    "ssh": (break_ssh, "apt-get install openssh-client"),
    "keyring": (break_keyring, "keyrings.alt"),
    "operator allowlist": (break_operator, "invoke operator --name NAME"),
    "known_hosts vps": (break_known_hosts, "ssh-keyscan -p"),
    "identity vps": (break_identity, "chmod 600"),
    "state folder": (break_state_folder, "chmod go-w"),
    "flake tree": (break_flake_tree, "commit or stash"),
}


def doctor(d: Deployment, *args: str, **env: str) -> tuple[int, str, str]:
    done = d.invoke("doctor", *args, timeout=120, **env)
    return done.returncode, done.stdout, done.stderr


def test_every_check_is_covered() -> None:
    assert list(BREAKERS) == CHECKS


def test_all_ok(deployment: Deployment) -> None:
    """The test bed's operator machine passes every check, without contacting the host."""
    d = deployment
    before = d.host.current_system()
    code, out, err = doctor(d)
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line.split(":")[0][5:] for line in lines[:-1]] == CHECKS
    assert all(line.startswith("ok   ") for line in lines[:-1]), out
    assert lines[-1] == f"{len(CHECKS)} checks: all ok"
    assert not d.audit_log.exists()  # doctor writes no audit record
    assert d.host.current_system() == before
    code, out, _ = doctor(d, "--json")
    data = json.loads(out)
    assert [c["name"] for c in data] == CHECKS
    assert all(c["ok"] and set(c) == {"name", "ok", "detail", "fix"} for c in data)


@pytest.mark.parametrize("name", CHECKS)
def test_each_check_fails_with_its_fix(deployment: Deployment, name: str) -> None:
    d = deployment
    breaker, fix = BREAKERS[name]
    env = breaker(d)
    code, out, err = doctor(d, **env)
    assert code == 3, out + err
    lines = out.splitlines()
    failed = [i for i, line in enumerate(lines) if line.startswith(f"FAIL {name}: ")]
    assert failed, out
    assert lines[failed[0] + 1].startswith("     fix: "), out
    assert fix in lines[failed[0] + 1], out
    if name not in ("inventory", "nix"):  # these two also leave dependent checks undone
        assert sum(line.startswith("FAIL ") for line in lines) == 1, out
    code, out, _ = doctor(d, "--json", **env)
    assert code == 3
    by_name = {c["name"]: c for c in json.loads(out)}
    assert not by_name[name]["ok"] and fix in by_name[name]["fix"]
