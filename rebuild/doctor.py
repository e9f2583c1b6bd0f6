"""`invoke doctor`: checks this operator machine end to end without touching any host.

The gathering (`gather`) is a thin shell that runs the local tools and reads files; every check
is a small pure function over what was gathered that says ok, FAIL or warn, and for a problem
the fix. Nothing is changed, no host is contacted.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rebuild import gitstate, identity, process
from rebuild.console import Console
from rebuild.errors import GateRefused, RebuildError
from rebuild.gates import operator_gate
from rebuild.inventory import Loaded, inventory_path, load
from rebuild.remote import Endpoint, key_is_known, unknown_key_message

OK, FAIL, WARN = "ok", "FAIL", "warn"
TOOL_TIMEOUT = 30.0
FLAKE_TIMEOUT = 120.0
NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")
EXIT_FAILED = GateRefused.exit_code  # 3: something this machine needs is missing or unsafe


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    level: str  # ok, FAIL or warn
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.level != FAIL

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class Tool:
    """A local program and what `PROGRAM --version` (or another probe) answered."""

    program: str  # as configured
    path: str | None  # found on PATH (or as given), None when missing
    returncode: int = 0
    output: str = ""
    resolved: str | None = None  # the real path behind links (a store path on NixOS)

    @property
    def answer(self) -> str:
        """The first non-empty line of the answer."""
        return next((line.strip() for line in self.output.splitlines() if line.strip()), "")


@dataclass(frozen=True)
class FileFacts:
    """What `stat` says about a file or folder (None fields: it does not exist)."""

    path: Path
    exists: bool
    is_dir: bool = False
    mode: int = 0
    uid: int = -1


@dataclass(frozen=True)
class HostFacts:
    name: str
    endpoint: Endpoint
    key_known: bool
    identity: FileFacts | None  # None: no identity_file (ssh-agent or default keys)


@dataclass
class Facts:
    """Everything doctor looks at, gathered once."""

    uid: int
    nixos_rebuild: Tool
    nixos_rebuild_source: str  # where the program name came from
    flavour: str | None  # the inventory's nixos_rebuild_flavour, when it has one
    nix: Tool
    flakes: Tool | None  # `nix ... flake metadata FLAKE` (None: no inventory)
    ssh: Tool
    inventory_path: Path
    inventory_error: str | None = None
    loaded: Loaded | None = None
    me: identity.Identity | None = None
    sudo_hosts: tuple[str, ...] = ()
    keyring_error: str | None = None
    keyring_backend: str | None = None
    hosts: list[HostFacts] = field(default_factory=list)
    state_dir: FileFacts | None = None
    audit_log: FileFacts | None = None
    git: gitstate.GitState | None = None


# --------------------------------------------------------------------------- the checks


def check_inventory(f: Facts) -> Check:
    if f.inventory_error is not None:
        return Check(
            "inventory",
            FAIL,
            f.inventory_error,
            "fix the named key, or point --inventory / REBUILD_INVENTORY at the "
            "inventory (invoke init writes a first one)",
        )
    where = f.loaded.path if f.loaded else f.inventory_path
    return Check("inventory", OK, f"{where} is valid")


def detect_flavour(resolved: str | None, answer: str) -> str | None:
    """ng or classic when the program says so: its store path (`...-nixos-rebuild-ng-25.05/`
    against `...-nixos-rebuild-24.11/`) or its --version answer; None when it cannot tell."""
    where = resolved or ""
    if "nixos-rebuild-ng" in where or "nixos-rebuild-ng" in answer:
        return "ng"
    if "/nix/store/" in where and "-nixos-rebuild-" in where:
        return "classic"
    return None


def check_nixos_rebuild(f: Facts) -> Check:
    tool = f.nixos_rebuild
    name = "nixos-rebuild"
    if tool.path is None:
        return Check(
            name,
            FAIL,
            f"{tool.program} not found ({f.nixos_rebuild_source})",
            "install nixos-rebuild (nix profile install nixpkgs#nixos-rebuild-ng), or "
            "set nixos_rebuild in the inventory / REBUILD_NIXOS_REBUILD to its path",
        )
    declared = f.flavour or "ng"
    version = tool.answer if tool.returncode == 0 and tool.answer else "no --version answer"
    detail = f"{tool.path} ({version}); flavour {declared}" + (
        "" if f.flavour else " (the default; nixos_rebuild_flavour is not set)"
    )
    detected = detect_flavour(tool.resolved, tool.answer if tool.returncode == 0 else "")
    if detected is not None and detected != declared:
        return Check(
            name,
            WARN,
            f"{detail}, but it looks {detected}",
            f'set nixos_rebuild_flavour = "{detected}" in the inventory, or point '
            "nixos_rebuild at the other program",
        )
    return Check(name, OK, detail)


def check_nix(f: Facts) -> Check:
    tool = f.nix
    if tool.path is None:
        return Check(
            "nix",
            FAIL,
            f"{tool.program} not found",
            "install Nix (https://nixos.org/download), or set nix in the inventory / "
            "REBUILD_NIX to its path",
        )
    if tool.returncode != 0 or not tool.answer:
        return Check(
            "nix",
            FAIL,
            f"{tool.path} --version failed: {tool.answer or tool.returncode}",
            "repair the Nix installation (nix --version must answer)",
        )
    return Check("nix", OK, f"{tool.path} ({tool.answer})")


def check_flakes(f: Facts) -> Check:
    name = "nix flakes"
    if f.flakes is None:
        return Check(
            name, WARN, "not checked: no valid inventory names a flake", "fix the inventory first"
        )
    if f.nix.path is None:
        return Check(name, FAIL, "not checked: nix is missing", "install Nix first")
    flake = f.loaded.flake if f.loaded else "the flake"
    if f.flakes.returncode != 0:
        why = f.flakes.output.strip().splitlines()[-1:] or [f"exit {f.flakes.returncode}"]
        return Check(
            name,
            FAIL,
            f"`nix flake metadata {flake}` with nix-command and flakes failed: {why[0]}",
            "use Nix 2.4 or later, and check that the flake evaluates "
            f"(nix --extra-experimental-features 'nix-command flakes' flake metadata "
            f"{flake})",
        )
    return Check(name, OK, f"nix-command and flakes work: `nix flake metadata {flake}` answered")


def check_ssh(f: Facts) -> Check:
    tool = f.ssh
    if tool.path is None:
        return Check(
            "ssh",
            FAIL,
            "ssh not found",
            "install the OpenSSH client (apt-get install openssh-client)",
        )
    if tool.returncode != 0 or not tool.answer.startswith("OpenSSH"):
        return Check(
            "ssh",
            WARN,
            f"{tool.path}: ssh -V said {tool.answer or tool.returncode!r}",
            "nixos-rebuild and nix need OpenSSH's ssh (apt-get install openssh-client)",
        )
    return Check("ssh", OK, f"{tool.path} ({tool.answer})")


def check_keyring(f: Facts) -> Check:
    name = "keyring"
    if not f.sudo_hosts:
        return Check(name, OK, "not needed: no host has sudo = true")
    hosts = ", ".join(f.sudo_hosts)
    if f.keyring_error is not None:
        return Check(
            name,
            FAIL,
            f"hosts with sudo = true ({hosts}), but {f.keyring_error}",
            "install a keyring backend (a desktop Secret Service, or keyrings.alt "
            "on a headless machine) or choose one with PYTHON_KEYRING_BACKEND; or "
            "allow passwordless sudo on those hosts (NOPASSWD)",
        )
    return Check(name, OK, f"backend {f.keyring_backend} for the sudo hosts ({hosts})")


def check_operator(f: Facts) -> Check:
    name = "operator allowlist"
    if f.loaded is None or f.me is None:
        return Check(name, WARN, "not checked: no valid inventory", "fix the inventory first")
    try:
        operator = operator_gate(f.loaded, f.me)
    except GateRefused as exc:
        return Check(
            name,
            FAIL,
            str(exc).split("; run")[0],
            f"run `invoke operator --name NAME` and commit the printed [[operators]] "
            f"lines to {f.loaded.path} (reviewed)",
        )
    return Check(name, OK, f"this machine ({f.me.hostname}) is operator {operator!r}")


def check_known_host(host: HostFacts) -> Check:
    name = f"known_hosts {host.name}"
    endpoint = host.endpoint
    if not host.key_known:
        return Check(
            name,
            FAIL,
            f"no key for {endpoint.key_name} in {endpoint.known_hosts}",
            unknown_key_message(endpoint).split("; ", 1)[-1],
        )
    return Check(name, OK, f"{endpoint.key_name} is in {endpoint.known_hosts}")


def check_identity_file(host: HostFacts, uid: int) -> Check:
    name = f"identity {host.name}"
    facts = host.identity
    if facts is None:
        return Check(name, OK, "no identity_file: ssh-agent or the default keys")
    path = facts.path
    if not facts.exists or facts.is_dir:
        return Check(
            name,
            FAIL,
            f"{path} does not exist" if not facts.exists else f"{path} is a folder",
            f"create the key (ssh-keygen -t ed25519 -f {path}) or fix "
            f"hosts.{host.name}.identity_file",
        )
    if facts.mode & 0o077:
        return Check(
            name,
            FAIL,
            f"{path} is readable by others (mode {facts.mode & 0o777:o})",
            f"chmod 600 {path}",
        )
    if facts.uid != uid:
        return Check(
            name, FAIL, f"{path} belongs to uid {facts.uid}, not you ({uid})", f"chown {uid} {path}"
        )
    return Check(name, OK, f"{path} (mode {facts.mode & 0o777:o})")


def check_state_dir(f: Facts) -> Check:
    name = "state folder"
    facts = f.state_dir
    if facts is None:
        return Check(name, WARN, "not checked: no valid inventory", "fix the inventory first")
    path = facts.path
    if not facts.exists:
        return Check(name, OK, f"{path} does not exist yet (created private, 0700)")
    if not facts.is_dir:
        return Check(
            name,
            FAIL,
            f"{path} is not a folder",
            f"move it away; rebuild keeps the audit log and locks in {path}",
        )
    if facts.uid != f.uid:
        return Check(
            name,
            FAIL,
            f"{path} belongs to uid {facts.uid}, not you ({f.uid})",
            f"chown {f.uid} {path}",
        )
    if facts.mode & 0o022:
        return Check(
            name,
            FAIL,
            f"{path} is writable by others (mode {facts.mode & 0o777:o}): "
            "they could forge the audit log or a lock",
            f"chmod go-w {path}",
        )
    log = f.audit_log
    if log is not None and log.exists and (log.mode & 0o022 or log.uid != f.uid):
        return Check(
            name,
            FAIL,
            f"{log.path} is writable by others or not yours "
            f"(mode {log.mode & 0o777:o}, uid {log.uid})",
            f"chown {f.uid} {log.path} && chmod 600 {log.path}",
        )
    return Check(name, OK, f"{path} (mode {facts.mode & 0o777:o}, yours)")


def check_git(f: Facts) -> Check:
    name = "flake tree"
    if f.loaded is None:
        return Check(name, WARN, "not checked: no valid inventory", "fix the inventory first")
    if f.loaded.flake_dir is None:
        return Check(name, OK, f"{f.loaded.flake} is a flake URL (no local tree)")
    state = f.git
    if state is None or not state.is_repo:
        return Check(
            name,
            FAIL,
            f"{f.loaded.flake} is not in a git repository",
            "commit the flake to git (what is deployed must trace to a commit)",
        )
    if state.dirty:
        shown = ", ".join(state.dirty_files[: gitstate.MAX_LISTED])
        more = len(state.dirty_files) - gitstate.MAX_LISTED
        shown += f" (+{more} more)" if more > 0 else ""
        return Check(
            name,
            FAIL,
            f"uncommitted changes: {shown}",
            "commit or stash them (or deploy with --allow-dirty, recorded in the audit)",
        )
    return Check(name, OK, f"clean at {state.short} ({state.subject})")


def checks(f: Facts) -> list[Check]:
    """Every check, in the order the report shows them."""
    out = [check_inventory(f), check_nixos_rebuild(f), check_nix(f), check_flakes(f),
           check_ssh(f), check_keyring(f), check_operator(f)]  # fmt: skip
    for host in f.hosts:
        out.append(check_known_host(host))
        out.append(check_identity_file(host, f.uid))
    out += [check_state_dir(f), check_git(f)]
    return out


def render(found: list[Check]) -> list[str]:
    """One line per check; a problem's fix on the line below it."""
    lines = []
    for check in found:
        lines.append(f"{check.level:4} {check.name}: {check.detail}")
        if check.level != OK and check.fix:
            lines.append(f"     fix: {check.fix}")
    return lines


def exit_code(found: list[Check]) -> int:
    return 0 if all(check.ok for check in found) else EXIT_FAILED


# --------------------------------------------------------------------------- gathering


def probe_tool(program: str, args: list[str], *, timeout: float = TOOL_TIMEOUT,
               run: Callable[..., process.Completed] = process.run) -> Tool:  # fmt: skip
    path = shutil.which(program)
    if path is None:
        return Tool(program, None)
    done = run([path, *args], timeout=timeout)
    output = (done.stdout + "\n" + done.stderr).strip()
    return Tool(program, path, done.returncode, output, os.path.realpath(path))


def file_facts(path: Path) -> FileFacts:
    try:
        st = path.stat()
    except OSError:
        return FileFacts(path, exists=False)
    return FileFacts(path, True, stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid)


def keyring_state() -> tuple[str | None, str | None]:
    """(backend, error): the keyring backend Python's keyring would use, or why none."""
    try:
        import keyring
        from keyring.backends import chainer, fail
    except ImportError as exc:  # pragma: no cover - keyring is a dependency
        return None, f"the keyring package is missing ({exc})"
    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring) or (
        isinstance(backend, chainer.ChainerBackend) and not backend.backends
    ):
        return None, "no OS keyring backend is available on this machine"
    from rebuild.sudo_keyring import backend_name

    return backend_name(), None


def gather(inventory: str | None) -> Facts:
    """Run the tools and read the files doctor checks (no host is contacted)."""
    from rebuild.hostrun import endpoint_for

    path = inventory_path(inventory)
    loaded: Loaded | None = None
    error: str | None = None
    try:
        loaded = load(inventory)
    except RebuildError as exc:
        error = str(exc)
    env_rebuild = os.environ.get("REBUILD_NIXOS_REBUILD")
    rebuild_program = loaded.nixos_rebuild_program if loaded else env_rebuild or "nixos-rebuild"
    if env_rebuild:
        source = "REBUILD_NIXOS_REBUILD"
    elif loaded and "nixos_rebuild" in loaded.inventory.model_fields_set:
        source = "the inventory's nixos_rebuild"
    else:
        source = "the default, on PATH"
    nix_program = loaded.nix_program if loaded else os.environ.get("REBUILD_NIX") or "nix"
    nix = probe_tool(nix_program, ["--version"])
    facts = Facts(
        uid=os.getuid(),
        nixos_rebuild=probe_tool(rebuild_program, ["--version"]),
        nixos_rebuild_source=source,
        flavour=getattr(loaded.inventory, "nixos_rebuild_flavour", None) if loaded else None,
        nix=nix,
        flakes=None,
        ssh=probe_tool("ssh", ["-V"]),
        inventory_path=path,
        inventory_error=error,
    )
    if loaded is None:
        return facts
    facts.loaded = loaded
    facts.me = identity.current()
    if nix.path is not None:
        facts.flakes = probe_tool(
            nix.path, [*NIX_FEATURES, "flake", "metadata", loaded.flake], timeout=FLAKE_TIMEOUT
        )
    else:
        facts.flakes = Tool(nix_program, None, 127)
    targets = loaded.targets()
    facts.sudo_hosts = tuple(t.name for t in targets if t.settings.sudo)
    if facts.sudo_hosts:
        facts.keyring_backend, facts.keyring_error = keyring_state()
    for target in targets:
        endpoint = endpoint_for(loaded, target)
        ident = loaded.identity_file(target)
        facts.hosts.append(
            HostFacts(
                target.name, endpoint, key_is_known(endpoint), file_facts(ident) if ident else None
            )
        )
    facts.state_dir = file_facts(loaded.audit_log.parent)
    facts.audit_log = file_facts(loaded.audit_log)
    if loaded.flake_dir is not None:
        facts.git = gitstate.read(loaded.flake_dir)
    return facts


def run(inventory: str | None, console: Console, *, json_mode: bool = False) -> int:
    """`invoke doctor`: 0 when nothing failed, 3 when something did."""
    found = checks(gather(inventory))
    if json_mode:
        console.json([check.to_json() for check in found])
    else:
        for line in render(found):
            console.say(line)
        failed = sum(not c.ok for c in found)
        warned = sum(c.level == WARN for c in found)
        console.say(
            f"{len(found)} checks: {failed} failed, {warned} warnings"
            if failed or warned
            else f"{len(found)} checks: all ok"
        )
    return exit_code(found)
