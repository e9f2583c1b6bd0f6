"""The host's ``nix`` for what rebuild asks before and around a switch: ``nix store
diff-closures``, ``nix path-info``, ``nix config show`` / ``nix show-config``.

Imitates Nix 2.28 (the version the host's ``nix --version`` reports), read from NixOS/nix:

- ``store diff-closures BEFORE AFTER`` (``src/nix/diff-closures.cc``): both closures
  (``computeFSClosure``) are grouped by package name: a path's name loses an output suffix
  first (the regex ``(.*)-([a-z]+|lib32|lib64)``, so ``linux-6.6.30-modules`` counts as
  ``linux`` ``6.6.30``), then splits into name and version by ``DrvName``
  (``src/libstore/names.cc``: the version starts after the first ``-`` not followed by a
  letter). For every name of either closure, in sorted order, the versions only before
  (removed) and only after (added) and the change of the summed NAR sizes: a line
  ``name: 1.0 → 1.1, +12.3 KiB`` when a version changed or the size by at least 8 KiB; ``∅``
  for no version, ``ε`` for an empty one; the size ``%+.1f KiB`` between ANSI red (grew) or
  green (shrank) and ANSI normal, on stdout whether or not it is a terminal. (Nix after 2.28
  prints it with ``renderSize``: ``12.3 KiB``, ``1.2 MiB``, no plus sign.)
- ``path-info [-r] [-s] [-S] [--json] PATHS`` (``src/nix/path-info.cc``): without ``--json`` a
  line per path, the path padded to the longest, then ``\\t%11d`` NAR size (``-s``) and closure
  size (``-S``); with ``--json`` (Nix 2.19+) one object keyed by store path, each value with
  ``narSize``, ``narHash``, ``references``, ``deriver``, ``registrationTime``, ``signatures``,
  ``ultimate``, ``ca`` and, with ``-S``, ``closureSize``; an invalid path is ``null`` there and
  ``error: path '...' is not valid`` otherwise.
- ``config show [NAME]`` (Nix 2.20+; ``show-config`` before): ``NAME = VALUE`` lines, or the
  value alone for a NAME; an unknown NAME: ``error: could not find setting 'NAME'``.
  ``trusted-users`` is the host's ``trusted_users`` (:class:`testbed.testbed.SimHost`,
  default ``root``), as ``nix.settings.trusted-users`` would set it.

Every subcommand needs the ``nix-command`` experimental feature, as in Nix. Arguments under
``/run`` and the other mapped folders are the host's (``/run/current-system``); store paths are
the test bed's shared store, where every path exists is valid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from testbed.sim.host import Host, map_arg
from testbed.store import SimError, closure, nar_size, references

QUERIES = ("store", "path-info", "config", "show-config")
_VALUE_FLAGS = {"--extra-experimental-features": 1, "--experimental-features": 1, "--option": 2,
                "--log-format": 1, "--store": 1}  # fmt: skip
_OUTPUT_NAME = re.compile(r"(.*)-([a-z]+|lib32|lib64)")
ANSI_RED, ANSI_GREEN, ANSI_NORMAL = "\x1b[31;1m", "\x1b[32;1m", "\x1b[0m"
SHOW_DELTA = 8 * 1024


def _split(argv: Sequence[str]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(flags without values, flags with values, positional words) of a nix command line."""
    flags: list[str] = []
    values: dict[str, list[str]] = {}
    words: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            words += args[i:]
            break
        if arg in _VALUE_FLAGS:
            count = _VALUE_FLAGS[arg]
            if i + count > len(args):
                raise SimError(f"flag '{arg}' requires {count} argument{'s' * (count > 1)}")
            values.setdefault(arg, []).append(" ".join(args[i : i + count]))
            i += count
        elif arg.startswith("-") and len(arg) > 1:
            flags.append(arg)
        else:
            words.append(arg)
    return flags, values, words


def handles(argv: Sequence[str]) -> bool:
    try:
        words = _split(argv)[2]
    except SimError:
        return False
    return bool(words) and words[0] in QUERIES


def _features(values: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for key in ("--extra-experimental-features", "--experimental-features"):
        for value in values.get(key, []):
            found.update(value.split())
    for value in values.get("--option", []):
        name, _, rest = value.partition(" ")
        if name in ("experimental-features", "extra-experimental-features"):
            found.update(rest.split())
    for line in os.environ.get("NIX_CONFIG", "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("experimental-features", "extra-experimental-features"):
            found.update(value.split())
    return found


def nix_query(argv: Sequence[str]) -> int:
    try:
        flags, values, words = _split(argv)
        if "nix-command" not in _features(values):
            print(
                "error: experimental Nix feature 'nix-command' is disabled; add "
                "'--extra-experimental-features nix-command' to enable it",
                file=sys.stderr,
            )
            return 1
        host = Host.load()
        command, rest = words[0], words[1:]
        if command == "store" and rest[:1] == ["diff-closures"]:
            return diff_closures(host, rest[1:], flags)
        if command == "path-info":
            return path_info(host, rest, flags)
        if command == "show-config" or (command == "config" and rest[:1] == ["show"]):
            return config_show(host, rest[1:] if command == "config" else rest)
        sub = " ".join(words[:2])
        raise SimError(f"'{sub}' is not a recognised command")
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _store_path(host: Host, arg: str) -> Path:
    """An installable that is a store path, or a link to one (``/run/current-system``)."""
    store = host.store.rstrip("/")
    mapped = map_arg(arg, host.root)
    real = os.path.realpath(mapped)
    if not real.startswith(store + "/"):
        raise SimError(f"path '{arg}' is not in the Nix store")
    top = store + "/" + real[len(store) + 1 :].split("/", 1)[0]
    if not Path(top).exists():
        raise SimError(f"path '{top}' is not valid")
    return Path(top)


def drv_name(name: str) -> tuple[str, str]:
    """Nix's DrvName (``src/libstore/names.cc``): the name is everything up to the first dash
    not followed by a letter, the version the rest."""
    for i, ch in enumerate(name):
        if ch == "-" and i + 1 < len(name) and not name[i + 1].isalpha():
            return name[:i], name[i + 1 :]
    return name, ""


def _grouped(path: Path) -> dict[str, dict[str, list[Path]]]:
    """``getClosureInfo``: name -> version -> paths of the closure."""
    groups: dict[str, dict[str, list[Path]]] = {}
    for item in closure(path):
        name = item.name.split("-", 1)[1] if "-" in item.name else item.name
        match = _OUTPUT_NAME.fullmatch(name)
        if match:
            name = match.group(1)
        package, version = drv_name(name)
        groups.setdefault(package, {}).setdefault(version, []).append(item)
    return groups


def _show_versions(versions: set[str]) -> str:
    if not versions:
        return "∅"
    return ", ".join(sorted("ε" if v == "" else v for v in versions))


def diff_closures(host: Host, args: list[str], flags: list[str]) -> int:
    if flags:
        raise SimError(f"unrecognised flag '{flags[0]}'")
    if len(args) != 2:
        raise SimError("'nix store diff-closures' requires two installables: BEFORE AFTER")
    before = _grouped(_store_path(host, args[0]))
    after = _grouped(_store_path(host, args[1]))
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name, {}), after.get(name, {})
        size_before = sum(nar_size(p) for paths in was.values() for p in paths)
        size_after = sum(nar_size(p) for paths in now.values() for p in paths)
        delta = size_after - size_before
        removed = {v for v in was if v not in now}
        added = {v for v in now if v not in was}
        items = []
        if removed or added:
            items.append(f"{_show_versions(removed)} → {_show_versions(added)}")
        if abs(delta) >= SHOW_DELTA:
            colour = ANSI_RED if delta > 0 else ANSI_GREEN
            items.append(f"{colour}{delta / 1024.0:+.1f} KiB{ANSI_NORMAL}")
        if items:
            print(f"{name}: {', '.join(items)}")
    return 0


def _info(path: Path, with_closure: bool) -> dict[str, object]:
    digest = hashlib.sha256(path.name.encode()).digest()
    info: dict[str, object] = {
        "ca": None,
        "deriver": None,
        "narHash": "sha256-" + base64.b64encode(digest).decode(),
        "narSize": nar_size(path),
        "references": references(path),
        "registrationTime": int(path.lstat().st_mtime),
        "signatures": [],
        "ultimate": False,
    }
    if with_closure:
        info["closureSize"] = sum(nar_size(p) for p in closure(path))
    return dict(sorted(info.items()))


def path_info(host: Host, args: list[str], flags: list[str]) -> int:
    short = {"-s": "--size", "-S": "--closure-size", "-r": "--recursive", "-h": "--human"}
    wanted: set[str] = set()
    for flag in flags:
        if re.fullmatch(r"-[sSrh]+", flag):
            wanted.update(short[f"-{ch}"] for ch in flag[1:])
        elif flag in ("--size", "--closure-size", "--recursive", "--json", "--human-readable"):
            wanted.add(flag)
        else:
            raise SimError(f"unrecognised flag '{flag}'")
    store = host.store.rstrip("/")
    paths: list[Path | str] = []
    for arg in args:
        try:
            top = _store_path(host, arg)
        except SimError:
            if "--json" not in wanted or not arg.startswith(store + "/"):
                raise
            paths.append(arg)  # invalid, shown as null
            continue
        paths.extend(closure(top) if "--recursive" in wanted else [top])
    with_closure = "--closure-size" in wanted
    if "--json" in wanted:
        out = {str(p): (_info(p, with_closure) if isinstance(p, Path) else None) for p in paths}
        print(json.dumps(dict(sorted(out.items()))))
        return 0
    width = max((len(str(p)) for p in paths), default=0)
    for item in paths:
        line = str(item)
        if {"--size", "--closure-size"} & wanted:
            line += " " * (width - len(line))
        if "--size" in wanted and isinstance(item, Path):
            line += f"\t{nar_size(item):11d}"
        if with_closure and isinstance(item, Path):
            line += f"\t{sum(nar_size(p) for p in closure(item)):11d}"
        print(line)
    return 0


def settings(host: Host) -> dict[str, str]:
    """The host's Nix settings that the test bed knows (``nix config show``)."""
    trusted = host.info.get("trusted_users") or "root"
    if isinstance(trusted, list):
        trusted = " ".join(str(t) for t in trusted)
    return {
        "allowed-users": "*",
        "experimental-features": "",
        "store": "auto",
        "substituters": "https://cache.nixos.org/",
        "trusted-users": str(trusted),
    }


def config_show(host: Host, names: list[str]) -> int:
    known = settings(host)
    if not names:
        for key, value in known.items():
            print(f"{key} = {value}")
        return 0
    if len(names) > 1:
        raise SimError("'nix config show' takes at most one setting name")
    if names[0] not in known:
        raise SimError(f"could not find setting '{names[0]}'")
    print(known[names[0]])
    return 0
