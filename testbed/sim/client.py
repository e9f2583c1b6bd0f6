"""The client half of the simulator's commands, in Python: for a machine without a C compiler.

Not an imitation itself: the same program as ``client.c`` (its comment says what it does; the
wire format is in :mod:`testbed.sim.server`'s docstring), for when the test bed finds no ``cc``
to build that one. It starts in about 8 ms instead of the Python shim's 40 because it imports
nothing but built-in modules (``posix``, ``_socket``, ``_signal``; no ``os``, no ``site``).
The test bed copies this file into ``hostbin/`` with a ``#!`` line and a last line that runs
:func:`main` with the folder of the Python shims it falls back to (no package to import).
"""

from __future__ import annotations

import _socket
import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and signal (enum) cost milliseconds to import: for the checker only
    import signal as _signal
    from typing import NoReturn
else:
    import _signal

FORWARDED = (
    _signal.SIGHUP,
    _signal.SIGINT,
    _signal.SIGQUIT,
    _signal.SIGTERM,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
# Python's own start-up ignores these; the simulator's child ignores them too
_PYTHON_IGNORES = (_signal.SIGPIPE, _signal.SIGXFSZ)
_INT = 4
_ORDER = sys.byteorder


def _fallback(py_dir: str, name: str, root: str | None) -> NoReturn:
    """Run the Python shim of the same name."""
    env = dict(posix.environ)
    if root is not None and b"SIM_ROOT" not in env:
        env[b"SIM_ROOT"] = root.encode("utf-8", "surrogateescape")
    path = f"{py_dir}/{name}"
    try:
        posix.execve(path, [path, *sys.argv[1:]], env)
    except OSError as exc:
        sys.stderr.write(f"rebuild test bed: {name}: cannot run its Python shim: {exc}\n")
    posix._exit(127)


def _find_root(execfn: str) -> str | None:
    value = posix.environ.get(b"SIM_ROOT")
    if value:
        return value.decode("utf-8", "surrogateescape")
    folder = execfn.rpartition("/")[0] if "/" in execfn else "."
    try:
        fd = posix.open(f"{folder}/.sim-root", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = posix.read(fd, 4096)
    finally:
        posix.close(fd)
    line = data.decode("utf-8", "surrogateescape").split("\n", 1)[0]
    return line or None


def _read_int(sock: _socket.socket) -> int | None:
    data = b""
    while len(data) < _INT:
        try:
            chunk = sock.recv(_INT - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return int.from_bytes(data, _ORDER, signed=True)


def main(py_dir: str) -> int:
    """Run this command on the host's simulator; the exit code (or die of its signal)."""
    # which of 0, 1, 2 are open: before a descriptor of ours can take a closed one's number
    fds: list[int] = []
    open_std = 0
    for fd in (0, 1, 2):
        try:
            posix.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
        open_std |= 1 << fd
    execfn = sys.argv[0]
    name = execfn.rpartition("/")[2]
    root = _find_root(execfn)
    if root is None:
        _fallback(py_dir, name, None)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(f"{root}/sim/server.sock")
        cwd = posix.open(".", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
    except OSError:
        _fallback(py_dir, name, root)
    fds.append(cwd)
    mask = posix.umask(0)
    posix.umask(mask)
    ignored = 0
    for sig in _signal.valid_signals():
        if _signal.getsignal(sig) == _signal.SIG_IGN and sig not in _PYTHON_IGNORES:
            ignored |= 1 << (sig - 1)
    blocked = 0
    for masked in _signal.pthread_sigmask(_signal.SIG_BLOCK, []):
        blocked |= 1 << (masked - 1)
    args = [a.encode("utf-8", "surrogateescape") for a in sys.argv[1:]]
    fields = [
        name.encode(),
        execfn.encode("utf-8", "surrogateescape"),
        root.encode("utf-8", "surrogateescape"),
        f"{mask:o}".encode(),
        str(open_std).encode(),
        str(ignored).encode(),
        str(blocked).encode(),
        str(len(args)).encode(),
        *args,
        *(k + b"=" + v for k, v in posix.environ.items()),
    ]
    payload = b"".join(f + b"\0" for f in fields)
    message = b"RBS1" + len(payload).to_bytes(4, _ORDER) + payload
    rights = b"".join(fd.to_bytes(_INT, _ORDER, signed=True) for fd in fds)
    try:
        sent = sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    except OSError:
        _fallback(py_dir, name, root)  # nothing was sent
    try:
        if sent < len(message):
            sock.sendall(message[sent:])
    except OSError:
        # the simulator may have started it: never run it a second time
        sys.stderr.write(f"rebuild test bed: {name}: lost the host's simulator\n")
        return 1
    posix.close(cwd)
    child: list[int] = []
    pending: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if child:
            posix.kill(child[0], sig)
        else:
            pending.append(sig)

    for sig in FORWARDED:
        if not ignored & (1 << (sig - 1)):
            _signal.signal(sig, forward)
    pid = _read_int(sock)
    if pid is None:
        sys.stderr.write(f"rebuild test bed: {name}: the host's simulator did not run it\n")
        return 1
    child.append(pid)
    for early in pending:
        posix.kill(pid, early)
    status = _read_int(sock)
    if status is None:
        sys.stderr.write(f"rebuild test bed: {name}: lost the host's simulator\n")
        return 1
    if posix.WIFSIGNALED(status):
        killer = posix.WTERMSIG(status)
        _signal.signal(killer, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [killer])
        posix.kill(posix.getpid(), killer)
        return 128 + killer
    return posix.WEXITSTATUS(status) if posix.WIFEXITED(status) else 1
