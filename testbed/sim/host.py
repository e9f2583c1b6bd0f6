"""The simulated host as its commands see it: ``SIM_ROOT``, path mapping, the state file.

Not one program: what every shim shares. A NixOS host keeps its live state under ``/run``
(``/run/current-system``, rebuild's lock) and its profiles under ``/nix/var/nix/profiles``; here
both are directories of the host's ``SIM_ROOT``, and :func:`map_arg`/:func:`unmap_text`
translate paths on the way in and out. What systemd itself would hold in memory (units, their
processes, timers) is ``$SIM_ROOT/sim/state.json``, read and written under a file lock
(:func:`locked_state`) so that concurrent shims see one consistent manager.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed.procs import PidRegistry, proc_parent
from testbed.store import SimError

MAPPED_PREFIXES = ("/run", "/nix/var", "/var/lib")  # /var/lib: rebuild's deployments.jsonl
# the kernel's boot id (proc(5)): new at every boot, which is how rebuild tells that a host
# rebooted; the host's is $SIM_ROOT/proc/..., written when the host starts and when it reboots
BOOT_ID = "/proc/sys/kernel/random/boot_id"
MAPPED_FILES = (BOOT_ID,)
SIM_ROOT_MARKER = ".sim-root"
PROFILE = "/nix/var/nix/profiles/system"


class UsageError(Exception):
    """A usage error: message to stderr, exit 1."""


# --------------------------------------------------------------------------- host context


def find_sim_root() -> Path:
    """``$SIM_ROOT``; when a command runs under ``env -i`` or ``sudo`` (which drop it), the
    nearest ancestor process that has it (the SSH session's shell got it from sshd's SetEnv)."""
    value = os.environ.get("SIM_ROOT")
    if value:
        return Path(value)
    # each host's PATH directory holds a marker naming its state directory, and PATH survives
    # `env -i PATH=${PATH-} ...` as nixos-rebuild-ng runs remote commands
    marker = Path(sys.argv[0]).parent / SIM_ROOT_MARKER
    with contextlib.suppress(OSError):
        return Path(marker.read_text(encoding="utf-8").strip())
    pid = proc_parent(os.getpid())
    for _ in range(64):
        if pid is None or pid <= 1:
            break
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            environ = b""
        for item in environ.split(b"\0"):
            if item.startswith(b"SIM_ROOT="):
                return Path(os.fsdecode(item[len(b"SIM_ROOT=") :]))
        pid = proc_parent(pid)
    raise SimError("SIM_ROOT is not set: this command only works on a rebuild test-bed host")


@dataclass
class Host:
    """A simulated host as seen from inside it."""

    root: Path
    info: dict[str, Any]

    @classmethod
    def load(cls, root: Path | None = None) -> Host:
        sim_root = root or find_sim_root()
        info = json.loads((sim_root / "sim" / "host.json").read_text(encoding="utf-8"))
        return cls(root=sim_root, info=info)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def store(self) -> str:
        return str(self.info["store"])

    @property
    def sim(self) -> Path:
        return self.root / "sim"

    @property
    def pids(self) -> PidRegistry:
        return PidRegistry(self.sim / "pids")

    def log(self, name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", name)
        return self.sim / "log" / f"{safe}.log"

    def map_path(self, arg: str) -> str:
        return map_arg(arg, self.root)

    def service_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": str(self.info["path"]),
            "SIM_ROOT": str(self.root),
            "LANG": "C.UTF-8",
            "INVOCATION_ID": secrets.token_hex(16),
        }
        home = os.environ.get("HOME")
        if home:
            env["HOME"] = home
        env.update(extra or {})
        return env

    def internal_argv(self, *args: str) -> list[str]:
        return [str(self.info["python"]), "-IS", str(self.info["entry"]), *args]


def map_arg(arg: str, root: Path) -> str:
    """Rewrite a host path under /run or /nix/var into the host's state directory."""
    if arg in MAPPED_FILES:
        return f"{root}{arg}"
    for prefix in MAPPED_PREFIXES:
        if arg == prefix or arg.startswith(prefix + "/"):
            return f"{root}{arg}"
        # --option=/run/...
        if arg.startswith("-") and "=" in arg:
            key, _, value = arg.partition("=")
            if value == prefix or value.startswith(prefix + "/"):
                return f"{key}={root}{value}"
    return arg


def unmap_text(text: str, root: Path) -> str:
    """Show host paths as the host would: ``$SIM_ROOT/run/x`` -> ``/run/x``."""
    return re.sub(re.escape(str(root)) + r"(?=/run\b|/nix/var\b|/var/lib\b|/proc/sys/)", "", text)


# --------------------------------------------------------------------------- state


@contextlib.contextmanager
def locked_state(host: Host, *, write: bool = True) -> Iterator[dict[str, Any]]:
    """The host's systemd/activation state under the host lock (saved on exit when write)."""
    with host_lock(host, exclusive=write):
        state_path = host.sim / "state.json"
        try:
            state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {}
        state.setdefault("units", {})
        state.setdefault("counter", 0)
        try:
            yield state
        finally:
            if write:
                tmp = host.sim / f".state.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
                tmp.replace(state_path)


@contextlib.contextmanager
def host_lock(host: Host, *, exclusive: bool = True) -> Iterator[None]:
    """The host lock alone (what `nix-env` takes, as Nix locks a profile, without touching the
    systemd state): exclusive, or shared for a reader."""
    host.sim.mkdir(parents=True, exist_ok=True)
    lock_path = host.sim / "lock"
    handle: IO[bytes]
    try:
        handle = lock_path.open("a+b")
    except PermissionError:
        if exclusive:  # a user without sudo changing the host's systemd state
            raise SimError("Access denied (this needs root: use sudo)") from None
        handle = lock_path.open("rb")  # reading state needs no privilege, as on NixOS
    with handle as lock:
        deadline = time.monotonic() + 60.0
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(lock.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SimError(f"timed out waiting for the state lock {lock_path}") from None
                time.sleep(0.01)
        yield


# --------------------------------------------------------------------------- helpers' options


def internal_opts(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Options of the test bed's own helpers (``rbtb-sim SUBCOMMAND --key value ... --
    command``): ``({"--key": "value"}, command)``; ``--collect`` takes no value."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return opts, argv[i:]
        if arg in ("--collect",):
            opts[arg] = ""
        else:
            opts[arg] = argv[i]
            i += 1
    return opts, []
