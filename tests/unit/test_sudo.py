"""Non-root deploys through sudo: the keyring (rebuild.sudo_keyring), the sudo command lines and
what sudo's complaints mean (rebuild.remote), nixos-rebuild's flags, the deploy's wiring."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import pytest
from keyring.backends import fail

from rebuild import deploy, driver, hostrun, process
from rebuild import sudo_keyring as secrets
from rebuild.errors import ConfigError, Declined, GateRefused
from rebuild.inventory import HostSettings, Target
from rebuild.nixos import nixos_rebuild_argv
from rebuild.remote import Endpoint, _WholeStream, sudo_command, sudo_problem
from tests.keyring_backend import MemoryKeyring

PASSWORD = "correct horse battery staple"


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(previous)


def endpoint(**overrides: Any) -> Endpoint:
    values: dict[str, Any] = {
        "name": "vps", "address": "203.0.113.10", "port": 22, "user": "deploy",
        "known_hosts": Path("/k"), "sudo": True,
    }  # fmt: skip
    values.update(overrides)
    return Endpoint(**values)


def vps(**settings: Any) -> Target:
    return Target("vps", HostSettings(address="203.0.113.10", user="deploy", **settings))


class TestKeyring:
    def test_round_trip(self, memory_keyring: MemoryKeyring) -> None:
        """set stores under service rebuild, bound to name, user, address and port; clear
        removes it once."""
        target = vps(sudo=True)
        assert secrets.get(target) is None
        secrets.store(target, PASSWORD)
        assert memory_keyring.store == {("rebuild", "vps:deploy@203.0.113.10:22"): PASSWORD}
        assert secrets.get(target) == PASSWORD
        assert secrets.clear(target) is True
        assert secrets.clear(target) is False
        assert secrets.get(target) is None

    @pytest.mark.parametrize(
        "changed",
        [{"address": "198.51.100.7"}, {"user": "admin"}, {"port": 2222}],
    )
    def test_entry_is_bound_to_user_address_and_port(
        self, memory_keyring: MemoryKeyring, changed: dict[str, Any]
    ) -> None:
        """The same host name with another address, user or port finds no password: a host
        moved in the inventory never receives the password stored for its old address."""
        secrets.store(vps(sudo=True), PASSWORD)
        moved = Target("vps", HostSettings(**{"address": "203.0.113.10", "user": "deploy",
                                              "sudo": True, **changed}))  # fmt: skip
        assert secrets.get(moved) is None

    def test_entry_names(self) -> None:
        assert secrets.entry_name(vps()) == "vps:deploy@203.0.113.10:22"
        v6 = Target("web", HostSettings(address="2001:db8::10", port=2200))
        assert secrets.entry_name(v6) == "web:root@[2001:db8::10]:2200"

    def test_old_entry_under_the_host_name_is_never_used(
        self, memory_keyring: MemoryKeyring
    ) -> None:
        """An older rebuild's entry (host name alone, not bound to an address) is refused
        (exit 3), naming `invoke secret set` and `clear`; its password is not returned."""
        memory_keyring.store[("rebuild", "vps")] = PASSWORD
        with pytest.raises(secrets.UnboundEntry) as caught:
            secrets.get(vps(sudo=True))
        message = str(caught.value)
        assert caught.value.exit_code == 3
        assert "older rebuild" in message and "not bound to a user and address" in message
        assert "invoke secret set --host vps" in message
        assert "invoke secret clear --host vps" in message
        assert "deploy@203.0.113.10 port 22" in message and PASSWORD not in message

    def test_bound_entry_wins_over_an_old_one(self, memory_keyring: MemoryKeyring) -> None:
        memory_keyring.store[("rebuild", "vps")] = "old-" + PASSWORD
        secrets.store(vps(), PASSWORD)
        assert secrets.get(vps()) == PASSWORD

    def test_clear_removes_the_old_entry_too(self, memory_keyring: MemoryKeyring) -> None:
        memory_keyring.store[("rebuild", "vps")] = PASSWORD
        assert secrets.clear(vps()) is True
        assert memory_keyring.store == {}

    def test_no_backend_is_one_clear_error(self, no_keyring: None) -> None:
        """A headless machine: a ConfigError (exit 2) naming both ways out, for every call."""
        target = vps(sudo=True)
        for call in (lambda: secrets.get(target),
                     lambda: secrets.store(target, PASSWORD),
                     lambda: secrets.clear(target)):  # fmt: skip
            with pytest.raises(secrets.KeyringUnavailable) as caught:
                call()
            message = str(caught.value)
            assert caught.value.exit_code == 2
            assert "passwordless sudo for the deploy user (deploy)" in message
            assert "keyrings.alt" in message and "PYTHON_KEYRING_BACKEND" in message
            assert PASSWORD not in message


# Run in a fresh interpreter: reading a password turns core dumps off for good.
CORE_PROBE = """
import ctypes, json, resource, sys
import keyring
from rebuild import sudo_keyring
from rebuild.inventory import HostSettings, Target
from tests.keyring_backend import MemoryKeyring

keyring.set_keyring(MemoryKeyring())
soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # dumps on, as far as allowed
before = resource.getrlimit(resource.RLIMIT_CORE)
libc = ctypes.CDLL(None, use_errno=True)
dumpable_before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
target = Target("vps", HostSettings(address="203.0.113.10", user="deploy", sudo=True))
sudo_keyring.store(target, "pw-" + "x" * 8)
assert sudo_keyring.get(target) == "pw-" + "x" * 8
print(json.dumps({"before": before, "after": resource.getrlimit(resource.RLIMIT_CORE),
                  "dumpable_before": dumpable_before, "dumpable": libc.prctl(3, 0, 0, 0, 0)}))
"""


class TestCoreDumps:
    def test_reading_a_password_turns_core_dumps_off(self) -> None:
        """After the keyring is read: RLIMIT_CORE is (0, 0) (children inherit it) and the
        process is not dumpable (PR_GET_DUMPABLE 0)."""
        import subprocess
        import sys

        repo = Path(__file__).resolve().parents[2]
        done = subprocess.run([sys.executable, "-c", CORE_PROBE], capture_output=True,
                              text=True, timeout=60, check=False, cwd=repo)  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert seen["dumpable_before"] == 1
        assert seen["after"] == [0, 0] and seen["dumpable"] == 0


class TestReadPassword:
    def test_one_line_from_stdin(self) -> None:
        """--stdin reads one line, without its newline, and nothing more."""
        source = io.StringIO(PASSWORD + "\r\nsecond line\n")
        assert secrets.read_password("vps", from_stdin=True, stdin=source) == PASSWORD

    def test_empty_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="empty"):
            secrets.read_password("vps", from_stdin=True, stdin=io.StringIO("\n"))

    def test_no_terminal_without_stdin_flag_refuses(self) -> None:
        """Without a terminal and without --stdin: exit 3, naming --stdin."""
        with pytest.raises(GateRefused, match="--stdin"):
            secrets.read_password("vps", from_stdin=False, stdin=io.StringIO(PASSWORD))

    def test_asked_twice_and_must_match(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """At a terminal getpass asks twice; different answers decline (exit 4)."""

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        answers = iter([PASSWORD, PASSWORD, PASSWORD, "other"])
        prompts: list[str] = []

        def fake_getpass(prompt: str = "") -> str:
            prompts.append(prompt)
            return next(answers)

        monkeypatch.setattr(secrets.getpass, "getpass", fake_getpass)
        assert secrets.read_password("vps", from_stdin=False, stdin=Tty()) == PASSWORD
        assert prompts == ["sudo password for vps: ", "again, to confirm: "]
        with pytest.raises(Declined, match="differ"):
            secrets.read_password("vps", from_stdin=False, stdin=Tty())


class TestSudoCommand:
    def test_without_password_never_waits(self) -> None:
        """No stored password: non-interactive sudo, which fails at once if it wants one."""
        assert sudo_command("id -u\n") == "sudo -n -- sh -c 'id -u\n'"

    def test_with_password_reads_stdin_and_detaches_it(self) -> None:
        """With one: -S with an empty prompt; the script drains and detaches its stdin first,
        so an unneeded password (NOPASSWD) never reaches the rest; no password in the line."""
        assert sudo_command("id -u\n", with_password=True) == (
            "sudo -S -p '' -- sh -c 'IFS= read -r rebuild_stdin || true; unset rebuild_stdin; "
            "exec </dev/null\nid -u\n'"
        )

    def test_whole_stream(self) -> None:
        """Invoke reads a non-terminal stream one character at a time: all at once instead."""
        stream = _WholeStream("abc\n")
        assert stream.read(1) == "abc\n"
        assert stream.read(1) == ""


class TestSudoProblem:
    @pytest.mark.parametrize(
        "stderr",
        ["Sorry, try again.\nsudo: 1 incorrect password attempt\n",
         "sudo: no password was provided\n"],
    )  # fmt: skip
    def test_rejected_password(self, stderr: str) -> None:
        problem = sudo_problem(endpoint(sudo_password=PASSWORD), stderr)
        assert problem is not None and "rejected the stored password" in problem
        assert "invoke secret set --host vps" in problem and PASSWORD not in problem

    def test_password_needed_and_none_stored(self) -> None:
        problem = sudo_problem(endpoint(), "sudo: a password is required\n")
        assert problem is not None
        assert "needs a password for deploy" in problem
        assert "invoke secret set --host vps" in problem and "NOPASSWD" in problem

    def test_password_needed_on_a_headless_machine(self) -> None:
        problem = sudo_problem(endpoint(keyring_available=False), "sudo: a password is required")
        assert problem is not None and "keyrings.alt" in problem
        assert "passwordless sudo for the deploy user (deploy)" in problem

    def test_not_a_sudoer_and_no_sudo(self) -> None:
        no_rights = sudo_problem(endpoint(), "deploy is not in the sudoers file.\n")
        assert no_rights is not None and "may not use sudo" in no_rights
        missing = sudo_problem(endpoint(), "sh: 1: sudo: not found\n")
        assert missing is not None and "has no sudo" in missing

    def test_other_errors_are_not_sudos(self) -> None:
        assert sudo_problem(endpoint(), "mkdir: cannot create directory\n") is None


class TestNixosRebuildArgv:
    def test_password_adds_ask_sudo_password(self) -> None:
        argv = nixos_rebuild_argv("nr", "switch", "/f", vps(sudo=True), ask_sudo_password=True)
        assert argv[-3:] == ["--sudo", "--ask-sudo-password", "--use-substitutes"]

    def test_passwordless_is_just_sudo(self) -> None:
        argv = nixos_rebuild_argv("nr", "switch", "/f", vps(sudo=True))
        assert "--sudo" in argv and "--ask-sudo-password" not in argv

    def test_legacy_flag_has_no_ask_option(self) -> None:
        """Older nixos-rebuild has no --ask-sudo-password: its sudo prompts through ssh -t."""
        argv = nixos_rebuild_argv(
            "nr", "switch", "/f", vps(sudo=True), flavour="classic", ask_sudo_password=True
        )
        assert "--use-remote-sudo" in argv and "--ask-sudo-password" not in argv

    def test_build_has_no_sudo(self) -> None:
        argv = nixos_rebuild_argv("nr", "build", "/f", vps(sudo=True), ask_sudo_password=True)
        assert "--sudo" not in argv and "--ask-sudo-password" not in argv


def host_run(target: Target) -> hostrun.HostRun:
    ep = Endpoint(name="vps", address="203.0.113.10", port=22, user="deploy",
                  known_hosts=Path("/k"), sudo=target.settings.sudo)  # fmt: skip
    return hostrun.HostRun(target, ep, "switch", "r")


class TestDeployWiring:
    def test_password_from_the_keyring(self, memory_keyring: MemoryKeyring) -> None:
        secrets.store(vps(sudo=True), PASSWORD)
        hr = host_run(vps(sudo=True))
        deploy.attach_sudo_password(hr)
        assert hr.endpoint.sudo_password == PASSWORD
        assert PASSWORD not in repr(hr.endpoint)

    def test_old_unbound_entry_refuses_the_deploy(self, memory_keyring: MemoryKeyring) -> None:
        """Only an old entry under the host name: the deploy is refused (exit 3) before
        anything runs, and the password is not attached."""
        memory_keyring.store[("rebuild", "vps")] = PASSWORD
        hr = host_run(vps(sudo=True))
        with pytest.raises(GateRefused, match="invoke secret set --host vps"):
            deploy.attach_sudo_password(hr)
        assert hr.endpoint.sudo_password is None

    def test_no_password_stored_means_passwordless(self, memory_keyring: MemoryKeyring) -> None:
        hr = host_run(vps(sudo=True))
        deploy.attach_sudo_password(hr)
        assert hr.endpoint.sudo_password is None and hr.endpoint.keyring_available

    def test_headless_is_passwordless_and_remembered(self, no_keyring: None) -> None:
        """No keyring: not an error by itself (NOPASSWD works); noted for sudo's message."""
        hr = host_run(vps(sudo=True))
        deploy.attach_sudo_password(hr)
        assert hr.endpoint.sudo_password is None and not hr.endpoint.keyring_available

    def test_no_sudo_never_asks_the_keyring(self, no_keyring: None) -> None:
        hr = host_run(vps())
        deploy.attach_sudo_password(hr)
        assert hr.endpoint.keyring_available

    def test_rejected_password_message(self) -> None:
        hr = host_run(vps(sudo=True))
        responder = process.Responder(PASSWORD, {"[sudo] password for deploy@203.0.113.10: ": 1})
        responder.rejected = True
        done = process.Completed(("nr",), 1, "", "Sorry, try again.")
        message = driver.build_failure(hr, done, responder)
        assert "rejected the stored password of deploy" in message
        assert "nixos-rebuild was stopped" in message and PASSWORD not in message

    def test_sudo_complaint_without_password(self) -> None:
        hr = host_run(vps(sudo=True))
        complaint = "sudo: a terminal is required to read the password"
        message = driver.build_failure(hr, process.Completed(("nr",), 1, "", "x"), None, complaint)
        assert "needs a password" in message and "invoke secret set" in message

    def test_other_failures_show_the_tail(self) -> None:
        hr = host_run(vps(sudo=True))
        message = driver.build_failure(hr, process.Completed(("nr",), 1, "", "a\nerror: boom"))
        assert message.endswith("exited 1:\na\nerror: boom")

    def test_legacy_flag_that_does_not_pass_the_password(self) -> None:
        """--use-remote-sudo with a stored password, and sudo still wanted one: the message
        says to use --sudo (nixos-rebuild-ng), not to store a password."""
        hr = host_run(vps(sudo=True))
        responder = process.Responder(PASSWORD, {"[sudo] password for deploy: ": 16})
        complaint = "sudo: a terminal is required to read the password"
        done = process.Completed(("nr",), 1, "", "x")
        message = driver.build_failure(hr, done, responder, complaint)
        assert 'nixos_rebuild_flavour = "ng"' in message and "did not hand over" in message
