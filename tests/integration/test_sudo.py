"""Deploying as a non-root user through sudo, with the password in the OS keyring.

Real Linux users log in to a test-bed host (its sshd runs as root): one with passwordless
sudo, one whose sudo wants a password, one with a mixed rule (rebuild's own scripts without a
password, everything else with one). The keyring backend is selected explicitly
(PYTHON_KEYRING_BACKEND): a file backend from tests/, or keyring's `fail` backend for a
headless machine. The deploy-user tests need root (creating users); the `invoke secret` tests
run anywhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from rebuild.errors import GateRefused
from rebuild.remote import Endpoint, Remote
from testbed import Testbed
from testbed.procs import proc_parent
from testbed.testbed import FAST_KEX
from tests.integration.conftest import REPO, Deployment, config, make_deployment
from tests.support import users as testusers

FILE_BACKEND = "tests.keyring_backend.FileKeyring"
HEADLESS_BACKEND = "keyring.backends.fail.Keyring"
PASSWORD = "rb-" + secrets.token_urlsafe(18)  # one per test session; never in any argv
GIT_PROMPT = "Password for 'https://alice@example.com': "  # git's, for a private flake input


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, testusers.TestUser]]:
    """The deploy users, created once for this module and removed afterwards."""
    why = testusers.unavailable()
    if why:
        pytest.skip(why)
    testusers.cleanup_stale_users()
    made: dict[str, testusers.TestUser] = {}
    try:
        made["nopasswd"] = testusers.create_user("nopasswd")
        made["password"] = testusers.create_user("password", PASSWORD)
        made["mixed"] = testusers.create_user("mixed", PASSWORD)
        yield made
    finally:
        problems = [p for user in made.values() for p in testusers.remove_user(user)]
        assert not problems, problems
        for user in made.values():
            assert not user.sudoers_file.exists()


@pytest.fixture
def bed(accounts: dict[str, testusers.TestUser]) -> Iterator[Testbed]:
    with Testbed(other_users=True, kex=FAST_KEX) as tb:
        yield tb


@pytest.fixture
def keyring_file(tmp_path: Path) -> Path:
    """The file the test keyring backend keeps passwords in (outside the test bed)."""
    return tmp_path / "keyring.json"


def as_user(d: Deployment, user: str, *, sudo: bool) -> Deployment:
    """Deploy to vps as `user` (sudo = true or false) instead of root."""
    text = d.inventory.read_text()
    old = f'user = "{d.host.user}"'
    assert text.count(old) == 1
    line = f'user = "{user}"' + ("\nsudo = true" if sudo else "")
    d.inventory.write_text(text.replace(old, line))
    return d


def keyring_env(keyring_file: Path, backend: str = FILE_BACKEND) -> dict[str, str]:
    return {
        "PYTHON_KEYRING_BACKEND": backend,
        "RBTEST_KEYRING": str(keyring_file),
        "PYTHONPATH": str(REPO),
    }


def store_password(d: Deployment, keyring_file: Path, password: str) -> None:
    done = subprocess.run(
        d.argv("secret", "set", "--host", "vps", "--stdin"), input=password + "\n",
        env=d.env(**keyring_env(keyring_file)), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr


def entry(d: Deployment, user: str | None = None) -> str:
    """The keyring file's key of vps's entry: bound to name, user, address and port."""
    return f"rebuild/vps:{user or d.host.user}@{d.host.address}:{d.host.port}"


def no_waiting_timer(d: Deployment) -> bool:
    return not [t for t, sub in d.host.timers().items() if sub == "waiting"]


class TestNoSudo:
    def test_non_root_user_without_sudo_is_refused_at_the_lock(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """A non-root deploy user without sudo = true cannot take the lock: exit 3, 'needs
        root', nixos-rebuild never ran, the host unchanged."""
        d = as_user(make_deployment(bed), accounts["nopasswd"].name, sudo=False)
        before = d.host.current_system()
        done = d.invoke("rebuild", "--host", "vps", "--yes", **keyring_env(keyring_file))
        assert done.returncode == 3, done.stdout + done.stderr
        assert "needs root" in done.stderr and "sudo = true" in done.stderr
        assert "Permission denied" in done.stderr
        assert d.nixos_rebuild_calls() == []
        assert d.host.current_system() == before
        assert d.records()[-1]["result"] == "refused"


class TestPasswordlessSudo:
    def test_an_untrusted_deploy_user_is_refused_before_any_copy(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """The host's Nix does not trust the deploy user (trusted-users = root): copying the new
        system would fail late, so the lock step refuses at once (exit 3), naming the setting;
        nixos-rebuild never ran. Trusted, the same deploy goes through."""
        user = accounts["nopasswd"].name
        d = as_user(make_deployment(bed), user, sudo=True)
        nix = d.host.bin_dir / "nix"  # the host's `nix config show trusted-users`
        nix.write_text("#!/bin/sh\necho root\n")
        nix.chmod(0o755)
        env = keyring_env(keyring_file, HEADLESS_BACKEND)
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "not a trusted Nix user" in done.stderr and "trusted-users" in done.stderr
        assert d.nixos_rebuild_calls() == []
        # without the preview the lock step also arms the dead-man timer: taken back
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--no-preview", **env)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "not a trusted Nix user" in done.stderr and no_waiting_timer(d)
        assert not (d.host.root / "run" / "rebuild-lock").exists()
        assert d.nixos_rebuild_calls() == []
        nix.write_text(f"#!/bin/sh\necho root {user}\n")
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_deploys_even_without_a_keyring(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """NOPASSWD sudo just works, on a headless machine too: --sudo, no password asked,
        verified, timer cancelled, lock released."""
        d = as_user(make_deployment(bed), accounts["nopasswd"].name, sudo=True)
        env = keyring_env(keyring_file, HEADLESS_BACKEND)
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == d.expected("vps", config("v1", d.web_port))
        [call] = d.nixos_rebuild_calls()
        assert "--sudo" in call.split() and "--ask-sudo-password" not in call
        assert "answered by rebuild" not in done.stdout
        assert no_waiting_timer(d)
        assert not (d.host.root / "run" / "rebuild-lock").exists()
        record = d.records()[-1]
        assert record["result"] == "ok" and "--sudo" in record["command"]


class TestPasswordSudo:
    def test_no_password_stored_is_refused_naming_the_fix(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """sudo wants a password and none is stored: exit 3 naming `invoke secret set` and
        passwordless sudo; nothing ran."""
        d = as_user(make_deployment(bed), accounts["password"].name, sudo=True)
        done = d.invoke("rebuild", "--host", "vps", "--yes", **keyring_env(keyring_file))
        assert done.returncode == 3, done.stdout + done.stderr
        assert "needs a password" in done.stderr and "invoke secret set --host vps" in done.stderr
        assert "NOPASSWD" in done.stderr
        assert d.nixos_rebuild_calls() == []

    def test_headless_machine_names_both_options(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """No keyring backend at all: one clear line naming passwordless sudo and a keyring
        backend such as keyrings.alt (exit 3), never a traceback; `secret set` exits 2."""
        d = as_user(make_deployment(bed), accounts["password"].name, sudo=True)
        env = keyring_env(keyring_file, HEADLESS_BACKEND)
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "passwordless sudo" in done.stderr and "keyrings.alt" in done.stderr
        assert "Traceback" not in done.stderr
        done = subprocess.run(
            d.argv("secret", "set", "--host", "vps", "--stdin"), input="x\n", env=d.env(**env),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        assert "keyrings.alt" in done.stderr and "passwordless sudo" in done.stderr
        assert "Traceback" not in done.stderr

    def test_deploy_with_stored_password_never_leaks_it(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """The whole deploy works with the keyring password, and the password never appears in
        any process's argv or environment during the run (every process on this machine is
        polled: rebuild's children and the host-side sudo alike), nor in the output, the audit
        or any log of the test bed."""
        user = accounts["password"]
        d = as_user(make_deployment(bed), user.name, sudo=True)
        store_password(d, keyring_file, PASSWORD)
        # where it lives: the keyring only, bound to this login on this address
        assert json.loads(keyring_file.read_text()) == {entry(d, user.name): PASSWORD}
        secret = PASSWORD.encode()
        uid = int(subprocess.run(["id", "-u", user.name], capture_output=True, text=True,
                                 check=True).stdout)  # fmt: skip
        leaks: list[str] = []
        seen: set[str] = set()
        proc = subprocess.Popen(
            d.argv("rebuild", "--host", "vps", "--yes"), env=d.env(**keyring_env(keyring_file)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        output: dict[str, bytes] = {}

        def drain() -> None:
            out, err = proc.communicate()
            output.update(out=out, err=err)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        scans = 0
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            scan_processes(secret, proc.pid, uid, seen, leaks)
            scans += 1
        reader.join(timeout=30)
        assert proc.returncode == 0, output
        out, err = output["out"].decode(), output["err"].decode()
        assert not leaks, leaks
        # the scan watched the run: nixos-rebuild, ssh, and the host-side sudo
        assert scans > 20
        assert any("nixos-rebuild" in c for c in seen), seen
        assert any(c.startswith("ssh ") or "/ssh " in c for c in seen), seen
        assert any("sudo" in c for c in seen), seen
        assert d.host.current_system() == d.expected("vps", config("v1", d.web_port))
        [call] = d.nixos_rebuild_calls()
        assert "--sudo --ask-sudo-password" in call
        assert out.count("(answered by rebuild)") == 1
        assert PASSWORD not in out + err
        assert PASSWORD not in d.audit_log.read_text()
        record = d.records()[-1]
        assert record["result"] == "ok" and "--ask-sudo-password" in record["command"]
        assert no_waiting_timer(d)
        for path in files_below(bed.root):
            assert secret not in path.read_bytes(), path
        assert keyring_file.parent != bed.root

    def test_wrong_password_fails_once_at_the_lock(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """A wrong stored password: sudo rejects it at the first privileged step, rebuild
        refuses (exit 3) once, clearly, in bounded time; nixos-rebuild never runs."""
        d = as_user(make_deployment(bed), accounts["password"].name, sudo=True)
        store_password(d, keyring_file, "not-" + PASSWORD)
        started = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes", timeout=60,
                        **keyring_env(keyring_file))  # fmt: skip
        assert done.returncode == 3, done.stdout + done.stderr
        assert time.monotonic() - started < 30
        assert done.stderr.count("rejected the stored password") == 1
        assert "invoke secret set --host vps" in done.stderr
        assert PASSWORD not in done.stdout + done.stderr
        assert d.nixos_rebuild_calls() == []
        assert d.records()[-1]["result"] == "refused"

    def test_wrong_password_at_nixos_rebuild_exit_5(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], keyring_file: Path
    ) -> None:
        """sudo without a password for rebuild's own scripts but with one for the rest: a wrong
        password passes the lock and fails at nixos-rebuild's sudo; the prompt was answered
        once, nixos-rebuild stopped, exit 5, host unchanged, timer gone, lock released."""
        d = as_user(make_deployment(bed), accounts["mixed"].name, sudo=True)
        wrong = "not-" + PASSWORD
        store_password(d, keyring_file, wrong)
        before = d.host.current_system()
        started = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes", timeout=120,
                        **keyring_env(keyring_file))  # fmt: skip
        assert done.returncode == 5, done.stdout + done.stderr
        assert time.monotonic() - started < 90
        assert "rejected the stored password" in done.stderr
        assert "nixos-rebuild was stopped" in done.stderr
        assert done.stdout.count("(answered by rebuild)") == 1
        assert wrong not in done.stdout + done.stderr
        assert d.host.current_system() == before
        assert no_waiting_timer(d)
        assert not (d.host.root / "run" / "rebuild-lock").exists()
        record = d.records()[-1]
        assert record["result"] == "build_failed" and record["exit_code"] == 5
        assert wrong not in json.dumps(record)

    def test_a_git_password_prompt_is_never_answered(
        self,
        bed: Testbed,
        accounts: dict[str, testusers.TestUser],
        keyring_file: Path,
        tmp_path: Path,
    ) -> None:
        """The build asks for a private flake input's git password on the terminal (after ng's
        sudo prompt was answered): never answered, nixos-rebuild stopped, exit 5, the message
        names the prompt and the fix; the password never reached the prompt; nixos-rebuild ran
        with GIT_TERMINAL_PROMPT=0; host unchanged, timer gone, lock released."""
        d = as_user(make_deployment(bed), accounts["password"].name, sudo=True)
        store_password(d, keyring_file, PASSWORD)
        record = tmp_path / "git-prompt.jsonl"
        d.set_config("vps", config("v2", d.web_port, build_prompt=GIT_PROMPT,
                                   build_prompt_record=str(record)))  # fmt: skip
        before = d.host.current_system()
        # the build ahead (the preview's) runs with no terminal at all: git cannot even ask
        done = d.invoke("rebuild", "--host", "vps", "--yes", timeout=120,
                        **keyring_env(keyring_file))  # fmt: skip
        assert done.returncode == 5, done.stdout + done.stderr
        assert "cannot build vps" in done.stderr and "Password for" in done.stderr
        asked = [json.loads(line) for line in record.read_text().splitlines()]
        assert asked == [{"asked": GIT_PROMPT, "GIT_TERMINAL_PROMPT": "0"}]  # nothing read
        assert d.nixos_rebuild_calls() == []
        record.unlink()
        # without the preview, nixos-rebuild builds on rebuild's pseudo-terminal
        started = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--no-preview", timeout=120,
                        **keyring_env(keyring_file))  # fmt: skip
        assert done.returncode == 5, done.stdout + done.stderr
        assert time.monotonic() - started < 90
        assert (
            "nixos-rebuild was stopped: git asked for a password for https://alice@example.com"
            in done.stderr
        )
        assert "rebuild answers only sudo's prompt ('[sudo] password for " in done.stderr
        assert "make the flake input reachable without a password" in done.stderr
        assert done.stdout.count("(answered by rebuild)") == 1  # ng's sudo prompt only
        assert f"{GIT_PROMPT.rstrip()} (not answered by rebuild)" in done.stdout
        asked = [json.loads(line) for line in record.read_text().splitlines()]
        assert asked == [{"asked": GIT_PROMPT, "GIT_TERMINAL_PROMPT": "0"}]  # nothing read
        assert PASSWORD not in done.stdout + done.stderr + d.audit_log.read_text()
        assert d.host.current_system() == before
        assert no_waiting_timer(d)
        assert not (d.host.root / "run" / "rebuild-lock").exists()
        rec = d.records()[-1]
        assert rec["result"] == "build_failed" and rec["exit_code"] == 5


class TestSecretTask:
    def test_set_from_stdin_and_clear(self, testbed: Testbed, keyring_file: Path) -> None:
        """`secret set --stdin` stores under service rebuild, bound to the host's name, user,
        address and port; `clear` removes it, a second clear says there is nothing; bad usage
        exits 2 or 3."""
        d = make_deployment(testbed)
        env = keyring_env(keyring_file)
        store_password(d, keyring_file, PASSWORD)
        assert json.loads(keyring_file.read_text()) == {entry(d): PASSWORD}
        done = d.invoke("secret", "clear", "--host", "vps", **env)
        assert done.returncode == 0 and "removed" in done.stdout
        assert json.loads(keyring_file.read_text()) == {}
        done = d.invoke("secret", "clear", "--host", "vps", **env)
        assert done.returncode == 0 and "nothing to remove" in done.stdout
        done = d.invoke("secret", "set", "--host", "vps", **env)  # stdin is /dev/null
        assert done.returncode == 3 and "--stdin" in done.stderr
        done = d.invoke("secret", "show", "--host", "vps", **env)
        assert done.returncode == 2 and "set" in done.stderr
        done = d.invoke("secret", "set", "--host", "nope", "--stdin", **env)
        assert done.returncode == 2 and "unknown host" in done.stderr

    def test_set_at_a_terminal_asks_twice_without_echo(
        self, testbed: Testbed, keyring_file: Path
    ) -> None:
        """At a terminal `secret set` asks twice and echoes nothing; two different answers
        store nothing (exit 4)."""
        d = make_deployment(testbed)
        env = d.env(**keyring_env(keyring_file))
        argv = d.argv("secret", "set", "--host", "vps")
        child = pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=60)
        child.expect_exact("sudo password for vps: ")
        child.sendline("one-" + PASSWORD)
        child.expect_exact("again, to confirm: ")
        child.sendline("two-" + PASSWORD)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert PASSWORD not in (child.before or "")
        assert not keyring_file.exists() or json.loads(keyring_file.read_text()) == {}
        child = pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=60)
        child.expect_exact("sudo password for vps: ")
        child.sendline(PASSWORD)
        child.expect_exact("again, to confirm: ")
        child.sendline(PASSWORD)
        child.expect(pexpect.EOF)
        transcript = child.before or ""
        child.close()
        assert child.exitstatus == 0, transcript
        assert PASSWORD not in transcript
        assert "stored the sudo password of vps" in transcript
        assert json.loads(keyring_file.read_text()) == {entry(d): PASSWORD}

    def test_old_entry_is_refused_until_stored_again(
        self, testbed: Testbed, keyring_file: Path
    ) -> None:
        """An entry of an older rebuild (the host name alone, not bound to an address): a
        sudo deploy is refused (exit 3) before anything runs, naming `invoke secret set` and
        `clear`; `secret set` stores the bound entry and removes the old one."""
        d = make_deployment(testbed)
        as_user(d, d.host.user, sudo=True)
        env = keyring_env(keyring_file)
        keyring_file.write_text(json.dumps({"rebuild/vps": PASSWORD}))
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 3, done.stdout + done.stderr
        assert "older rebuild" in done.stderr and "not bound to a user and address" in done.stderr
        assert "invoke secret set --host vps" in done.stderr
        assert "invoke secret clear --host vps" in done.stderr
        assert PASSWORD not in done.stdout + done.stderr
        assert d.nixos_rebuild_calls() == []
        assert d.records()[-1]["result"] == "refused"
        store_password(d, keyring_file, PASSWORD)
        assert json.loads(keyring_file.read_text()) == {entry(d): PASSWORD}


# --- helpers --------------------------------------------------------------------------------


def scan_processes(secret: bytes, root_pid: int, uid: int, seen: set[str],
                   leaks: list[str]) -> None:  # fmt: skip
    """One pass over every process: the secret must be in no argv and no environment. The
    commands of rebuild's descendants and of the deploy user's processes are noted in `seen`."""
    me = os.getpid()
    parents: dict[int, int | None] = {}
    commands: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text(errors="replace")
        except OSError:
            continue
        command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        if secret in cmdline:
            leaks.append(f"argv of {pid}: {command[:300]}")
        if secret in environ:
            leaks.append(f"environment of {pid}: {command[:300]}")
        parents[pid] = proc_parent(pid)
        commands[pid] = command
        match = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if match and int(match.group(1)) == uid:
            seen.add(command[:300])
    for pid, command in commands.items():
        ancestor: int | None = pid
        for _ in range(64):
            if ancestor is None or ancestor <= 1:
                break
            if ancestor == root_pid:
                seen.add(command[:300])
                break
            ancestor = parents.get(ancestor)


def files_below(root: Path) -> Iterator[Path]:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


class TestPrivilegedAndPlainInOneRoundTrip:
    """`Remote.run_pair`: the re-arm (root, through sudo) and the facts (as the SSH user) of a
    deploy's verification share one remote command; the password reaches sudo only."""

    def endpoint(self, d: Deployment, user: str, password: str | None) -> Endpoint:
        return Endpoint(name="vps", address=d.host.address, port=d.host.port, user=user,
                        known_hosts=d.tb.known_hosts, identity_file=d.tb.client_key,
                        connect_timeout=5, sudo=True, sudo_password=password)  # fmt: skip

    @pytest.mark.parametrize("kind", ["nopasswd", "password"])
    def test_first_part_as_root_second_as_the_user(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser], kind: str
    ) -> None:
        d = make_deployment(bed)
        user = accounts[kind].name
        password = PASSWORD if kind == "password" else None
        with Remote(self.endpoint(d, user, password)) as remote:
            first, second = remote.run_pair(
                "id -un; cat; echo oops >&2; exit 3", "id -un; cat; echo done"
            )
        assert (first.exited, first.stdout) == (3, "root\noops\n")
        assert (second.exited, second.stdout) == (0, f"{user}\ndone\n")
        assert PASSWORD not in first.stdout + second.stdout + second.stderr

    def test_a_wrong_password_is_refused_once(
        self, bed: Testbed, accounts: dict[str, testusers.TestUser]
    ) -> None:
        d = make_deployment(bed)
        endpoint = self.endpoint(d, accounts["password"].name, "not-" + PASSWORD)
        with Remote(endpoint) as remote, pytest.raises(GateRefused, match="rejected"):
            remote.run_pair("id -un", "echo plain")
