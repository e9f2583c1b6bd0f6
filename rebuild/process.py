"""The one subprocess seam: every local program rebuild runs goes through here."""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

TAIL_LINES = 20


@dataclass(frozen=True)
class Completed:
    """A finished program: its exit code, and its output (captured or the last lines)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 120,
) -> Completed:
    """Run a program to completion and capture its output (for git and nix eval)."""
    try:
        proc = subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return Completed(tuple(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Completed(tuple(argv), 124, "", f"{argv[0]}: timed out after {timeout:g}s")
    return Completed(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a child (and its process group): SIGINT, then SIGTERM, then SIGKILL, bounded.

    A second Ctrl-C meanwhile never abandons the child: it is noted (by `_ctrl_c_sets`) or, off
    the main thread's supervision, skips to the next signal."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            continue


@contextmanager
def _ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While rebuild's main thread runs a child: Ctrl-C sets `event` instead of raising
    KeyboardInterrupt wherever Python happens to be (inside `Popen` after the fork, before the
    supervision loop, while stopping the child). The child runs in its own session, so the
    terminal's Ctrl-C reaches rebuild only; a lost KeyboardInterrupt would leave it running.
    Other threads cannot take signals; their callers pass `cancel` instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: object) -> None:
        event.set()

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _supervise(
    proc: subprocess.Popen[bytes],
    program: str,
    tail: deque[str],
    *,
    stop: Callable[[], bool],
    timeout: float | None,
    give_up: Callable[[], str | None] = lambda: None,
) -> int:
    """Wait for a child, stopping it when `stop` says so (Ctrl-C, or a cancelled run), past
    its timeout, or when `give_up` says why (a rejected password, a prompt rebuild does not
    answer); the reason lands in `tail`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _exit_notice(proc) as exited:
        while True:
            if exited(0.1):
                return proc.wait()
            reason = give_up()
            if reason is not None:
                _stop(proc)
                tail.append(f"{program}: stopped: {reason}")
                return 1
            if stop():
                _stop(proc)
                tail.append(f"{program}: stopped (interrupted)")
                return 130
            if deadline is not None and time.monotonic() > deadline:
                _stop(proc)
                tail.append(f"{program}: timed out after {timeout:g}s")
                return 124


@contextmanager
def _exit_notice(proc: subprocess.Popen[bytes]) -> Iterator[Callable[[float], bool]]:
    """A wait for the child's end that returns the moment it ends (a pidfd, Linux 5.3+), at
    most `seconds` later. `Popen.wait(timeout=...)` polls with sleeps growing to 50 ms, which
    a deploy used to pay once per nixos-rebuild. Without pidfds, it falls back to that poll."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):

        def poll(seconds: float) -> bool:
            try:
                proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                return False
            return True

        yield poll
        return
    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    try:
        yield lambda seconds: bool(waiter.poll(seconds * 1000))
    finally:
        os.close(pidfd)


def stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_line: Callable[[str], None],
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    responder: Responder | None = None,
    on_stdout: Callable[[str], None] | None = None,
) -> Completed:
    """Run a long program, handing every whole line of its output to `on_line` as it comes
    (and, without a pseudo-terminal, each line of its stdout alone to `on_stdout` too: some
    programs print their result on stdout and the words around it on stderr).

    The child runs in its own session, so Ctrl-C reaches rebuild only; rebuild then stops the
    child and, once it is gone, raises KeyboardInterrupt (on the main thread, Ctrl-C is taken
    as a note for the whole run, so that no moment loses it). When `cancel` is set (Ctrl-C
    seen by another thread) the child is stopped the same way and the result's code is 130.
    `stderr` of the result holds the last lines of the merged output.

    With a `responder` the child runs on a pseudo-terminal of its own (its controlling
    terminal, stderr merged into stdout) and the responder answers the exact password prompts
    it expects; any other password prompt stops the child (see `Responder`).
    """
    interrupted = threading.Event()

    def stop() -> bool:
        return interrupted.is_set() or (cancel is not None and cancel.is_set())

    with _ctrl_c_sets(interrupted):
        if responder is not None:
            done = _stream_pty(argv, env=env, cwd=cwd, on_line=on_line, timeout=timeout,
                               stop=stop, responder=responder)  # fmt: skip
        else:
            done = _stream_pipes(argv, env=env, cwd=cwd, on_line=on_line, timeout=timeout,
                                 stop=stop, on_stdout=on_stdout)  # fmt: skip
    if interrupted.is_set():
        raise KeyboardInterrupt
    return done


def _stream_pipes(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    on_line: Callable[[str], None],
    timeout: float | None,
    stop: Callable[[], bool],
    on_stdout: Callable[[str], None] | None = None,
) -> Completed:
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lock = threading.Lock()
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        return Completed(tuple(argv), 127, "", f"{argv[0]}: command not found")

    def pump(pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with lock:
                tail.append(line)
                on_line(line)
                if on_stdout is not None and pipe is proc.stdout:
                    on_stdout(line)

    readers = [
        threading.Thread(target=pump, args=(pipe,), daemon=True)
        for pipe in (proc.stdout, proc.stderr)
        if pipe is not None
    ]
    try:
        for reader in readers:
            reader.start()
        returncode = _supervise(proc, argv[0], tail, stop=stop, timeout=timeout)
    except BaseException:
        _stop(proc)
        for reader in readers:
            if reader.is_alive():
                reader.join(timeout=2)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if returncode < 0:
        returncode = 128 - returncode
    return Completed(tuple(argv), returncode, "", "\n".join(tail))


# --- a program on a pseudo-terminal, with its password prompt answered ----------------------

# The prompts rebuild answers, exactly as the programs print them:
# - nixos-rebuild-ng with --ask-sudo-password asks once, locally, with getpass:
#   `getpass.getpass(f"[sudo] password for {host}: ")` where `host` is the --target-host
#   argument as given (nixpkgs pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/process.py,
#   `Remote.from_arg`; later elevate.py: `f"[{self.name}] password for {host_label}: "`).
# - classic nixos-rebuild with --use-remote-sudo runs `ssh -t HOST sudo ...`
#   (nixos-rebuild.sh, `targetHostSudoCmd`): the remote sudo prints its own default prompt,
#   `[sudo] password for %p: ` (%p: the user whose password is asked, the deploy user), once
#   per ssh session.
NG_SUDO_PROMPT = "[sudo] password for {target_host}: "
SUDO_PROMPT = "[sudo] password for {user}: "
REJECTIONS = ("Sorry, try again", "incorrect password attempt", "no password was provided")
MASK = "********"
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
# What an unanswered line waiting for input looks like when it asks for a credential.
CREDENTIAL_PROMPT = re.compile(
    r"(?i)\b(?:password|passphrase|passcode|pin|username|user name|token|otp|"
    r"verification code|one-time)\b[^\n]*[:?]\s*$"
)
# Run as the child: it is the leader of a new session (start_new_session), so opening the
# terminal makes it the controlling one (/dev/tty works, as for `getpass`); Ctrl-C's default
# action is restored (rebuild may have been started with SIGINT ignored), then exec.
_TRAMPOLINE = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.close(os.open(os.ttyname(0), os.O_RDWR))\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'{sys.argv[1]}: {exc.strerror}\\n')\n"
    "    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)\n"
)


def nixos_rebuild_prompts(argv: Sequence[str], user: str, *, sudo_sessions: int) -> dict[str, int]:
    """The exact password prompts nixos-rebuild run as `argv` prints for the host's sudo, each
    with how often it may be answered: ng's one getpass prompt (`--ask-sudo-password`), or the
    remote sudo's own prompt for the deploy `user` (`--use-remote-sudo`, at most
    `sudo_sessions` times). Nothing else, and nothing without a --target-host."""
    target_host = _option(argv, "--target-host")
    if target_host is None:
        return {}
    if "--ask-sudo-password" in argv:
        return {NG_SUDO_PROMPT.format(target_host=target_host): 1}
    if "--use-remote-sudo" in argv:
        return {SUDO_PROMPT.format(user=user): sudo_sessions}
    return {}


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


@dataclass
class Responder:
    """Answers the exact password prompts it is given, each at most as often as allowed.

    `prompts` maps each prompt (the whole last line as a terminal shows it, trailing space
    included) to the number of answers it may get. Any other line that waits for input and
    asks for a credential (git's `Password for 'https://...': `, ssh's `user@host's password: `,
    sudo asking for another user) is never answered: `refused` says which prompt appeared and
    why rebuild does not answer it, and the program is stopped (it would wait forever). A
    prompt asked more often than allowed is refused the same way; for sudo's own prompt
    (answered more than once) it means sudo asks again, so the password is wrong. sudo's
    rejection ("Sorry, try again", "incorrect password attempt") in the output fails the same
    way. The answer is masked if it ever shows up in the output.
    """

    answer: str = field(repr=False)
    prompts: Mapping[str, int]
    answered: int = 0
    rejected: bool = False
    reprompted: bool = False
    refused: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """sudo did not accept the password."""
        return self.rejected or self.reprompted

    @property
    def stop_reason(self) -> str | None:
        """Why the program must be stopped now, or None."""
        if self.refused is not None:
            return self.refused
        return "the password was not accepted" if self.failed else None

    def line(self, text: str) -> str:
        """A whole output line: note a rejection; mask the answer."""
        if any(marker in text for marker in REJECTIONS):
            self.rejected = True
        return mask(text, self.answer)

    def partial(self, text: str) -> str | None:
        """An unterminated line (perhaps a prompt waiting for input): what to type, or None.
        Only an expected prompt, matched whole, is ever answered."""
        shown = _clean(text)
        allowed = self.prompts.get(shown)
        if allowed is None or self.stop_reason is not None:
            return None
        count = self.counts.get(shown, 0)
        if count >= allowed:
            if allowed > 1:
                self.reprompted = True
            else:
                self.refused = (
                    f"the prompt {shown!r} appeared a second time; nixos-rebuild asks for the "
                    "sudo password once and rebuild answers it once"
                )
            return None
        self.counts[shown] = count + 1
        self.answered += 1
        return self.answer + "\n"

    def stalled(self, text: str) -> bool:
        """An unterminated line the program has been waiting on: True when it asks for a
        credential rebuild does not answer (then `refused` says which and why)."""
        shown = _clean(text)
        if self.refused is not None or any(p.startswith(shown) for p in self.prompts):
            return False  # refused already, or an expected prompt (or the start of one)
        if not CREDENTIAL_PROMPT.search(shown):
            return False
        self.refused = refusal(shown, self.prompts)
        return True


def refusal(prompt: str, expected: Mapping[str, int]) -> str:
    """Why rebuild does not answer `prompt`, naming the prompt and what would fix it."""
    shown = prompt.strip()
    answers = " or ".join(repr(p) for p in expected)
    only = f"rebuild answers only sudo's prompt ({answers})" if answers else (
        "rebuild answers no prompt here"
    )  # fmt: skip
    if m := re.fullmatch(r"(Password|Username) for '([^']*)':", shown):
        what = f"git asked for a {m[1].lower()} for {m[2]}"
        fix = (
            "make the flake input reachable without a password (an SSH key, a git credential "
            "helper, or access-tokens in nix.conf)"
        )
    elif m := re.fullmatch(r"(?:\(\S+\) )?(\S+@\S+)'s password:", shown):
        what = f"ssh asked for the password of {m[1]}"
        fix = "make that ssh log in with a key (rebuild never types ssh passwords)"
    elif m := re.fullmatch(r"Enter passphrase for (?:key )?'?([^']*?)'?:", shown):
        what = f"ssh asked for the passphrase of the key {m[1]}"
        fix = "load the key into ssh-agent before deploying"
    elif m := re.fullmatch(r"\[sudo\] password for (\S+):", shown):
        what = f"sudo asked for the password of {m[1]} ({shown!r})"
        fix = "rebuild gives the stored password only to the prompt of this host's deploy user"
    else:
        what = f"a program asked {shown!r}"
        fix = "make that step work without a password"
    return f"{what}; {only}, so it did not answer; {fix}"


def mask(text: str, secret: str) -> str:
    return text.replace(secret, MASK) if secret else text


def _clean(text: str) -> str:
    """What a terminal would show of one line: no escape sequences, the last \\r rewrite."""
    text = _ANSI.sub("", text)
    if "\r" in text:
        parts = [part for part in text.split("\r") if part]
        text = parts[-1] if parts else ""
    return text


def _open_pty() -> tuple[int, int]:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    # nothing typed into the terminal is echoed back: the answer can never come out as output
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    return master, slave


def _stream_pty(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    on_line: Callable[[str], None],
    timeout: float | None,
    stop: Callable[[], bool],
    responder: Responder,
) -> Completed:
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    master, slave = _open_pty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, *argv],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)
    done = threading.Event()

    def emit(raw: str) -> None:
        line = responder.line(_clean(raw))
        tail.append(line)
        on_line(line)

    def pump() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        answered = False  # the newline a prompt prints after reading is not worth a line
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.2)
                if not ready:
                    if done.is_set():
                        break
                    if pending and responder.stalled(pending):
                        emit(_clean(pending).rstrip() + " (not answered by rebuild)")
                        pending = ""
                    continue
                chunk = os.read(master, 4096)
            except (OSError, ValueError):  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            for raw in lines:
                if not (answered and not _clean(raw).strip()):
                    emit(raw)
                answered = False
            if pending:
                reply = responder.partial(pending)
                if reply is not None:
                    emit(_clean(pending).rstrip() + " (answered by rebuild)")
                    pending = ""
                    answered = True
                    try:
                        os.write(master, reply.encode("utf-8"))
                    except OSError:
                        break
                elif responder.refused is not None and _clean(pending) in responder.prompts:
                    emit(_clean(pending).rstrip() + " (not answered by rebuild)")
                    pending = ""
        if pending.strip():
            emit(pending)

    reader = threading.Thread(target=pump, daemon=True, name="pty-reader")
    try:
        reader.start()
        returncode = _supervise(
            proc, argv[0], tail, stop=stop, timeout=timeout, give_up=lambda: responder.stop_reason
        )
    except BaseException:
        _stop(proc)
        done.set()
        if reader.is_alive():
            reader.join(timeout=2)
        os.close(master)
        raise
    done.set()
    reader.join(timeout=5)
    os.close(master)
    if returncode < 0:
        returncode = 128 - returncode
    if responder.stop_reason is not None and returncode == 0:
        returncode = 1
    return Completed(tuple(argv), returncode, "", "\n".join(tail))
