"""process.stream on a pseudo-terminal: the password prompt answered once, a second prompt or
sudo's rejection stops the program, the answer never comes back out."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from rebuild import process

SECRET = "s3cret-Pa55"

PROMPTER = textwrap.dedent(
    """
    import getpass, os, sys
    print("building", flush=True)
    print("tty", os.ttyname(0) == os.ttyname(1), flush=True)
    prompts = int(sys.argv[1])
    for _ in range(prompts):
        word = getpass.getpass("[sudo] password for deploy@203.0.113.10: ")
        print("got", len(word), flush=True)
        if sys.argv[2:] == ["reject"]:
            print("Sorry, try again.", flush=True)
            print("sudo: 1 incorrect password attempt", flush=True)
            import time; time.sleep(30)
    if sys.argv[2:] == ["leak"]:
        print("the answer was " + word, flush=True)
    print("done", flush=True)
    """
)


@pytest.fixture
def prompter(tmp_path: Path) -> list[str]:
    script = tmp_path / "prompter.py"
    script.write_text(PROMPTER)
    return [sys.executable, str(script)]


def run(argv: list[str], responder: process.Responder) -> tuple[process.Completed, list[str]]:
    lines: list[str] = []
    done = process.stream(argv, on_line=lines.append, responder=responder, timeout=60)
    return done, lines


class TestResponder:
    def test_prompt_patterns(self) -> None:
        """sudo's and nixos-rebuild-ng's prompts (also after escape codes) are recognised;
        ordinary output is not."""
        for text in ("[sudo] password for deploy@10.0.0.1: ", "[sudo] password for root: ",
                     "Password: ", "\x1b[0m[sudo] password for x: "):  # fmt: skip
            assert process.Responder(SECRET).partial(text) == SECRET + "\n", text
        assert process.Responder(SECRET).partial("copying path 'x' ... ") is None

    def test_answers_at_most_max_then_fails(self) -> None:
        r = process.Responder(SECRET, max_answers=2)
        assert r.partial("Password: ") and r.partial("Password: ")
        assert r.partial("Password: ") is None and r.failed and r.reprompted

    def test_rejection_lines_fail_and_mask(self) -> None:
        r = process.Responder(SECRET)
        assert r.line(f"echo {SECRET}") == "echo ********"
        assert not r.failed
        r.line("sudo: 1 incorrect password attempt")
        assert r.rejected and r.partial("Password: ") is None

    def test_secret_not_in_repr(self) -> None:
        assert SECRET not in repr(process.Responder(SECRET))


class TestStreamOnATerminal:
    def test_one_prompt_answered(self, prompter: list[str]) -> None:
        """The program runs on its own terminal, gets the answer once, and finishes; the
        prompt is shown as answered, the answer never."""
        responder = process.Responder(SECRET)
        done, lines = run([*prompter, "1"], responder)
        assert done.returncode == 0, lines
        assert lines == [
            "building",
            "tty True",
            "[sudo] password for deploy@203.0.113.10: (answered by rebuild)",
            f"got {len(SECRET)}",
            "done",
        ]
        assert responder.answered == 1 and not responder.failed

    def test_second_prompt_stops_the_program(self, prompter: list[str]) -> None:
        """A second prompt means the answer was wrong: not answered, the program stopped at
        once (no hang until a timeout), exit 1."""
        responder = process.Responder(SECRET)
        started = time.monotonic()
        done, lines = run([*prompter, "2"], responder)
        assert time.monotonic() - started < 15
        assert done.returncode == 1 and responder.reprompted
        assert sum("(answered by rebuild)" in line for line in lines) == 1
        assert "password was not accepted" in done.stderr

    def test_sudo_rejection_stops_the_program(self, prompter: list[str]) -> None:
        """sudo's 'incorrect password' in the output stops the program (it would wait)."""
        responder = process.Responder(SECRET)
        started = time.monotonic()
        done, _ = run([*prompter, "1", "reject"], responder)
        assert time.monotonic() - started < 15
        assert done.returncode == 1 and responder.rejected

    def test_answer_is_masked_in_output(self, prompter: list[str]) -> None:
        done, lines = run([*prompter, "1", "leak"], process.Responder(SECRET))
        assert done.returncode == 0
        assert "the answer was ********" in lines
        assert SECRET not in "\n".join(lines) + done.stderr

    def test_missing_program(self) -> None:
        done, lines = run(["/nonexistent/nixos-rebuild"], process.Responder(SECRET))
        assert done.returncode == 127
        assert any("No such file" in line for line in lines)
