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
from collections.abc import Callable, Mapping, Sequence
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
    """Stop a child (and its process group): SIGINT, then SIGTERM, then SIGKILL, bounded."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _supervise(
    proc: subprocess.Popen[bytes],
    program: str,
    tail: deque[str],
    *,
    cancel: threading.Event | None,
    timeout: float | None,
    give_up: Callable[[], str | None] = lambda: None,
) -> int:
    """Wait for a child, stopping it when cancelled, past its timeout, or when `give_up` says
    why (a rejected password); the reason lands in `tail`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        reason = give_up()
        if reason is not None:
            _stop(proc)
            tail.append(f"{program}: stopped: {reason}")
            return 1
        if cancel is not None and cancel.is_set():
            _stop(proc)
            tail.append(f"{program}: stopped (interrupted)")
            return 130
        if deadline is not None and time.monotonic() > deadline:
            _stop(proc)
            tail.append(f"{program}: timed out after {timeout:g}s")
            return 124


def stream(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    on_line: Callable[[str], None],
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    responder: Responder | None = None,
) -> Completed:
    """Run a long program, handing every whole line of its output to `on_line` as it comes.

    The child runs in its own session, so Ctrl-C reaches rebuild only; rebuild then stops the
    child (KeyboardInterrupt is re-raised after it is gone). When `cancel` is set (Ctrl-C seen by
    another thread) the child is stopped the same way and the result's code is 130. `stderr` of
    the result holds the last lines of the merged output.

    With a `responder` the child runs on a pseudo-terminal of its own (its controlling
    terminal, stderr merged into stdout) and the responder answers its password prompt.
    """
    if responder is not None:
        return _stream_pty(
            argv, env=env, cwd=cwd, on_line=on_line, timeout=timeout, cancel=cancel,
            responder=responder,
        )  # fmt: skip
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

    readers = [
        threading.Thread(target=pump, args=(pipe,), daemon=True)
        for pipe in (proc.stdout, proc.stderr)
        if pipe is not None
    ]
    for reader in readers:
        reader.start()
    try:
        returncode = _supervise(proc, argv[0], tail, cancel=cancel, timeout=timeout)
    except KeyboardInterrupt:
        _stop(proc)
        for reader in readers:
            reader.join(timeout=2)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if returncode < 0:
        returncode = 128 - returncode
    return Completed(tuple(argv), returncode, "", "\n".join(tail))


# --- a program on a pseudo-terminal, with its password prompt answered ----------------------

SUDO_PROMPT = re.compile(r"(?:\[sudo\] )?[Pp]assword(?: for [^\n]*)?: ?$")
REJECTIONS = ("Sorry, try again", "incorrect password attempt", "no password was provided")
MASK = "********"
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
# Run as the child: it is the leader of a new session (start_new_session), so opening the
# terminal makes it the controlling one (/dev/tty works, as for `getpass`), then exec.
_TRAMPOLINE = (
    "import os, sys\n"
    "os.close(os.open(os.ttyname(0), os.O_RDWR))\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'{sys.argv[1]}: {exc.strerror}\\n')\n"
    "    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)\n"
)


@dataclass
class Responder:
    """Answers a program's password prompt on its terminal, at most `max_answers` times.

    One more prompt after that, or sudo's rejection ("Sorry, try again", "incorrect password
    attempt") in the output, means the password is wrong: `failed` is set and the program is
    stopped, never answered again. The answer is masked if it ever shows up in the output.
    """

    answer: str = field(repr=False)
    prompt: re.Pattern[str] = SUDO_PROMPT
    max_answers: int = 1
    answered: int = 0
    rejected: bool = False
    reprompted: bool = False

    @property
    def failed(self) -> bool:
        return self.rejected or self.reprompted

    def line(self, text: str) -> str:
        """A whole output line: note a rejection; mask the answer."""
        if any(marker in text for marker in REJECTIONS):
            self.rejected = True
        return mask(text, self.answer)

    def partial(self, text: str) -> str | None:
        """An unterminated line (a prompt waits for input): what to type, or None."""
        if not self.prompt.search(_clean(text).rstrip("\n")):
            return None
        if self.failed or self.answered >= self.max_answers:
            self.reprompted = True
            return None
        self.answered += 1
        return self.answer + "\n"


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
    cancel: threading.Event | None,
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
        if pending.strip():
            emit(pending)

    reader = threading.Thread(target=pump, daemon=True, name="pty-reader")
    reader.start()
    try:
        returncode = _supervise(
            proc,
            argv[0],
            tail,
            cancel=cancel,
            timeout=timeout,
            give_up=lambda: "the password was not accepted" if responder.failed else None,
        )
    except KeyboardInterrupt:
        _stop(proc)
        done.set()
        reader.join(timeout=2)
        os.close(master)
        raise
    done.set()
    reader.join(timeout=5)
    os.close(master)
    if returncode < 0:
        returncode = 128 - returncode
    if responder.failed and returncode == 0:
        returncode = 1
    return Completed(tuple(argv), returncode, "", "\n".join(tail))
