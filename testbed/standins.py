"""Operator-side stand-ins for ``nix`` and ``nixos-rebuild`` (NixOS cannot run here).

They evaluate the test bed's simulated flakes (``hosts/<attr>.json`` in a git repository),
"build" store paths into the test bed's store (``$NIX_STORE_DIR``) and reach target hosts only
through the real ``ssh`` client with ``shlex.split($NIX_SSHOPTS)`` before the destination, the
way nixos-rebuild-ng does. Messages and exit codes follow the real tools.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import secrets
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.procs import run_unpiped
from testbed.store import (
    DEFAULT_IMAGE_VARIANTS,
    Flake,
    SimError,
    build_image,
    build_system,
    canonical_json,
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
    "--substitute-on-destination",
    "-s",
    "--no-check-sigs",
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
    "--to",
    "--from",
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


def _installable(text: str, flake: Flake | None = None) -> Target:
    """``text`` resolved; with ``flake``, on that flake as this command already fetched it."""
    ref, _, fragment = text.partition("#")
    if flake is None:
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


def _locked_input(ref: str) -> str:
    """What an --override-input reference locks to: a path (relative to the working folder, as
    Nix resolves it) must exist; anything else is kept as written."""
    raw = ref.removeprefix("path:").removeprefix("git+file://")
    if raw.startswith(("/", ".")):
        folder = (Path.cwd() / raw).resolve()
        if not folder.is_dir():
            raise SimError(f"path '{folder}' does not exist")
        return f"path:{folder}"
    return ref


def with_overrides(config: dict[str, Any], overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``--override-input NAME REF``: a host configuration's ``inputs`` (a test bed field) names
    the flake inputs it is built from, so overriding one changes what it evaluates to (the
    locked reference joins the configuration, and with it the store path). An override that
    matches no input only warns, as Nix does."""
    declared = config.get("inputs") or []
    applied: dict[str, str] = {}
    for name, ref in overrides:
        if name not in declared:
            _err(f"warning: the flag '--override-input {name} {ref}' does not match any input")
            continue
        applied[name] = _locked_input(ref)
    return {**config, "input_overrides": applied} if applied else config


def write_drv(store: Path, drv: str, out: str, attr: str, config: dict[str, Any]) -> None:
    """Instantiate a derivation in the store, as evaluating ``drvPath`` does: the test bed's
    derivation is JSON naming its out path (and whether its build fails), what a build host's
    ``nix build DRV^*`` / ``nix-store -r DRV`` reads (:mod:`testbed.sim.nix_cmd`)."""
    path = Path(drv)
    if path.exists():
        return
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".tmp-drv-{os.getpid()}-{secrets.token_hex(4)}"
    data = {"out": out, "attr": attr, "fail": bool(config.get("build_fail"))}
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    tmp.chmod(0o444)
    tmp.replace(path)


def evaluate(target: Target, store: Path, overrides: Sequence[tuple[str, str]] = ()) -> Evaluated:
    path = target.path
    shown = ".".join(path)
    if target.flake.dirty():
        _err(f"warning: Git tree '{target.flake.git_root}' is dirty")
    package = _image_package(target, path)
    if package is not None:
        package.config = with_overrides(package.config, overrides)
        return package
    if not path or path[0] != "nixosConfigurations":
        raise _missing(target, shown or "default")
    attrs = target.flake.attrs()
    if len(path) == 1:
        return Evaluated(kind="attrs", value=attrs)
    attr = path[1]
    found = target.flake.config(attr)
    if found is None:
        raise _missing(target, shown)
    config = with_overrides(found, overrides)
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
            drv = system_drv_path(store, attr, config)
            write_drv(store, drv, system_store_path(store, attr, config), attr, config)
            return Evaluated(kind="string", value=drv)
    elif rest[:4] == [*build, "nixos-rebuild"] and len(rest) == 4:
        # the configuration's own nixos-rebuild (what re-exec builds): its flavour is the
        # test bed field `nixos_rebuild_flavour` of the host's configuration (default ng)
        return Evaluated(kind="package", value=None, attr=attr, config=config)
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


# `nix eval --json FLAKE#nixosConfigurations --apply 'cs: map (n: cs.${n}.config.system.build.
# toplevel.outPath) [ "a" "b" ]'`: several hosts' systems in one evaluator (what `invoke status`
# asks). The stand-in reads this one expression shape (Nix string literals in the list); any other
# --apply on a set is handled as before (builtins.attrNames).
_SYSTEMS_APPLY = re.compile(
    r"cs: map \(n: cs\.\$\{n\}\.config\.system\.build\.toplevel\.outPath\) "
    r'\[((?: "(?:[^"\\$]|\\.|\$(?!\{))*")*) \]'
)
_NIX_STRING = re.compile(r'"((?:[^"\\$]|\\.|\$(?!\{))*)"')


def _systems_applied(args: NixArgs) -> list[str] | None:
    """The attribute names of rebuild's many-systems --apply, or None for any other."""
    match = _SYSTEMS_APPLY.fullmatch(args.value("--apply") or "")
    if match is None:
        return None
    return [re.sub(r"\\(.)", r"\1", m) for m in _NIX_STRING.findall(match.group(1))]


def _eval_systems(args: NixArgs, names: list[str], store: Path,
                  overrides: Sequence[tuple[str, str]]) -> None:  # fmt: skip
    """Each name's toplevel.outPath, in order (a full evaluation each, in one process); a missing
    name fails the whole command as `cs.${n}` does in Nix."""
    installable = args.positional[1]
    base, _, fragment = installable.partition("#")
    if split_attr_path(fragment) != ["nixosConfigurations"]:
        raise SimError("the test bed evaluates this --apply only on FLAKE#nixosConfigurations")
    flake = _installable(installable).flake  # fetched once for every name, as Nix does
    paths = []
    for name in names:
        if flake.config(name) is None:
            raise SimError(f"attribute '{name}' missing\n       at «string»:1:13:")
        attr = f"{base}#nixosConfigurations.{name}.config.system.build.toplevel.outPath"
        paths.append(counted_evaluate("nix", "eval", attr, store, overrides, flake=flake).value)
    if "--json" in args.flags:
        sys.stdout.write(json.dumps(paths) + "\n")
    else:
        sys.stdout.write("[ " + " ".join(_nix_string(str(v)) for v in paths) + " ]\n")
    sys.stdout.flush()


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
    elif result.kind == "package":
        value = rebuild_package_path(store, package_flavour(result.config))
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
    if result.kind == "package":
        return rebuild_package(store, package_flavour(result.config))
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


def _drv_of(result: Evaluated, store: Path) -> str:
    """The derivation of a system or image, instantiated as evaluating it does."""
    if result.kind == "image":
        drv = image_drv_path(store, result.attr, result.config, result.variant)
        out = image_store_path(store, result.attr, result.config, result.variant)
    elif result.kind == "system":
        drv = system_drv_path(store, result.attr, result.config)
        out = system_store_path(store, result.attr, result.config)
    else:
        raise SimError("expected a derivation")
    write_drv(store, drv, out, result.attr, result.config)
    return drv


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
    """``nix`` stand-in: ``eval``, ``build``, ``copy --to ssh://``, ``flake metadata``,
    ``--version``."""
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
    if command not in ("eval", "build", "flake", "copy"):
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
        overrides = [(a, b) for flag, a, b in args.pairs if flag == "--override-input"]
        if command in ("eval", "build"):
            note_event(tool="nix", event=command, argv=list(argv))
        if command == "eval":
            if len(args.positional) != 2:
                raise NixUsage("'nix eval' requires exactly one installable")
            systems = _systems_applied(args)
            if systems is not None:
                _eval_systems(args, systems, store, overrides)
                return 0
            result = counted_evaluate("nix", "eval", args.positional[1], store, overrides)
            _print_value(result, args, store)
            return 0
        if command == "build":
            if len(args.positional) < 2:
                raise NixUsage("'nix build' requires at least one installable")
            results = [counted_evaluate("nix", "build", t, store, overrides)
                       for t in args.positional[1:]]  # fmt: skip
            outs = [_build_one(r, store, "--dry-run" in args.flags) for r in results]
            if "--dry-run" in args.flags:
                if "--json" in args.flags:  # src/nix/build.cc: the derived paths, with the
                    # out paths of input-addressed derivations (src/libstore/derived-path.cc)
                    print(json.dumps([{"drvPath": _drv_of(r, store), "outputs": {"out": out}}
                                      for r, out in zip(results, outs, strict=True)]))  # fmt: skip
                return 0
            if "--no-link" not in args.flags:
                base = args.value("--out-link") or args.value("-o") or "result"
                for n, out in enumerate(outs):
                    _link_result(out, base if n == 0 else f"{base}-{n}")
            if "--print-out-paths" in args.flags:
                for out in outs:
                    print(out)
            return 0
        if command == "copy":
            return _copy(args, store)
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


def _copy(args: NixArgs, store: Path) -> int:
    """``nix copy --to ssh://[USER@]HOST PATH...``: Nix's legacy SSH store (src/libstore/
    legacy-ssh-store.cc) runs ``nix-store --serve --write`` over ``ssh HOST -x $NIX_SSHOPTS``
    with no master of its own ("Use SSH master only if using more than 1 connection", and
    max-connections is 1), so the caller's ssh options alone decide whether a shared
    connection is used; it sends the closure; on failure: "error: cannot open connection to
    remote store ..."."""
    to = args.value("--to")
    if not to:
        raise NixUsage("'nix copy' needs --to or --from")
    if not to.startswith("ssh://"):
        raise SimError(f"the test bed copies only to ssh:// stores, not '{to}'")
    paths = args.positional[1:]
    if not paths:
        raise NixUsage("'nix copy' requires at least one installable")
    host = to.removeprefix("ssh://")
    opts = split_sshopts(os.environ.get("NIX_SSHOPTS", ""), "shell")  # Nix 2.26+ (PR 12020)
    for path in paths:
        if not Path(path).exists():
            raise SimError(f"path '{path}' is not valid")
    try:
        ssh_store(host, opts, paths, write=True)
    except SimError as exc:
        _err(f"error: {exc}")
        return 1
    return 0


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
#
# Two flavours, each imitating one program: `ng` here (nixos-rebuild-ng, nixpkgs
# pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/: __init__.py, services.py, nix.py,
# process.py) and `classic` in testbed.rebuild_classic (pkgs/by-name/ni/nixos-rebuild/
# nixos-rebuild.sh). testbed/README.md lists every behaviour they rely on with its source.

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
FLAVOURS = ("ng", "classic")
PACKAGE_VERSION = {"ng": "nixos-rebuild-ng-25.11", "classic": "nixos-rebuild-24.11"}
FLAVOUR_FIELD = "nixos_rebuild_flavour"  # in a host's configuration: its own nixos-rebuild
REEXEC_ENV = "_NIXOS_REBUILD_REEXEC"
NIXOS_REBUILD_ATTR = "config.system.build.nixos-rebuild"
EVENTS_FILE = "standins.jsonl"  # in $RBTB_ROOT: what the stand-ins ran, one JSON line each
# ng's switch prefix (nix.py SWITCH_TO_CONFIGURATION_CMD_PREFIX: no --wait, --pipe waits)
NG_SWITCH_PREFIX = [a for a in SWITCH_PREFIX if a != "--wait"]


def note_event(**entry: Any) -> None:
    """Append what a stand-in did to ``$RBTB_ROOT/standins.jsonl`` (tests count evaluations,
    builds, re-execs and every ssh with its argv); nothing without RBTB_ROOT."""
    root = os.environ.get("RBTB_ROOT")
    if not root:
        return
    entry.setdefault("pid", os.getpid())
    with contextlib.suppress(OSError), Path(root, EVENTS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


# --- evaluations and Nix's flake evaluation cache ------------------------------------------
#
# Every full evaluation (of a NixOS configuration: an attribute below nixosConfigurations.NAME,
# or an image package) is a JSON line in $RBTB_ROOT/evaluations.jsonl: program (nix,
# nixos-rebuild-ng, nixos-rebuild-classic), command (eval, build), flake (its URL and locked
# revision), attr, cached. The cache is Nix's (NixOS/nix src/libexpr/eval-cache.cc, keyed by
# the locked flake's fingerprint, so only for a clean git tree, and by attribute path):
# - `nix build X` looks up what src/libcmd/installable-flake.cc `toDerivedPaths` reads of X
#   (type, drvPath, outputSpecified, meta): a second `nix build X` of the same locked flake
#   (`nixos-rebuild`'s build after rebuild's own) is answered from the cache, `cached: true`,
#   and is not an evaluation;
# - `nix eval X` is always a full evaluation (src/nix/eval.cc: `toValue` calls `forceValue`,
#   which never reads the cache) and caches only X's own string, which no build reads: after
#   `nix eval ...toplevel.outPath`, a `nix build ...toplevel` evaluates again.
EVALUATIONS_FILE = "evaluations.jsonl"
EVAL_CACHE_FILE = "eval-cache.jsonl"


def _fingerprint(flake: Flake, overrides: Sequence[tuple[str, str]]) -> str | None:
    """The locked flake's fingerprint, or None when Nix would not cache (a dirty tree, a
    flake that is not a git repository)."""
    if flake.git_root is None:
        return None
    if flake.rev is not None:
        rev = flake.rev
    else:
        if flake.dirty():
            return None
        try:
            rev = flake._git("rev-parse", "HEAD").strip()
        except SimError:
            return None
    return canonical_json([str(flake.directory), rev, sorted(overrides)])


def _flake_cache(root: str) -> set[str]:
    try:
        lines = Path(root, EVAL_CACHE_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return set(lines)


def counted_evaluate(program: str, command: str, installable: str, store: Path,
                     overrides: Sequence[tuple[str, str]] = (), *, shown: str | None = None,
                     flake: Flake | None = None) -> Evaluated:  # fmt: skip
    """:func:`evaluate` as the ``nix COMMAND`` of ``program`` does it, noting a full
    evaluation (or the cache hit that spared it) in ``$RBTB_ROOT/evaluations.jsonl``.
    ``shown``: the installable as the command line names it, when it is not the one
    evaluated here (``nix eval X.drvPath``); ``flake``: the installable's flake as this
    command already fetched it."""
    target = _installable(installable, flake)
    path = split_attr_path((shown or installable).partition("#")[2])
    full = (len(path) > 2 and path[0] == "nixosConfigurations") or (
        len(path) == 3 and path[0] == "packages" and path[2].endswith("-image")
    )
    root = os.environ.get("RBTB_ROOT")
    if not full or not root:
        return evaluate(target, store, overrides)
    fingerprint = _fingerprint(target.flake, overrides)
    key = canonical_json([fingerprint, path]) if fingerprint is not None else None
    cached = command == "build" and key is not None and key in _flake_cache(root)
    entry: dict[str, Any] = {
        "program": program, "command": command, "flake": target.flake.url,
        "rev": json.loads(fingerprint)[1] if fingerprint else None,
        "dirty": fingerprint is None and target.flake.git_root is not None,
        "attr": ".".join(path), "cached": cached, "pid": os.getpid(),
    }  # fmt: skip
    try:
        result = evaluate(target, store, overrides)
    except SimError as exc:
        entry["error"] = str(exc).splitlines()[0]
        raise
    finally:
        with contextlib.suppress(OSError), Path(root, EVALUATIONS_FILE).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
    if command == "build" and key is not None and not cached:
        with contextlib.suppress(OSError), Path(root, EVAL_CACHE_FILE).open("a") as fh:
            fh.write(key + "\n")
    return result


def package_flavour(config: dict[str, Any]) -> str:
    flavour = str(config.get(FLAVOUR_FIELD) or "ng")
    if flavour not in FLAVOURS:
        raise SimError(f"{FLAVOUR_FIELD} must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
    return flavour


def rebuild_package_path(store: Path, flavour: str) -> str:
    from testbed.store import _hash32

    name = PACKAGE_VERSION[flavour]
    return f"{store}/{_hash32('nixos-rebuild', name)}-{name}"


def rebuild_package(store: Path, flavour: str) -> str:
    """``config.system.build.nixos-rebuild``: a store path whose ``bin/nixos-rebuild`` is the
    stand-in of that flavour (what a re-exec runs)."""
    from testbed.store import _install, script_header

    out = Path(rebuild_package_path(store, flavour))

    def fill(tmp: Path) -> None:
        (tmp / "bin").mkdir()
        script = tmp / "bin" / "nixos-rebuild"
        script.write_text(
            script_header(sys.executable)
            + "from testbed.standins import nixos_rebuild_main\n"
            + f"sys.exit(nixos_rebuild_main(sys.argv[1:], default_store={str(store)!r}, "
            + f"flavour={flavour!r}, program=__file__))\n",
            encoding="utf-8",
        )
        script.chmod(0o755)

    _install(store, out, fill)
    return str(out)


class CommandFailed(Exception):
    """A command of the run exited non-zero (subprocess.CalledProcessError as ng reports it)."""

    def __init__(self, returncode: int, argv: Sequence[str]) -> None:
        super().__init__(returncode, list(argv))
        self.returncode = returncode
        self.argv = list(argv)

    def __str__(self) -> str:
        shown = shlex.join(str(a) for a in self.argv)
        return str(subprocess.CalledProcessError(self.returncode, shown))


class RebuildFailed(Exception):
    """Ends nixos-rebuild with exit 1 after printing ``message`` (ng: ``sys.exit(str(ex))``)."""


def split_sshopts(text: str, how: str) -> list[str]:
    """NIX_SSHOPTS as each reader splits it: ``shell`` (nixos-rebuild-ng's shlex.split, Nix
    2.26+'s shellSplitString, nix PR 12020) or ``words`` (bash's unquoted ``$SSHOPTS`` in
    classic nixos-rebuild, Nix before 2.26: whitespace only, quotes kept)."""
    return shlex.split(text) if how == "shell" else text.split()


def run_ssh(
    argv: list[str],
    *,
    input_text: str | None = None,
    capture: bool = False,
    inherit_stdin: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run one real ssh (noted in the events log with its whole argv)."""
    note_event(event="ssh", argv=argv)
    try:
        if capture or input_text is not None:
            return subprocess.run(
                argv,
                input=input_text,
                stdout=subprocess.PIPE if capture else None,
                stdin=None if input_text is not None or inherit_stdin else subprocess.DEVNULL,
                text=True,
                timeout=REMOTE_TIMEOUT,
                check=False,
            )
        # nixos-rebuild waits for this ssh with no timeout, a blocking wait (ng/process.py
        # `run_wrapper`: `subprocess.run(final_args, check=check, ...)`); the test bed bounds
        # it, without subprocess.run's 50 ms polls
        stdin = None if inherit_stdin else subprocess.DEVNULL
        code = run_unpiped(argv, timeout=REMOTE_TIMEOUT, stdin=stdin)
        return subprocess.CompletedProcess(argv, code)
    except subprocess.TimeoutExpired as exc:
        raise RebuildFailed(f"Command '{argv}' timed out after {REMOTE_TIMEOUT} seconds") from exc


def ssh_store(host: str, opts: list[str], paths: Sequence[str], *, write: bool) -> None:
    """Nix's legacy ssh store (``nix-copy-closure``, ``nix copy ssh://``; nix
    src/libstore/legacy-ssh-store.cc, ssh.cc): ``ssh HOST -x $NIX_SSHOPTS -- nix-store --serve
    [--write]``; here the test bed's line protocol of the host's nix-store shim."""
    argv = ["ssh", host, "-x", *opts, "--", "nix-store", "--serve", *(["--write"] if write else [])]
    for path in paths:
        _err(f"copying path '{path}' {'to' if write else 'from'} 'ssh://{host}'...")
    result = run_ssh(argv, input_text="".join(p + "\n" for p in paths), capture=True)
    if result.returncode == 255:
        raise SimError(
            f"cannot open connection to remote store 'ssh://{host}': "
            f"error: failed to start SSH connection to '{host}'"
        )
    missing = [p for p in paths if f"valid {p}" not in result.stdout.splitlines()]
    if result.returncode != 0 or missing:
        raise SimError(f"path '{(missing or list(paths))[0]}' is not valid on 'ssh://{host}'")


@dataclass(frozen=True)
class Raw:
    """A remote shell word passed unquoted."""

    text: str


SSH_CONTROL: dict[str, Path] = {}  # the run's folder for ssh control sockets (ng: tmpdir.py)


def control_dir() -> Path:
    """nixos-rebuild-ng's temporary folder (tmpdir.py, ``nixos-rebuild.`` prefix), removed with
    its ssh masters at exit (process.py ``cleanup_ssh``: ``ssh -o ControlPath=... -O exit``)."""
    if "dir" not in SSH_CONTROL:
        import atexit
        import tempfile

        SSH_CONTROL["dir"] = Path(tempfile.mkdtemp(prefix="nixos-rebuild."))
        atexit.register(cleanup_control)
    return SSH_CONTROL["dir"]


def cleanup_control() -> None:
    folder = SSH_CONTROL.pop("dir", None)
    if folder is None:
        return
    for socket_path in folder.glob("ssh-*"):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "dummyhost"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def ssh_default_opts() -> list[str]:
    """process.py SSH_DEFAULT_OPTS."""
    path = control_dir() / "ssh-%n"
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={path}", "-o", "ControlPersist=60"]


class Remote:
    """A host nixos-rebuild-ng reaches (process.py ``Remote`` and ``run_wrapper``)."""

    def __init__(self, host: str, verbose: bool, sudo_password: str | None = None) -> None:
        self.host = host
        self.opts = split_sshopts(os.environ.get("NIX_SSHOPTS", ""), "shell")
        self.verbose = verbose
        self.sudo_password = sudo_password  # --ask-sudo-password: fed to `sudo --stdin`

    @classmethod
    def from_arg(cls, host: str | None, ask_sudo_password: bool | None, verbose: bool,
                 validate_opts: bool = True) -> Remote | None:  # fmt: skip
        if not host:
            return None
        remote = cls(host, verbose)
        if validate_opts:
            for o in remote.opts:
                if o in ("-t", "-tt", "RequestTTY=yes", "RequestTTY=force"):
                    _err(
                        f"detected option '{o}' in NIX_SSHOPTS. SSH's TTY may cause issues, it "
                        "is recommended to remove this option"
                    )
        if ask_sudo_password:
            try:
                remote.sudo_password = getpass.getpass(f"[sudo] password for {host}: ")
            except EOFError:
                raise RebuildFailed("") from None
        return remote

    def argv(
        self, args: Sequence[str | Raw], sudo: bool, extra_env: dict[str, str] | None = None
    ) -> list[str]:
        cmd: list[str | Raw] = list(args)
        if extra_env:
            cmd = ["env", *(f"{k}={v}" for k, v in extra_env.items()), *cmd]
        if sudo:
            cmd = ["sudo", *(["--prompt=", "--stdin"] if self.sudo_password else []), *cmd]
        words = [a.text if isinstance(a, Raw) else shlex.quote(a) for a in cmd]
        return ["ssh", *self.opts, *ssh_default_opts(), self.host, "--", *words]

    def run(
        self,
        args: Sequence[str | Raw],
        *,
        sudo: bool = False,
        extra_env: dict[str, str] | None = None,
        capture: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(args, sudo, extra_env)
        stdin_text = self.sudo_password + "\n" if sudo and self.sudo_password else None
        if self.verbose:
            shown = [a.text if isinstance(a, Raw) else a for a in args]
            _err(f"calling run with args={shown!r}, remote={self.host!r}, sudo={sudo}")
        result = run_ssh(argv, input_text=stdin_text, capture=capture)
        if check and result.returncode != 0:
            if sudo and self.sudo_password is None:
                _err(
                    "while running command with remote sudo, did you forget to use "
                    "--ask-sudo-password?"
                )
            raise CommandFailed(result.returncode, argv)
        return result

    def copy_closure(self, path: str) -> None:
        """``nix-copy-closure --to HOST PATH``: NIX_SSHOPTS is SSH_DEFAULT_OPTS and the caller's
        (nix.py ``copy_closure``), split by Nix 2.28 like a shell."""
        try:
            ssh_store(self.host, [*ssh_default_opts(), *self.opts], [path], write=True)
        except SimError as exc:
            _err(f"error: {exc}")
            raise RebuildFailed(
                str(CommandFailed(1, ["nix-copy-closure", "--to", self.host, path]))
            ) from None


def _flake_arg(value: str | bool | None, target: Remote | None) -> tuple[str, str] | None:
    if value is None or value is False:
        return None
    if value is True:
        raise RebuildFailed("--flake without a value (/etc/nixos) is not simulated by the test bed")
    ref, sep, attr = str(value).partition("#")
    if not sep or not attr:
        if target is not None:
            attr = target.run(["uname", "-n"], capture=True).stdout.strip()
        else:
            attr = os.uname().nodename
    return ref or ".", attr


def flake_installable(ref: str, attr: str, *rest: str) -> str:
    """models.py Flake.to_attr: ``REF#nixosConfigurations."ATTR".REST``."""
    return ".".join([f'{ref}#nixosConfigurations."{attr}"', *rest])


def nixos_rebuild_main(
    argv: Sequence[str], default_store: str, flavour: str = "ng", program: str | None = None
) -> int:
    """``nixos-rebuild`` stand-in of a flavour, ``ng`` or ``classic``."""
    store = _store_dir(default_store)
    program = program or sys.argv[0]
    note_event(event="start", tool="nixos-rebuild", flavour=flavour, program=program,
               argv=list(argv), reexec=bool(os.environ.get(REEXEC_ENV)))  # fmt: skip
    if flavour == "classic":
        from testbed.rebuild_classic import classic_main

        return classic_main(list(argv), store, program)
    return ng_main(list(argv), store, program)


def rebuild_parser() -> argparse.ArgumentParser:
    """The argument parser of nixos-rebuild-ng (__init__.py get_parser: same flags, same
    errors, exit 2)."""
    p = argparse.ArgumentParser(
        prog="nixos-rebuild",
        add_help=False,
        allow_abbrev=False,
        description="Reconfigure a NixOS machine",
    )
    p.add_argument("--verbose", "-v", action="count", default=0, dest="v")
    p.add_argument("--quiet", action="count", default=0)
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
    p.add_argument("--update-input", action="append")
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


def ng_main(argv: list[str], store: Path, program: str) -> int:
    """nixos-rebuild-ng: __init__.py ``parse_args``/``execute``/``main``."""
    parser = rebuild_parser()
    args = parser.parse_args(argv)
    if args.help or args.action is None:
        parser.print_help()
        return 0

    def warn(msg: str) -> None:
        _err(f"{parser.prog}: warning: {msg}")

    if args.action == "dry-run":
        args.action = "dry-build"
    if args.ask_sudo_password:
        args.sudo = True
    if args.install_grub:
        warn("--install-grub is deprecated, use --install-bootloader instead")
        args.install_bootloader = True
    if args.use_remote_sudo:
        warn("--use-remote-sudo is deprecated, use --sudo instead")
        args.sudo = True
    if args.fast:
        warn("--fast is deprecated, use --no-reexec instead")
        args.no_reexec = True
    if args.no_ssh_tty:
        warn("--no-ssh-tty is deprecated, SSH's TTY is never used anymore")
    if args.no_build_nix:
        warn("--no-build-nix is deprecated, we do not build nix anymore")
    if args.action == "edit" and (args.file or args.attr):
        parser.error("--file and --attr are not supported with 'edit'")
    if (args.target_host or args.build_host) and args.action not in (
        "switch", "boot", "test", "build", "dry-build", "dry-activate", "build-vm",
        "build-vm-with-bootloader",
    ):  # fmt: skip
        parser.error(f"--target-host/--build-host is not supported with '{args.action}'")
    if args.flake and (args.file or args.attr):
        parser.error("--flake cannot be used with --file or --attr")
    try:
        return _ng_execute(args, argv, store, program)
    except CommandFailed as exc:  # main(): _handle_called_process_error
        _err(str(exc))
        return exc.returncode
    except RebuildFailed as exc:  # main(): sys.exit(str(ex))
        if str(exc):
            _err(str(exc))
        return 1
    except SimError as exc:
        _err(f"error: {exc}")
        return 1


def _overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(a, b) for a, b in (args.override_input or [])]


def nix_build_flags(args: argparse.Namespace) -> list[str]:
    """The flake build flags nixos-rebuild-ng hands to nix (utils.py dict_to_flags)."""
    out: list[str] = []
    for name, value in (("--override-input", args.override_input), ("--option", args.option)):
        for a, b in value or []:
            out += [name, a, b]
    for flag in ("impure", "offline", "refresh", "show_trace", "no_update_lock_file",
                 "no_write_lock_file", "recreate_lock_file", "keep_going"):  # fmt: skip
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    return out


def _ng_build(installable: str, store: Path, overrides: Sequence[tuple[str, str]],
              flags: list[str], *, no_link: bool, dry_run: bool) -> str:  # fmt: skip
    """nix.py build_flake: ``nix build --print-out-paths INSTALLABLE [flags]`` (here)."""
    cmd = ["nix", *FLAKE_FLAGS, "build", "--print-out-paths", installable, *flags]
    cmd += ["--no-link"] if no_link else []
    cmd += ["--dry-run"] if dry_run else []
    note_event(event="nix", argv=cmd)
    try:
        result = counted_evaluate("nixos-rebuild-ng", "build", installable, store, overrides)
        out = _build_one(result, store, dry_run)
    except SimError as exc:
        _err(f"error: {exc}")
        raise CommandFailed(1, cmd) from None
    if not no_link and not dry_run:
        _link_result(out, "result")
    return out


def _reexec(argv: list[str], args: argparse.Namespace, store: Path, program: str) -> None:
    """services.py ``reexec``: build the *target configuration's* nixos-rebuild and exec it
    with the same arguments (and _NIXOS_REBUILD_REEXEC=1), unless it is this very program."""
    flake = _flake_arg(args.flake, Remote.from_arg(args.target_host, None, bool(args.v)))
    if flake is None:
        raise RebuildFailed("the rebuild test bed only simulates flake builds; pass --flake")
    installable = flake_installable(*flake, NIXOS_REBUILD_ATTR)
    drv = _ng_build(installable, store, _overrides(args), nix_build_flags(args),
                    no_link=True, dry_run=False)  # fmt: skip
    new = f"{drv}/bin/nixos-rebuild"
    if Path(new) == Path(program):
        return
    cleanup_control()
    note_event(event="reexec", into=new)
    env = {**os.environ, REEXEC_ENV: "1"}
    try:
        os.execve(new, [new, *argv], env)  # noqa: S606 (the re-exec is what is imitated)
    except OSError:
        _err("could not re-exec in a newer version of nixos-rebuild, using current version")
        os.execve(program, [program, *argv], env)  # noqa: S606


def _ng_execute(args: argparse.Namespace, argv: list[str], store: Path, program: str) -> int:
    action: str = args.action
    verbose = bool(args.v)
    if action in ("edit", "repl", "build-vm", "build-vm-with-bootloader", "list-generations"):
        raise RebuildFailed(f"nixos-rebuild {action} is not simulated by the rebuild test bed")
    can_run = action in ("switch", "boot", "test")
    if can_run and not args.no_reexec and not os.environ.get(REEXEC_ENV):
        _reexec(argv, args, store, program)
    target = Remote.from_arg(args.target_host, args.ask_sudo_password, verbose)
    build_host = Remote.from_arg(args.build_host, False, verbose, validate_opts=False)
    if action in ("switch", "boot", "test", "dry-activate") and target is None:
        raise RebuildFailed("the rebuild test bed cannot activate the local machine; use "
                            "--target-host")  # fmt: skip
    profile = (
        PROFILE
        if args.profile_name == "system"
        else f"/nix/var/nix/profiles/system-profiles/{args.profile_name}"
    )
    flake = _flake_arg(args.flake, target)
    if flake is None and not args.rollback:
        raise RebuildFailed("the rebuild test bed only simulates flake builds; pass --flake")
    _err("building the system configuration...")
    if args.rollback:
        path = _ng_rollback(action, target, profile, args.sudo)
    else:
        if flake is None:
            raise RebuildFailed("the rebuild test bed only simulates flake builds")
        attr_path = "config.system.build.toplevel"
        if action == "build-image":
            attr_path = _ng_image_attr(flake, args.image_variant, store)
        path = _ng_build_system(flake, attr_path, action, args, store, target, build_host)
    _ng_activate(path, action, args, target, profile, flake, store)
    return 0


def _ng_image_attr(flake: tuple[str, str], variant: str | None, store: Path) -> str:
    variants = counted_evaluate("nixos-rebuild-ng", "eval",
                                flake_installable(*flake, "config.system.build.images"),
                                store).value  # fmt: skip
    if variant not in variants:
        raise RebuildFailed(
            "please specify one of the following supported image variants via "
            "--image-variant:\n" + "\n".join(f"- {v}" for v in variants)
        )
    return f"config.system.build.images.{variant}"


def _ng_rollback(action: str, target: Remote | None, profile: str, sudo: bool) -> str:
    """services.py _rollback_system / nix.py rollback, rollback_temporary_profile."""
    if target is None:
        raise RebuildFailed("the rebuild test bed only rolls back a --target-host")
    if action in ("switch", "boot"):
        target.run(["nix-env", "--rollback", "-p", profile], sudo=sudo)
        return profile
    if action in ("test", "build"):
        listing = target.run(["nix-env", "-p", profile, "--list-generations"], sudo=sudo,
                             capture=True).stdout  # fmt: skip
        previous = None
        for line in listing.splitlines():
            parts = line.split()
            if parts and "(current)" not in parts:
                previous = parts[0]
        if previous is None:
            raise RebuildFailed("could not find previous generation")
        return f"{profile}-{previous}-link"
    raise RebuildFailed(f"--rollback is incompatible with '{action}'")


def _ng_build_system(flake: tuple[str, str], attr_path: str, action: str,
                     args: argparse.Namespace, store: Path, target: Remote | None,
                     build_host: Remote | None) -> str:  # fmt: skip
    """services.py _build_system (newer ng: no result link for switch, boot, test and
    dry-activate; 25.05 linked test and dry-activate too)."""
    dry_run = action == "dry-build"
    no_link = action in ("switch", "boot", "test", "dry-activate")
    installable = flake_installable(*flake, attr_path)
    overrides = _overrides(args)
    flags = nix_build_flags(args)
    if build_host is None:
        path = _ng_build(installable, store, overrides, flags, no_link=no_link, dry_run=dry_run)
    else:
        path = _ng_build_remote(installable, store, overrides, flags, build_host,
                                no_link=no_link, dry_run=dry_run)  # fmt: skip
    if not dry_run:
        _ng_copy_closure(path, target, build_host)
    return path


def _ng_build_remote(installable: str, store: Path, overrides: Sequence[tuple[str, str]],
                     flags: list[str], build_host: Remote, *, no_link: bool,
                     dry_run: bool) -> str:  # fmt: skip
    """nix.py build_remote_flake: evaluate the drvPath here, copy the derivation to the build
    host, ``nix build DRV^* --print-out-paths`` there over ssh."""
    cmd = ["nix", *FLAKE_FLAGS, "eval", "--raw", f"{installable}.drvPath", *flags]
    note_event(event="nix", argv=cmd)
    try:
        result = counted_evaluate("nixos-rebuild-ng", "eval", installable, store, overrides,
                                  shown=f"{installable}.drvPath")  # fmt: skip
        drv = evaluate(_installable(f"{installable}.drvPath"), store, overrides).value
        if not result.config.get("build_fail"):
            # one shared store: what the build host "builds" is made here (see README)
            _build_one(result, store, dry_run=False)
    except SimError as exc:
        _err(f"error: {exc}")
        raise CommandFailed(1, cmd) from None
    build_host.copy_closure(drv)
    remote = ["nix", *FLAKE_FLAGS, "build", f"{drv}^*", "--print-out-paths", *flags]
    remote += ["--no-link"] if no_link else []
    remote += ["--dry-run"] if dry_run else []
    done = build_host.run(remote, capture=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def _ng_copy_closure(path: str, to_host: Remote | None, from_host: Remote | None) -> None:
    """nix.py copy_closure: ``nix-copy-closure --to|--from HOST`` for one remote, ``nix copy
    --from ssh://BUILD --to ssh://TARGET`` (run here) for two, both with NIX_SSHOPTS =
    SSH_DEFAULT_OPTS + the caller's."""
    if to_host is None and from_host is None:
        return
    opts = [*ssh_default_opts(), *split_sshopts(os.environ.get("NIX_SSHOPTS", ""), "shell")]
    if to_host is not None and from_host is not None:
        cmd = ["nix", *FLAKE_FLAGS, "copy", "--from", f"ssh://{from_host.host}", "--to",
               f"ssh://{to_host.host}", path]  # fmt: skip
        note_event(event="nix", argv=cmd)
        try:
            ssh_store(from_host.host, opts, [path], write=False)
            ssh_store(to_host.host, opts, [path], write=True)
        except SimError as exc:
            _err(f"error: {exc}")
            raise CommandFailed(1, cmd) from None
        return
    host = to_host if to_host is not None else from_host
    if host is None:
        return
    cmd = ["nix-copy-closure", "--to" if to_host else "--from", host.host, path]
    note_event(event="nix", argv=cmd)
    try:
        ssh_store(host.host, opts, [path], write=to_host is not None)
    except SimError as exc:
        _err(f"error: {exc}")
        raise CommandFailed(1, cmd) from None


def _print_result(message: str, result: str) -> None:
    """services.py print_result: the words on stderr, the result alone on stdout."""
    print(message, end=" ", file=sys.stderr, flush=True)
    print(result, flush=True)


def _ng_activate(path: str, action: str, args: argparse.Namespace, target: Remote | None,
                 profile: str, flake: tuple[str, str] | None, store: Path) -> None:  # fmt: skip
    """services.py _activate_system; nix.py set_profile and switch_to_configuration."""
    if target is None and action in ("switch", "boot", "test", "dry-activate"):
        raise RebuildFailed("the rebuild test bed cannot activate the local machine")
    if action in ("switch", "boot") and not args.rollback and target is not None:
        check = target.run(["test", "-f", f"{path}/nixos-version"], check=False)
        if check.returncode != 0:
            raise RebuildFailed(
                "your NixOS configuration path seems to be missing essential files.\n"
                "To avoid corrupting your current NixOS installation, the activation will "
                f"abort.\n\nThis is the evaluated NixOS configuration path: {path}."
            )
        target.run(["nix-env", "-p", profile, "--set", path], sudo=args.sudo)
    if action in ("switch", "boot", "test", "dry-activate") and target is not None:
        target.run(
            [*NG_SWITCH_PREFIX, f"{path}/bin/switch-to-configuration", action],
            sudo=args.sudo,
            extra_env={"NIXOS_INSTALL_BOOTLOADER": "1" if args.install_bootloader else "0"},
        )
        _print_result("Done. The new configuration is", path)
    elif action == "build":
        _print_result("Done. The new configuration is", path)
    elif action == "build-image" and flake is not None:
        name = counted_evaluate("nixos-rebuild-ng", "eval", flake_installable(
            *flake, f"config.system.build.images.{args.image_variant}.passthru.filePath"),
            store).value  # fmt: skip
        _print_result("Done. The disk image can be found in", f"{path}/{name}")
