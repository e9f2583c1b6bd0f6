"""Pure argv builders for nix, nixos-rebuild and the ssh options they use."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rebuild.inventory import Target

EXPERIMENTAL = ("--extra-experimental-features", "nix-command flakes")
SERVER_ALIVE_INTERVAL = 5
SERVER_ALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class SshSettings:
    """How rebuild reaches a host over ssh: strict keys, bounded time, one shared connection."""

    port: int
    known_hosts: Path
    identity_file: Path | None
    connect_timeout: int
    control_dir: Path | None


def toplevel_attr(flake: str, attr: str) -> str:
    return f"{flake}#nixosConfigurations.{attr}.config.system.build.toplevel.outPath"


def nix_eval_argv(nix: str, flake: str, attr: str) -> list[str]:
    """`nix eval --raw` of the host's system: the store path the deploy must end on."""
    return [nix, *EXPERIMENTAL, "eval", "--raw", toplevel_attr(flake, attr)]


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


def nix_build_argv(nix: str, flake: str, output: str, *, out_link: str | None = None) -> list[str]:
    """`nix build` of a named flake output (an image), printing its store path; with `out_link`
    the result link (a GC root) is made there instead of none."""
    link = ["--out-link", out_link] if out_link is not None else ["--no-link"]
    return [nix, *EXPERIMENTAL, "build", "--print-out-paths", *link, f"{flake}#{output}"]


def ssh_options(ssh: SshSettings) -> list[str]:
    """ssh options, strict first: ssh keeps the first value of a repeated `-o`. `-F none`: no
    ssh_config (the operator's or the system's) can redirect or weaken this ssh; the host's
    address, port, user and key come from the inventory only, as on rebuild's own SSH path."""
    opts = [
        "-F", "none",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={ssh.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "BatchMode=yes",
        "-o", "KnownHostsCommand=none",
        "-o", "VerifyHostKeyDNS=no",
        "-o", f"ConnectTimeout={ssh.connect_timeout}",
        "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
        "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT_MAX}",
    ]  # fmt: skip
    if ssh.control_dir is not None:
        opts += [
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={ssh.control_dir}/%C",
            "-o", "ControlPersist=60",
        ]  # fmt: skip
    if ssh.identity_file is not None:
        opts += ["-o", "IdentitiesOnly=yes", "-i", str(ssh.identity_file)]
    opts += ["-p", str(ssh.port)]
    return opts


def nix_sshopts(ssh: SshSettings) -> str:
    """NIX_SSHOPTS: rebuild's options only. An inherited NIX_SSHOPTS is dropped: options rebuild
    does not set itself (HostKeyAlias, ProxyCommand, KnownHostsCommand, ...) could redirect
    nixos-rebuild's ssh to another machine while the gates checked this one."""
    return shlex.join(ssh_options(ssh))


def nixos_rebuild_argv(
    program: str,
    action: str,
    flake: str,
    target: Target,
    *,
    rollback: bool = False,
    ask_sudo_password: bool = False,
) -> list[str]:
    """The exact nixos-rebuild command line for a host (an argv list, never a shell string).

    `ask_sudo_password`: the host's sudo wants a password (rebuild answers the prompt on a
    pseudo-terminal); nixos-rebuild-ng then asks once and feeds it to `sudo --stdin`. Older
    nixos-rebuild (`sudo_flag = "--use-remote-sudo"`) has no such flag: its sudo prompts through
    `ssh -t` and rebuild answers those prompts.
    """
    spec = target.settings
    argv = [program, action, "--flake", f"{flake}#{target.attr}"]
    if action != "build":
        argv += ["--target-host", target.destination]
    if spec.build_host == "target":
        argv += ["--build-host", target.destination]
    elif spec.build_host:
        argv += ["--build-host", spec.build_host]
    if spec.sudo and action != "build":
        argv.append(spec.sudo_flag)
        if ask_sudo_password and spec.sudo_flag == "--sudo":
            argv.append("--ask-sudo-password")
    if spec.use_substitutes and action != "build":
        argv.append("--use-substitutes")
    if rollback:
        argv.append("--rollback")
    argv += list(spec.extra_args)
    return argv


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
