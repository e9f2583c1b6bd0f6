"""The one SSH seam: a Fabric connection with strict host keys; quoting happens here only."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import shlex
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paramiko
from fabric import Config, Connection
from fabric.runners import Remote as FabricRemoteRunner
from invoke.exceptions import CommandTimedOut
from paramiko.hostkeys import HostKeyEntry, HostKeys

from rebuild.errors import GateRefused, RemoteError

# paramiko logs a handshake that fails (a port that does not speak SSH) with a traceback
# through the logging module's last-resort handler; rebuild reports it as one line instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


@dataclass(frozen=True)
class RemoteResult:
    """What a remote command gave back."""

    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exited == 0


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, and with which trust anchors."""

    name: str
    address: str
    port: int
    user: str
    known_hosts: Path
    identity_file: Path | None = None
    connect_timeout: float = 10
    sudo: bool = False
    sudo_password: str | None = field(default=None, repr=False)
    keyring_available: bool = True  # for the message when sudo wants a password we lack

    @property
    def key_name(self) -> str:
        """The name host keys are filed under in known_hosts."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class KnownHosts:
    """The inventory's known_hosts as rebuild trusts it: plain keys by host name, `@revoked`
    keys (never accepted, for any host), and the names that have `@cert-authority` lines."""

    keys: HostKeys
    revoked: frozenset[str]  # base64 key blobs
    cert_authority_for: tuple[str, ...]
    skipped: tuple[str, ...]


def read_known_hosts(path: Path) -> KnownHosts:
    """Parse known_hosts as OpenSSH would for rebuild's hosts; lines paramiko cannot use
    (wildcards, hashed patterns with markers) are reported."""
    keys = HostKeys()
    skipped: list[str] = []
    revoked: set[str] = set()
    authorities: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return KnownHosts(keys, frozenset(), (), ())
    except OSError as exc:
        raise GateRefused(f"cannot read known_hosts {path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            words = line.split()
            if words[0] == "@revoked" and len(words) >= 4:
                revoked.add(words[3])
            elif words[0] == "@cert-authority" and len(words) >= 2:
                authorities.extend(words[1].split(","))
            else:
                skipped.append(f"{path}:{lineno}: malformed {words[0]} line")
            continue
        try:
            entry = HostKeyEntry.from_line(line, lineno)
        except Exception:
            skipped.append(f"{path}:{lineno}: malformed line")
            continue
        if entry is None:
            skipped.append(f"{path}:{lineno}: unsupported key type")
            continue
        for name in entry.hostnames:
            if any(ch in name for ch in "*?!"):
                skipped.append(f"{path}:{lineno}: wildcard pattern {name!r} is not supported")
                continue
            keys.add(name, entry.key.get_name(), entry.key)
    return KnownHosts(keys, frozenset(revoked), tuple(authorities), tuple(skipped))


def known_host_keys(path: Path) -> tuple[HostKeys, list[str]]:
    """The plain keys of known_hosts and the lines that were not used."""
    known = read_known_hosts(path)
    return known.keys, list(known.skipped)


def key_is_known(endpoint: Endpoint) -> bool:
    """The local half of the host-key gate: is there any key for this host in known_hosts
    that is not revoked? (A host vouched for only by a certificate authority is refused with
    its own message by `host_key_problem`.)"""
    return host_key_problem(endpoint) is None


def host_key_problem(endpoint: Endpoint) -> str | None:
    """Why the host-key gate refuses this host before connecting, or None."""
    known = read_known_hosts(endpoint.known_hosts)
    if {endpoint.key_name, endpoint.address} & set(known.cert_authority_for):
        return (
            f"{endpoint.known_hosts} vouches for {endpoint.name} ({endpoint.key_name}) with an "
            "@cert-authority line, which rebuild does not support (its SSH library cannot check "
            "host certificates); pin the host's own key instead: " + keyscan_hint(endpoint)
        )
    by_type = known.keys.lookup(endpoint.key_name)
    if by_type is None:
        return unknown_key_message(endpoint)
    usable = [key for key in by_type.values() if key.get_base64() not in known.revoked]
    if not usable:
        return (
            f"every key of {endpoint.name} ({endpoint.key_name}) in {endpoint.known_hosts} is "
            "marked @revoked; verify the host's new key out of band and pin it"
        )
    return None


def keyscan_hint(endpoint: Endpoint) -> str:
    """The command that adds the host's key (to be run only after checking its fingerprint)."""
    argv = ["ssh-keyscan"]
    if endpoint.port != 22:
        argv += ["-p", str(endpoint.port)]
    argv.append(endpoint.address)
    return f"{shlex.join(argv)} >> {shlex.quote(str(endpoint.known_hosts))}"


def unknown_key_message(endpoint: Endpoint) -> str:
    return (
        f"host key of {endpoint.name} ({endpoint.key_name}) is not in {endpoint.known_hosts}; "
        f"verify its fingerprint out of band (provider console: ssh-keygen -lf "
        f"/etc/ssh/ssh_host_ed25519_key.pub), then add it: {keyscan_hint(endpoint)}"
    )


def changed_key_message(endpoint: Endpoint) -> str:
    remove = shlex.join(["ssh-keygen", "-R", endpoint.key_name, "-f", str(endpoint.known_hosts)])
    return (
        f"HOST KEY CHANGED for {endpoint.name} ({endpoint.key_name}): the key it offers differs "
        f"from {endpoint.known_hosts}; this may be an attack or a reinstalled host. Verify the "
        f"new fingerprint out of band, then replace the entry ({remove})"
    )


def revoked_key_message(endpoint: Endpoint) -> str:
    return (
        f"{endpoint.name} ({endpoint.key_name}) offers a host key that {endpoint.known_hosts} "
        "marks @revoked; refusing to connect. Verify the host out of band"
    )


class _Runner(FabricRemoteRunner):  # type: ignore[misc]  # Fabric is untyped
    """Fabric's runner, polling for the command's end every 2 ms instead of Invoke's 10 ms (up
    to 10 ms more on every remote command, for a check that costs microseconds)."""

    input_sleep = 0.002


class _Spare:
    """A session channel being opened ahead of the command that will use it."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.channel: paramiko.Channel | None = None


class _PromptSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once (TCP_QUICKACK, re-armed before
    each read: Linux clears it by itself). With delayed ACKs, an sshd that holds a small
    reply for an ACK (Nagle) stalls 40 ms: measured on the first channel of each connection."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return super().recv(bufsize, flags)


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """The TCP connection paramiko would open (each address of the name in turn; refused and
    unreachable ones gathered into NoValidConnectionsError, any other error raised at once),
    with Nagle off (TCP_NODELAY: the handshake's small packets go out at once, 110 → 21 ms on
    loopback) and prompt ACKs (`_PromptSocket`)."""
    errors: dict[tuple[str, int], OSError] = {}
    for family, _, _, _, address in socket.getaddrinfo(
        host, port, socket.AF_UNSPEC, socket.SOCK_STREAM
    ):
        sock = _PromptSocket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                raise
            errors[(str(address[0]), int(address[1]))] = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise paramiko.ssh_exception.NoValidConnectionsError(errors)


class _AheadConnection(Connection):  # type: ignore[misc]  # Fabric is untyped
    """Fabric's connection, with the next command's session channel opened while the current
    one runs: a remote command then costs one round trip (exec) instead of two (open, exec).
    The channel an unused spare leaves open goes with the connection."""

    _spare_lock: threading.Lock
    _spares: list[_Spare]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # Invoke's `_set`: a plain attribute (a bare one would become a config key, copied and
        # even pickled later)
        self._set(_spare_lock=threading.Lock(), _spares=[])

    def open(self) -> object:
        """Fabric's open, on a socket from `tcp_connect`."""
        if self.is_connected:
            return None
        self.connect_kwargs["sock"] = tcp_connect(self.host, self.port, self.connect_timeout)
        try:
            return super().open()
        finally:
            self.connect_kwargs.pop("sock", None)

    def create_session(self) -> paramiko.Channel:
        channel = self._take_spare()
        if channel is None:
            channel = self.transport.open_session(timeout=self.connect_timeout)
        self.open_spare()
        return channel

    def open_spare(self) -> None:
        spare = _Spare()
        with self._spare_lock:
            self._spares.append(spare)
        transport = self.transport

        def work() -> None:
            # a connection closing under it fails the open: the next command opens its own
            with contextlib.suppress(Exception):
                spare.channel = transport.open_session(timeout=self.connect_timeout)
            spare.ready.set()

        threading.Thread(target=work, name="rebuild-spare-channel", daemon=True).start()

    def _take_spare(self) -> paramiko.Channel | None:
        with self._spare_lock:
            spare = self._spares.pop(0) if self._spares else None
        if spare is None or not spare.ready.wait(self.connect_timeout):
            return None
        channel = spare.channel
        return channel if channel is not None and not channel.closed else None


class Remote:
    """One SSH connection to a host, reused for every command of a run."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.commands = 0  # remote commands run (each one round trip on this connection)
        self._count_lock = threading.Lock()
        # lazy: no /etc/fabric.yml, ~/.fabric.yaml or ~/.fabric.py (code!) is read; no ssh_config
        config = Config(
            overrides={"load_ssh_configs": False, "run": {"in_stream": False},
                       "runners": {"remote": _Runner}},
            lazy=True,
        )  # fmt: skip
        connect_kwargs: dict[str, object] = {
            "banner_timeout": endpoint.connect_timeout,
            "auth_timeout": endpoint.connect_timeout,
            "allow_agent": True,
            "look_for_keys": endpoint.identity_file is None,
        }
        if endpoint.identity_file is not None:
            connect_kwargs["key_filename"] = str(endpoint.identity_file)
        self.conn = _AheadConnection(
            host=endpoint.address,
            user=endpoint.user,
            port=endpoint.port,
            config=config,
            connect_timeout=endpoint.connect_timeout,
            connect_kwargs=connect_kwargs,
            gateway=None,
        )
        # Fabric installs AutoAddPolicy unconditionally: trust only the inventory's known_hosts.
        self.known = read_known_hosts(endpoint.known_hosts)
        client_keys = self.conn.client.get_host_keys()
        for hostname, by_type in self.known.keys.items():
            for keytype, key in by_type.items():
                if key.get_base64() not in self.known.revoked:
                    client_keys.add(hostname, keytype, key)
        self.conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def open(self) -> Remote:
        try:
            self.conn.open()
            transport = self.conn.client.get_transport()
            if transport is not None:
                if transport.get_remote_server_key().get_base64() in self.known.revoked:
                    self.close()
                    raise GateRefused(revoked_key_message(self.endpoint))
                transport.set_keepalive(5)
                self.conn.open_spare()  # the first command's channel
        except paramiko.BadHostKeyException:
            self.close()
            raise GateRefused(changed_key_message(self.endpoint)) from None
        except paramiko.SSHException as exc:
            self.close()
            if "not found in known_hosts" in str(exc):
                raise GateRefused(unknown_key_message(self.endpoint)) from None
            raise RemoteError(
                f"cannot connect to {self.endpoint.name} ({self.endpoint.key_name}): {exc}"
            ) from None
        except (OSError, EOFError) as exc:
            self.close()
            reason = (
                "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
            )
            raise RemoteError(
                f"cannot reach {self.endpoint.name} ({self.endpoint.key_name}): {reason}"
            ) from None
        return self

    def __enter__(self) -> Remote:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection may fail
            self.conn.close()

    def run(self, script: str, *, timeout: float = 60, privileged: bool = False) -> RemoteResult:
        """Run a POSIX sh script on the host; privileged scripts go through sudo when configured.

        The script is composed by rebuild with every inventory value already quoted (`quote`).
        """
        command = script
        stdin: io.StringIO | bool = False
        sudo = privileged and self.endpoint.sudo
        if sudo:
            password = self.endpoint.sudo_password
            command = sudo_command(script, with_password=password is not None)
            if password is not None:
                # sudo -S reads it from the command's stdin: never in an argv or environment
                stdin = _WholeStream(password + "\n")
        result = self._exec(command, stdin, timeout)
        if sudo and result.exited != 0:
            problem = sudo_problem(self.endpoint, result.stderr)
            if problem is not None:
                raise GateRefused(problem)
        return result

    def _exec(self, command: str, stdin: io.StringIO | bool, timeout: float) -> RemoteResult:
        """One remote command; a timeout, a lost connection or a missing exit status is a
        RemoteError."""
        with self._count_lock:  # the heartbeat thread runs commands too
            self.commands += 1
        try:
            result = self.conn.run(
                command, hide=True, warn=True, in_stream=stdin, timeout=timeout, pty=False
            )
        except CommandTimedOut:
            raise RemoteError(
                f"{self.endpoint.name}: a remote command timed out after {timeout:g}s"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.endpoint.name}: connection lost: {exc}") from None
        if result.exited == NO_EXIT_STATUS:
            # Invoke's timer closes the channel, but reports CommandTimedOut only when its own
            # thread has already ended: under load the partial output comes back as a result
            # with no exit status. The same holds for a channel closed any other way.
            raise RemoteError(
                f"{self.endpoint.name}: a remote command ended without an exit status "
                f"(timed out after {timeout:g}s, or the connection was lost)"
            )
        return RemoteResult(int(result.exited), str(result.stdout), str(result.stderr))

    def run_pair(self, privileged: str, plain: str, *, timeout: float = 60
                 ) -> tuple[RemoteResult, RemoteResult]:  # fmt: skip
        """Run a privileged script and a plain one, side by side, in one round trip (one
        remote command).

        The privileged part's output (its stderr folded in) and exit status travel ahead of
        a marker line; the plain part runs as the SSH user with stdin closed, also when the
        first went through sudo (which took the password from stdin, as `run` does). The
        plain part starts first, in the background, its output held in a private temporary
        file (`mktemp`) and printed after the marker: the pair costs what the slower part
        costs, not the sum (a deploy's verification: the re-arm beside the facts). Where
        `mktemp` fails, the plain part runs after the first, as before.
        """
        sudo = self.endpoint.sudo
        password = self.endpoint.sudo_password if sudo else None
        if password is not None:  # sudo -S takes the password line; the script drains the rest
            first = sudo_command(privileged, with_password=True)
        else:
            first = (sudo_command(privileged) if sudo else "sh -c " + shlex.quote(privileged)
                     ) + " </dev/null"  # fmt: skip
        script = (
            f"{_PAIR_TMP}=$(mktemp 2>/dev/null) || {_PAIR_TMP}=\n"
            f'if [ -n "${_PAIR_TMP}" ]; then ( exec </dev/null\n{plain}\n'
            f') >"${_PAIR_TMP}" & {_PAIR_PID}=$!; fi\n'
            f"{_PAIR_OUT}=$({first} 2>&1); {_PAIR_RC}=$?\n"
            f'printf \'%s\\n\' "${_PAIR_OUT}"; echo "{PAIR_MARK} ${_PAIR_RC}"\n'
            f"unset {_PAIR_OUT} {_PAIR_RC}; exec </dev/null\n"
            f'if [ -n "${_PAIR_TMP}" ]; then wait "${_PAIR_PID}"; {_PAIR_RC}=$?; '
            f'cat "${_PAIR_TMP}"; rm -f "${_PAIR_TMP}"; exit "${_PAIR_RC}"; fi\n{plain}'
        )
        stdin = _WholeStream(password + "\n") if password is not None else False
        result = self._exec(script, stdin, timeout)
        head, found, tail = result.stdout.partition(f"\n{PAIR_MARK} ")
        code_text, _, plain_out = tail.partition("\n")
        if not found or not code_text.strip().lstrip("-").isdigit():
            raise RemoteError(f"{self.endpoint.name}: a remote command ended early: "
                              f"{result.stderr.strip()[-200:]}")  # fmt: skip
        first_result = RemoteResult(int(code_text), head + "\n", "")
        if sudo and first_result.exited != 0:
            problem = sudo_problem(self.endpoint, head)
            if problem is not None:
                raise GateRefused(problem)
        return first_result, RemoteResult(result.exited, plain_out, result.stderr)


NO_EXIT_STATUS = -1  # paramiko's recv_exit_status() for a channel closed without one


PAIR_MARK = "@@rebuild-pair@@"
_PAIR_OUT, _PAIR_RC = "rebuild_first", "rebuild_first_rc"
_PAIR_TMP, _PAIR_PID = "rebuild_plain", "rebuild_plain_pid"


class _WholeStream(io.StringIO):
    """stdin for one remote command: Invoke reads a non-terminal stream one character per
    poll; hand it everything at once (then EOF, so a rejected password fails at once)."""

    def read(self, size: int | None = -1) -> str:
        return super().read()


def sudo_command(script: str, *, with_password: bool = False) -> str:
    """Run a script as root through sudo; a password is never put in argv or the environment.

    Without a password, non-interactive sudo (`-n`): a sudo that wants one fails at once.
    With one, `-S -p ''`: sudo reads it from stdin, without a prompt. The script first drains
    its stdin (the password line when sudo did not need it, NOPASSWD; else nothing until EOF)
    into a variable it unsets at once, then detaches stdin: the rest of the script never sees
    the password, and the command never ends before rebuild has written and closed its stdin
    (closing it after the channel was gone would fail).
    """
    if with_password:
        drain = f"IFS= read -r {_DRAIN} || true; unset {_DRAIN}; exec </dev/null\n"
        return "sudo -S -p '' -- sh -c " + shlex.quote(drain + script)
    return "sudo -n -- sh -c " + shlex.quote(script)


_DRAIN = "rebuild_stdin"


SUDO_REJECTED = ("incorrect password attempt", "Sorry, try again", "no password was provided")
SUDO_NEEDS_PASSWORD = ("a password is required", "a terminal is required")


def sudo_problem(endpoint: Endpoint, stderr: str) -> str | None:
    """What sudo's own complaint on stderr means for the operator, or None if it is not sudo's.

    Every case is final: rebuild never retries a password.
    """
    name, user = endpoint.name, endpoint.user
    if any(marker in stderr for marker in SUDO_REJECTED):
        return (
            f"sudo on {name} rejected the stored password of {user}; store the right one "
            f"with `invoke secret set --host {name}`"
        )
    if any(marker in stderr for marker in SUDO_NEEDS_PASSWORD):
        if not endpoint.keyring_available:
            from rebuild.sudo_keyring import no_backend_message

            return f"sudo on {name} needs a password for {user}: " + no_backend_message(name, user)
        return (
            f"sudo on {name} needs a password for {user} and none is stored; store it with "
            f"`invoke secret set --host {name}` (kept in the OS keyring), or allow "
            f"passwordless sudo for {user} on {name} (a NOPASSWD rule)"
        )
    if "not in the sudoers file" in stderr or "is not allowed to" in stderr:
        return (
            f"{user} may not use sudo on {name} (sudo: not in the sudoers file); grant it "
            f"sudo rights there, or deploy as root"
        )
    if "sudo: command not found" in stderr or "sudo: not found" in stderr:
        return f"sudo = true for {name}, but the host has no sudo; install it, or deploy as root"
    return None


def quote(value: str) -> str:
    return shlex.quote(value)


def join(argv: Sequence[str]) -> str:
    return shlex.join(argv)
