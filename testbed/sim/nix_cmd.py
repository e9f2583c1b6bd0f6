"""``nix build DRV^*`` and ``nix-copy-closure`` on a simulated host (a build host's side).

Imitates what nixos-rebuild runs on a ``--build-host``:

- nixos-rebuild-ng's ``build_remote_flake`` (nixpkgs
  ``pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/nix.py``) evaluates the ``drvPath``
  locally, copies the derivation to the build host, then runs ``nix
  --extra-experimental-features 'nix-command flakes' build DRV^* --print-out-paths`` there over
  ssh and reads the out path from its stdout;
- classic nixos-rebuild (``pkgs/by-name/ni/nixos-rebuild/nixos-rebuild.sh``, ``copyToTarget``)
  copies from a build host to a different target by running ``nix-copy-closure --to TARGET
  PATH`` *on the build host*, with the build host's own ssh (``NIX_SSHOPTS`` is not passed
  along): a host alias that only the operator's ssh config knows does not resolve there.

The store is the test bed's shared one: a derivation file (written by the operator-side
``nix eval ...drvPath``, :mod:`testbed.standins`) is JSON naming its out path; the operator-side
stand-in has made that path already (one store, so "building" here is answering with it), or
the derivation says the build fails (``build_fail``), which fails here with Nix's message.
Besides ``build`` (and ``--version``), the host's ``nix`` answers what rebuild's preview and
lock step ask (:mod:`testbed.sim.nix_query`): ``store diff-closures``, ``path-info``, ``config
show`` and ``show-config``; anything else is Nix's "not a recognised command" error.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.store import SimError


def _read_drv(drv: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(drv).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SimError(f"path '{drv}' is not valid") from None
    if not isinstance(data, dict) or not isinstance(data.get("out"), str):
        raise SimError(f"path '{drv}' is not a derivation")
    return data


def realise(drv: str) -> str:
    """The out path of a derivation the test bed wrote, as a build of it on this host ends."""
    data = _read_drv(drv)
    out = str(data["out"])
    if data.get("fail"):
        raise SimError(
            f"builder for '{drv}' failed with exit code 1;\n"
            "       last 1 log lines:\n"
            f"       > simulated build failure (build_fail is set for {data.get('attr', '?')})\n"
            f"       For full logs, run 'nix log {drv}'."
        )
    if not Path(out).exists():
        raise SimError(f"path '{out}' is not valid")
    return out


def nix(argv: Sequence[str]) -> int:
    """``nix [flags] build DRV^*... [--print-out-paths]``; the queries of
    :mod:`testbed.sim.nix_query`."""
    from testbed.sim import nix_query

    if nix_query.handles(argv):
        return nix_query.nix_query(argv)
    from testbed.standins import NixUsage, parse_nix_args

    try:
        args = parse_nix_args(argv)
    except NixUsage as exc:
        print(f"error: {exc}\nTry 'nix --help' for more information.", file=sys.stderr)
        return 1
    if "--version" in args.flags:
        print("nix (Nix) 2.28.3")
        return 0
    if not args.positional or args.positional[0] != "build":
        command = args.positional[0] if args.positional else ""
        print(
            f"error: '{command}' is not a recognised command"
            if command
            else "error: no subcommand specified",
            file=sys.stderr,
        )
        print("Try 'nix --help' for more information.", file=sys.stderr)
        return 1
    if "nix-command" not in args.features():
        print(
            "error: experimental Nix feature 'nix-command' is disabled; add "
            "'--extra-experimental-features nix-command' to enable it",
            file=sys.stderr,
        )
        return 1
    outs: list[str] = []
    try:
        for installable in args.positional[1:]:
            drv = installable.removesuffix("^*").removesuffix("^out")
            if not drv.endswith(".drv"):
                raise SimError(
                    f"the rebuild test bed's host-side nix builds only derivations "
                    f"(DRV^*), not '{installable}'"
                )
            outs.append(realise(drv))
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "--dry-run" in args.flags:
        return 0
    if "--print-out-paths" in args.flags:
        for out in outs:
            print(out)
    return 0


def nix_copy_closure(argv: Sequence[str]) -> int:
    """``nix-copy-closure [-s] [-v] --to|--from HOST PATH...`` with this host's own ssh."""
    args = list(argv)
    direction = ""
    host = ""
    paths: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--to", "--from"):
            if i >= len(args):
                print(f"error: flag '{arg}' requires 1 argument", file=sys.stderr)
                return 1
            direction, host = arg, args[i]
            i += 1
        elif arg in ("-s", "--use-substitutes", "--gzip", "--include-outputs", "-v"):
            continue
        elif arg.startswith("-"):
            print(f"error: unrecognised flag '{arg}'", file=sys.stderr)
            return 1
        else:
            paths.append(arg)
    if not direction:
        print("error: no --to or --from given", file=sys.stderr)
        return 1
    # Nix before 2.26 splits NIX_SSHOPTS on whitespace (nix PR 12020 made it shell-like)
    opts = os.environ.get("NIX_SSHOPTS", "").split()
    argv_ssh = ["ssh", host, "-x", *opts, "--", "nix-store", "--serve"]
    if direction == "--to":
        argv_ssh.append("--write")
    done = subprocess.run(
        argv_ssh,
        input="".join(p + "\n" for p in paths),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    sys.stderr.write(done.stderr)
    if done.returncode == 255:
        print(f"error: cannot connect to '{host}'", file=sys.stderr)
        return 1
    if done.returncode != 0:
        shown = shlex.join(argv_ssh)
        print(f"error: {shown} failed with exit code {done.returncode}", file=sys.stderr)
        return 1
    return 0
