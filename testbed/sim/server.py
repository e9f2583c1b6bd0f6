"""The host's simulator: one long-lived process per simulated host that runs its commands.

Not an imitation itself. A Python shim costs about 40 ms of start-up (interpreter and imports)
per command; here the imports are paid once per host. ``hostbin/systemctl``, ``systemd-run``,
``nix-env``, ``nix-store``, ``hostname`` (every shim but the path shims, ``sudo`` and
``rbtb-sim``: :mod:`testbed.hostbin`) are a small client (``client.c`` compiled with the
system's ``cc``, or ``client.py``) that connects to ``$SIM_ROOT/sim/server.sock`` and hands over
what a process is: its argv, environment, umask, signal dispositions and mask, working directory
and standard input, output and error (as file descriptors, ``SCM_RIGHTS``). For each command the
server forks a child that becomes that process (the caller's uid, gid and groups from
``SO_PEERCRED`` when the server runs as root, so a user without sudo is still refused what needs
root), runs :func:`testbed.sim.dispatch.main` as the Python shim would, and exits; the server
sends the child's wait status back and the client exits the same way (with the same code, or
killed by the same signal). The client forwards the signals it gets to the child; a client that
dies first takes its child with it (``SIGKILL``), as a killed command stops.

The helpers such a child starts (a transient service's or a timer's process, a unit's server:
:func:`spawn_helper`) are forks of it in turn, set up as ``subprocess.Popen`` and a fresh
``python -IS hostbin/rbtb-sim ...`` would be; outside the simulator they are that Popen.

The server is started with the host's sshd and ended with it (its pid is in the host's
:class:`~testbed.procs.PidRegistry`, so ``python -m testbed cleanup-stale`` ends it too); its
children stay in its process group. Started as ``python -IS hostbin/rbtb-sim server``.

Wire format (client to server, one message): ``RBS1``, the payload's length (``uint32``, native
order), then NUL-terminated fields: name, the path the client was executed as, ``SIM_ROOT``, the
umask (octal), the open standard descriptors (bit mask), the ignored and the blocked signals
(bit masks, bit ``n-1`` for signal ``n``), the number of arguments, the arguments, then the
environment; the descriptors (the open ones of 0, 1, 2, then the working directory) ride along.
Server to client: the child's pid as soon as it is forked (it keeps the forwarded signals
blocked until it is set up), then its wait status (``int32`` each, native order).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn, Protocol

if TYPE_CHECKING:
    from testbed.sim.host import Host

SOCKET_NAME = "server.sock"
MAGIC = b"RBS1"
HEADER = struct.Struct("=4sI")
INT = struct.Struct("=i")
MAX_REQUEST = 4 * 1024 * 1024
# what the clients forward to the command (client.c, client.py)
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# what a fresh `python -IS` does to these at start-up (the child is one)
_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)


def socket_path(root: Path) -> Path:
    return root / "sim" / SOCKET_NAME


@dataclass(frozen=True)
class Request:
    """One command as the client sent it."""

    name: str
    execfn: str
    root: str
    umask: int
    open_std: int
    ignored: int
    blocked: int
    argv: list[str]
    env: list[bytes]


def parse_request(payload: bytes) -> Request:
    """The fields of a request's payload (see the module docstring)."""
    fields = payload.split(b"\0")
    if len(fields) < 9 or fields[-1] != b"":
        raise ValueError("truncated request")
    fields.pop()
    text = [os.fsdecode(f) for f in fields[:8]]
    argc = int(text[7])
    if argc < 0 or 8 + argc > len(fields):
        raise ValueError("bad argument count")
    return Request(
        name=text[0],
        execfn=text[1],
        root=text[2],
        umask=int(text[3], 8),
        open_std=int(text[4]),
        ignored=int(text[5]),
        blocked=int(text[6]),
        argv=[os.fsdecode(a) for a in fields[8 : 8 + argc]],
        env=fields[8 + argc :],
    )


def coerce_c_locale(env: dict[bytes, bytes]) -> bool:
    """What Python does at start-up in the C locale (PEP 538): ``LC_CTYPE=C.UTF-8`` in its
    environment, which the programs it starts inherit. True when it applied."""
    if env.get(b"LC_ALL"):
        return False
    ctype = env.get(b"LC_CTYPE") or env.get(b"LANG") or b"C"
    if ctype not in (b"C", b"POSIX"):
        return False
    env[b"LC_CTYPE"] = b"C.UTF-8"
    return True


# --------------------------------------------------------------------------- the child


def _recv_request(conn: socket.socket) -> tuple[Request, list[int]]:
    fds: list[int] = []
    data = b""
    space = socket.CMSG_SPACE(4 * INT.size)
    while len(data) < HEADER.size:
        chunk, ancdata, _flags, _addr = conn.recvmsg(65536, space, socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % INT.size
                fds.extend(x for (x,) in INT.iter_unpack(cdata[:usable]))
        if not chunk:
            raise ValueError("client closed the connection")
        data += chunk
    magic, length = HEADER.unpack_from(data)
    if magic != MAGIC or length > MAX_REQUEST:
        raise ValueError("not a test bed request")
    while len(data) < HEADER.size + length:
        chunk = conn.recv(HEADER.size + length - len(data))
        if not chunk:
            raise ValueError("client closed the connection")
        data += chunk
    return parse_request(data[HEADER.size :]), fds


def _take_credentials(peer_pid: int, uid: int, gid: int) -> None:
    """Become the caller: its groups (from /proc, as the kernel has them), gid and uid."""
    groups: list[int] = []
    with open(f"/proc/{peer_pid}/status", "rb") as status:  # noqa: PTH123 (lighter than Path)
        for line in status:
            if line.startswith(b"Groups:"):
                groups = [int(g) for g in line.split()[1:]]
                break
    if (uid, gid) == (os.getuid(), os.getgid()) and sorted(groups) == sorted(os.getgroups()):
        return
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _install_stdio(request: Request, fds: list[int], utf8_mode: bool) -> None:
    """fds 0-2 are the caller's; sys.std* as a fresh ``python -IS`` would wrap them."""
    received = iter(fds)
    for fd in (0, 1, 2):
        if request.open_std & (1 << fd):
            src = next(received)
            os.dup2(src, fd)
            os.close(src)
        else:
            with contextlib.suppress(OSError):
                os.close(fd)
    cwd_fd = next(received)
    os.fchdir(cwd_fd)
    os.close(cwd_fd)
    wrap_stdio(request.open_std, utf8_mode)


def wrap_stdio(open_std: int, utf8_mode: bool) -> None:
    """sys.std* over fds 0-2 as a fresh ``python -IS`` makes them (None for a closed one)."""
    errors = "surrogateescape" if utf8_mode else "strict"
    streams: list[io.TextIOWrapper | None] = []
    for fd, mode in ((0, "r"), (1, "w"), (2, "w")):
        if not open_std & (1 << fd):
            streams.append(None)
            continue
        raw = open(fd, mode + "b", closefd=False)  # noqa: SIM115 (lives until the process ends)
        streams.append(
            io.TextIOWrapper(
                raw,
                encoding="utf-8",
                errors="backslashreplace" if fd == 2 else errors,
                newline="\n",
                line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
            )
        )
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams  # type: ignore[misc]


def fresh_signals() -> None:
    """The dispositions of a fresh ``python -IS`` that ignores nothing it was not made to:
    SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ are ignored (Python's start-up),
    every other signal has its default action, none is blocked. The server sets them once;
    its children start with them."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig in _PYTHON_IGNORES:
            handler: signal.Handlers | Callable[..., object] = signal.SIG_IGN
        elif sig == signal.SIGINT:
            handler = signal.default_int_handler
        else:
            handler = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):  # the C library's own (32, 33)
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _set_signals(request: Request) -> None:
    """What the caller ignores stays ignored, as exec keeps it (the rest is as
    :func:`fresh_signals` left it)."""
    ignored = request.ignored
    sig = 0
    while ignored:
        sig += 1
        if ignored & 1 and sig not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_IGN)
        ignored >>= 1


def _run(request: Request) -> int:
    """The shim's body as ``sys.exit(main(name, argv))`` at the top of a script would run it;
    for a server of ``python -m invoke`` (:data:`PROGRAM`), that, ended as the interpreter
    ends (threads joined, ``atexit`` run)."""

    def body() -> object:
        # the caller's signal mask: what came while this process was being set up arrives now
        signal.pthread_sigmask(
            signal.SIG_SETMASK, {n + 1 for n in range(64) if request.blocked & (1 << n)}
        )
        if PROGRAM == "invoke":
            import runpy

            sys.argv = ["-m", *request.argv]
            sys.path[0] = str(Path.cwd())
            return runpy.run_module("invoke", run_name="__main__", alter_sys=True)
        from testbed.sim.dispatch import main

        return main(request.name, request.argv)

    code = run_script(body)
    if PROGRAM == "invoke":
        import atexit
        import threading

        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
            atexit._run_exitfuncs()
            _flush()
    return code


def run_script(body: Callable[[], object]) -> int:
    """``sys.exit(body())`` as CPython ends a script: the exit status (an uncaught exception:
    its traceback, 1; Ctrl-C: the traceback, then killed by SIGINT), output flushed."""
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    return 120 if not _flush() and status == 0 else status


def _flush() -> bool:
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            ok = False
    return ok


def _child(conn: socket.socket, peer: tuple[int, int, int], close: Sequence[int]) -> NoReturn:
    """Become the client's process, run its command, exit with its status."""
    code = 1
    try:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        request, fds = _recv_request(conn)
        if os.geteuid() == 0:
            _take_credentials(*peer)
        env = dict(e.split(b"=", 1) for e in request.env if b"=" in e)
        utf8_mode = coerce_c_locale(env)
        zone = os.environb.get(b"TZ")
        for key in [k for k in os.environb if k not in env]:
            del os.environb[key]
        for key, value in env.items():
            if os.environb.get(key) != value:
                os.environb[key] = value
        if env.get(b"TZ") != zone:
            time.tzset()
        os.umask(request.umask)
        _install_stdio(request, fds, utf8_mode)
        _set_signals(request)
        sys.argv = [request.execfn, *request.argv]
        global IN_SIMULATOR  # this process is one of the simulator's children
        IN_SIMULATOR = True
        code = _run(request)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            _flush()
    os._exit(code)


# --------------------------------------------------------------------------- helpers

# True in the simulator's children: the helpers they start are forks, not new Pythons
IN_SIMULATOR = False
# A forked helper registers its pid (PidRegistry.add) at the moment its starter does: safe since
# PidRegistry.add takes two writers of one pid (a temporary file per writer)
FORK_HELPERS = True


class Helper(Protocol):
    """What the callers use of a started helper (a subset of :class:`subprocess.Popen`)."""

    @property
    def pid(self) -> int: ...

    def wait(self, timeout: float | None = None) -> int: ...


class ForkedHelper:
    """A helper forked from this process: its pid, and ``wait`` as Popen's."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(["rbtb-sim"], timeout or 0.0)
            _, status = os.waitpid(self.pid, 0)
            os.close(self._pidfd)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def spawn_helper(
    host: Host,
    args: Sequence[str],
    env: dict[str, str],
    log: Path | None,
    pass_fds: Sequence[int] = (),
) -> Helper:
    """``rbtb-sim ARGS`` in a session of its own, in ``/``, with exactly ``env``; stdin
    /dev/null and stdout and stderr appended to ``log`` (without a log: the caller's stdio);
    every other descriptor closed but ``pass_fds``. A new Python (``host.internal_argv``), or
    in the simulator's children a fork of this process, which has every module imported: the
    same process but for the 40 ms of start-up."""
    if not (IN_SIMULATOR and FORK_HELPERS):
        argv = host.internal_argv(*args)
        if log is None:
            return subprocess.Popen(
                argv, env=env, cwd="/", start_new_session=True, pass_fds=tuple(pass_fds)
            )
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(
                argv,
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
    _flush()  # nothing buffered here may be written twice
    handle: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.fork()
        if pid == 0:
            _helper_child(host, list(args), env, handle, devnull, pass_fds)
    finally:
        os.close(devnull)
        if handle is not None:
            handle.close()
    return ForkedHelper(pid)


def _helper_child(
    host: Host,
    args: list[str],
    env: dict[str, str],
    log: IO[bytes] | None,
    devnull: int,
    pass_fds: Sequence[int],
) -> NoReturn:
    """The forked helper: what Popen and a fresh ``python -IS rbtb-sim ARGS`` would set up."""
    import gc

    gc.freeze()  # what it inherited is never collected here (no descriptor closed twice)
    code = 1
    try:
        os.setsid()
        if log is not None:
            os.dup2(devnull, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        first = 3
        for fd in sorted(fd for fd in pass_fds if fd >= first):
            os.closerange(first, fd)
            first = fd + 1
        os.closerange(first, os.sysconf("SC_OPEN_MAX"))
        os.chdir("/")
        environ = {k.encode(): v.encode() for k, v in env.items()}
        utf8_mode = coerce_c_locale(environ)
        os.environb.clear()
        os.environb.update(environ)
        time.tzset()
        open_std = 0
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                os.fstat(fd)
                open_std |= 1 << fd
        wrap_stdio(open_std, utf8_mode)
        sys.argv = [str(host.info["entry"]), *args]
        from testbed.sim.dispatch import internal

        code = run_script(lambda: internal(args))
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
            _flush()
    os._exit(code)


# --------------------------------------------------------------------------- the server


# what a server's children run: a host's shims (`dispatch.main`), or `python -m invoke`
PROGRAM = "shims"
# what a server of `python -m invoke` imports for its children: the libraries, never rebuild
INVOKE_PRELOAD = ("invoke.main", "fabric", "paramiko", "pydantic", "structlog")


def _preload() -> None:
    """Import every module the children run once: they start with them."""
    import importlib
    import pkgutil

    if PROGRAM == "invoke":
        for name in INVOKE_PRELOAD:
            importlib.import_module(name)
        return
    import testbed.sim

    for module in pkgutil.iter_modules(testbed.sim.__path__):
        if module.name not in ("client", "server"):
            importlib.import_module(f"testbed.sim.{module.name}")


def serve(argv: Sequence[str]) -> int:
    """``rbtb-sim server --root SIM_ROOT --ready-fd FD [--program invoke] [--parent PID]``:
    serve until SIGTERM, or until the process PID is no longer the parent (then end what
    still runs). ``--program invoke``: the tests' warm ``python -m invoke``
    (``tests/support/launcher.py``), run by a Python with its site-packages."""
    import gc

    from testbed.sim.host import internal_opts

    global PROGRAM
    opts, _ = internal_opts(list(argv))
    root = Path(opts["--root"])
    ready_fd = int(opts["--ready-fd"])
    PROGRAM = opts.get("--program", "shims")
    parent = int(opts["--parent"]) if "--parent" in opts else None
    _preload()
    fresh_signals()
    path = socket_path(root)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{SOCKET_NAME}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # bound by a relative name: a socket's path may be too long for sun_path (108 bytes), then
    # the clients cannot connect and run the Python shims instead, but the host still works
    os.chdir(path.parent)
    try:
        listener.bind(tmp.name)
    finally:
        os.chdir("/")
    # as root, every local user may connect: each command runs with the caller's credentials
    tmp.chmod(0o666 if os.geteuid() == 0 else 0o600)
    listener.listen(128)
    tmp.replace(path)  # whole: no client connects before listen()
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    # pidfd -> (pid, connection); connection fd -> pidfd
    running: dict[int, tuple[int, socket.socket]] = {}
    by_conn: dict[int, int] = {}
    gc.freeze()  # the children share the imported modules' pages
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    while parent is None or os.getppid() == parent:
        try:
            events = poller.poll(-1 if parent is None else 1.0)
        except InterruptedError:
            continue
        # ends and hang-ups first: a descriptor closed here is not reused before the next poll
        for fd, mask in events:
            if fd in running:
                _finish(poller, running, by_conn, fd)
            elif fd in by_conn and mask & (select.EPOLLRDHUP | select.EPOLLHUP):
                # the client is gone before its command ended: so is the command
                pidfd = by_conn.pop(fd)
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                poller.unregister(fd)
        if any(fd == listener.fileno() for fd, _ in events):
            _accept(listener, poller, running, by_conn)
    for pidfd in running:  # the parent is gone: so is everything it started here
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    return 0


def _finish(
    poller: select.epoll,
    running: dict[int, tuple[int, socket.socket]],
    by_conn: dict[int, int],
    pidfd: int,
) -> None:
    """A command ended: its wait status to the client, and forget both."""
    pid, conn = running.pop(pidfd)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        conn.sendall(INT.pack(status))
    poller.unregister(pidfd)
    os.close(pidfd)
    if by_conn.pop(conn.fileno(), None) is not None:
        poller.unregister(conn.fileno())
    conn.close()


def _accept(
    listener: socket.socket,
    poller: select.epoll,
    running: dict[int, tuple[int, socket.socket]],
    by_conn: dict[int, int],
) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    peer_pid, uid, gid = struct.unpack("3i", creds)
    if os.geteuid() != 0 and uid != os.geteuid():
        conn.close()  # another user may not run commands as this one
        return
    inherited = [listener.fileno(), poller.fileno(), *running, *by_conn]
    # the child starts with the signals a client forwards blocked, until it is set up
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        _child(conn, (peer_pid, uid, gid), inherited)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    # the client forwards its signals to this pid (they wait until the child is set up)
    with contextlib.suppress(OSError):
        conn.sendall(INT.pack(pid))
    pidfd = os.pidfd_open(pid)
    running[pidfd] = (pid, conn)
    by_conn[conn.fileno()] = pidfd
    poller.register(pidfd, select.EPOLLIN)
    poller.register(conn.fileno(), select.EPOLLRDHUP)
