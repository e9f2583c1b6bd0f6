"""Operator-side stand-ins for ``nix`` and ``nixos-rebuild`` (NixOS cannot run here).

They evaluate the test bed's simulated flakes (``hosts/<attr>.json`` in a git repository),
"build" store paths into the test bed's store (``$NIX_STORE_DIR``) and reach target hosts only
through the real ``ssh`` client with ``shlex.split($NIX_SSHOPTS)`` before the destination, the
way nixos-rebuild-ng does. Messages and exit codes follow the real tools.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from testbed.store import (
    DEFAULT_IMAGE_VARIANTS,
    Flake,
    SimError,
    build_image,
    build_system,
    image_drv_path,
    image_file_name,
    image_store_path,
    resolve_flake,
    split_attr_path,
    system_drv_path,
    system_store_path,
)

PROFILE = "/nix/var/nix/profiles/system"
FLAKE_FLAGS = ["--extra-experimental-features", "nix-command flakes"]
SWITCH_PREFIX = [
    "systemd-run",
    "-E",
    "LOCALE_ARCHIVE",
    "-E",
    "NIXOS_INSTALL_BOOTLOADER",
    "--collect",
    "--no-ask-password",
    "--pipe",
    "--quiet",
    "--service-type=exec",
    "--unit=nixos-rebuild-switch-to-configuration",
    "--wait",
]
REMOTE_TIMEOUT = 900.0
SYSTEM = "x86_64-linux"


class NixUsage(Exception):
    """``error: ...`` plus the 'Try nix --help' hint, exit 1."""


def _store_dir(default_store: str) -> Path:
    return Path(os.environ.get("NIX_STORE_DIR") or default_store)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# =========================================================================== nix

_NIX_FLAGS0 = {
    "--raw",
    "--json",
    "--print-out-paths",
    "--no-link",
    "--show-trace",
    "--impure",
    "--pure-eval",
    "--offline",
    "--refresh",
    "--quiet",
    "--verbose",
    "-L",
    "--print-build-logs",
    "--keep-going",
    "-k",
    "--keep-failed",
    "-K",
    "--fallback",
    "--accept-flake-config",
    "--no-write-lock-file",
    "--no-update-lock-file",
    "--recreate-lock-file",
    "--no-registries",
    "--commit-lock-file",
    "--dry-run",
    "--debug",
    "--read-only",
    "--rebuild",
    "--repair",
    "--no-net",
    "--version",
    "--help",
}
_NIX_FLAGS1 = {
    "--extra-experimental-features",
    "--experimental-features",
    "--log-format",
    "--max-jobs",
    "-j",
    "--cores",
    "--builders",
    "--out-link",
    "-o",
    "--apply",
    "--update-input",
    "--system",
    "--substituters",
    "--extra-substituters",
    "--store",
    "--eval-store",
    "--include",
    "-I",
    "--reference-lock-file",
    "--output-lock-file",
}
_NIX_FLAGS2 = {"--option", "--override-input", "--arg", "--argstr"}


@dataclass
class NixArgs:
    flags: set[str] = field(default_factory=set)
    values: dict[str, list[str]] = field(default_factory=dict)
    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    positional: list[str] = field(default_factory=list)

    def value(self, key: str) -> str | None:
        found = self.values.get(key)
        return found[-1] if found else None

    def features(self) -> set[str]:
        out: set[str] = set()
        for key in ("--extra-experimental-features", "--experimental-features"):
            for value in self.values.get(key, []):
                out.update(value.split())
        for _flag, name, value in self.pairs:
            if name in ("experimental-features", "extra-experimental-features"):
                out.update(value.split())
        for line in os.environ.get("NIX_CONFIG", "").splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("experimental-features", "extra-experimental-features"):
                out.update(value.split())
        return out


def parse_nix_args(argv: Sequence[str]) -> NixArgs:
    out = NixArgs()
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out.positional.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            out.positional.append(arg)
            continue
        if re.fullmatch(r"-v+", arg):
            out.flags.add("--verbose")
            continue
        if arg in _NIX_FLAGS0:
            out.flags.add(arg)
            continue
        if arg in _NIX_FLAGS1:
            if i >= len(args):
                raise NixUsage(f"flag '{arg}' requires 1 argument")
            out.values.setdefault(arg, []).append(args[i])
            i += 1
            continue
        if arg in _NIX_FLAGS2:
            if i + 1 >= len(args):
                raise NixUsage(f"flag '{arg}' requires 2 arguments")
            out.pairs.append((arg, args[i], args[i + 1]))
            i += 2
            continue
        raise NixUsage(f"unrecognised flag '{arg}'")
    return out


@dataclass
class Target:
    """A resolved ``flake#attrpath`` installable."""

    flake: Flake
    path: list[str]
    text: str


def _installable(text: str) -> Target:
    ref, _, fragment = text.partition("#")
    flake = resolve_flake(ref or ".")
    flake.check()
    return Target(flake=flake, path=split_attr_path(fragment), text=text)


def _missing(target: Target, shown: str) -> SimError:
    return SimError(
        f"flake '{target.flake.url}' does not provide attribute 'packages.{SYSTEM}.{shown}', "
        f"'legacyPackages.{SYSTEM}.{shown}' or '{shown}'"
    )


@dataclass
class Evaluated:
    """The value an installable evaluates to."""

    kind: str  # "string", "list", "system", "image", "attrs"
    value: Any
    attr: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    variant: str = ""


def _image_package(target: Target, path: list[str]) -> Evaluated | None:
    """``packages.<system>.<attr>-image``: the image of nixosConfigurations.<attr>, as flakes
    commonly expose it (``= self.nixosConfigurations.<attr>.config.system.build.images.linode``);
    the variant is the config's ``image_package_variant``, else ``linode``."""
    if len(path) != 3 or path[0] != "packages" or path[1] != SYSTEM:
        return None
    if not path[2].endswith("-image"):
        return None
    attr = path[2][: -len("-image")]
    config = target.flake.config(attr) if attr else None
    if config is None:
        return None
    variant = str(config.get("image_package_variant") or "linode")
    variants = list(config.get("image_variants") or DEFAULT_IMAGE_VARIANTS)
    if variant not in variants:
        raise SimError(f"attribute '{variant}' missing\n       (in packages.{SYSTEM}.{path[2]})")
    return Evaluated(kind="image", value=None, attr=attr, config=config, variant=variant)


def evaluate(target: Target, store: Path) -> Evaluated:
    path = target.path
    shown = ".".join(path)
    if target.flake.dirty():
        _err(f"warning: Git tree '{target.flake.git_root}' is dirty")
    package = _image_package(target, path)
    if package is not None:
        return package
    if not path or path[0] != "nixosConfigurations":
        raise _missing(target, shown or "default")
    attrs = target.flake.attrs()
    if len(path) == 1:
        return Evaluated(kind="attrs", value=attrs)
    attr = path[1]
    config = target.flake.config(attr)
    if config is None:
        raise _missing(target, shown)
    rest = path[2:]
    hostname = str(config.get("hostname") or attr)
    variants = list(config.get("image_variants") or DEFAULT_IMAGE_VARIANTS)
    build = ["config", "system", "build"]
    if rest[:4] == [*build, "toplevel"]:
        tail = rest[4:]
        if not tail:
            return Evaluated(kind="system", value=None, attr=attr, config=config)
        if tail == ["outPath"]:
            return Evaluated(kind="string", value=system_store_path(store, attr, config))
        if tail == ["drvPath"]:
            return Evaluated(kind="string", value=system_drv_path(store, attr, config))
    elif rest[:4] == [*build, "images"]:
        tail = rest[4:]
        if not tail:
            return Evaluated(kind="attrs", value=variants)
        if tail[0] not in variants:
            raise SimError(f"attribute '{tail[0]}' missing")
        if len(tail) == 1:
            return Evaluated(kind="image", value=None, attr=attr, config=config, variant=tail[0])
        if tail[1:] == ["passthru", "filePath"]:
            return Evaluated(kind="string", value=image_file_name(tail[0]))
    elif rest == ["config", "networking", "hostName"]:
        return Evaluated(kind="string", value=hostname)
    elif rest == ["config", "system", "nixos", "label"]:
        return Evaluated(kind="string", value=str(config.get("label") or "25.05"))
    if not rest:
        return Evaluated(kind="attrs", value=["config", "options", "pkgs"])
    raise SimError(f"attribute '{'.'.join(rest)}' missing\n       (in nixosConfigurations.{attr})")


def _nix_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def _print_value(result: Evaluated, args: NixArgs, store: Path) -> None:
    apply = args.value("--apply")
    value: Any = result.value
    if result.kind == "system":
        value = system_store_path(store, result.attr, result.config)
        if not {"--raw", "--json"} & args.flags:
            drv = system_drv_path(store, result.attr, result.config)
            sys.stdout.write(f"«derivation {drv}»\n")
            return
    elif result.kind == "image":
        value = image_store_path(store, result.attr, result.config, result.variant)
    names_only = apply in ("builtins.attrNames", "(builtins.attrNames)", "x: builtins.attrNames x")
    if result.kind == "attrs" and not names_only:
        if "--json" not in args.flags:
            sys.stdout.write("{ " + " ".join(f"{n} = {{ ... }};" for n in value) + " }\n")
            return
        value = {name: {} for name in value}
    if "--raw" in args.flags:
        if not isinstance(value, str):
            raise SimError("cannot coerce a list to a string")
        sys.stdout.write(value)
    elif "--json" in args.flags:
        sys.stdout.write(json.dumps(value) + "\n")
    elif isinstance(value, list):
        sys.stdout.write("[ " + " ".join(_nix_string(str(v)) for v in value) + " ]\n")
    else:
        sys.stdout.write(_nix_string(str(value)) + "\n")
    sys.stdout.flush()


def _build_one(result: Evaluated, store: Path, dry_run: bool) -> str:
    """Build a system or image; prints nix-like progress on stderr. Raises on build_fail."""
    if result.kind == "system":
        out = system_store_path(store, result.attr, result.config)
        drv = system_drv_path(store, result.attr, result.config)
    elif result.kind == "image":
        out = image_store_path(store, result.attr, result.config, result.variant)
        drv = image_drv_path(store, result.attr, result.config, result.variant)
    else:
        raise SimError("expected a derivation")
    failing = bool(result.config.get("build_fail"))
    if Path(out).exists() and not failing:
        return out
    _err("this derivation will be built:" if not dry_run else "this derivation would be built:")
    _err(f"  {drv}")
    if dry_run:
        return out
    _err(f"building '{drv}'...")
    # a build that asks for a credential on its terminal, as git or ssh do when a private flake
    # input needs one: `build_prompt` in the config (tests prove rebuild never answers it)
    if result.config.get("build_prompt"):
        _ask_terminal(str(result.config["build_prompt"]), result.config.get("build_prompt_record"))
    # a slow build, for tests that interrupt or race a deploy: `build_seconds` in the config
    delay = min(float(str(result.config.get("build_seconds") or 0)), 600.0)
    if delay > 0:
        time.sleep(delay)
    if failing:
        raise SimError(
            f"builder for '{drv}' failed with exit code 1;\n"
            "       last 1 log lines:\n"
            f"       > simulated build failure (build_fail is set for {result.attr})\n"
            f"       For full logs, run 'nix log {drv}'."
        )
    if result.kind == "system":
        return build_system(store, result.attr, result.config)
    return build_image(store, result.attr, result.config, result.variant)


def _ask_terminal(prompt: str, record: object) -> None:
    """Print `prompt` on /dev/tty and wait (bounded) for a line, like a credential prompt that
    the environment cannot silence (libgit2 and ssh ignore GIT_TERMINAL_PROMPT). JSON lines go
    to the file `record` (when given): that it asked (with the GIT_TERMINAL_PROMPT it saw), then
    what it read, if anything."""

    def note(**entry: object) -> None:
        if record:
            with Path(str(record)).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    note(asked=prompt, GIT_TERMINAL_PROMPT=os.environ.get("GIT_TERMINAL_PROMPT"))
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError as exc:
        raise SimError(f"could not read {prompt.strip()} {exc.strerror}") from None
    try:
        os.write(tty, prompt.encode())
        ready, _, _ = select.select([tty], [], [], 120)
        answer = os.read(tty, 4096).decode(errors="replace") if ready else ""
    finally:
        os.close(tty)
    note(read=answer)
    if not answer.strip():
        raise SimError(f"could not read {prompt.strip()} no answer")


def _link_result(out: str, link: str) -> None:
    path = Path(link)
    if path.is_symlink() or path.exists():
        if not path.is_symlink():
            raise SimError(f"cannot create symlink '{link}'; already exists")
        path.unlink()
    path.symlink_to(out)


def nix_main(argv: Sequence[str], default_store: str) -> int:
    """``nix`` stand-in: ``eval``, ``build``, ``flake metadata``, ``--version``."""
    store = _store_dir(default_store)
    try:
        args = parse_nix_args(argv)
    except NixUsage as exc:
        _err(f"error: {exc}\nTry 'nix --help' for more information.")
        return 1
    if "--version" in args.flags:
        print("nix (Nix) 2.28.3")
        return 0
    if not args.positional:
        _err("error: no subcommand specified\nTry 'nix --help' for more information.")
        return 1
    command = args.positional[0]
    features = args.features()
    if command not in ("eval", "build", "flake"):
        _err(f"error: '{command}' is not a recognised command")
        _err("Try 'nix --help' for more information.")
        return 1
    for feature in ("nix-command", "flakes"):
        if feature not in features:
            _err(
                f"error: experimental Nix feature '{feature}' is disabled; add "
                f"'--extra-experimental-features {feature}' to enable it"
            )
            return 1
    try:
        if command == "eval":
            if len(args.positional) != 2:
                raise NixUsage("'nix eval' requires exactly one installable")
            _print_value(evaluate(_installable(args.positional[1]), store), args, store)
            return 0
        if command == "build":
            if len(args.positional) < 2:
                raise NixUsage("'nix build' requires at least one installable")
            outs = [
                _build_one(evaluate(_installable(t), store), store, "--dry-run" in args.flags)
                for t in args.positional[1:]
            ]
            if "--dry-run" in args.flags:
                return 0
            if "--no-link" not in args.flags:
                base = args.value("--out-link") or args.value("-o") or "result"
                for n, out in enumerate(outs):
                    _link_result(out, base if n == 0 else f"{base}-{n}")
            if "--print-out-paths" in args.flags:
                for out in outs:
                    print(out)
            return 0
        # flake
        sub = args.positional[1] if len(args.positional) > 1 else ""
        if sub not in ("metadata", "info"):
            raise NixUsage(
                f"'{sub}' is not a recognised command" if sub else "no subcommand specified"
            )
        flake = resolve_flake(args.positional[2] if len(args.positional) > 2 else ".")
        flake.check()
        return _flake_metadata(flake, "--json" in args.flags)
    except NixUsage as exc:
        _err(f"error: {exc}\nTry 'nix --help' for more information.")
        return 1
    except SimError as exc:
        _err(f"error: {exc}")
        return 1


def _flake_metadata(flake: Flake, as_json: bool) -> int:
    info: dict[str, Any] = {
        "url": flake.url,
        "resolvedUrl": flake.url,
        "path": str(flake.directory),
    }
    if flake.git_root is not None:
        rev = subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", str(flake.git_root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        locked: dict[str, Any] = {"type": "git", "url": f"file://{flake.git_root}"}
        if rev and flake.dirty():
            info["dirtyRevision"] = locked["dirtyRev"] = f"{rev}-dirty"
        elif rev:
            info["revision"] = locked["rev"] = rev
        info["locked"] = locked
    if as_json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if not isinstance(value, dict):
                print(f"{key}: {value}")
    return 0


# =========================================================================== nixos-rebuild

ACTIONS = [
    "switch",
    "boot",
    "test",
    "build",
    "edit",
    "repl",
    "dry-build",
    "dry-run",
    "dry-activate",
    "build-image",
    "build-vm",
    "build-vm-with-bootloader",
    "list-generations",
]


def rebuild_parser() -> argparse.ArgumentParser:
    """The argument parser of nixos-rebuild-ng (same flags, same errors: exit 2)."""
    p = argparse.ArgumentParser(
        prog="nixos-rebuild",
        add_help=False,
        allow_abbrev=False,
        description="Reconfigure a NixOS machine",
    )
    p.add_argument("--verbose", "-v", action="count", default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--max-jobs", "-j")
    p.add_argument("--cores")
    p.add_argument("--log-format")
    p.add_argument("--keep-going", "-k", action="store_true")
    p.add_argument("--keep-failed", "-K", action="store_true")
    p.add_argument("--fallback", action="store_true")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--option", nargs=2, action="append")
    p.add_argument("--builders")
    p.add_argument("--include", "-I", action="append")
    p.add_argument("--print-build-logs", "-L", action="store_true")
    p.add_argument("--show-trace", action="store_true")
    p.add_argument("--accept-flake-config", action="store_true")
    p.add_argument("--refresh", action="store_true")
    p.add_argument("--impure", action="store_true")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--no-net", action="store_true")
    p.add_argument("--recreate-lock-file", action="store_true")
    p.add_argument("--no-update-lock-file", action="store_true")
    p.add_argument("--no-write-lock-file", action="store_true")
    p.add_argument("--no-registries", action="store_true")
    p.add_argument("--commit-lock-file", action="store_true")
    p.add_argument("--update-input")
    p.add_argument("--override-input", nargs=2, action="append")
    p.add_argument("--no-build-output", "-Q", action="store_true")
    p.add_argument(
        "--use-substitutes", "--substitute-on-destination", "-s", action="store_true", dest="s"
    )
    p.add_argument("--help", "-h", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--file", "-f")
    p.add_argument("--attr", "-A")
    p.add_argument("--flake", nargs="?", const=True)
    p.add_argument("--no-flake", dest="flake", action="store_false")
    p.add_argument("--install-bootloader", action="store_true")
    p.add_argument("--install-grub", action="store_true")
    p.add_argument("--profile-name", "-p", default="system")
    p.add_argument("--specialisation", "-c")
    p.add_argument("--rollback", action="store_true")
    p.add_argument("--upgrade", action="store_true")
    p.add_argument("--upgrade-all", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ask-sudo-password", action="store_true")
    p.add_argument("--sudo", action="store_true")
    p.add_argument("--use-remote-sudo", action="store_true")
    p.add_argument("--no-ssh-tty", action="store_true")
    p.add_argument("--no-reexec", action="store_true")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--build-host")
    p.add_argument("--target-host")
    p.add_argument("--no-build-nix", action="store_true")
    p.add_argument("--image-variant")
    p.add_argument("action", choices=ACTIONS, nargs="?")
    return p


@dataclass(frozen=True)
class Raw:
    """A remote shell word passed unquoted (like nixos-rebuild-ng's _RawShellArg)."""

    text: str


class RebuildFailed(Exception):
    """Ends nixos-rebuild with exit 1 after printing ``message``."""


class Remote:
    """Runs commands on a target host the way nixos-rebuild-ng's run_wrapper does."""

    def __init__(self, host: str, verbose: bool, sudo_password: str | None = None) -> None:
        self.host = host
        self.opts = shlex.split(os.environ.get("NIX_SSHOPTS", ""))
        self.verbose = verbose
        self.sudo_password = sudo_password  # --ask-sudo-password: fed to `sudo --stdin`

    def argv(
        self, args: Sequence[str | Raw], sudo: bool, extra_env: dict[str, str] | None = None
    ) -> list[str]:
        cmd: list[str | Raw] = ["env", "-i", Raw("PATH=${PATH-}")]
        cmd += [f"{k}={v}" for k, v in (extra_env or {}).items()]
        cmd += list(args)
        if sudo:
            sudo_opts = shlex.split(os.environ.get("NIX_SUDOOPTS", ""))
            if self.sudo_password:
                cmd = ["sudo", "--prompt=", "--stdin", *sudo_opts, *cmd]
            else:
                cmd = ["sudo", *sudo_opts, *cmd]
        words = [a.text if isinstance(a, Raw) else shlex.quote(a) for a in cmd]
        return ["ssh", *self.opts, self.host, "--", *words]

    def run(
        self,
        args: Sequence[str | Raw],
        *,
        sudo: bool = False,
        extra_env: dict[str, str] | None = None,
        capture: bool = False,
        stdin_text: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(args, sudo, extra_env)
        if sudo and self.sudo_password:
            stdin_text = self.sudo_password + "\n"  # never in an argv or the environment
        if self.verbose:
            shown = [a.text if isinstance(a, Raw) else a for a in args]
            _err(f"calling run with args={shown!r}, remote={self.host!r}, sudo={sudo}")
        try:
            result = subprocess.run(
                argv,
                input=stdin_text,
                stdout=subprocess.PIPE if capture else None,
                stdin=None if stdin_text is not None else subprocess.DEVNULL,
                text=True,
                timeout=REMOTE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RebuildFailed(
                f"Command '{argv}' timed out after {REMOTE_TIMEOUT} seconds"
            ) from exc
        if check and result.returncode != 0:
            raise RebuildFailed(str(subprocess.CalledProcessError(result.returncode, argv)))
        return result

    def copy_closure(self, path: str) -> None:
        """nix-copy-closure --to HOST PATH (ssh ... nix-store --serve --write)."""
        _err("copying 1 paths...")
        _err(f"copying path '{path}' to 'ssh://{self.host}'...")
        argv = ["ssh", *self.opts, "-x", "-a", self.host, "nix-store", "--serve", "--write"]
        if self.verbose:
            _err(f"calling run with args={['nix-copy-closure', '--to', self.host, path]!r}")
        try:
            result = subprocess.run(
                argv,
                input=path + "\n",
                capture_output=True,
                text=True,
                timeout=REMOTE_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RebuildFailed(f"Command '{argv}' timed out") from exc
        if result.stderr:
            sys.stderr.write(result.stderr)
        if result.returncode == 255:
            _err(
                f"error: cannot open connection to remote store 'ssh://{self.host}': "
                f"error: failed to start SSH connection to '{self.host}'"
            )
        elif result.returncode != 0 or f"valid {path}" not in result.stdout.splitlines():
            _err(f"error: copying path '{path}' to 'ssh://{self.host}' failed")
        else:
            return
        raise RebuildFailed(
            str(subprocess.CalledProcessError(1, ["nix-copy-closure", "--to", self.host, path]))
        )


def _parse_flake_arg(value: str | bool | None, target: Remote | None) -> tuple[str, str] | None:
    if value is None or value is False:
        return None
    if value is True:
        raise RebuildFailed(
            "error: --flake without a value (/etc/nixos) is not simulated by the test bed"
        )
    ref, sep, attr = str(value).partition("#")
    if not sep or not attr:
        if target is not None:
            out = target.run(["hostname"], capture=True)
            attr = out.stdout.strip()
        else:
            attr = os.uname().nodename
    return ref or ".", attr


def nixos_rebuild_main(argv: Sequence[str], default_store: str) -> int:
    """``nixos-rebuild`` stand-in (see the module docstring)."""
    parser = rebuild_parser()
    args = parser.parse_args(list(argv))
    if args.help or args.action is None:
        parser.print_help()
        return 0

    def warn(msg: str) -> None:
        _err(f"{parser.prog}: warning: {msg}")

    if args.action == "dry-run":
        args.action = "dry-build"
    if args.ask_sudo_password:
        args.sudo = True
    if args.use_remote_sudo:
        warn("--use-remote-sudo deprecated, use --sudo instead")
        args.sudo = True
    if args.no_ssh_tty:
        warn("--no-ssh-tty deprecated, SSH's TTY is never used anymore")
    if (args.target_host or args.build_host) and args.action not in (
        "switch",
        "boot",
        "test",
        "build",
        "dry-build",
        "dry-activate",
    ):
        parser.error(f"--target-host/--build-host is not supported with '{args.action}'")
    if args.flake and (args.file or args.attr):
        parser.error("--flake cannot be used with --file or --attr")
    if args.action == "build-image" and not args.image_variant:
        parser.error("--image-variant is required with 'build-image'")
    try:
        return _execute(args, _store_dir(default_store))
    except RebuildFailed as exc:
        _err(str(exc))
        return 1
    except SimError as exc:
        _err(f"error: {exc}")
        return 1


def _fail_nix(exc: SimError, cmd: list[str]) -> NoReturn:
    _err(f"error: {exc}")
    raise RebuildFailed(str(subprocess.CalledProcessError(1, cmd)))


def _execute(args: argparse.Namespace, store: Path) -> int:
    action: str = args.action
    verbose = bool(args.verbose)
    if action in ("edit", "repl", "build-vm", "build-vm-with-bootloader", "list-generations"):
        raise RebuildFailed(
            f"error: nixos-rebuild {action} is not simulated by the rebuild test bed"
        )
    password = None
    if args.ask_sudo_password and args.target_host:
        # like nixos-rebuild-ng: asked once, on the terminal (getpass uses /dev/tty)
        try:
            password = getpass.getpass(f"[sudo] password for {args.target_host}: ")
        except EOFError:
            raise RebuildFailed("") from None
    target = Remote(args.target_host, verbose, password) if args.target_host else None
    build_host = Remote(args.build_host, verbose) if args.build_host else None
    if action in ("switch", "boot", "test", "dry-activate") and target is None:
        raise RebuildFailed(
            "error: the rebuild test bed cannot activate the local machine; use --target-host"
        )
    profile = (
        PROFILE
        if args.profile_name == "system"
        else (f"/nix/var/nix/profiles/system-profiles/{args.profile_name}")
    )
    if args.rollback:
        if action not in ("switch", "boot", "test", "build"):
            raise RebuildFailed(f"--rollback is incompatible with '{action}'")
        if target is None:
            raise RebuildFailed("error: the rebuild test bed only rolls back a --target-host")
        _err("building the system configuration...")
        if action in ("switch", "boot"):
            target.run(["nix-env", "--rollback", "-p", profile], sudo=args.sudo)
            path = profile
        else:
            listing = target.run(
                ["nix-env", "-p", profile, "--list-generations"], sudo=args.sudo, capture=True
            ).stdout
            previous = None
            for line in listing.splitlines():
                parts = line.split()
                if parts and "(current)" not in parts:
                    previous = parts[0]
            if previous is None:
                raise RebuildFailed("could not find previous generation")
            path = f"{profile}-{previous}-link"
        if action in ("switch", "boot", "test"):
            _switch(target, path, action, args)
        return 0

    flake = _parse_flake_arg(args.flake, target)
    if flake is None:
        raise RebuildFailed(
            "error: the rebuild test bed only simulates flake builds; pass --flake REF#ATTR"
        )
    ref, attr = flake
    if action == "build-image":
        return _build_image(ref, attr, args.image_variant, store)
    _err("building the system configuration...")
    installable = f'{ref}#nixosConfigurations."{attr}".config.system.build.toplevel'
    nix_cmd = ["nix", *FLAKE_FLAGS, "build", "--print-out-paths", installable]
    try:
        result = evaluate(_installable(installable), store)
        out = _build_one(result, store, dry_run=action == "dry-build")
    except SimError as exc:
        _fail_nix(exc, nix_cmd)
    if action == "dry-build":
        return 0
    if action not in ("switch", "boot"):
        _link_result(out, "result")
    if build_host is not None and build_host.host not in ("localhost", "127.0.0.1"):
        build_host.copy_closure(out)
    if target is None:
        return 0
    target.copy_closure(out)
    if action in ("switch", "boot"):
        check = target.run(["test", "-f", f"{out}/nixos-version"], check=False)
        if check.returncode != 0:
            raise RebuildFailed(
                "your NixOS configuration path seems to be missing essential files.\n"
                f"This is the evaluated NixOS configuration path: {out}."
            )
        target.run(["nix-env", "-p", profile, "--set", out], sudo=args.sudo)
    if action in ("switch", "boot", "test", "dry-activate"):
        _switch(target, out, action, args)
    return 0


def _switch(target: Remote, path: str, action: str, args: argparse.Namespace) -> None:
    result = target.run(
        [*SWITCH_PREFIX, f"{path}/bin/switch-to-configuration", action],
        sudo=args.sudo,
        extra_env={"NIXOS_INSTALL_BOOTLOADER": "1" if args.install_bootloader else "0"},
        check=False,
    )
    if result.returncode == 4:
        raise RebuildFailed("warning: error(s) occurred while switching to the new configuration")
    if result.returncode != 0:
        argv = target.argv(
            [*SWITCH_PREFIX, f"{path}/bin/switch-to-configuration", action],
            args.sudo,
            {"NIXOS_INSTALL_BOOTLOADER": "1" if args.install_bootloader else "0"},
        )
        raise RebuildFailed(str(subprocess.CalledProcessError(result.returncode, argv)))


def _build_image(ref: str, attr: str, variant: str, store: Path) -> int:
    images = f'{ref}#nixosConfigurations."{attr}".config.system.build.images'
    try:
        variants = evaluate(_installable(images), store).value
        if variant not in variants:
            raise RebuildFailed(
                f"error: Image variant '{variant}' is not one of the available image variants: "
                + ", ".join(variants)
            )
        _err(f"Building image variant '{variant}'...")
        result = evaluate(_installable(f"{images}.{variant}"), store)
        out = _build_one(result, store, dry_run=False)
    except SimError as exc:
        _fail_nix(exc, ["nix", *FLAKE_FLAGS, "build", "--print-out-paths", f"{images}.{variant}"])
    _link_result(out, "result")
    print(f"Done. The disk image can be found in {out}/{image_file_name(variant)}")
    return 0
