"""`invoke init` and `invoke add-host`, the real `invoke` run as a subprocess in a repository
(a test-bed flake with tasks.py) against real sshd test hosts: the key pinned only on a
matching fingerprint or a typed `yes`, nothing written on any refusal, and a tree in which the
dry-run deploy of the new host passes its gates."""

from __future__ import annotations

import base64
import difflib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from rebuild import hostkeys, inventory
from testbed import SimHost, Testbed
from tests.integration.conftest import config, free_port, git
from tests.support import launcher

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120
SSHD = Path("/usr/sbin/sshd")


def ssh_keygen_fingerprint(pub_line: str) -> str:
    """The fingerprint as the host's console shows it: real `ssh-keygen -lf` of the key."""
    done = subprocess.run(["ssh-keygen", "-lf", "-"], input=pub_line + "\n", text=True,
                          capture_output=True, check=True)  # fmt: skip
    return done.stdout.split()[1]


def other_key_line(tmp: Path) -> str:
    """Another real ed25519 public key (`type base64`): a key the host does not have."""
    path = tmp / f"other-{time.monotonic_ns()}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


class Repo:
    """A repository with a NixOS flake (configurations vps and web) and rebuild's tasks.py,
    one simulated host `vps`, and the real `invoke` run from the repository's root."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.host: SimHost = tb.add_host("vps")
        web_port = free_port()
        self.root = tb.make_flake(tb.root / "repo", {"vps": config("v1", web_port),
                                                     "web": config("w1", web_port)})  # fmt: skip
        shutil.copy(REPO / "tasks.py", self.root / "tasks.py")
        git(self.root, "add", "tasks.py")
        git(self.root, "commit", "-qm", "rebuild's tasks")
        self.inventory = self.root / "inventory.toml"
        self.known_hosts = self.root / "known_hosts"
        self.scripts = self.root / "scripts"

    @property
    def audit_log(self) -> Path:
        return self.tb.root / "state" / "rebuild" / "audit.jsonl"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REBUILD_")}
        env.update(self.tb.env())
        env["XDG_STATE_HOME"] = str(self.tb.root / "state")
        env["XDG_RUNTIME_DIR"] = str(self.tb.root)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(self.root), *args]

    def invoke(self, *args: str) -> subprocess.CompletedProcess[str]:
        return launcher.run(self.argv(*args), cwd=self.root, env=self.env(), timeout=TIMEOUT)

    def spawn(self, *args: str) -> pexpect.spawn:
        argv = self.argv(*args)
        return pexpect.spawn(argv[0], argv[1:], cwd=str(self.root), env=self.env(),
                             encoding="utf-8", timeout=60)  # fmt: skip

    def fingerprint(self) -> str:
        return ssh_keygen_fingerprint(self.host.host_key_line)

    def host_flags(self) -> list[str]:
        """Where and as whom: the dry-run deploy afterwards connects (to take the lock and
        preview the change), so the host gets the test bed's key too."""
        return ["--port", str(self.host.port), "--user", self.host.user,
                "--identity-file", str(self.tb.client_key)]  # fmt: skip

    def snapshot(self) -> dict[str, bytes | None]:
        """Every file add-host may write, byte for byte (None: absent)."""
        files = [self.inventory, self.known_hosts]
        if self.scripts.exists():
            files += sorted(self.scripts.iterdir())
        return {str(p): (p.read_bytes() if p.exists() else None) for p in files}

    def commit(self) -> None:
        git(self.root, "add", "-A")
        git(self.root, "commit", "-qm", "onboarding")

    def records(self, event: str) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        lines = self.audit_log.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("event") == event]


@pytest.fixture
def repo(testbed: Testbed) -> Repo:
    return Repo(testbed)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


class TestInit:
    def test_writes_a_valid_inventory_for_the_hosts_given(self, repo: Repo) -> None:
        """--host NAME=ADDRESS without a terminal: exit 0, an inventory that every task reads,
        this machine as operator, only the host given; the one nix call listed both."""
        done = repo.invoke("init", "--host", "vps=127.0.0.1")
        assert done.returncode == 0, done.stderr
        assert "vps, web" in done.stdout
        assert "invoke add-host --host vps" in done.stdout
        loaded = inventory.load(str(repo.inventory))
        assert [t.name for t in loaded.targets()] == ["vps"]
        assert loaded.target("vps").address == "127.0.0.1"
        assert loaded.known_hosts == repo.known_hosts
        assert len(loaded.inventory.operators) == 1
        hosts = repo.invoke("hosts")
        assert hosts.returncode == 0, hosts.stderr
        assert repo.records("init")[-1]["result"] == "ok"

    def test_yes_takes_every_configuration_with_addresses_to_fill_in(self, repo: Repo) -> None:
        """--yes: every configuration; those without an address make the file fail
        validation (exit 2, naming the key and the command) until add-host fills them in."""
        done = repo.invoke("init", "--yes")
        assert done.returncode == 0, done.stderr
        hosts = repo.invoke("hosts")
        assert hosts.returncode == 2
        assert "hosts.vps.address" in hosts.stderr
        assert "invoke add-host --host vps --address ADDR" in hosts.stderr

    def test_never_overwrites(self, repo: Repo) -> None:
        """An existing inventory: exit 2, one line naming the file and add-host, bytes kept."""
        repo.inventory.write_text("# mine\nflake = '.'\n")
        before = repo.inventory.read_bytes()
        done = repo.invoke("init", "--yes", "--host", "vps=127.0.0.1")
        assert done.returncode == 2
        line = one_line(done.stderr)
        assert "inventory.toml" in line
        assert "add-host" in line
        assert repo.inventory.read_bytes() == before

    def test_no_terminal_and_nothing_to_go_by(self, repo: Repo) -> None:
        """No terminal, no --host, no --yes: exit 3, nothing written."""
        done = repo.invoke("init")
        assert done.returncode == 3
        assert "no terminal" in one_line(done.stderr)
        assert not repo.inventory.exists()

    @pytest.mark.parametrize(
        "args",
        [["--host", "vps"], ["--host", "vps=1.2.3.4;reboot"], ["--host", "nope=127.0.0.1"],
         ["--host", "vps=127.0.0.1", "--host", "vps=127.0.0.2"], ["--flake", "a b", "--yes"],
         ["--operator", "a b", "--yes"]],
    )  # fmt: skip
    def test_bad_input(self, repo: Repo, args: list[str]) -> None:
        """Bad names, addresses, configurations, flake or operator: exit 2, one line."""
        done = repo.invoke("init", *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert one_line(done.stderr).startswith("error: ")
        assert not repo.inventory.exists()

    def test_asks_on_a_terminal(self, repo: Repo) -> None:
        """On a terminal it lists the configurations and asks which to include."""
        child = repo.spawn("init")
        child.expect("1. vps")
        child.expect("2. web")
        child.expect(r"Which configurations become hosts\?")
        child.sendline("2")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        _, pending = inventory_pending(repo.inventory)
        assert pending == ("web",)


def inventory_pending(path: Path) -> tuple[Any, tuple[str, ...]]:
    from rebuild.inventory_text import validate

    return validate(path, path.read_text())


class TestAddHost:
    def test_matching_fingerprint_then_dry_run(self, repo: Repo) -> None:
        """A fingerprint given up front that matches: exit 0; the key pinned as ssh writes it,
        the host in the inventory, its wrapper; committed, the dry-run deploy passes."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        done = repo.invoke("add-host", "--host", "vps", *repo.host_flags(),
                           "--fingerprint", repo.fingerprint())  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert repo.fingerprint() in done.stdout
        assert repo.known_hosts.read_text() == repo.host.known_hosts_line + "\n"
        target = inventory.load(str(repo.inventory)).target("vps")
        assert (target.settings.port, target.settings.user) == (repo.host.port, repo.host.user)
        wrapper = repo.scripts / "rebuild-vps.sh"
        assert os.access(wrapper, os.X_OK)
        assert repo.invoke("wrapper", "--check").returncode == 0
        record = repo.records("add-host")[-1]
        assert (record["result"], record["exit_code"]) == ("ok", 0)
        assert record["pinned"] == [repo.fingerprint()]
        repo.commit()
        dry = repo.invoke("rebuild", "--host", "vps", "--dry-run", "--yes")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        # once more: the host is there with the same key, nothing to do
        again = repo.invoke("add-host", "--host", "vps")
        assert again.returncode == 0, again.stderr
        assert "nothing to do" in again.stdout
        assert repo.invoke("rebuild", "--host", "vps", "--dry-run", "--yes").returncode == 0

    def test_typed_yes_at_a_terminal(self, repo: Repo) -> None:
        """Without --fingerprint, at a real terminal: the fingerprints, the question, and only
        a typed `yes` pins the key; anything else is exit 4 with nothing written."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        before = repo.snapshot()
        child = repo.spawn("add-host", "--host", "vps", *repo.host_flags())
        child.expect_exact(repo.fingerprint())
        child.expect("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
        child.expect("Type yes if they match")
        child.sendline("y")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert repo.snapshot() == before

        child = repo.spawn("add-host", "--host", "vps", *repo.host_flags())
        child.expect("Type yes if they match")
        child.sendline("yes")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert repo.known_hosts.read_text() == repo.host.known_hosts_line + "\n"
        assert (repo.scripts / "rebuild-vps.sh").exists()

    def test_mismatch_writes_nothing(self, repo: Repo, tmp_path: Path) -> None:
        """A fingerprint that is not the host's: exit 3, one line, no file touched."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        before = repo.snapshot()
        wrong = ssh_keygen_fingerprint(other_key_line(tmp_path))
        done = repo.invoke("add-host", "--host", "vps", *repo.host_flags(),
                           "--fingerprint", wrong)  # fmt: skip
        assert done.returncode == 3
        line = one_line(done.stderr)
        assert "MISMATCH" in line
        assert wrong in line
        assert repo.fingerprint() in line
        assert repo.snapshot() == before
        assert repo.records("add-host")[-1]["result"] == "refused"

    def test_no_terminal_without_fingerprint(self, repo: Repo) -> None:
        """No terminal to ask and no --fingerprint: exit 3 with the way forward."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        before = repo.snapshot()
        done = repo.invoke("add-host", "--host", "vps", *repo.host_flags())
        assert done.returncode == 3
        assert "no terminal to confirm the fingerprint; pass --fingerprint SHA256:... after " \
               "checking it out of band" in one_line(done.stderr)  # fmt: skip
        assert repo.snapshot() == before

    def test_changed_key_needs_replace_key(self, repo: Repo, tmp_path: Path) -> None:
        """known_hosts pins another key for the host: exit 3 naming both fingerprints, nothing
        written; with --replace-key and the new fingerprint: the old line replaced, audited."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        assert repo.invoke("add-host", "--host", "vps", *repo.host_flags(),
                           "--fingerprint", repo.fingerprint()).returncode == 0  # fmt: skip
        old = other_key_line(tmp_path)
        name = hostkeys.key_name(repo.host.address, repo.host.port)
        repo.known_hosts.write_text(f"# pinned by hand\nother.example ssh-ed25519 AAAA\n"
                                    f"{name} {old}\n")  # fmt: skip
        before = repo.snapshot()
        done = repo.invoke("add-host", "--host", "vps")
        assert done.returncode == 3
        line = one_line(done.stderr)
        assert "HOST KEY CHANGED" in line
        assert ssh_keygen_fingerprint(old) in line
        assert repo.fingerprint() in line
        assert "--replace-key" in line
        assert repo.snapshot() == before

        done = repo.invoke("add-host", "--host", "vps", "--replace-key",
                           "--fingerprint", repo.fingerprint())  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert repo.known_hosts.read_text() == (
            "# pinned by hand\nother.example ssh-ed25519 AAAA\n" + repo.host.known_hosts_line + "\n"
        )
        record = repo.records("add-host")[-1]
        assert record["overrides"] == ["replace-key"]
        assert record["previous_keys"] == [ssh_keygen_fingerprint(old)]
        assert record["pinned"] == [repo.fingerprint()]
        assert record["result"] == "ok"

    def test_unreachable(self, repo: Repo) -> None:
        """Nothing listens at the address: exit 3, one line, nothing written."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        before = repo.snapshot()
        port = str(free_port())
        done = repo.invoke("add-host", "--host", "web", "--address", "127.0.0.1",
                           "--port", port, "--fingerprint", repo.fingerprint())  # fmt: skip
        assert done.returncode == 3
        assert "cannot reach" in one_line(done.stderr)
        assert repo.snapshot() == before

    @pytest.mark.parametrize(
        "args",
        [["--host", "v;ps", "--address", "127.0.0.1"], ["--host", "web", "--address", "a b"],
         ["--host", "web", "--address", "127.0.0.1", "--port", "70000"],
         ["--host", "web", "--address", "127.0.0.1", "--user", "$(id)"],
         ["--host", "web", "--address", "127.0.0.1", "--attr", "nope"],
         ["--host", "web", "--address", "127.0.0.1", "--fingerprint", "MD5:aa:bb"],
         ["--host", "web"], ["--address", "127.0.0.1"],
         ["--host", "vps", "--address", "127.0.0.9"]],
    )  # fmt: skip
    def test_bad_input(self, repo: Repo, args: list[str]) -> None:
        """Bad names, addresses, ports, users, attrs, fingerprints, a missing address or host,
        or a flag that would change a host's address: exit 2, one line, nothing written."""
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        before = repo.snapshot()
        done = repo.invoke("add-host", *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert one_line(done.stderr).startswith("error: ")
        assert repo.snapshot() == before

    def test_comments_and_order_kept_when_appending(self, repo: Repo) -> None:
        """A hand-written inventory: the new host is appended, every byte before it kept, and
        the result is valid."""
        hand = (REPO / "inventory.toml").read_text().replace(
            'known_hosts = "~/.ssh/known_hosts"', 'known_hosts = "known_hosts"')  # fmt: skip
        hand = hand.replace("# [[operators]]\n# name", "[[operators]]\nname", 1)
        hand = hand.replace('# machine_id = "0123456789abcdef0123456789abcdef"',
                            f'machine_id = "{machine_id()}"', 1)  # fmt: skip
        hand = hand.replace('# hostname = "laptop"', "", 1)
        repo.inventory.write_text(hand)
        repo.commit()
        done = repo.invoke("add-host", "--host", "sim", "--attr", "vps", "--address",
                           repo.host.address, *repo.host_flags(),
                           "--fingerprint", repo.fingerprint())  # fmt: skip
        assert done.returncode == 0, done.stderr
        text = repo.inventory.read_text()
        assert text.startswith(hand)
        loaded = inventory.load(str(repo.inventory))
        assert [t.name for t in loaded.targets()] == ["vps", "sim"]
        assert loaded.target("sim").attr == "vps"
        repo.commit()
        dry = repo.invoke("rebuild", "--host", "sim", "--dry-run", "--yes")
        assert dry.returncode == 0, dry.stdout + dry.stderr

    def test_fills_in_what_init_left(self, repo: Repo) -> None:
        """After `init --yes`, add-host fills in the host's address (and port, user) in its
        table: only those lines change, every comment stays; the other host still waits."""
        assert repo.invoke("init", "--yes").returncode == 0
        before = repo.inventory.read_text()
        done = repo.invoke("add-host", "--host", "vps", "--address", repo.host.address,
                           *repo.host_flags(), "--fingerprint", repo.fingerprint())  # fmt: skip
        assert done.returncode == 0, done.stderr
        after = repo.inventory.read_text()
        diff = [line for line in difflib.ndiff(before.splitlines(), after.splitlines())
                if line[:1] in "+-"]  # fmt: skip
        added = sorted(line[2:].split("#")[0].strip() for line in diff if line[0] == "+")
        assert added == sorted([f'address = "{repo.host.address}"', f"port = {repo.host.port}",
                                f'user = "{repo.host.user}"',
                                f'identity_file = "{repo.tb.client_key}"'])  # fmt: skip
        assert len(diff) == 8
        filled = [line for line in diff if line[0] == "+" and "identity_file" not in line]
        assert all("  # " in line for line in filled)  # comments kept

        def prose(text: str) -> list[str]:
            return [c for c in text.splitlines() if c.startswith("#") and " = " not in c]

        assert prose(before) == prose(after)
        _, pending = inventory_pending(repo.inventory)
        assert pending == ("web",)


def machine_id() -> str:
    from rebuild import identity

    return identity.current().machine_id


# --- a host that offers every key type -------------------------------------------------------


@pytest.fixture
def many_keys(tmp_path: Path) -> Iterator[tuple[str, int, dict[str, str]]]:
    """A real sshd with Ed25519, ECDSA and RSA host keys: (address, port, {family: pub})."""
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    keys: dict[str, str] = {}
    for family, kind in (("ED25519", "ed25519"), ("ECDSA", "ecdsa"), ("RSA", "rsa")):
        path = tmp_path / f"host_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
        keys[family] = " ".join(path.with_suffix(".pub").read_text().split()[:2])
    port = free_port()
    cfg = tmp_path / "sshd_config"
    cfg.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1",
        *(f"HostKey {tmp_path / f'host_{k}'}" for k in ("ed25519", "ecdsa", "rsa")),
        f"PidFile {tmp_path / 'sshd.pid'}", "UsePAM no", "StrictModes no",
        "AuthorizedKeysFile none", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "",
    ]))  # fmt: skip
    log = (tmp_path / "sshd.log").open("wb")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail((tmp_path / "sshd.log").read_text())
                time.sleep(0.05)
        yield "127.0.0.1", port, keys
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


class TestEveryKeyType:
    def test_scan_reads_every_key_the_server_offers(
        self, many_keys: tuple[str, int, dict[str, str]]
    ) -> None:
        """One handshake per family gets the Ed25519, ECDSA and RSA keys, each as the host's
        public key file has it."""
        address, port, keys = many_keys
        offered = hostkeys.scan(address, port, timeout=5)
        assert {k.family: f"{k.keytype} {base64.b64encode(k.blob).decode()}"
                for k in offered} == keys  # fmt: skip
        for key in offered:
            assert key.fingerprint == ssh_keygen_fingerprint(keys[key.family])

    def test_fingerprint_pins_only_the_key_it_names(
        self, repo: Repo, many_keys: tuple[str, int, dict[str, str]]
    ) -> None:
        """--fingerprint of the ECDSA key pins that key alone: the others were not checked."""
        address, port, keys = many_keys
        assert repo.invoke("init", "--host", "vps=127.0.0.1").returncode == 0
        done = repo.invoke("add-host", "--host", "web", "--address", address, "--port", str(port),
                           "--fingerprint", ssh_keygen_fingerprint(keys["ECDSA"]))  # fmt: skip
        assert done.returncode == 0, done.stderr
        for family in keys:
            assert ssh_keygen_fingerprint(keys[family]) in done.stdout
        assert repo.known_hosts.read_text() == f"[{address}]:{port} {keys['ECDSA']}\n"
