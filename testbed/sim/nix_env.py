"""``nix-env -p PROFILE --set|--rollback|--list-generations|--switch-generation|...``.

Imitates Nix's nix-env on profiles (the Nix manual's ``nix-env --set``, ``--rollback``,
``--list-generations``, ``--switch-generation``, ``--delete-generations``; Nix's
``src/nix/nix-env/nix-env.cc``, formerly ``src/nix-env/``, and ``src/libstore/profiles.cc``):
a profile is a symlink to ``<profile>-<N>-link``, itself a symlink to a store path; ``--set``
adds generation N+1 unless the newest already points there, and switches the profile to it.
That is how nixos-rebuild
records the system profile and how rebuild's rollback goes back to the previous generation.
Only operations on an explicit ``-p``/``--profile`` are simulated.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.sim.host import Host, host_lock
from testbed.store import SimError


def profile_paths(profile: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if not profile.parent.is_dir():
        return out
    pattern = re.compile(rf"^{re.escape(profile.name)}-(\d+)-link$")
    for entry in profile.parent.iterdir():
        m = pattern.match(entry.name)
        if m:
            out[int(m.group(1))] = entry
    return out


def current_generation(profile: Path) -> int | None:
    try:
        target = os.readlink(profile)  # noqa: PTH115 (need the raw link text)
    except OSError:
        return None
    m = re.match(rf"^{re.escape(profile.name)}-(\d+)-link$", Path(target).name)
    return int(m.group(1)) if m else None


def _switch_link(profile: Path, generation: int) -> None:
    tmp = profile.parent / f".{profile.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(f"{profile.name}-{generation}-link")
    tmp.replace(profile)


def nix_env(argv: Sequence[str]) -> int:
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    profile: Path | None = None
    op: str | None = None
    operand: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-p", "--profile"):
            if i >= len(args):
                print(f"error: flag '{arg}' requires 1 argument", file=sys.stderr)
                return 1
            profile = Path(host.map_path(args[i]))
            i += 1
        elif arg in ("--set", "--switch-generation", "-G", "--delete-generations"):
            op = arg
            while i < len(args) and not args[i].startswith("-"):
                operand.append(args[i])
                i += 1
        elif arg in ("--rollback", "--list-generations"):
            op = arg
        elif arg == "--version":
            print("nix-env (Nix) 2.28.3")
            return 0
        elif arg in ("--quiet", "-v", "--verbose", "-vv", "-vvv", "--show-trace"):
            continue
        elif arg == "--option":
            i += 2
        else:
            print(f"error: unrecognised flag '{arg}'", file=sys.stderr)
            print("Try 'nix-env --help' for more information.", file=sys.stderr)
            return 1
    if op is None:
        print("error: no operation specified", file=sys.stderr)
        print("Try 'nix-env --help' for more information.", file=sys.stderr)
        return 1
    if profile is None:
        print("error: the test bed's nix-env needs -p/--profile", file=sys.stderr)
        return 1
    # Nix locks the profile (profiles.cc lockProfile), also to list it; the systemd state is
    # not nix-env's to read or write
    with host_lock(host):
        return _nix_env_op(host, profile, op, operand)


def _nix_env_op(host: Host, profile: Path, op: str, operand: list[str]) -> int:
    gens = profile_paths(profile)
    current = current_generation(profile)
    if op == "--set":
        if len(operand) != 1:
            print("error: '--set' requires exactly one argument", file=sys.stderr)
            return 1
        target = operand[0]
        if not target.startswith(host.store.rstrip("/") + "/"):
            print(f"error: path '{target}' is not in the Nix store", file=sys.stderr)
            return 1
        target = f"{host.store}/{Path(target).relative_to(host.store).parts[0]}"
        if not Path(target).exists():
            print(f"error: path '{target}' is not valid", file=sys.stderr)
            return 1
        profile.parent.mkdir(parents=True, exist_ok=True)
        last = max(gens) if gens else None
        if last is not None and os.readlink(gens[last]) == target:  # noqa: PTH115
            number = last
        else:
            number = (last or 0) + 1
            link = profile.parent / f"{profile.name}-{number}-link"
            link.symlink_to(target)
        _switch_link(profile, number)
        return 0
    if op == "--list-generations":
        for number in sorted(gens):
            stamp = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(gens[number].lstat().st_mtime)
            )
            mark = "(current)" if number == current else ""
            print(f"{number:4d}   {stamp}   {mark}")
        return 0
    if op == "--rollback":
        older = [n for n in gens if current is not None and n < current]
        if not older:
            print(
                f"error: no generation older than the current ({current}) exists", file=sys.stderr
            )
            return 1
        target_gen = max(older)
        print(f"switching profile from version {current} to {target_gen}", file=sys.stderr)
        _switch_link(profile, target_gen)
        return 0
    if op in ("--switch-generation", "-G"):
        if len(operand) != 1 or not operand[0].isdigit():
            print(f"error: '{op}' requires one generation number", file=sys.stderr)
            return 1
        number = int(operand[0])
        if number not in gens:
            print(f"error: generation {number} does not exist", file=sys.stderr)
            return 1
        print(f"switching profile from version {current} to {number}", file=sys.stderr)
        _switch_link(profile, number)
        return 0
    # --delete-generations
    doomed: set[int] = set()
    for item in operand:
        if item == "old":
            doomed.update(n for n in gens if n != current)
        elif item.isdigit():
            doomed.add(int(item))
    if current in doomed:
        print(f"error: cannot delete current version of profile {profile}'", file=sys.stderr)
        return 1
    for number in sorted(doomed):
        if number in gens:
            print(f"removing profile version {number}", file=sys.stderr)
            gens[number].unlink()
    return 0
