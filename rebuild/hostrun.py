"""One host's part of a run: its record, its SSH connection, and the facts rebuild reads
from it (what it runs, what HEAD evaluates to, the verification checks)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rebuild import facts, hostops, nixos, preview, process
from rebuild.core import Outcome
from rebuild.errors import BuildFailed, ConfigError, GateRefused, RebuildError
from rebuild.inventory import Loaded, Target
from rebuild.remote import Endpoint, Remote, RemoteResult
from rebuild.verify import Report, run_checks

NIX_EVAL_TIMEOUT = 600


@dataclass
class HostRun:
    """One host's part of a run: what the gates decided for it, its locks and connection, and
    at the end its Outcome. Changed only by the run's own thread for this host (the heartbeat
    uses the connection, never these fields); the audit record is made from it once."""

    target: Target
    endpoint: Endpoint
    action: str
    run_id: str
    command: list[str] = field(default_factory=list)
    expected: str | None = None
    previous: str | None = None
    overrides: list[str] = field(default_factory=list)  # this host's own (e.g. break-lock)
    remote: Remote | None = None
    remote_locked: bool = False
    lock_owner: hostops.LockOwner | None = None  # this run's entry in the host's lock
    local_lock: int | None = None  # the flock'd file descriptor
    outcome: Outcome | None = None
    start_record: str | None = None  # the line the host's own deploy log gets at the start
    final_record: str | None = None  # ... and at the end
    success_record: str | None = None  # the end's line if it verifies (sent with the cancel)
    warnings: list[str] = field(default_factory=list)
    changes: preview.Changes | None = None  # what the switch will change (the preview)
    armed_ahead: float | None = None  # the dead-man timer armed in the preview's round trip
    commands_before: int = 0  # remote commands on this host's earlier (closed) connections
    connect_error: RebuildError | None = None  # from connect_ahead, raised by the next command
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.target.name

    def connect_ahead(self) -> None:
        """Open the connection now (from a worker thread, while local work runs); a failure
        is kept and raised by the next command, so an unreachable host is not waited for
        twice."""
        try:
            self.connection()
        except RebuildError as exc:
            self.connect_error = exc

    def connection(self) -> Remote:
        """The host's one connection, reopened if it died."""
        if self.connect_error is not None:
            error, self.connect_error = self.connect_error, None
            raise error
        if self.remote is not None:
            transport = self.remote.conn.client.get_transport()
            if transport is not None and transport.is_active():
                return self.remote
            self.close()
        self.remote = Remote(self.endpoint).open()
        return self.remote

    def run(self, script: str, *, timeout: float = 60, privileged: bool = True) -> RemoteResult:
        return self.connection().run(script, timeout=timeout, privileged=privileged)

    def run_pair(self, privileged: str, plain: str, *, timeout: float = 60
                 ) -> tuple[RemoteResult, RemoteResult]:  # fmt: skip
        """A privileged script and a plain one in one round trip (`Remote.run_pair`)."""
        return self.connection().run_pair(privileged, plain, timeout=timeout)

    def close(self) -> None:
        if self.remote is not None:
            self.commands_before += self.remote.commands
            self.remote.close()
            self.remote = None

    @property
    def remote_commands(self) -> int:
        """Commands rebuild ran on the host over its own connections (each one round trip);
        nixos-rebuild's and `nix copy`'s own SSH sessions are not counted."""
        return self.commands_before + (self.remote.commands if self.remote is not None else 0)


def endpoint_for(loaded: Loaded, target: Target, sudo_password: str | None = None) -> Endpoint:
    spec = target.settings
    return Endpoint(
        name=target.name,
        address=spec.address,
        port=spec.port,
        user=spec.user,
        known_hosts=loaded.known_hosts,
        identity_file=loaded.identity_file(target),
        connect_timeout=loaded.inventory.connect_timeout,
        sudo=spec.sudo,
        sudo_password=sudo_password,
    )


_run_dirs: list[Path] = []


def run_dir() -> Path:
    """This run's private folder (mkdtemp: mode 0700, a fresh name, never a folder another user
    made or could swap): the ssh config nixos-rebuild gets, ssh's control sockets (unix socket
    paths are short, so it lives in $XDG_RUNTIME_DIR or /tmp), and nixos-rebuild's working
    folder, so no `result` link lands in the flake's tree. Its path has no whitespace (Nix
    splits NIX_SSHOPTS on it)."""
    if not _run_dirs:
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        if not Path(base).is_dir() or any(ch.isspace() for ch in base):
            base = "/tmp"
        _run_dirs.append(Path(tempfile.mkdtemp(prefix="rb-run-", dir=base)))
    return _run_dirs[0]


def remove_run_dir() -> None:
    """At the end of a run: the shared ssh connections stop, the config, sockets and links go
    with their folder."""
    stop_masters()
    while _run_dirs:
        shutil.rmtree(_run_dirs.pop(), ignore_errors=True)


_masters: list[tuple[list[str], subprocess.Popen[bytes]]] = []
MASTER_STOP_TIMEOUT = 5


def open_master(loaded: Loaded, target: Target) -> None:
    """Open, in the background, the OpenSSH connection that `nix copy` to this host shares
    through the run's ControlPath (Nix's ssh:// store runs `ssh HOST $NIX_SSHOPTS` with no
    master of its own): opened while this machine evaluates and builds, the preview's copy
    pays no handshake. If it is not ready (or failed), the copy connects by itself."""
    config = ssh_config_file(loaded, target)
    destination = nixos.target_destination(target)
    with contextlib.suppress(OSError):
        proc = subprocess.Popen(
            nixos.ssh_master_argv(config, destination), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _masters.append((nixos.ssh_exit_argv(config, destination), proc))


def stop_masters() -> None:
    """Stop the shared connections of this run (also one a `nix copy` opened itself), so that
    none lingers for ControlPersist's minute after rebuild has exited."""
    while _masters:
        exit_argv, proc = _masters.pop()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                exit_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=MASTER_STOP_TIMEOUT, check=False,
            )  # fmt: skip
        if proc.poll() is None:  # still connecting: the run ended first
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=MASTER_STOP_TIMEOUT)


def builder_endpoint(loaded: Loaded, target: Target) -> Endpoint | None:
    """The build host nixos-rebuild copies to and builds on (its key is gated like the
    target's), or None when the build is local or on the target."""
    spec = target.settings
    if spec.build_host in ("", "target"):
        return None
    builder = nixos.parse_build_host(spec.build_host)
    return Endpoint(
        name=f"{target.name} (build host)",
        address=builder.host,
        port=builder.port,
        user=builder.user,
        known_hosts=loaded.known_hosts,
        identity_file=loaded.identity_file(target),
        connect_timeout=loaded.inventory.connect_timeout,
    )


def ssh_config_file(loaded: Loaded, target: Target) -> Path:
    """Write the ssh config nixos-rebuild's ssh reads for this host (and its build host)."""
    spec = target.settings
    hosts = [
        nixos.SshHost(nixos.target_alias(target.name), spec.address, spec.port, spec.user,
                      loaded.identity_file(target)),
    ]  # fmt: skip
    builder = builder_endpoint(loaded, target)
    if builder is not None:
        hosts.append(nixos.SshHost(nixos.builder_alias(target.name), builder.address,
                                   builder.port, builder.user, builder.identity_file))  # fmt: skip
    folder = run_dir()
    try:
        text = nixos.ssh_config_text(
            hosts,
            known_hosts=loaded.known_hosts,
            connect_timeout=loaded.inventory.connect_timeout,
            control_dir=folder,
            agent=os.environ.get("SSH_AUTH_SOCK") or None,
            rollback_timeout=spec.rollback_timeout,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    path = folder / f"ssh_config.{target.name}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def child_env(loaded: Loaded, target: Target) -> dict[str, str]:
    """nixos-rebuild's environment: NIX_SSHOPTS names rebuild's ssh config only; git never
    asks for a password."""
    env = dict(os.environ)
    env["NIX_SSHOPTS"] = nixos.nix_sshopts(ssh_config_file(loaded, target))
    return env


def expected_system(loaded: Loaded, target: Target, flake: str | None = None) -> str:
    extra = nixos.evaluation_args(target.settings.extra_args)
    argv = nixos.nix_eval_argv(loaded.nix_program, flake or loaded.flake, target.attr, extra)
    done = process.run(argv, timeout=NIX_EVAL_TIMEOUT)
    path = done.stdout.strip()
    if not done.ok or not path.startswith("/"):
        tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise BuildFailed(f"{target.name}: cannot evaluate {target.attr}: {tail}")
    return path


def expected_systems(loaded: Loaded, targets: list[Target], flake: str
                     ) -> dict[str, str | RebuildError]:  # fmt: skip
    """The systems of hosts that share their evaluation flags, by attribute: one `nix eval` for
    them all; when that fails, one per attribute, so that each error names its host."""
    attrs = list(dict.fromkeys(t.attr for t in targets))
    if len(attrs) > 1:
        extra = nixos.evaluation_args(targets[0].settings.extra_args)
        argv = nixos.nix_eval_systems_argv(loaded.nix_program, flake, attrs, extra)
        with contextlib.suppress(RebuildError):  # each attribute alone says what is wrong
            done = process.run(argv, timeout=NIX_EVAL_TIMEOUT)
            found = nixos.parse_systems(done.stdout, attrs) if done.ok else None
            if found is not None:
                return dict(found)
    by_attr = {t.attr: t for t in targets}
    out: dict[str, str | RebuildError] = {}
    for attr in attrs:
        try:
            out[attr] = expected_system(loaded, by_attr[attr], flake)
        except RebuildError as exc:
            out[attr] = exc
    return out


def locked_flake(loaded: Loaded) -> str:
    """The flake reference a run uses: a local flake as it is (the git gate covers it); a remote
    one pinned to the revision it resolves to now, so that what was evaluated and shown in the
    plan is what nixos-rebuild builds."""
    if loaded.flake_dir is not None:
        return loaded.flake
    done = process.run(nixos.flake_metadata_argv(loaded.nix_program, loaded.flake), timeout=120)
    try:
        metadata = json.loads(done.stdout) if done.ok else None
    except ValueError:
        metadata = None
    locked = nixos.locked_flake_ref(loaded.flake, metadata) if isinstance(metadata, dict) else None
    if locked is None:
        tail = " ".join(done.stderr.strip().splitlines()[-2:]) or "no revision in its metadata"
        raise GateRefused(
            f"cannot pin the remote flake {loaded.flake} to a revision ({tail}); fix the URL, "
            "or name a revision in it (?rev=...)"
        )
    return locked


def gather(hr: HostRun, *, boot: bool) -> facts.Facts:
    spec = hr.target.settings.verify
    script = facts.script(spec, services=not boot)
    result = hr.run(script, timeout=facts.script_timeout(spec), privileged=False)
    return facts.parse(result.stdout, spec)


def verify_host(hr: HostRun, expected: str | None, *, boot: bool = False,
                settle_timeout: float | None = None) -> Report:  # fmt: skip
    return run_checks(
        lambda: gather(hr, boot=boot),
        hr.target.settings.verify,
        expected,
        host=hr.name,
        boot=boot,
        settle_timeout=settle_timeout,
    )


def current_system(hr: HostRun) -> str | None:
    return facts.parse_store_path(
        hr.run(
            f"readlink -f {facts.CURRENT_SYSTEM}; true\n", timeout=20, privileged=False
        ).stdout.splitlines()
    )


def previous_generation(hr: HostRun) -> str:
    """The system of the generation below the current one (`invoke rollback`'s target)."""
    numbers, current = hostops.parse_generations(
        hr.run(hostops.generations_script(), timeout=30).stdout
    )
    older = [n for n in numbers if current is not None and n < current]
    if not older:
        raise GateRefused(f"{hr.name}: no generation older than the current one to roll back to")
    path = facts.parse_store_path(
        hr.run(hostops.generation_path_script(max(older)), timeout=30).stdout.splitlines()
    )
    if path is None:
        raise GateRefused(f"{hr.name}: cannot read the previous generation's system")
    return path
