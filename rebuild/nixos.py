"""Pure argv builders for nix, nixos-rebuild and the ssh options they use."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rebuild.inventory import Target

EXPERIMENTAL = ("--extra-experimental-features", "nix-command flakes")
# nixos-rebuild's ssh must survive a long activation (a network restart, a slow unit): at least
# two minutes of silence, and never less than the dead-man timer (ng runs the switch under
# `systemd-run --pipe`: an ssh that gives up can leave the host half switched, while the timer
# would have restored it anyway). rebuild's own checks keep their tight bounds.
SERVER_ALIVE_INTERVAL = 15
SERVER_ALIVE_MIN_SECONDS = 120


def server_alive_count(rollback_timeout: int) -> int:
    """ServerAliveCountMax so that ssh waits out the dead-man timer (and a margin)."""
    patience = max(SERVER_ALIVE_MIN_SECONDS, rollback_timeout + 30)
    return -(-patience // SERVER_ALIVE_INTERVAL)


Flavour = Literal["ng", "classic"]
# Without these, nixos-rebuild re-executes the nixos-rebuild of the configuration being
# deployed for switch, boot and test (both flavours: `canRun` in nixos-rebuild.sh, `can_run` in
# ng's __init__.py), so a *new* program would judge the flags and build itself first (nixpkgs
# issue 425637). Both accept --fast; ng 25.11+ warns and maps it to --no-reexec, which ng has
# from 25.05 on. rebuild passes it for every action: harmless where nothing re-executes.
NO_REEXEC: dict[Flavour, str] = {"ng": "--no-reexec", "classic": "--fast"}
# classic knows only --use-remote-sudo (sudo through `ssh -t`); ng has --sudo (and warns about
# --use-remote-sudo), and --ask-sudo-password to ask once and feed `sudo --stdin`.
SUDO_FLAG: dict[Flavour, str] = {"ng": "--sudo", "classic": "--use-remote-sudo"}


@dataclass(frozen=True)
class SshHost:
    """One host nixos-rebuild's ssh reaches, under an alias rebuild chooses."""

    alias: str  # what nixos-rebuild is given (--target-host user@alias)
    hostname: str  # the real address (an IPv6 address needs no brackets here)
    port: int
    user: str
    identity_file: Path | None


def ssh_config_text(
    hosts: Sequence[SshHost],
    *,
    known_hosts: Path,
    connect_timeout: int,
    control_dir: Path | None,
    agent: str | None,
    rollback_timeout: int = 0,
) -> str:
    """The only ssh configuration nixos-rebuild's ssh (and nix's) reads, passed with `-F`:
    a Host block per host (its own port and key: a target on 2200 and a builder on 22 both
    work), then strict host keys, bounded time and connection sharing for every host.
    Paths are quoted, so a folder with spaces works; ssh keeps the first value it reads."""
    lines = ["# written by rebuild for one run; no other ssh configuration is read"]
    for host in hosts:
        lines += [
            f"Host {host.alias}",
            f"  HostName {host.hostname}",
            f"  Port {host.port}",
            f"  User {host.user}",
        ]
        if host.identity_file is not None:
            lines += [f"  IdentityFile {_quoted(host.identity_file)}", "  IdentitiesOnly yes"]
    lines += [
        "Host *",
        "  StrictHostKeyChecking yes",
        f"  UserKnownHostsFile {_quoted(known_hosts)}",
        "  GlobalKnownHostsFile /dev/null",
        "  UpdateHostKeys no",
        "  KnownHostsCommand none",
        "  VerifyHostKeyDNS no",
        "  CheckHostIP no",
        "  BatchMode yes",
        f"  ConnectTimeout {connect_timeout}",
        f"  ServerAliveInterval {SERVER_ALIVE_INTERVAL}",
        f"  ServerAliveCountMax {server_alive_count(rollback_timeout)}",
        f"  IdentityAgent {_quoted(agent) if agent else 'none'}",
        "  ProxyCommand none",
        "  ProxyJump none",
        "  PermitLocalCommand no",
    ]
    if control_dir is not None:
        lines += [
            "  ControlMaster auto",
            f"  ControlPath {_quoted(control_dir / '%C')}",
            "  ControlPersist 60",
        ]
    return "\n".join(lines) + "\n"


def _quoted(path: Path | str) -> str:
    text = str(path)
    if '"' in text or "\n" in text:
        raise ValueError(f"{text!r}: a path with a double quote or newline cannot go to ssh")
    return f'"{text}"'


def ssh_master_argv(config: Path, destination: str) -> list[str]:
    """`ssh -F CONFIG -M -N -f DEST`: the connection the config's ControlPath shares, opened
    ahead (it goes to the background once authenticated; ControlPersist ends it when idle)."""
    return ["ssh", "-F", str(config), "-M", "-N", "-f", destination]


def ssh_exit_argv(config: Path, destination: str) -> list[str]:
    """`ssh -F CONFIG -O exit DEST`: stop the shared connection (master) of that destination."""
    return ["ssh", "-F", str(config), "-O", "exit", destination]


def nix_sshopts(config: Path) -> str:
    """NIX_SSHOPTS: `-F <rebuild's config>` and nothing else. Nix and classic nixos-rebuild
    split it on whitespace, so the config's own path must have none (checked by the caller).
    An inherited NIX_SSHOPTS is dropped: options rebuild does not set could redirect
    nixos-rebuild's ssh to another machine while the gates checked this one."""
    return f"-F {config}"


def target_alias(name: str) -> str:
    """The name nixos-rebuild is given for a host (the ssh config maps it to the address)."""
    return f"rebuild-{name}"


def target_destination(target: Target) -> str:
    """`user@alias`: how nixos-rebuild, `nix copy` and the shared ssh connection name a host."""
    return f"{target.settings.user}@{target_alias(target.name)}"


def builder_alias(name: str) -> str:
    return f"rebuild-{name}-builder"


_STORE_NAME = re.compile(r"^/nix/store/[0-9a-z]{32}-(?P<name>[^/]+)/")


def tool_version(resolved_path: str) -> str:
    """A Nix-installed program's version from its store path (`...-nix-2.24.9/bin/nix` →
    `2.24.9`; `...-nixos-rebuild-ng-25.11/bin/nixos-rebuild` → `ng 25.11`), without running
    it; "unknown" elsewhere."""
    match = _STORE_NAME.match(resolved_path)
    if match is None:
        return "unknown"
    name = match.group("name")
    version = re.search(r"-(\d[^-]*)$", name)
    flavour = "ng " if "nixos-rebuild-ng" in name else ""
    return flavour + version.group(1) if version else "unknown"


def toplevel_attr(flake: str, attr: str) -> str:
    return f"{flake}#nixosConfigurations.{attr}.config.system.build.toplevel.outPath"


def nix_eval_argv(nix: str, flake: str, attr: str, extra: Sequence[str] = ()) -> list[str]:
    """`nix eval --raw` of the host's system: the store path the deploy must end on, with the
    evaluation-affecting flags nixos-rebuild gets too (`evaluation_args`)."""
    return [nix, *EXPERIMENTAL, "eval", "--raw", *extra, toplevel_attr(flake, attr)]


def nix_eval_systems_argv(nix: str, flake: str, attrs: Sequence[str],
                          extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """`nix eval --json` of several hosts' systems in one evaluator (one flake fetch, Nix's
    parse and evaluation caches shared across the hosts): a JSON list of store paths in the
    order of `attrs`."""
    names = " ".join(nix_string(attr) for attr in attrs)
    apply = f"cs: map (n: cs.${{n}}.config.system.build.toplevel.outPath) [ {names} ]"
    return [nix, *EXPERIMENTAL, "eval", "--json", *extra, f"{flake}#nixosConfigurations",
            "--apply", apply]  # fmt: skip


def nix_string(value: str) -> str:
    """A Nix string literal: `"`, `\\` and `${` escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def parse_systems(text: str, attrs: Sequence[str]) -> dict[str, str] | None:
    """`nix_eval_systems_argv`'s answer by attribute, or None when it is not one store path
    per attribute."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list) or len(data) != len(attrs):
        return None
    if not all(isinstance(path, str) and path.startswith("/") for path in data):
        return None
    return dict(zip(attrs, data, strict=True))


def flake_metadata_argv(nix: str, flake: str) -> list[str]:
    """`nix flake metadata --json`: where a remote flake's reference resolves to now."""
    return [nix, *EXPERIMENTAL, "flake", "metadata", "--json", flake]


def locked_flake_ref(flake: str, metadata: dict[str, object]) -> str | None:
    """The flake reference pinned to the revision `nix flake metadata --json` resolved, so that
    evaluation and nixos-rebuild build exactly the same thing (None: nothing to pin to).

    Nix prints `lockedUrl` (before 2.20) or `url` (later) with the revision in it, and
    `locked.rev` / `revision`; a URL that already names a rev is kept as it is."""
    if re.search(r"[?&]rev=[0-9a-f]{40}\b", flake):
        return flake
    for key in ("lockedUrl", "url"):
        value = metadata.get(key)
        if isinstance(value, str) and re.search(r"[?&/]rev=[0-9a-f]{40}\b|/[0-9a-f]{40}\b", value):
            return value
    locked = metadata.get("locked")
    rev = metadata.get("revision") or (locked.get("rev") if isinstance(locked, dict) else None)
    if not isinstance(rev, str) or not re.fullmatch(r"[0-9a-f]{40}", rev):
        return None
    base, sep, fragment = flake.partition("#")
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}rev={rev}" + (sep + fragment if sep else "")


def nix_build_system_argv(nix: str, flake: str, attr: str, extra: Sequence[str] = ()) -> list[str]:
    """`nix build` of the host's system, once, before the prompt (the preview's build): it
    prints the store path and makes no `result` link; nixos-rebuild's own build of the same
    attribute is then answered by Nix's evaluation cache and the store."""
    target = f"{flake}#nixosConfigurations.{attr}.config.system.build.toplevel"
    return [nix, *EXPERIMENTAL, "build", "--no-link", "--print-out-paths", *extra, target]


def nix_dry_build_argv(nix: str, flake: str, attr: str, extra: Sequence[str] = ()) -> list[str]:
    """`nix build --dry-run --json` of the host's system: evaluated as a build evaluates it,
    nothing built; the JSON names the out path (`parse_dry_build`)."""
    target = f"{flake}#nixosConfigurations.{attr}.config.system.build.toplevel"
    return [nix, *EXPERIMENTAL, "build", "--dry-run", "--json", "--no-link", *extra, target]


def parse_dry_build(text: str) -> str | None:
    """The out path in `nix build --dry-run --json`'s answer (`[{"drvPath": ..., "outputs":
    {"out": PATH}}]`, NixOS/nix src/libstore/derived-path.cc); None when it names none."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        return None
    outputs = data[0].get("outputs")
    out = outputs.get("out") if isinstance(outputs, dict) else None
    return out if isinstance(out, str) and out.startswith("/") else None


def nix_copy_argv(nix: str, destination: str, path: str, *, substitute: bool) -> list[str]:
    """`nix copy` of a built system to the host (ssh:// reads NIX_SSHOPTS, so rebuild's ssh
    config applies), letting the host fetch from its caches what it can."""
    argv = [nix, *EXPERIMENTAL, "copy", "--to", f"ssh://{destination}"]
    if substitute:
        argv.append("--substitute-on-destination")
    return [*argv, path]


def nix_build_argv(nix: str, flake: str, output: str, *, out_link: str | None = None) -> list[str]:
    """`nix build` of a named flake output (an image), printing its store path; with `out_link`
    the result link (a GC root) is made there instead of none."""
    link = ["--out-link", out_link] if out_link is not None else ["--no-link"]
    return [nix, *EXPERIMENTAL, "build", "--print-out-paths", *link, f"{flake}#{output}"]


def nixos_rebuild_argv(
    program: str,
    action: str,
    flake: str,
    target: Target,
    *,
    flavour: Flavour = "ng",
    rollback: bool = False,
    ask_sudo_password: bool = False,
) -> list[str]:
    """The exact nixos-rebuild command line for a host and flavour (an argv list, never a
    shell string); only flags that flavour accepts.

    The hosts are named by their ssh aliases (`ssh_config_text` maps them to the address, port
    and key), so an IPv6 address needs no brackets and each host keeps its own port.
    `ask_sudo_password`: the host's sudo wants a password; ng then asks once (rebuild answers
    on a pseudo-terminal) and feeds it to `sudo --stdin`; classic has no such flag: its remote
    sudo prompts through `ssh -t` and rebuild answers those prompts.
    """
    spec = target.settings
    argv = [program, action, "--flake", f"{flake}#{target.attr}", NO_REEXEC[flavour]]
    if action != "build":
        argv += ["--target-host", target_destination(target)]
    if spec.build_host == "target":
        argv += ["--build-host", target_destination(target)]
    elif spec.build_host:
        builder = parse_build_host(spec.build_host)
        argv += ["--build-host", f"{builder.user or spec.user}@{builder_alias(target.name)}"]
    if spec.sudo and action != "build":
        argv.append(SUDO_FLAG[flavour])
        if ask_sudo_password and flavour == "ng":
            argv.append("--ask-sudo-password")
    if spec.use_substitutes and action != "build":
        argv.append("--use-substitutes")
    if rollback:
        argv.append("--rollback")
    argv += list(spec.extra_args)
    return argv


@dataclass(frozen=True)
class BuildHost:
    """`build_host = "user@host"` or `"user@host:port"` (`"user@[v6]:port"`)."""

    user: str
    host: str
    port: int


def parse_build_host(text: str) -> BuildHost:
    """The parts of a (validated) build_host."""
    user, _, rest = text.rpartition("@")
    port = 22
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, number = rest.partition(":")
        port = int(number)
    else:
        host = rest
    return BuildHost(user, host, port)


# nixos-rebuild flags that change what the configuration evaluates to; `nix eval` of the
# expected system must get them too, or a correct deploy is judged as drift. (flag, values)
EVAL_FLAGS = {
    "--impure": 0, "--override-input": 2, "--option": 2, "-I": 1, "--include": 1,
    "--no-update-lock-file": 0, "--no-write-lock-file": 0, "--recreate-lock-file": 0,
    "--update-input": 1, "--no-registries": 0, "--offline": 0, "--refresh": 0,
    "--arg": 2, "--argstr": 2, "--show-trace": 0,
}  # fmt: skip


def evaluation_args(extra_args: Sequence[str]) -> list[str]:
    """The part of extra_args that `nix eval` must see to evaluate what nixos-rebuild builds."""
    out: list[str] = []
    i = 0
    while i < len(extra_args):
        arg = extra_args[i]
        flag, eq, _ = arg.partition("=")
        count = EVAL_FLAGS.get(flag)
        if count is None:
            i += 1
            continue
        taken = 1 if eq else 1 + count
        out += list(extra_args[i : i + taken])
        i += taken
    return out


def build_image_argv(program: str, flake: str, target: Target) -> list[str]:
    """`nixos-rebuild build-image` with the host's image variant (the upstream image workflow)."""
    return [
        program,
        "build-image",
        "--image-variant",
        target.settings.image_variant,
        "--flake",
        f"{flake}#{target.attr}",
    ]


def render(argv: Sequence[str]) -> str:
    """A command line for display only (the plan); never executed through a shell."""
    return shlex.join(argv)
