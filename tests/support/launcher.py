"""A warm interpreter for the tests' ``python -m invoke ...`` runs (issue #17: CI time).

A fresh ``python -m invoke`` spends about 200 ms of CPU importing the libraries rebuild uses
(Invoke, Fabric, paramiko with cryptography, pydantic, structlog) before rebuild's own code
runs; the suite starts some 400 of them on two cores. Here each run is still a process of its
own, with its own argv, environment, working folder and standard input, output and error, but
forked from a server that imported those libraries once (none of rebuild: every run imports
and executes rebuild afresh, and reads its environment at run time as a fresh one would).

The server is the test bed's host simulator (:mod:`testbed.sim.server`) with
``--program invoke``: the same fork server, wire format and set-up of a child as "a fresh
interpreter" (signal dispositions, the caller's ignored signals and mask, streams), running
``invoke`` as ``python -m`` does (:func:`runpy.run_module`). This module is its client.

A run goes to a fresh interpreter instead when anything the interpreter reads at start-up
differs from the server's (``PYTHON*``, the locale variables), and always with
``REBUILD_TESTS_FRESH=1``. What the command-line start costs is measured by
``benchmarks/startup.py``, never by the tests.

The server is started on first use by each pytest process, in a private folder (only the same
user may connect), and ends with that process (``--parent``).
"""

from __future__ import annotations

import atexit
import contextlib
import locale
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from testbed.sim.server import HEADER, INT, MAGIC, socket_path

# what an interpreter reads from its environment before any code of the program runs
START_UP = ("LANG", "LC_ALL", "LC_CTYPE")
SERVE = "import sys; from testbed.sim.server import serve; sys.exit(serve(sys.argv[1:]))"


def _start_up_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON") or k in START_UP}


class _Server:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rbl-"))
        (self.root / "sim").mkdir(mode=0o700)
        self.socket = socket_path(self.root)
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--root", str(self.root), "--ready-fd", str(write),
             "--program", "invoke", "--parent", str(os.getpid())],
            pass_fds=[write], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        os.close(write)
        self.env = _start_up_env(os.environ)
        ready = selectors.DefaultSelector()
        ready.register(read, selectors.EVENT_READ)
        ok = bool(ready.select(30)) and os.read(read, 3) == b"ok\n"
        os.close(read)
        if not ok:
            self.stop()
            raise RuntimeError("the tests' launcher did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for path in (self.socket, self.socket.parent, self.root):
            with contextlib.suppress(OSError):
                path.unlink() if path.is_socket() else path.rmdir()


_server: list[_Server | None] = []


def _the_server() -> _Server | None:
    if not _server:
        try:
            server: _Server | None = _Server()
        except (OSError, RuntimeError):
            server = None
        _server.append(server)
        if server is not None:
            atexit.register(server.stop)
    return _server[0]


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
    timeout=timeout, stdin=DEVNULL)`` for ``[sys.executable, "-m", "invoke", ...]``."""
    server = None
    wanted = list(argv[:3]) == [sys.executable, "-m", "invoke"]
    if wanted and os.environ.get("REBUILD_TESTS_FRESH") != "1":
        server = _the_server()
    if server is not None and _start_up_env(env) == server.env:
        try:
            return _forked(server, list(argv), env, os.fspath(cwd or os.getcwd()), timeout)
        except _Unreachable:
            _server[0] = None  # the server is gone: every later run starts fresh
    return subprocess.run(
        list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


class _Unreachable(Exception):
    """The server did not take the run (nothing of it started)."""


def _request(argv: list[str], env: Mapping[str, str]) -> bytes:
    """The server's wire format (:mod:`testbed.sim.server`): what ``exec`` would hand on."""
    umask = os.umask(0o022)
    os.umask(umask)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    fields = [
        "invoke", "-m", "", f"{umask:o}", str(0b111), str(_mask(_ignored_signals())),
        str(_mask(blocked)), str(len(argv) - 3), *argv[3:],
        *(f"{key}={value}" for key, value in env.items()),
    ]  # fmt: skip
    payload = b"".join(os.fsencode(field) + b"\0" for field in fields)
    return HEADER.pack(MAGIC, len(payload)) + payload


def _mask(signals: Iterable[int]) -> int:
    return sum(1 << (int(sig) - 1) for sig in signals)


def _ignored_signals() -> list[int]:
    """The signals this process ignores that a child it started would still ignore after
    exec (`subprocess` restores SIGPIPE and SIGXFSZ first; a fresh Python then ignores those
    two itself, and leaves an ignored SIGINT ignored instead of raising KeyboardInterrupt)."""
    restored = {signal.SIGPIPE, signal.SIGXFSZ}
    return [
        int(sig)
        for sig in signal.valid_signals()
        if sig not in restored and _disposition(sig) == signal.SIG_IGN
    ]


def _disposition(sig: int) -> object:
    try:
        return signal.getsignal(sig)
    except (OSError, ValueError):
        return None


def _forked(server: _Server, argv: list[str], env: Mapping[str, str], cwd: str,
            timeout: float) -> subprocess.CompletedProcess[str]:  # fmt: skip
    deadline = time.monotonic() + timeout
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    folder = os.open(cwd, os.O_RDONLY | os.O_DIRECTORY)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(server.socket))
        socket.send_fds(conn, [_request(argv, env)], [null, out_w, err_w, folder])
    except OSError:
        conn.close()
        os.close(out_r)
        os.close(err_r)
        raise _Unreachable from None
    finally:
        for fd in (null, out_w, err_w, folder):
            os.close(fd)
    # from here on the run may have started: never retried
    pid = INT.unpack(_recv_exactly(conn, INT.size, deadline))[0]
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    streams = selectors.DefaultSelector()
    for fd in chunks:
        streams.register(fd, selectors.EVENT_READ)
    try:
        while streams.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout)
            for key, _ in streams.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    streams.unregister(key.fd)
        status = INT.unpack(_recv_exactly(conn, INT.size, deadline))[0]
    finally:
        streams.close()
        os.close(out_r)
        os.close(err_r)
        conn.close()
    encoding = locale.getpreferredencoding(False)
    return subprocess.CompletedProcess(
        argv,
        os.waitstatus_to_exitcode(status),
        b"".join(chunks[out_r]).decode(encoding),
        b"".join(chunks[err_r]).decode(encoding),
    )


def _recv_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise RuntimeError("the tests' launcher closed the connection")
        data += chunk
    return data
