"""`invoke enroll --host vps` against a test-bed host: the host key read over SSH (strict host
keys), checked against known_hosts, its age recipient derived, `.sops.yaml` updated, and
`sops updatekeys` run (a recording stand-in) on exactly the files the host's rule governs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rebuild import agekey
from testbed import Testbed
from tests.integration.conftest import Deployment, make_deployment

ALICE = "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp"
OLD = "age18s8m9hvlrwvltgys4lafyyqe356ntc7e06t4kd2nccqm5amsaa2s878mju"
REGEX = r"secrets/vps/[^/]+\.yaml$"

SOPS_YAML = f"""\
# who can read which secrets (reviewed like code)
keys:
  - &admin_alice {ALICE}  # alice's laptop
creation_rules:
  # shared with the whole team, never the hosts
  - path_regex: secrets/vps/shared\\.yaml$
    key_groups:
      - age:
          - *admin_alice
  # the vps's own secrets
  - path_regex: {REGEX}
    key_groups:
      - age:
          - *admin_alice
  - path_regex: secrets/other/[^/]+\\.yaml$
    key_groups:
      - age:
          - *admin_alice
"""
ENCRYPTED = "password: ENC[AES256_GCM,data:xyz,iv:abc,tag:def,type:str]\nsops:\n  version: 3.9.0\n"


@pytest.fixture
def enrolling(testbed: Testbed, tmp_path: Path) -> Deployment:
    """The vps deployment with a .sops.yaml, encrypted secrets and the host's regex."""
    d = make_deployment(testbed)
    text = d.inventory.read_text()
    text = text.replace("[hosts.vps]\n", f"[hosts.vps]\nsops_path_regex = '{REGEX}'\n", 1)
    d.inventory.write_text(text)
    (d.flake / ".sops.yaml").write_text(SOPS_YAML)
    for path, body in {
        "secrets/vps/app.yaml": ENCRYPTED,
        "secrets/vps/db.yaml": ENCRYPTED,
        "secrets/vps/shared.yaml": ENCRYPTED,  # governed by the team-only rule
        "secrets/vps/notes.yaml": "not: encrypted\n",  # plain files are not re-keyed
        "secrets/other/x.yaml": ENCRYPTED,
    }.items():
        (d.flake / path).parent.mkdir(parents=True, exist_ok=True)
        (d.flake / path).write_text(body)
    return d


def fake_sops(tmp_path: Path) -> tuple[Path, Path]:
    """A `sops` that records its cwd and arguments."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "sops-calls.log"
    script = bindir / "sops"
    script.write_text(f"#!/bin/sh\nprintf '%s %s\\n' \"$PWD\" \"$*\" >> '{log}'\n")
    script.chmod(0o755)
    return bindir, log


def enroll(d: Deployment, *args: str, path: str) -> subprocess.CompletedProcess[str]:
    return d.invoke("enroll", "--host", "vps", *args, PATH=path)


def host_recipient(d: Deployment) -> tuple[str, str]:
    line = d.host.host_key_line
    return agekey.fingerprint_sha256(line), agekey.ssh_ed25519_to_age_recipient(line)


class TestEnroll:
    def test_enrolls_runs_sops_on_the_governed_files_and_is_idempotent(
        self, enrolling: Deployment, tmp_path: Path
    ) -> None:
        """Fingerprint and recipient printed; .sops.yaml gains the host in its rule with every
        other byte kept; sops updatekeys ran for exactly the encrypted files whose governing
        rule is the host's; a second run changes nothing and runs nothing."""
        d = enrolling
        bindir, log = fake_sops(tmp_path)
        path = f"{bindir}:{os.environ['PATH']}"
        fingerprint, recipient = host_recipient(d)
        done = enroll(d, path=path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert fingerprint in done.stdout and recipient in done.stdout
        assert "invoke rebuild --host vps" in done.stdout
        # the fingerprint is what ssh-keygen says of the sshd's own key
        keygen = subprocess.run(
            ["ssh-keygen", "-lf", str(d.host.dir / "ssh_host_ed25519_key.pub")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert fingerprint in keygen.stdout
        text = (d.flake / ".sops.yaml").read_text()
        assert f"  - &host_vps {recipient}\n" in text
        added = [line for line in text.splitlines() if line not in SOPS_YAML.splitlines()]
        assert added == [f"  - &host_vps {recipient}", "          - *host_vps"]
        assert text.index("*host_vps") > text.index(REGEX)
        assert text.index("*host_vps") < text.index("secrets/other")
        calls = log.read_text().splitlines()
        assert calls == [
            f"{d.flake} updatekeys --yes secrets/vps/app.yaml",
            f"{d.flake} updatekeys --yes secrets/vps/db.yaml",
        ]
        record = d.records()[-1]
        assert record["event"] == "enroll" and record["result"] == "ok"
        assert record["recipient"] == recipient and record["fingerprint"] == fingerprint

        again = enroll(d, path=path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "unchanged" in again.stdout
        assert (d.flake / ".sops.yaml").read_text() == text
        assert log.read_text().splitlines() == calls

    @pytest.mark.skipif(shutil.which("age-keygen") is None, reason="age-keygen not installed")
    def test_recipient_belongs_to_the_hosts_private_key(self, enrolling: Deployment) -> None:
        """The enrolled recipient is what real age derives from the host's own key, as
        sops-nix converts it on the host."""
        d = enrolling
        _, recipient = host_recipient(d)
        identity = agekey.ssh_ed25519_private_to_age_identity(
            (d.host.dir / "ssh_host_ed25519_key").read_text()
        )
        derived = subprocess.run(
            ["age-keygen", "-y"], input=identity + "\n", capture_output=True, text=True,
            check=True, timeout=30,
        )  # fmt: skip
        assert derived.stdout.strip() == recipient

    def test_reinstalled_host_replaces_the_old_recipient(
        self, enrolling: Deployment, tmp_path: Path
    ) -> None:
        """A host enrolled with an old key (reinstalled since): the old recipient is replaced
        and the operator is told; the files are re-keyed."""
        d = enrolling
        old = SOPS_YAML.replace(
            "  - &admin_alice", f"  - &host_vps {OLD}\n  - &admin_alice"
        ).replace("          - *admin_alice\n  - path_regex: secrets/other",
                  "          - *admin_alice\n          - *host_vps\n"
                  "  - path_regex: secrets/other")  # fmt: skip
        (d.flake / ".sops.yaml").write_text(old)
        bindir, log = fake_sops(tmp_path)
        _, recipient = host_recipient(d)
        done = enroll(d, path=f"{bindir}:{os.environ['PATH']}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "host key changed" in done.stdout and OLD in done.stdout
        text = (d.flake / ".sops.yaml").read_text()
        assert OLD not in text and f"&host_vps {recipient}" in text
        assert len(log.read_text().splitlines()) == 2

    def test_key_file_differing_from_known_hosts_refuses(
        self, enrolling: Deployment, tmp_path: Path
    ) -> None:
        """The host's /etc/ssh key file is not the key known_hosts has (and sshd serves):
        refused, exit 3, nothing written, sops not run."""
        d = enrolling
        other = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                       check=True)  # fmt: skip
        link = d.host.root / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
        link.unlink()
        shutil.copyfile(f"{other}.pub", link)
        bindir, log = fake_sops(tmp_path)
        done = enroll(d, path=f"{bindir}:{os.environ['PATH']}")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "is not the ssh-ed25519 key known_hosts has" in done.stderr
        assert (d.flake / ".sops.yaml").read_text() == SOPS_YAML
        assert not log.exists()
        assert d.records()[-1]["result"] == "refused"

    def test_unknown_and_changed_host_keys_refuse(self, enrolling: Deployment) -> None:
        """No known_hosts entry, or another key there: exit 3 before reading anything."""
        d = enrolling
        good = d.tb.known_hosts.read_text()
        d.tb.known_hosts.write_text("")
        done = enroll(d, path=os.environ["PATH"])
        assert done.returncode == 3 and "ssh-keyscan" in done.stderr
        name = good.split()[0]
        d.tb.known_hosts.write_text(f"{name} {agekey.ED25519} {bogus_key()}\n")
        done = enroll(d, path=os.environ["PATH"])
        assert done.returncode == 3 and "HOST KEY CHANGED" in done.stderr
        assert (d.flake / ".sops.yaml").read_text() == SOPS_YAML

    def test_without_sops_prints_the_commands(self, enrolling: Deployment) -> None:
        """sops not on PATH: .sops.yaml is updated and the exact commands are printed."""
        d = enrolling
        path = "/usr/bin:/bin"
        if shutil.which("sops", path=path):
            pytest.skip("a real sops is installed in /usr/bin")
        done = enroll(d, path=path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sops is not on PATH" in done.stdout
        for name in ("app", "db"):
            assert f"&& sops updatekeys --yes secrets/vps/{name}.yaml)" in done.stdout
        assert "shared.yaml" not in done.stdout and "secrets/other" not in done.stdout
        assert "&host_vps" in (d.flake / ".sops.yaml").read_text()

    def test_dry_run_writes_nothing(self, enrolling: Deployment, tmp_path: Path) -> None:
        """--dry-run prints the recipient and the plan; the file and the secrets stay."""
        d = enrolling
        bindir, log = fake_sops(tmp_path)
        _, recipient = host_recipient(d)
        done = enroll(d, "--dry-run", path=f"{bindir}:{os.environ['PATH']}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert recipient in done.stdout and "nothing was written" in done.stdout
        assert "secrets/vps/app.yaml" in done.stdout
        assert (d.flake / ".sops.yaml").read_text() == SOPS_YAML
        assert not log.exists()
        assert json.dumps(d.records()) == "[]"


def bogus_key() -> str:
    import base64

    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))
    return base64.b64encode(blob).decode()
