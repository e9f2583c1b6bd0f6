"""The rails under bad input: inventories, flags, the environment and files on disk, tried as an
attacker and as a careless operator would. Every case runs the real `invoke` as a subprocess and
asserts the exit code, one clear `error:` line, no traceback, that nothing ran (recording `nix`
and `nixos-rebuild` stand-ins log every call; a listener stands where the host would be and
counts connections), and that no file outside the state folder changed.

No simulated NixOS is needed: every case is refused before anything reaches a host."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rebuild import identity
from tests.support import launcher

REPO = Path(__file__).resolve().parents[2]
STORE_PATH = "/nix/store/0c6kzph7l0dcbyqhn35ndhjyzjv4nl8q-nixos-system-vps-26.05"
ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIBu3w5Y1m1ZTeBOEmQwRc6S5Q2bxv0dtAVnFwe1HQb9X"
RECORDER = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
{tail}
"""


class Listener:
    """Stands where the host would be: accepts and counts connections, says nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@dataclass
class Bed:
    """A git flake, keys, a state folder and recording stand-ins in one temporary folder."""

    root: Path
    listener: Listener
    env: dict[str, str] = field(default_factory=dict)

    @property
    def flake(self) -> Path:
        return self.root / "flake"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.toml"

    def calls(self, tool: str) -> list[str]:
        log = self.root / f"{tool}.calls"
        return log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def text(self, *, top: str = "", host: str = "", verify: str = "", operators: bool = True,
             port: int | None = None) -> str:  # fmt: skip
        me = identity.current()
        lines = [
            f'flake = "{self.flake}"',
            f'known_hosts = "{self.known_hosts}"',
            f'audit_log = "{self.state / "audit.jsonl"}"',
            "connect_timeout = 2",
            top,
        ]
        if operators:
            lines += ["[[operators]]", 'name = "ci"', f'machine_id = "{me.machine_id}"']
        lines += [
            "[hosts.vps]",
            'address = "127.0.0.1"',
            f"port = {self.listener.port if port is None else port}",
            f'identity_file = "{self.key}"',
            "rollback_timeout = 30",
            host,
            "[hosts.vps.verify]",
            "settle_timeout = 3",
            verify,
        ]
        return "\n".join(lines) + "\n"


def run_git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=env, capture_output=True)


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def bed(tmp_path: Path, listener: Listener) -> Bed:
    b = Bed(tmp_path, listener)
    b.flake.mkdir()
    (b.flake / "flake.nix").write_text("{ outputs = _: { }; }\n", encoding="utf-8")
    run_git(b.flake, "init", "-q")
    run_git(b.flake, "add", "-A")
    run_git(b.flake, "commit", "-qm", "init")
    b.known_hosts.write_text(f"[127.0.0.1]:{listener.port} ssh-ed25519 {ED25519}\n")
    b.key.write_text("not a real key\n", encoding="utf-8")
    b.key.chmod(0o600)
    b.state.mkdir(mode=0o700)
    (tmp_path / "home").mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    for tool, tail in (
        ("nix", f"echo {STORE_PATH}"),
        ("nixos-rebuild", "exit 1"),
        ("ssh", "exit 255"),
    ):
        stub = tmp_path / "bin" / tool
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(RECORDER.format(log=tmp_path / f"{tool}.calls", tail=tail))
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REBUILD_", "NIX_"))}
    b.env = {
        **clean,
        "HOME": str(tmp_path / "home"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": f"{tmp_path / 'bin'}:{clean.get('PATH', '/usr/bin:/bin')}",
        "REBUILD_NIX": str(tmp_path / "bin" / "nix"),
        "REBUILD_NIXOS_REBUILD": str(tmp_path / "bin" / "nixos-rebuild"),
    }
    b.inventory.write_text(b.text(), encoding="utf-8")
    return b


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under root (but the skipped ones and .git): size, mode, mtime."""
    seen: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d != ".git" and here / d not in skip]
        for name in filenames:
            path = here / name
            if path in skip or name.endswith(".calls"):
                continue
            info = path.lstat()
            seen[str(path)] = (info.st_size, info.st_mode, info.st_mtime_ns)
    return seen


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, what to run, the exit code and a fragment of the line."""

    id: str
    code: int
    says: str
    make: Callable[[Bed], None] = lambda b: None
    args: tuple[str, ...] = ("rebuild", "--host", "vps", "--yes")
    env: tuple[tuple[str, str], ...] = ()
    nix_may_run: bool = False  # refused after evaluating the expected system
    connects: bool = False  # refused after trying the host


def inv(**parts: object) -> Callable[[Bed], None]:
    """Replace the inventory with the base text plus these parts."""

    def make(b: Bed) -> None:
        b.inventory.write_text(b.text(**parts), encoding="utf-8")  # type: ignore[arg-type]

    return make


def replace(old: str, new: str) -> Callable[[Bed], None]:
    def make(b: Bed) -> None:
        text = b.inventory.read_text(encoding="utf-8")
        assert old in text
        b.inventory.write_text(text.replace(old, new), encoding="utf-8")

    return make


def fifo_inventory(b: Bed) -> None:
    b.inventory.unlink()
    os.mkfifo(b.inventory)


def huge_inventory(b: Bed) -> None:
    b.inventory.write_text(b.text() + "# " + "x" * (1 << 20) + "\n", encoding="utf-8")


def binary_inventory(b: Bed) -> None:
    b.inventory.write_bytes(b.text().encode() + b"# \xff\xfe\n")


def inventory_folder(b: Bed) -> None:
    b.inventory.unlink()
    b.inventory.mkdir()


def dirty_tree(b: Bed) -> None:
    (b.flake / "flake.nix").write_text("{ outputs = _: { x = 1; }; }\n", encoding="utf-8")


def untracked_file(b: Bed) -> None:
    (b.flake / "hosts.nix").write_text("{ }\n", encoding="utf-8")


def dirty_url(prefix: str) -> Callable[[Bed], None]:
    def make(b: Bed) -> None:
        dirty_tree(b)
        b.inventory.write_text(
            b.text().replace(f'flake = "{b.flake}"', f'flake = "{prefix}{b.flake}"'),
            encoding="utf-8",
        )

    return make


def no_flake_repo(b: Bed) -> None:
    plain = b.root / "plain"
    plain.mkdir()
    (plain / "flake.nix").write_text("{ }\n", encoding="utf-8")
    b.inventory.write_text(b.text().replace(str(b.flake), str(plain)), encoding="utf-8")


def unknown_key(b: Bed) -> None:
    b.known_hosts.write_text("")


def revoked_key(b: Bed) -> None:
    line = f"[127.0.0.1]:{b.listener.port} ssh-ed25519 {ED25519}"
    b.known_hosts.write_text(f"{line}\n@revoked {line}\n")


def cert_authority(b: Bed) -> None:
    b.known_hosts.write_text(
        f"@cert-authority [127.0.0.1]:{b.listener.port} ssh-ed25519 {ED25519}\n"
    )


def audit_symlink(b: Bed) -> None:
    victim = b.root / "victim.txt"
    victim.write_text("precious\n")
    (b.state / "audit.jsonl").symlink_to(victim)


def audit_devnull(b: Bed) -> None:
    (b.state / "audit.jsonl").symlink_to("/dev/null")


def audit_folder(b: Bed) -> None:
    (b.state / "audit.jsonl").mkdir()


def state_world_writable(b: Bed) -> None:
    b.state.chmod(0o777)


def state_under_a_file(b: Bed) -> None:
    (b.root / "afile").write_text("")
    b.inventory.write_text(
        b.text().replace(str(b.state / "audit.jsonl"), str(b.root / "afile" / "audit.jsonl"))
    )


def lock_symlink(b: Bed) -> None:
    victim = b.root / "victim.txt"
    victim.write_text("precious\n")
    (b.state / "locks").mkdir(mode=0o700)
    (b.state / "locks" / "vps.lock").symlink_to(victim)


def closed_port(b: Bed) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b.known_hosts.write_text(f"[127.0.0.1]:{port} ssh-ed25519 {ED25519}\n")
    b.inventory.write_text(b.text(port=port))


def both(*makers: Callable[[Bed], None]) -> Callable[[Bed], None]:
    def make(b: Bed) -> None:
        for maker in makers:
            maker(b)

    return make


VERIFY = ("verify", "--host", "vps")
EXTRA = "extra_args = [{}]"

CASES = (
    # --- the environment: settings come from the committed inventory only -----------------
    *(
        Case(f"env {name}", 2, name, env=((name, value),))
        for name, value in (
            ("REBUILD_OPERATORS", '[{"name":"x","machine_id":"' + "a" * 32 + '"}]'),
            ("REBUILD_KNOWN_HOSTS", "/dev/null"),
            ("REBUILD_AUDIT_LOG", "/dev/null"),
            ("REBUILD_FLAKE", "/elsewhere"),
            ("REBUILD_HOSTS__VPS__PORT", "2200"),
            ("REBUILD_HOSTS__VPS__ADDRESS", "203.0.113.99"),
            ("REBUILD_HOSTS__VPS__EXTRA_ARGS", '["--flake","path:/x"]'),
            ("REBUILD_HOSTS__VPS__ROLLBACK_TIMEOUT", "0"),
            ("REBUILD_HOSTS__VPS__VERIFY__COMMANDS", "[]"),
            ("REBUILD_CONFIRM_COUNT_ABOVE", "1000"),
            ("REBUILD_OPERATORS", "garbage"),
        )
    ),
    Case("env on verify too", 2, "REBUILD_KNOWN_HOSTS", args=VERIFY,
         env=(("REBUILD_KNOWN_HOSTS", "/dev/null"),)),
    # --- inventories ------------------------------------------------------------------------
    Case("port as a string", 2, "hosts.vps.port", replace("port = ", 'port = "22"  # ')),
    Case("port as a boolean", 2, "hosts.vps.verify.ports", inv(verify="ports = [true]")),
    Case("port out of range", 2, "hosts.vps.verify.ports", inv(verify="ports = [70000]")),
    Case("address with shell", 2, "hosts.vps.address",
         replace('address = "127.0.0.1"', 'address = "127.0.0.1;touch /tmp/pwned"')),
    Case("address with a space", 2, "hosts.vps.address",
         replace('address = "127.0.0.1"', 'address = "127.0.0.1 -oProxyCommand=x"')),
    Case("ipv6 scope id with shell", 2, "scope id",
         replace('address = "127.0.0.1"', 'address = "::1%;touch${IFS}pwned"')),
    Case("user with shell", 2, "hosts.vps.user", inv(host='user = "root$(id)"')),
    Case("user starting with a dash", 2, "hosts.vps.user", inv(host='user = "-oProxyCommand"')),
    Case("build_host with shell", 2, "hosts.vps.build_host", inv(host='build_host = "a@b;c"')),
    Case("sudo as a string", 2, "hosts.vps.sudo", inv(host='sudo = "yes"')),
    Case("unknown top-level key", 2, "unknown key", inv(top='flak = "."')),
    Case("unknown host key", 2, "hosts.vps.adress", inv(host='adress = "x"')),
    Case("unknown verify key", 2, "hosts.vps.verify.unit", inv(verify='unit = ["a.service"]')),
    Case("unit name with shell", 2, "hosts.vps.verify.units",
         inv(verify='units = ["a.service;reboot"]')),
    Case("url that is not http", 2, "hosts.vps.verify.http",
         inv(verify='[[hosts.vps.verify.http]]\nurl = "file:///etc/shadow"')),
    Case("http status out of range", 2, "status",
         inv(verify='[[hosts.vps.verify.http]]\nurl = "http://x/"\nstatus = 99')),
    Case("empty check command", 2, "hosts.vps.verify.commands",
         inv(verify='[[hosts.vps.verify.commands]]\nname = "x"\nrun = ""')),
    Case("timer shorter than settling", 2, "rollback_timeout",
         replace("rollback_timeout = 30", "rollback_timeout = 2")),
    Case("negative timer", 2, "hosts.vps.rollback_timeout",
         replace("rollback_timeout = 30", "rollback_timeout = -1")),
    Case("unknown action", 2, "hosts.vps.action", inv(host='action = "reboot"')),
    Case("identity file missing", 2, "identity_file",
         replace("id_ed25519", "id_missing")),
    Case("identity file with shell", 2, "identity_file",
         replace('identity_file = "', 'identity_file = "$(id)')),
    Case("flake with shell", 2, "flake", replace('flake = "', 'flake = "`id`')),
    Case("operator machine-id malformed", 2, "machine_id",
         replace('machine_id = "', 'machine_id = "x')),
    Case("hosts differing in case", 2, "differ only in case",
         inv(verify='[hosts.VPS]\naddress = "127.0.0.2"')),
    Case("connect_timeout as a string", 2, "connect_timeout",
         replace("connect_timeout = 2", 'connect_timeout = "2"')),
    Case("TOML syntax error", 2, "invalid TOML", inv(top="flake = = 1")),
    Case("inventory is a FIFO", 2, "regular file", fifo_inventory),
    Case("inventory over 1 MiB", 2, "larger than 1 MiB", huge_inventory),
    Case("inventory not UTF-8", 2, "not UTF-8", binary_inventory),
    Case("inventory is a folder", 2, "regular file", inventory_folder),
    Case("tag with shell", 2, "hosts.vps.tags", inv(host='tags = ["a;b"]')),
    # --- extra_args may not redefine what the gates checked ---------------------------------
    *(
        Case(f"extra_args {arg}", 2, "extra_args" if "nixos-config" not in arg else "nixos-config",
             inv(host=EXTRA.format(arg)))
        for arg in (
            '"--flake", "path:/elsewhere#vps"',
            '"--target-host", "root@203.0.113.66"',
            '"--target-host=root@203.0.113.66"',
            '"--build-host", "root@203.0.113.66"',
            '"--sudo"',
            '"--use-remote-sudo"',
            '"--rollback"',
            '"--store-path", "/nix/store/x"',
            '"-I", "nixos-config=/etc/evil.nix"',
            '"--file", "/etc/evil.nix"',
            '"--attr", "other"',
            '"--no-reexec"',
            '"--elevate", "none"',
        )
    ),
    # --- flags ------------------------------------------------------------------------------
    Case("batch not a number", 2, "", args=("rebuild", "--host", "vps", "--batch", "abc")),
    Case("batch negative", 2, "--batch", args=("rebuild", "--host", "vps", "--batch", "-1")),
    Case("jobs zero", 2, "--jobs", args=("rebuild", "--host", "vps", "--jobs", "0")),
    Case("max-fail negative", 2, "--max-fail",
         args=("rebuild", "--host", "vps", "--max-fail", "-1")),
    Case("unknown action flag", 2, "unknown --action",
         args=("rebuild", "--host", "vps", "--action", "reboot")),
    Case("unknown flag", 2, "", args=("rebuild", "--host", "vps", "--force")),
    Case("unknown task", 2, "", args=("deploy",)),
    Case("unknown host", 2, "unknown host", args=("rebuild", "--host", "web")),
    Case("host name with shell", 2, "unknown host", args=("rebuild", "--host", ";reboot")),
    Case("unknown tag", 2, "no host has the tag", args=("rebuild", "--tag", "nope")),
    Case("verify without --host", 2, "--host", args=("verify",)),
    # --- gates ------------------------------------------------------------------------------
    Case("empty allowlist", 3, "allowlist is empty", inv(operators=False)),
    Case("empty allowlist, verify", 3, "allowlist is empty", inv(operators=False), args=VERIFY),
    Case("machine not listed", 3, "not listed",
         replace(f'machine_id = "{identity.current().machine_id}"', f'machine_id = "{"e" * 32}"')),
    Case("dirty tree", 3, "dirty", dirty_tree),
    Case("untracked file", 3, "dirty", untracked_file),
    Case("dirty tree as a path: URL", 3, "dirty", dirty_url("path:")),
    Case("dirty tree as a git+file: URL", 3, "dirty", dirty_url("git+file://")),
    Case("flake not in git", 3, "not in a git repository", no_flake_repo),
    Case("unknown host key", 3, "not in", unknown_key),
    Case("unknown host key, verify", 3, "not in", unknown_key, args=VERIFY),
    Case("revoked host key", 3, "@revoked", revoked_key),
    Case("cert-authority only", 3, "@cert-authority", cert_authority),
    Case("no terminal, no --yes", 3, "--yes", args=("rebuild", "--host", "vps")),
    # --- files on disk ----------------------------------------------------------------------
    Case("audit log is a symlink", 3, "symlink", audit_symlink),
    Case("audit log is /dev/null", 3, "symlink", audit_devnull),
    Case("audit log is a folder", 3, "audit.jsonl", audit_folder),
    Case("state folder world-writable", 3, "chmod go-w", state_world_writable),
    Case("state folder cannot be made", 3, "mkdir -p -m 700", state_under_a_file),
    Case("lock file is a symlink", 3, "symlink", lock_symlink, nix_may_run=True),
    Case("host unreachable before anything changed", 3, "nothing was changed", closed_port,
         nix_may_run=True),
)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(bed: Bed, case: Case) -> None:
    """Exit code, one clear line, no traceback; nothing ran; nothing outside state changed."""
    case.make(bed)
    skip = (bed.state, bed.root / "run", bed.root / "home")
    before = snapshot(bed.root, skip)
    accepted = bed.listener.accepted
    env = {**bed.env, **dict(case.env)}
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), *case.args]
    if case.args[0] in ("rebuild", "verify"):
        argv += ["--inventory", str(bed.inventory)]
    done = launcher.run(argv, env=env, cwd=bed.root, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in errors if not line.startswith("warning:")]
    assert len(errors) == 1, output
    assert errors[0].startswith("error: "), output
    assert case.says in errors[0], output
    assert bed.calls("nixos-rebuild") == [], "nixos-rebuild ran"
    calls = bed.calls("ssh")
    if case.id.startswith("host unreachable"):  # past the gates: the preview's shared
        # connection was tried (`-M -N`: it runs no command) and stopped; nothing else
        shared = (" -M -N -f ", " -O exit ")
        calls = [c for c in calls if not any(flag in f" {c} " for flag in shared)]
    assert calls == [], "ssh ran"
    if not case.nix_may_run:
        assert bed.calls("nix") == [], "nix ran"
    if not case.connects:
        assert bed.listener.accepted == accepted or case.id.startswith("host unreachable")
    assert snapshot(bed.root, skip) == before
    victim = bed.root / "victim.txt"
    if victim.exists():
        assert victim.read_text() == "precious\n"


def test_there_are_at_least_sixty_cases() -> None:
    """The issue asks for 60 bad inputs at least; the 36 inventory cases of the unit suite are
    on top of these."""
    assert len(CASES) >= 60


def test_a_refusal_is_audited(bed: Bed) -> None:
    """A refused run still leaves its record (result refused, exit 3) in the audit log."""
    dirty_tree(bed)
    argv = [sys.executable, "-m", "invoke", "--search-root", str(REPO), "rebuild", "--host",
            "vps", "--yes", "--inventory", str(bed.inventory)]  # fmt: skip
    done = subprocess.run(argv, env=bed.env, capture_output=True, text=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 3
    (record,) = [json.loads(x) for x in (bed.state / "audit.jsonl").read_text().splitlines()]
    assert (record["result"], record["exit_code"], record["dirty"]) == ("refused", 3, True)
    mode = stat.S_IMODE((bed.state / "audit.jsonl").stat().st_mode)
    assert mode == 0o600
