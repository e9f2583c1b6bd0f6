"""rebuild.enroll without a host: the known_hosts check, which files are re-keyed, commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from rebuild import agekey
from rebuild.enroll import (
    affected_files,
    check_against_known_hosts,
    looks_encrypted,
    secret_files,
    updatekeys_commands,
)
from rebuild.errors import GateRefused
from rebuild.remote import Endpoint

# two real keys (ssh-keygen -t ed25519)
HOST = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKt1RBD+Tg9UpY2mPMjpfJzXKYSbbu3WigXcEf9Q208j"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx6uCHrnjssysllKdX2naasLrJkBI7b0JaN6DJSlg8f"


def endpoint(tmp_path: Path, known: str, port: int = 22) -> Endpoint:
    path = tmp_path / "known_hosts"
    path.write_text(known)
    return Endpoint(name="vps", address="203.0.113.10", port=port, user="root", known_hosts=path)


class TestKnownHostsCheck:
    def test_the_known_key_passes(self, tmp_path: Path) -> None:
        ep = endpoint(tmp_path, f"203.0.113.10 {HOST}\n")
        key = check_against_known_hosts(ep, HOST + " root@vps\n")
        assert key.recipient == agekey.ssh_ed25519_to_age_recipient(HOST)
        assert key.fingerprint == agekey.fingerprint_sha256(HOST)

    def test_another_key_refuses(self, tmp_path: Path) -> None:
        ep = endpoint(tmp_path, f"203.0.113.10 {HOST}\n")
        with pytest.raises(GateRefused, match="is not the ssh-ed25519 key known_hosts has"):
            check_against_known_hosts(ep, OTHER)

    def test_no_ed25519_entry_refuses_with_the_scan_command(self, tmp_path: Path) -> None:
        ep = endpoint(tmp_path, "[203.0.113.10]:2222 " + HOST + "\n", port=22)
        with pytest.raises(GateRefused, match=r"ssh-keyscan -t ed25519 203\.0\.113\.10"):
            check_against_known_hosts(ep, HOST)
        ep = endpoint(tmp_path, "", port=2222)
        with pytest.raises(GateRefused, match=r"ssh-keyscan -t ed25519 -p 2222 203\.0\.113\.10"):
            check_against_known_hosts(ep, HOST)

    def test_not_an_ed25519_key_refuses(self, tmp_path: Path) -> None:
        ep = endpoint(tmp_path, f"203.0.113.10 {HOST}\n")
        with pytest.raises(GateRefused, match="not a usable ssh-ed25519 key"):
            check_against_known_hosts(ep, "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ")


ENCRYPTED = "data: ENC[AES256_GCM,data:x]\nsops:\n  mac: ENC[...]\n"


class TestFiles:
    def test_only_sops_files_outside_hidden_folders(self, tmp_path: Path) -> None:
        files = {
            "secrets/vps/a.yaml": ENCRYPTED,
            "secrets/vps/b.json": '{"data": "ENC[x]", "sops": {"mac": "x"}}',
            "secrets/vps/c.env": "A=ENC[x]\nsops_mac=ENC[x]\n",
            "secrets/vps/d.ini": "[x]\na = ENC[x]\n[sops]\nmac = ENC[x]\n",
            "secrets/vps/plain.yaml": "no: secret\n",
            ".git/secrets.yaml": ENCRYPTED,
            ".sops.yaml": "creation_rules: []\nsops: x\n",
        }
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        assert secret_files(tmp_path) == [
            "secrets/vps/a.yaml", "secrets/vps/b.json", "secrets/vps/c.env", "secrets/vps/d.ini",
        ]  # fmt: skip
        assert not looks_encrypted(tmp_path / "missing")

    def test_only_files_governed_by_a_rule_with_the_host(self) -> None:
        text = (
            "creation_rules:\n"
            "  - path_regex: secrets/vps/shared\\.yaml$\n    age: age1admin\n"
            "  - path_regex: secrets/vps/.*\\.yaml$\n    age: age1admin,age1host\n"
        )
        files = ["secrets/vps/shared.yaml", "secrets/vps/app.yaml", "secrets/web/x.yaml"]
        assert affected_files(text, ("secrets/vps/.*\\.yaml$",), files) == ["secrets/vps/app.yaml"]

    def test_commands_are_quoted(self) -> None:
        assert updatekeys_commands(Path("/srv/my infra"), ["secrets/vps/a b.yaml"]) == [
            "(cd '/srv/my infra' && sops updatekeys --yes 'secrets/vps/a b.yaml')"
        ]
