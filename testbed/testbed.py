"""The test bed: real OpenSSH servers playing simulated NixOS hosts.

See ``testbed/__init__.py`` for the overview.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed import hostbin
from testbed.netns import (
    Netns,
    cleanup_stale_netns,
    create_netns,
    delete_netns,
    netns_available,
)
from testbed.procs import PidRegistry, children_of, is_alive, proc_start_time, terminate
from testbed.proxy import LatencyProxy
from testbed.sim.dispatch import SHIM_NAMES, STORE_NAMES
from testbed.sim.host import BOOT_ID, PROFILE, SIM_ROOT_MARKER, Host, locked_state
from testbed.sim.nix_env import current_generation, profile_paths
from testbed.sim.reboot import write_boot_id
from testbed.sim.server import socket_path
from testbed.sim.units import mangle, system_state, unit_view
from testbed.store import (
    build_system,
    canonical_json,
    remove_tree,
    script_header,
    system_store_path,
)

SSHD = Path("/usr/sbin/sshd")
SSH_READY_TIMEOUT = 15.0
SERVER_READY_TIMEOUT = 30.0
HOST_PATH_TAIL = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_CONFIG: dict[str, object] = {"units": {"sshd.service": {}}, "label": "initial"}
# key exchanges that cost an OpenSSH client little CPU (see `Testbed`'s ``kex``)
FAST_KEX = ("curve25519-sha256", "curve25519-sha256@libssh.org")


OWNER_FILE = "testbed.owner"


class TestbedError(RuntimeError):
    """The test bed could not be set up."""

    __test__ = False  # not a pytest test class


def sshd_missing_message() -> str | None:
    """One-line error when OpenSSH's server is not installed, else None."""
    if SSHD.is_file() and os.access(SSHD, os.X_OK):
        return None
    return (
        f"{SSHD} not found: the rebuild test bed needs OpenSSH's server; install the Debian "
        "package openssh-server (sudo apt-get install openssh-server)"
    )


def _read_owner(path: Path) -> tuple[int, int | None] | None:
    try:
        pid_text, _, start_text = path.read_text(encoding="utf-8").strip().partition(" ")
        return int(pid_text), int(start_text) if start_text.isdigit() else None
    except (OSError, ValueError):
        return None


def cleanup_stale_testbeds(directory: Path | None = None) -> list[str]:
    """Remove test beds (``rbtb-*`` in the temp directory) whose creating process is gone.

    Ends only processes the dead test bed recorded (pid + start time): its sshds with their
    sessions, unit servers, timers and services; then deletes its directory. Also deletes
    stale network namespaces. Returns the directories removed.
    """
    base = directory or Path(tempfile.gettempdir())
    removed: list[str] = []
    for root in sorted(base.glob("rbtb-*")):
        owner = _read_owner(root / OWNER_FILE)
        if owner is None or is_alive(owner[0], owner[1]):
            continue
        try:
            for host_dir in sorted((root / "hosts").glob("*")):
                PidRegistry(host_dir / "root" / "sim" / "pids").terminate_all(timeout=2.0)
                sshd = _read_owner(host_dir / "sshd.owner")
                if sshd is not None and is_alive(sshd[0], sshd[1]):
                    for child in children_of(sshd[0]):
                        terminate(child, proc_start_time(child), timeout=1.0)
                    terminate(sshd[0], sshd[1], timeout=2.0)
        except OSError:
            continue
        remove_tree(root)
        removed.append(str(root))
    cleanup_stale_netns()
    return removed


def _run(
    argv: list[str],
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    if result.returncode != 0:
        raise TestbedError(
            f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def _free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _wait_tcp(
    address: str, port: int, timeout: float, exited: Callable[[], int | None] | None = None
) -> bool:
    """Wait until an SSH server greets on address:port; False on timeout or if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited is not None and exited() is not None:
            return False
        try:
            with socket.create_connection((address, port), timeout=1.0) as sock:
                sock.settimeout(2.0)
                if sock.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _keygen(path: Path, comment: str) -> None:
    """A new ed25519 key pair without a passphrase (host keys and the operator's key)."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _runnable_by_everyone(path: str) -> bool:
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


def shared_python() -> str:
    """A Python 3.11+ that every local user can run (shims run as the hosts' login users)."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    candidates += [f"/usr/bin/python3.{minor}" for minor in range(11, 20)]
    for candidate in candidates:
        if not Path(candidate).exists() or not _runnable_by_everyone(candidate):
            continue
        check = subprocess.run(
            [candidate, "-I", "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if check.returncode == 0:
            return candidate
    raise TestbedError(
        f"no Python 3.11+ that every user can run ({sys.executable} is private to its owner); "
        "install python3 (3.11 or later) system-wide"
    )


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


class SimHost:
    """One simulated NixOS host: an sshd with its own state directory (SIM_ROOT)."""

    def __init__(
        self,
        testbed: Testbed,
        name: str,
        *,
        netns: bool,
        latency_ms: int,
        address: str | None = None,
    ) -> None:
        self.testbed = testbed
        self.name = name
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.dir = testbed.root / "hosts" / name
        self.root = self.dir / "root"
        self.bin_dir = self.dir / "bin"
        self.home = self.dir / "home"
        self.path = f"{self.bin_dir}:{HOST_PATH_TAIL}"
        self.latency_ms = latency_ms
        self.netns: Netns | None = None
        self.proxy: LatencyProxy | None = None
        self.sshd: subprocess.Popen[bytes] | None = None
        self.sshd_start: int | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self._server_ready: int | None = None  # the pipe the simulator reports ready on
        self.address = ""
        self.port = 0
        self.sshd_address = ""
        self.sshd_port = 0
        self.host_key_line = ""
        # NixOS trusts root; a deploy user is added as `nix.settings.trusted-users` would add it:
        # the test bed's own user, and on a test bed whose hosts log in other users, all of
        # them (`*`, the `@wheel` of a real set-up); `set_trusted_users` for a test's own
        self.trusted_users = ["root"] + [self.user] * (self.user != "root")
        if testbed.other_users:
            self.trusted_users.append("*")
        self._closed = False
        try:
            self._setup(netns, address)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self, want_netns: bool, address: str | None) -> None:
        tb = self.testbed
        self.dir.mkdir(parents=True)
        for sub in ("run", "nix/var/nix/profiles", "nix/var/nix/gcroots", "sim/pids", "sim/log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # the host's own PATH directory: links to the shared shims plus a marker naming
        # SIM_ROOT, so shims find their host even under `env -i PATH=...` or sudo
        self.bin_dir.mkdir()
        self.home.mkdir()
        for shim in SHIM_NAMES:
            (self.bin_dir / shim).symlink_to(tb.hostbin_dir / shim)
        (self.bin_dir / SIM_ROOT_MARKER).write_text(f"{self.root}\n", encoding="utf-8")
        if address is not None and not ipaddress.ip_address(address).is_loopback:
            raise TestbedError(f"add_host({self.name!r}): address must be a loopback address")
        if want_netns:
            if address is not None:
                raise TestbedError(
                    f"add_host({self.name!r}): address and netns=True exclude each other"
                )
            why = netns_available()
            if why:
                raise TestbedError(f"add_host({self.name!r}, netns=True): {why}")
            self.netns = create_netns()
            self.sshd_address, self.sshd_port = self.netns.ns_ip, 22
        else:
            self.sshd_address = address or "127.0.0.1"
            self.sshd_port = 0
        # the host's simulator starts while the keys are made and sshd starts
        self._start_server()
        host_key = self.dir / "ssh_host_ed25519_key"
        _keygen(host_key, f"{self.name}@rebuild-testbed")
        self.host_key_line = " ".join(
            Path(f"{host_key}.pub").read_text(encoding="utf-8").split()[:2]
        )
        # the host's /etc/ssh (for `cat`): its public key is the one this sshd serves
        etc_ssh = self.root / "etc" / "ssh"
        etc_ssh.mkdir(parents=True)
        (etc_ssh / host_key.with_suffix(".pub").name).symlink_to(f"{host_key}.pub")
        auth = self.dir / "authorized_keys"
        shutil.copyfile(f"{tb.client_key}.pub", auth)
        # sshd reads it as the user logging in: other users need to read it (a public key)
        auth.chmod(0o644 if tb.other_users else 0o600)
        info = {
            "name": self.name,
            "address": self.sshd_address,
            "netns": self.netns.name if self.netns else None,
            "iface": self.netns.ns_if if self.netns else None,
            "path": self.path,
            "python": tb.python,
            "entry": str(tb.hostbin_dir / "rbtb-sim"),
            "store": str(tb.store_dir),
            "hostbin": str(tb.hostbin_dir),
            # the host's nix.settings.trusted-users (`nix config show trusted-users`)
            "trusted_users": " ".join(self.trusted_users),
            "sshd_owner": str(self.dir / "sshd.owner"),  # a reboot drops its sessions
        }
        (self.root / "sim" / "host.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        write_boot_id(self.root)
        self._start_sshd(host_key, auth)
        self._wait_server()
        if self.latency_ms > 0:
            listen = self.sshd_address if self.netns is None else "127.0.0.1"
            self.proxy = LatencyProxy(
                listen, self.sshd_address, self.sshd_port, self.latency_ms
            ).start()
            self.address, self.port = listen, self.proxy.port
        else:
            self.address, self.port = self.sshd_address, self.sshd_port

    def _start_server(self) -> None:
        """Start the host's simulator (:mod:`testbed.sim.server`), in the host's network
        namespace (its unit servers listen there); :meth:`_wait_server` waits for it."""
        tb = self.testbed
        read_fd, write_fd = os.pipe()
        argv = [tb.python, "-IS", str(tb.hostbin_dir / "rbtb-sim"), "server"]
        argv += ["--root", str(self.root), "--ready-fd", str(write_fd)]
        if self.netns is not None:
            argv = [*self.netns.exec_prefix(), *argv]
        env = {"PATH": self.path, "SIM_ROOT": str(self.root), "HOME": str(self.home)}
        log = self.root / "sim" / "log" / "server.log"
        try:
            with log.open("ab") as handle:
                self.server = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(write_fd,),
                    env={**env, "LANG": "C.UTF-8"},
                    cwd="/",
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._server_ready = read_fd
        PidRegistry(self.root / "sim" / "pids").add(self.server.pid, "simulator")

    def _wait_server(self) -> None:
        read_fd = self._server_ready
        if read_fd is None:
            raise TestbedError(f"the simulator of host {self.name!r} was not started")
        try:
            ready, _, _ = select.select([read_fd], [], [], SERVER_READY_TIMEOUT)
            data = os.read(read_fd, 64) if ready else b""
        finally:
            os.close(read_fd)
            self._server_ready = None
        if not data.startswith(b"ok") or not socket_path(self.root).exists():
            log = self.root / "sim" / "log" / "server.log"
            tail = log.read_text(encoding="utf-8", errors="replace").strip()[-2000:]
            raise TestbedError(f"the simulator of host {self.name!r} did not start:\n{tail}")

    def _start_sshd(self, host_key: Path, auth: Path) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last_error = ""
        for _attempt in range(5):
            port = self.sshd_port or _free_port(self.sshd_address)
            config = self.dir / "sshd_config"
            path_value = self.path
            tb = self.testbed
            config.write_text(
                "\n".join(
                    [
                        f"Port {port}",
                        f"ListenAddress {self.sshd_address}",
                        f'HostKey "{host_key}"',
                        f'PidFile "{self.dir / "sshd.pid"}"',
                        f'AuthorizedKeysFile "{auth}"',
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "PermitRootLogin prohibit-password",
                        "UsePAM no",
                        "StrictModes no",
                        "PrintMotd no",
                        "PrintLastLog no",
                        "MaxStartups 64:30:128",
                        *([f"KexAlgorithms {','.join(tb.kex)}"] if tb.kex else []),
                        "LogLevel VERBOSE",
                        # HOME: the host's own home, so the operator machine's ~/.bashrc
                        # (which bash sources for ssh commands) does not run on "hosts"
                        f'SetEnv "PATH={path_value}" "SIM_ROOT={self.root}" "HOME={self.home}"',
                        "Subsystem sftp /usr/lib/openssh/sftp-server",
                        "",
                    ]
                ),
                encoding="utf-8",
            )
            argv = [str(SSHD), "-D", "-e", "-f", str(config)]
            if self.netns is not None:
                argv = [*self.netns.exec_prefix(), *argv]
            log = self.dir / "sshd.log"
            with log.open("ab") as handle:
                self.sshd = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    cwd="/",
                )
            self.sshd_start = proc_start_time(self.sshd.pid)
            (self.dir / "sshd.owner").write_text(
                f"{self.sshd.pid} {self.sshd_start}\n", encoding="utf-8"
            )
            if _wait_tcp(self.sshd_address, port, SSH_READY_TIMEOUT, self.sshd.poll):
                self.sshd_port = port
                return
            last_error = log.read_text(encoding="utf-8", errors="replace").strip()[-2000:]
            self._stop_sshd()
            if self.netns is not None or "Address already in use" not in last_error:
                break
        raise TestbedError(f"sshd for host {self.name!r} did not start:\n{last_error}")

    # ------------------------------------------------------------------ operator view

    @property
    def known_hosts_line(self) -> str:
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{where} {self.host_key_line}"

    @property
    def destination(self) -> str:
        """``user@address`` for ``--target-host``."""
        return f"{self.user}@{self.address}"

    def ssh_options(self, *, connect_timeout: int = 5) -> list[str]:
        """ssh options (strict host keys, the test bed's key, this host's port)."""
        tb = self.testbed
        return [
            "-F",
            "/dev/null",
            "-i",
            str(tb.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={tb.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.port),
        ]

    def nix_sshopts(self, *, connect_timeout: int = 5) -> str:
        """A NIX_SSHOPTS value for ``nixos-rebuild --target-host {destination}``."""
        return " ".join(self.ssh_options(connect_timeout=connect_timeout))

    def ssh_argv(self, *, connect_timeout: int = 5) -> list[str]:
        """``ssh ... user@address`` (append ``--`` and the remote command)."""
        return ["ssh", *self.ssh_options(connect_timeout=connect_timeout), self.destination]

    # ------------------------------------------------------------------ host state

    def _host(self) -> Host:
        return Host.load(self.root)

    def current_system(self) -> str | None:
        link = self.root / "run" / "current-system"
        return str(link.resolve()) if link.exists() else None

    def profile_system(self) -> str | None:
        link = self.root / "nix/var/nix/profiles/system"
        return str(link.resolve()) if link.exists() else None

    def generations(self) -> list[tuple[int, str]]:
        out = []
        for number, link in profile_paths(self.root / "nix/var/nix/profiles/system").items():
            out.append((number, str(link.resolve())))
        return sorted(out)

    def current_generation(self) -> int | None:
        return current_generation(self.root / "nix/var/nix/profiles/system")

    def unit_state(self, unit: str) -> str:
        """ActiveState of a unit (``inactive`` for an unknown one), as systemctl reports it."""
        with locked_state(self._host(), write=False) as state:
            record = state["units"].get(mangle(unit))
            return unit_view(record)[0] if record else "inactive"

    def system_state(self) -> str:
        with locked_state(self._host(), write=False) as state:
            return system_state(state["units"])

    def timers(self) -> dict[str, str]:
        """Loaded transient timers: name -> SubState (waiting / elapsed)."""
        with locked_state(self._host(), write=False) as state:
            return {n: unit_view(u)[1] for n, u in state["units"].items() if n.endswith(".timer")}

    def local_env(self) -> dict[str, str]:
        """Environment of a command run "on" the host without ssh."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIM_ROOT")}
        env.update(PATH=self.path, SIM_ROOT=str(self.root), HOME=str(self.home))
        return env

    def run_local(
        self, argv: list[str], *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the host would (its PATH, SIM_ROOT, its namespace) without ssh."""
        prefix = self.netns.exec_prefix() if self.netns is not None else []
        return subprocess.run(
            [*prefix, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.local_env(),
            cwd="/",
        )

    def booted_system(self) -> str | None:
        """What the host booted (``/run/booted-system``)."""
        link = self.root / "run" / "booted-system"
        return str(link.resolve()) if link.exists() else None

    def boot_id(self) -> str:
        """The host's ``/proc/sys/kernel/random/boot_id`` (new at every reboot)."""
        return Path(f"{self.root}{BOOT_ID}").read_text(encoding="utf-8").strip()

    def boots(self) -> list[dict[str, Any]]:
        """The host's reboots so far (``sim/log/boots.jsonl``)."""
        log = self.root / "sim" / "log" / "boots.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]

    def hang_on_reboot(self, hang: bool = True) -> None:
        """From now on a reboot of this host does not come back: its sshd stops listening and
        nothing starts (a host stuck in its boot)."""
        flag = self.root / "sim" / "hang-on-reboot"
        if hang:
            flag.write_text("", encoding="utf-8")
        else:
            flag.unlink(missing_ok=True)

    def set_trusted_users(self, users: list[str]) -> None:
        """The host's ``nix.settings.trusted-users`` (what ``nix config show trusted-users``
        prints), e.g. ``["root"]`` for NixOS's default."""
        self.trusted_users = list(users)
        info_path = self.root / "sim" / "host.json"
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["trusted_users"] = " ".join(self.trusted_users)
        info_path.write_text(json.dumps(info, indent=1), encoding="utf-8")

    def activate(self, store_path: str) -> None:
        """Put the host on a system directly (profile + switch-to-configuration switch).

        ``store_path`` is a path from :meth:`Testbed.store_path` or :meth:`Testbed.build`
        (built here if needed) or any system path already in the store.
        """
        if not Path(store_path, "bin", "switch-to-configuration").exists():
            self.testbed.materialise(store_path)
        result = self.run_local(["nix-env", "-p", PROFILE, "--set", store_path])
        if result.returncode != 0:
            raise TestbedError(f"nix-env --set on {self.name} failed: {result.stderr.strip()}")
        result = self.run_local([f"{store_path}/bin/switch-to-configuration", "switch"])
        if result.returncode not in (0, 4):
            raise TestbedError(
                f"switch-to-configuration on {self.name} failed: {result.stderr.strip()}"
            )

    def cut_link(self) -> None:
        if self.netns is None:
            raise TestbedError(f"host {self.name!r} is not in a network namespace")
        self.netns.link(up=False)

    def restore_link(self) -> None:
        if self.netns is None:
            raise TestbedError(f"host {self.name!r} is not in a network namespace")
        self.netns.link(up=True)

    # ------------------------------------------------------------------ teardown

    def _stop_sshd(self) -> None:
        proc = self.sshd
        if proc is None:
            return
        pid, start = proc.pid, self.sshd_start
        if is_alive(pid, start):
            # per-connection sshd children outlive the listener: end them too
            for child in children_of(pid):
                terminate(child, proc_start_time(child), timeout=1.0)
            terminate(pid, start, timeout=3.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3.0)
        self.sshd = None

    def close(self) -> list[str]:
        """Stop everything of this host; returns what could not be stopped."""
        if self._closed:
            return []
        self._closed = True
        if self._server_ready is not None:
            os.close(self._server_ready)
            self._server_ready = None
        problems = PidRegistry(self.root / "sim" / "pids").terminate_all()
        if self.server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(timeout=3.0)
            self.server = None
        self._stop_sshd()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.netns is not None:
            try:
                delete_netns(self.netns)
            except Exception as exc:
                problems.append(f"netns {self.netns.name}: {exc}")
        return problems


class Testbed:
    """A directory with stand-ins, shims, a store, keys, and simulated hosts.

    Use as a context manager; :meth:`close` stops every process it started, deletes network
    namespaces and removes the directory, also when the body raised.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        root: Path | None = None,
        *,
        other_users: bool = False,
        kex: Sequence[str] = (),
    ) -> None:
        """``other_users``: hosts also log in other local users (see ``tests.support.users``):
        the directory is opened to them and shims run with a Python every user can run.
        ``kex``: the key exchanges the hosts' sshd offers (``KexAlgorithms``), as a host
        configured so; empty, OpenSSH's defaults. Its first default,
        sntrup761x25519-sha512, costs the OpenSSH client about 70 ms of CPU per connection here
        (paramiko never offers it): the test suite, which opens hundreds, names
        :data:`FAST_KEX`; the demo and the benchmarks keep the defaults."""
        python = shared_python() if other_users else sys.executable
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="rbtb-")).resolve()
        else:
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise TestbedError(f"test bed root {root} must be empty")
            self.root = root.resolve()
        if other_users:
            self.root.chmod(0o755)
        self.other_users = other_users
        self.kex = tuple(kex)
        self.python = python
        self.bin_dir = self.root / "bin"
        self.hostbin_dir = self.root / "hostbin"
        self.store_dir = self.root / "store"
        self.client_key = self.root / "client" / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.ssh_config = self.root / "ssh_config"
        self.hosts: dict[str, SimHost] = {}
        self._known: dict[str, tuple[str, dict[str, Any]]] = {}
        self._closed = False
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        for d in (self.bin_dir, self.hostbin_dir, self.store_dir, self.client_key.parent):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / OWNER_FILE).write_text(
            f"{os.getpid()} {proc_start_time(os.getpid())}\n", encoding="utf-8"
        )
        (self.root / "hosts").mkdir()
        self.known_hosts.write_text("", encoding="utf-8")
        self.ssh_config.write_text("", encoding="utf-8")
        _keygen(self.client_key, "operator@rebuild-testbed")
        self.client_key.chmod(0o600)
        self.client_kind = hostbin.install(self.hostbin_dir, self.python,
                                           SHIM_NAMES + STORE_NAMES)  # fmt: skip
        header = script_header(self.python)
        store = str(self.store_dir)
        for name, func in (("nix", "nix_main"), ("nixos-rebuild", "nixos_rebuild_main")):
            _write_script(
                self.bin_dir / name,
                header
                + f"from testbed.standins import {func}\n"
                + f"sys.exit({func}(sys.argv[1:], default_store={store!r}))\n",
            )
        # the classic (bash) nixos-rebuild stand-in beside ng's (testbed.rebuild_classic)
        (self.bin_dir / "classic").mkdir()
        _write_script(
            self.nixos_rebuild("classic"),
            header
            + "from testbed.standins import nixos_rebuild_main\n"
            + f"sys.exit(nixos_rebuild_main(sys.argv[1:], default_store={store!r}, "
            + "flavour='classic', program=__file__))\n",
        )

    # ------------------------------------------------------------------ public API

    def nixos_rebuild(self, flavour: str = "ng") -> Path:
        """The nixos-rebuild stand-in of a flavour: ``ng`` (nixos-rebuild-ng) or ``classic``
        (the bash nixos-rebuild of NixOS 24.11 and older)."""
        if flavour not in ("ng", "classic"):
            raise TestbedError(f"unknown nixos-rebuild flavour {flavour!r} (ng or classic)")
        return self.bin_dir / ("classic/nixos-rebuild" if flavour == "classic" else "nixos-rebuild")

    def env(self, flavour: str = "ng") -> dict[str, str]:
        """Variables the tool needs to use the stand-ins (merge into os.environ), with the
        nixos-rebuild of that flavour."""
        return {
            "REBUILD_NIXOS_REBUILD": str(self.nixos_rebuild(flavour)),
            "REBUILD_NIX": str(self.bin_dir / "nix"),
            "NIX_STORE_DIR": str(self.store_dir),
            "RBTB_ROOT": str(self.root),
        }

    def add_host(
        self,
        name: str,
        *,
        netns: bool = False,
        latency_ms: int = 0,
        initial_config: Mapping[str, object] | None = BASE_CONFIG,
        address: str | None = None,
    ) -> SimHost:
        """Start a simulated host; it boots ``initial_config`` (attr ``name``) unless None."""
        if self._closed:
            raise TestbedError("test bed is closed")
        if name in self.hosts:
            raise TestbedError(f"host {name!r} exists already")
        if not name or "/" in name or name.startswith("."):
            raise TestbedError(f"bad host name {name!r}")
        message = sshd_missing_message()
        if message:
            raise TestbedError(message)
        host = SimHost(self, name, netns=netns, latency_ms=latency_ms, address=address)
        self.hosts[name] = host
        with self.known_hosts.open("a", encoding="utf-8") as fh:
            fh.write(host.known_hosts_line + "\n")
        with self.ssh_config.open("a", encoding="utf-8") as fh:
            fh.write(
                f"Host {name}\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
                f"  IdentityFile {self.client_key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts}\n  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n\n"
            )
        if initial_config is not None:
            host.activate(self.build(name, initial_config))
        return host

    def make_flake(self, path: Path, configs: Mapping[str, Mapping[str, object]]) -> Path:
        """A git repository with ``flake.nix`` and ``hosts/<attr>.json``, committed."""
        path.mkdir(parents=True, exist_ok=True)
        git = ["git", "-c", "safe.directory=*", "-C", str(path)]
        _run([*git, "-c", "init.defaultBranch=main", "init", "-q"])
        _run([*git, "config", "user.name", "rebuild test bed"])
        _run([*git, "config", "user.email", "testbed@rebuild.invalid"])
        _run([*git, "config", "commit.gpgsign", "false"])
        attrs = " ".join(sorted(configs))
        (path / "flake.nix").write_text(
            '{\n  description = "rebuild test bed flake (simulated; see hosts/*.json)";\n'
            "  outputs = { self }: {\n"
            f"    # nixosConfigurations: {attrs}\n"
            "  };\n}\n",
            encoding="utf-8",
        )
        (path / "hosts").mkdir(exist_ok=True)
        for attr, config in configs.items():
            self.write_config(path, attr, config, commit=False)
        _run([*git, "add", "-A"])
        _run([*git, "commit", "-q", "-m", "test bed flake"])
        return path

    def write_config(
        self, flake: Path, attr: str, config: Mapping[str, object], *, commit: bool = True
    ) -> None:
        """Write ``hosts/<attr>.json`` (and commit it unless commit=False)."""
        target = flake / "hosts" / f"{attr}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if commit:
            git = ["git", "-c", "safe.directory=*", "-C", str(flake)]
            _run([*git, "add", str(target)])
            _run([*git, "commit", "-q", "-m", f"update {attr}"])

    def store_path(self, attr: str, config: Mapping[str, object]) -> str:
        """The toplevel path ``nix eval`` prints for this attr/config (not built yet)."""
        plain: dict[str, Any] = json.loads(canonical_json(config))
        path = system_store_path(self.store_dir, attr, plain)
        self._known[path] = (attr, plain)
        return path

    def build(self, attr: str, config: Mapping[str, object]) -> str:
        """Build (materialise) the system store path for attr/config; returns it."""
        plain: dict[str, Any] = json.loads(canonical_json(config))
        self._known[system_store_path(self.store_dir, attr, plain)] = (attr, plain)
        return build_system(self.store_dir, attr, plain, self.python)

    def materialise(self, store_path: str) -> str:
        """Build a path earlier returned by :meth:`store_path` (no-op if it exists)."""
        if Path(store_path, "bin", "switch-to-configuration").exists():
            return store_path
        known = self._known.get(store_path)
        if known is None:
            raise TestbedError(
                f"{store_path} is not a system this test bed knows; get it from "
                "Testbed.store_path()/build() or deploy it with nixos-rebuild first"
            )
        return build_system(self.store_dir, known[0], known[1], self.python)

    # ------------------------------------------------------------------ teardown

    def close(self) -> list[str]:
        """Stop every process, delete namespaces, remove the directory. Idempotent."""
        if self._closed:
            return []
        self._closed = True
        problems: list[str] = []
        for host in list(self.hosts.values()):
            try:
                problems.extend(host.close())
            except Exception as exc:
                problems.append(f"host {host.name}: {exc}")
        remove_tree(self.root)
        return problems

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not getattr(self, "_closed", True):
                self.close()
