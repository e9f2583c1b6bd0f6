"""Non-root deploys through sudo: the keyring (rebuild.sudo_keyring), the sudo command lines and
what sudo's complaints mean (rebuild.remote), nixos-rebuild's flags, the deploy's wiring."""

from __future__ import annotations

import io
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
        """set stores under service rebuild and the host's name; clear removes it once."""
        assert secrets.get("vps") is None
        secrets.store("vps", PASSWORD)
        assert memory_keyring.store == {("rebuild", "vps"): PASSWORD}
        assert secrets.get("vps") == PASSWORD
        assert secrets.clear("vps") is True
        assert secrets.clear("vps") is False
        assert secrets.get("vps") is None

    def test_no_backend_is_one_clear_error(self, no_keyring: None) -> None:
        """A headless machine: a ConfigError (exit 2) naming both ways out, for every call."""
        for call in (lambda: secrets.get("vps", "deploy"),
                     lambda: secrets.store("vps", PASSWORD, "deploy"),
                     lambda: secrets.clear("vps", "deploy")):  # fmt: skip
            with pytest.raises(secrets.KeyringUnavailable) as caught:
                call()
            message = str(caught.value)
            assert caught.value.exit_code == 2
            assert "passwordless sudo for the deploy user (deploy)" in message
            assert "keyrings.alt" in message and "PYTHON_KEYRING_BACKEND" in message
            assert PASSWORD not in message


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
            "nr", "switch", "/f", vps(sudo=True, sudo_flag="--use-remote-sudo"),
            ask_sudo_password=True,
        )  # fmt: skip
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
        secrets.store("vps", PASSWORD)
        hr = host_run(vps(sudo=True))
        deploy.attach_sudo_password(hr)
        assert hr.endpoint.sudo_password == PASSWORD
        assert PASSWORD not in repr(hr.endpoint)

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
        responder = process.Responder(PASSWORD)
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
        hr = host_run(vps(sudo=True, sudo_flag="--use-remote-sudo"))
        responder = process.Responder(PASSWORD, max_answers=16)
        complaint = "sudo: a terminal is required to read the password"
        done = process.Completed(("nr",), 1, "", "x")
        message = driver.build_failure(hr, done, responder, complaint)
        assert 'sudo_flag = "--sudo"' in message and "did not hand over" in message
