"""process.stream on a pseudo-terminal: only the exact sudo prompts nixos-rebuild prints for
the host are answered (ng's one getpass prompt once, classic remote sudo's a bounded number of
times); any other password prompt stops the program, never answered; sudo's rejection stops
it; the answer never comes back out. And Ctrl-C during stream always stops the child first."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rebuild import process
from rebuild.inventory import HostSettings, Target
from rebuild.nixos import nixos_rebuild_argv

SECRET = "s3cret-Pa55"
TARGET = "deploy@203.0.113.10"
NG = f"[sudo] password for {TARGET}: "
CLASSIC = "[sudo] password for deploy: "
GIT = "Password for 'https://alice@example.com': "

# A program that prints two lines, then asks each prompt given on its command line on its
# terminal (as getpass and git do, on /dev/tty) and notes what it read in RECORD (json lines).
PROMPTER = textwrap.dedent(
    """
    import getpass, json, os, sys
    record = open(os.environ["RECORD"], "a")
    record.write(json.dumps({"argv": sys.argv, "env": dict(os.environ)}) + "\\n")
    record.flush()
    print("building", flush=True)
    print("tty", os.ttyname(0) == os.ttyname(1), flush=True)
    mode, prompts = sys.argv[1], sys.argv[2:]
    for prompt in prompts:
        word = getpass.getpass(prompt)
        record.write(json.dumps({"prompt": prompt, "got": word}) + "\\n")
        record.flush()
        print("got", len(word), flush=True)
        if mode == "reject":
            print("Sorry, try again.", flush=True)
            print("sudo: 1 incorrect password attempt", flush=True)
            import time; time.sleep(30)
    if mode == "leak":
        print("the answer was " + word, flush=True)
    print("done", flush=True)
    """
)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv("RECORD", str(path))
    return path


@pytest.fixture
def prompter(tmp_path: Path, record: Path) -> list[str]:
    script = tmp_path / "prompter.py"
    script.write_text(PROMPTER)
    return [sys.executable, str(script)]


def answers(record: Path) -> list[tuple[str, str]]:
    """(prompt, what the program read) for every prompt it got an answer to."""
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    return [(row["prompt"], row["got"]) for row in rows if "prompt" in row]


def ng(times: int = 1) -> process.Responder:
    return process.Responder(SECRET, {NG: times})


def run(argv: list[str], responder: process.Responder) -> tuple[process.Completed, list[str]]:
    lines: list[str] = []
    done = process.stream(argv, on_line=lines.append, responder=responder, timeout=60)
    return done, lines


def vps(**settings: object) -> Target:
    return Target("vps", HostSettings(address="203.0.113.10", user="deploy", **settings))  # type: ignore[arg-type]


class TestExpectedPrompts:
    def test_ng_asks_once_for_the_target_host(self) -> None:
        """nixos-rebuild-ng with --ask-sudo-password: `[sudo] password for <--target-host>: `
        (getpass in its Remote.from_arg), once."""
        argv = ["nr", "switch", "--flake", "/f#vps", "--target-host", TARGET, "--sudo",
                "--ask-sudo-password", "--use-substitutes"]  # fmt: skip
        assert process.nixos_rebuild_prompts(argv, "deploy", sudo_sessions=16) == {NG: 1}

    def test_the_target_host_as_the_argv_builder_gives_it(self) -> None:
        """Whatever --target-host rebuild's argv builder passes (an address, an ssh alias) is
        what ng's prompt names."""
        argv = nixos_rebuild_argv("nr", "switch", "/f", vps(sudo=True), ask_sudo_password=True)
        target_host = argv[argv.index("--target-host") + 1]
        prompts = process.nixos_rebuild_prompts(argv, "deploy", sudo_sessions=16)
        assert prompts == {f"[sudo] password for {target_host}: ": 1}

    def test_classic_remote_sudo_asks_for_the_deploy_user(self) -> None:
        """classic --use-remote-sudo: the remote sudo's own `[sudo] password for <user>: `, a
        bounded number of times (once per ssh -t session)."""
        argv = ["nr", "switch", "--flake", "/f#vps", "--fast", "--target-host", TARGET,
                "--use-remote-sudo", "--use-substitutes"]  # fmt: skip
        assert process.nixos_rebuild_prompts(argv, "deploy", sudo_sessions=16) == {CLASSIC: 16}

    def test_nothing_to_answer_without_a_password_flag_or_target(self) -> None:
        plain = ["nr", "switch", "--flake", "/f#vps", "--target-host", TARGET, "--sudo"]
        build = ["nr", "build", "--flake", "/f#vps", "--ask-sudo-password"]
        for argv in (plain, build):
            assert process.nixos_rebuild_prompts(argv, "deploy", sudo_sessions=16) == {}


class TestResponder:
    def test_only_the_exact_prompt_is_answered(self) -> None:
        """The whole last line must be the expected prompt (escape codes and \\r rewrites
        removed as a terminal shows them); anything else gets no answer."""
        assert ng().partial(NG) == SECRET + "\n"
        assert ng().partial("\x1b[0m" + NG) == SECRET + "\n"
        assert ng().partial("progress 10%\r" + NG) == SECRET + "\n"
        for text in (NG.rstrip(), "x" + NG, CLASSIC, "Password: ", GIT, "[sudo] password for "):
            assert ng().partial(text) is None, text

    def test_ng_prompt_answered_once_then_refused(self) -> None:
        """ng asks once; a second ng prompt is not answered and stops the program, named."""
        r = ng()
        assert r.partial(NG) == SECRET + "\n"
        assert r.partial(NG) is None
        assert r.answered == 1 and not r.failed
        assert r.refused is not None and "second time" in r.refused and NG in r.refused
        assert r.stop_reason == r.refused and SECRET not in r.refused

    def test_classic_sudo_prompt_bounded_then_failed(self) -> None:
        """Remote sudo asks once per session, up to the bound; one more means sudo asks again:
        the password is not accepted."""
        r = process.Responder(SECRET, {CLASSIC: 2})
        assert r.partial(CLASSIC) and r.partial(CLASSIC)
        assert r.partial(CLASSIC) is None and r.failed and r.reprompted
        assert r.stop_reason == "the password was not accepted"

    @pytest.mark.parametrize(
        ("prompt", "says"),
        [
            (GIT, "git asked for a password for https://alice@example.com"),
            ("Username for 'https://github.com': ", "git asked for a username for https://github.com"),
            ("deploy@203.0.113.10's password: ",
             "ssh asked for the password of deploy@203.0.113.10"),
            ("(deploy@h) Password: ", "a program asked '(deploy@h) Password:'"),
            ("Enter passphrase for key '/home/op/.ssh/id_ed25519': ",
             "ssh asked for the passphrase of the key /home/op/.ssh/id_ed25519"),
            ("[sudo] password for root: ", "sudo asked for the password of root"),
            (CLASSIC, "sudo asked for the password of deploy"),
            ("Password: ", "a program asked 'Password:'"),
        ],
    )  # fmt: skip
    def test_other_prompts_are_refused_and_named(self, prompt: str, says: str) -> None:
        """git's, ssh's, sudo's for another user or another form: never answered; the reason
        names the prompt, says rebuild answers only sudo's prompt, and the way out."""
        r = ng()
        assert r.partial(prompt) is None
        assert r.stalled(prompt) is True
        assert r.refused is not None and r.refused.startswith(says), r.refused
        assert f"rebuild answers only sudo's prompt ({NG!r})" in r.refused
        assert SECRET not in r.refused and r.answered == 0
        assert r.partial(NG) is None  # once refused, nothing more is answered

    def test_git_refusal_says_how_to_fix_it(self) -> None:
        r = ng()
        r.stalled(GIT)
        assert r.refused is not None
        assert "make the flake input reachable without a password" in r.refused

    def test_ordinary_stalled_output_is_not_a_prompt(self) -> None:
        r = ng()
        for text in ("copying path '/nix/store/x' from 'https://cache' ... ",
                     "[1/3 built] building foo: ", "[sudo] password for deploy@203",
                     "downloading 'https://example.com/pin.tar.gz' 12%"):  # fmt: skip
            assert r.stalled(text) is False, text
        assert r.refused is None

    def test_rejection_lines_fail_and_mask(self) -> None:
        r = ng()
        assert r.line(f"echo {SECRET}") == "echo ********"
        assert not r.failed
        r.line("sudo: 1 incorrect password attempt")
        assert r.rejected and r.partial(NG) is None

    def test_secret_not_in_repr(self) -> None:
        assert SECRET not in repr(ng())


class TestStreamOnATerminal:
    def test_ng_prompt_answered_once(self, prompter: list[str], record: Path) -> None:
        """The program runs on its own terminal, gets the answer once, and finishes; the
        prompt is shown as answered, the answer never; not in its argv or environment."""
        responder = ng()
        done, lines = run([*prompter, "ok", NG], responder)
        assert done.returncode == 0, lines
        assert lines == [
            "building",
            "tty True",
            f"{NG.rstrip()} (answered by rebuild)",
            f"got {len(SECRET)}",
            "done",
        ]
        assert responder.answered == 1 and not responder.failed
        assert answers(record) == [(NG, SECRET)]
        started = json.loads(record.read_text().splitlines()[0])
        assert SECRET not in json.dumps(started["argv"]) + json.dumps(started["env"])

    def test_classic_sudo_prompts_answered(self, prompter: list[str], record: Path) -> None:
        responder = process.Responder(SECRET, {CLASSIC: 16})
        done, lines = run([*prompter, "ok", CLASSIC, CLASSIC], responder)
        assert done.returncode == 0, lines
        assert answers(record) == [(CLASSIC, SECRET), (CLASSIC, SECRET)]

    @pytest.mark.parametrize(
        ("prompts", "says"),
        [
            ([GIT], "git asked for a password for https://alice@example.com"),
            ([NG, GIT], "git asked for a password for https://alice@example.com"),
            (["deploy@203.0.113.10's password: "], "ssh asked for the password of deploy@"),
            ([NG, NG], "the prompt"),
            (["[sudo] password for root: "], "sudo asked for the password of root"),
            ([CLASSIC], "sudo asked for the password of deploy"),
        ],
    )  # fmt: skip
    def test_other_prompt_stops_the_program_unanswered(
        self, prompter: list[str], record: Path, prompts: list[str], says: str
    ) -> None:
        """A prompt rebuild does not answer: the program is stopped at once (it would wait
        forever), exit 1, the reason says which prompt; only the ng prompt got the password."""
        responder = ng()
        started = time.monotonic()
        done, lines = run([*prompter, "ok", *prompts], responder)
        assert time.monotonic() - started < 15
        assert done.returncode == 1, lines
        assert responder.refused is not None and says in responder.refused
        assert f"stopped: {responder.refused}" in done.stderr
        assert f"{prompts[-1].rstrip()} (not answered by rebuild)" in lines
        assert answers(record) == [(NG, SECRET)] * prompts[:-1].count(NG)
        assert SECRET not in "\n".join(lines) + done.stderr

    def test_sudo_rejection_stops_the_program(self, prompter: list[str]) -> None:
        """sudo's 'incorrect password' in the output stops the program (it would wait)."""
        responder = process.Responder(SECRET, {CLASSIC: 16})
        started = time.monotonic()
        done, _ = run([*prompter, "reject", CLASSIC], responder)
        assert time.monotonic() - started < 15
        assert done.returncode == 1 and responder.rejected
        assert "password was not accepted" in done.stderr

    def test_answer_is_masked_in_output(self, prompter: list[str]) -> None:
        done, lines = run([*prompter, "leak", NG], ng())
        assert done.returncode == 0
        assert "the answer was ********" in lines
        assert SECRET not in "\n".join(lines) + done.stderr

    def test_missing_program(self) -> None:
        done, lines = run(["/nonexistent/nixos-rebuild"], ng())
        assert done.returncode == 127
        assert any("No such file" in line for line in lines)


class TestChildEnd:
    @pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
    def test_exit_code_and_timeout(self, monkeypatch: pytest.MonkeyPatch, pidfd: bool) -> None:
        """The child's end is waited for on a pidfd (at once) or, where the kernel has none,
        by polling: the same exit codes and the same timeout either way."""
        if not pidfd:

            def no_pidfd(pid: int, flags: int = 0) -> int:
                raise OSError(38, "Function not implemented")

            monkeypatch.setattr(process.os, "pidfd_open", no_pidfd)
        lines: list[str] = []
        code = "import sys; print('built'); sys.exit(3)"
        done = process.stream([sys.executable, "-c", code], on_line=lines.append)
        assert (done.returncode, lines) == (3, ["built"])
        slow = [sys.executable, "-c", "import time; time.sleep(30)"]
        started = time.monotonic()
        done = process.stream(slow, on_line=lines.append, timeout=0.5)
        assert done.returncode == 124
        assert ": timed out after 0.5s" in done.stderr
        assert time.monotonic() - started < 15


SLEEPER = textwrap.dedent(
    """
    import os, signal, sys, time
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    open(sys.argv[2], "w").write(str(os.getpid()))
    time.sleep(60)
    """
)


class TestCtrlC:
    @pytest.mark.parametrize("pty", [False, True])
    def test_ctrl_c_stops_the_child_then_interrupts(self, tmp_path: Path, pty: bool) -> None:
        """SIGINT to rebuild while stream runs on the main thread: the child (its own session,
        which the terminal's Ctrl-C never reaches) is stopped first, then KeyboardInterrupt;
        rebuild's own Ctrl-C handling is back afterwards."""
        script, pidfile = tmp_path / "sleeper.py", tmp_path / "pid"
        script.write_text(SLEEPER)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            process.stream([sys.executable, str(script), "polite", str(pidfile)],
                           on_line=lambda _: None, timeout=60,
                           responder=ng() if pty else None)  # fmt: skip
        assert time.monotonic() - started < 10
        assert not alive(int(pidfile.read_text()))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def test_second_ctrl_c_while_stopping_never_abandons_the_child(self, tmp_path: Path) -> None:
        """A child that ignores SIGINT, and Ctrl-C twice: the second one does not cut the
        stop short; the child gets SIGTERM and is gone before KeyboardInterrupt."""
        script, pidfile = tmp_path / "sleeper.py", tmp_path / "pid"
        script.write_text(SLEEPER)
        timers = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGINT)) for t in (1.0, 2.0)]
        for timer in timers:
            timer.start()
        with pytest.raises(KeyboardInterrupt):
            process.stream([sys.executable, str(script), "stubborn", str(pidfile)],
                           on_line=lambda _: None, timeout=60)  # fmt: skip
        assert not alive(int(pidfile.read_text()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
