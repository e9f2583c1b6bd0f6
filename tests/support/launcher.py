"""A warm interpreter for the tests' ``python -m invoke ...`` runs (issue #17: CI time).

A fresh ``python -m invoke`` spends about 200 ms of CPU importing the libraries rebuild uses
(Invoke, Fabric, paramiko with cryptography, pydantic, structlog) before rebuild's own code
runs; the suite starts some 400 of them on two cores. Here each run is still a process of its
own, with its own argv, environment, working folder and standard input, output and error, but
forked from a server that imported those libraries once (none of rebuild: every run imports
and executes rebuild afresh, and reads its environment at run time as a fresh one would). The
child sets itself up with the test bed's host-simulator code (:mod:`testbed.sim.server`: the
signal dispositions and standard streams of a fresh interpreter) and runs ``invoke`` as
``python -m`` does (:func:`runpy.run_module`).

A run goes to a fresh interpreter instead when anything the interpreter reads at start-up
differs from the server's (``PYTHON*``, the locale variables), and always with
``REBUILD_TESTS_FRESH=1``. What the command-line start costs is measured by
``benchmarks/startup.py``, never by the tests.

The server is started on first use by each pytest process, talks over a Unix socket in a
private folder (only the same user may connect), and ends with that process (it watches its
parent). Run as ``python launcher.py SOCKET READY_FD``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import locale
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

INT = struct.Struct("=i")
HEADER = struct.Struct("=I")
PRELOAD = ("invoke.main", "fabric", "paramiko", "pydantic", "structlog")
# what an interpreter reads from its environment before any code of the program runs
START_UP = ("LANG", "LC_ALL", "LC_CTYPE")


def _start_up_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON") or k in START_UP}


# --------------------------------------------------------------------------- the client


class _Server:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="rbl-"))
        self.socket = self.folder / "s"
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.socket), str(write)],
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
        for path in (self.socket, self.folder):
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


def _forked(server: _Server, argv: list[str], env: Mapping[str, str], cwd: str,
            timeout: float) -> subprocess.CompletedProcess[str]:  # fmt: skip
    deadline = time.monotonic() + timeout
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    request = {"argv": argv[3:], "env": dict(env), "cwd": cwd, "ignored": _ignored_signals()}
    payload = json.dumps(request).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(server.socket))
        socket.send_fds(conn, [HEADER.pack(len(payload))], [null, out_w, err_w])
        conn.sendall(payload)
    except OSError:
        conn.close()
        os.close(out_r)
        os.close(err_r)
        raise _Unreachable from None
    finally:
        for fd in (null, out_w, err_w):
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


def _recv_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise RuntimeError("the tests' launcher closed the connection")
        data += chunk
    return data


# --------------------------------------------------------------------------- the server


def _child(conn: socket.socket, close: list[int]) -> None:
    """Become ``python -m invoke ARGS`` in the caller's folder, environment and streams."""
    code = 1
    try:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        import runpy

        from testbed.sim.server import coerce_c_locale, run_script, wrap_stdio

        header, fds, _flags, _addr = socket.recv_fds(conn, HEADER.size, 3)
        (length,) = HEADER.unpack(header)
        payload = b""
        while len(payload) < length:
            chunk = conn.recv(length - len(payload))
            if not chunk:
                raise RuntimeError("the client went away")
            payload += chunk
        request = json.loads(payload)
        env = {k.encode(): v.encode() for k, v in request["env"].items()}
        utf8_mode = coerce_c_locale(env)
        os.environb.clear()
        os.environb.update(env)
        for fd, target in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        wrap_stdio(0b111, utf8_mode)
        for sig in request["ignored"]:  # as exec keeps them: the caller's ignored signals
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_IGN)
        sys.argv = ["-m", *request["argv"]]
        sys.path[0] = os.getcwd()
        code = run_script(lambda: runpy.run_module("invoke", run_name="__main__", alter_sys=True))
        with contextlib.suppress(BaseException):
            import threading

            threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter's exit
            atexit._run_exitfuncs()
    except BaseException:
        import traceback

        with contextlib.suppress(BaseException):
            traceback.print_exc()
    os._exit(code)


def serve(path: str, ready_fd: int) -> None:
    import gc
    import importlib
    import select

    from testbed.sim.server import fresh_signals

    for name in PRELOAD:
        importlib.import_module(name)
    fresh_signals()
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    gc.freeze()  # the children share the imported modules' pages
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, its client)
    while os.getppid() == parent:  # ends with the pytest process that started it
        for fd, _mask in poller.poll(1.0):
            if fd in running:
                pid, conn = running.pop(fd)
                poller.unregister(fd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(INT.pack(status))
                conn.close()
                os.close(fd)
                continue
            conn, _ = listener.accept()
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.geteuid():
                conn.close()  # only the user who started it
                continue
            inherited = [listener.fileno(), poller.fileno(), *running]
            inherited += [c.fileno() for _, c in running.values()]
            pid = os.fork()
            if pid == 0:
                _child(conn, inherited)
            conn.sendall(INT.pack(pid))
            pidfd = os.pidfd_open(pid)
            running[pidfd] = (pid, conn)
            poller.register(pidfd, select.EPOLLIN)
    for pidfd in running:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
