"""``nix-store``: validity checks of store paths on the host, and the copy protocol's answers.

Imitates Nix's nix-store (the Nix manual's ``nix-store --realise``, ``--query``,
``--check-validity``, ``--verify-path``): a path is valid when it exists in the test bed's
shared store; ``--realise`` of a derivation the test bed wrote prints its out path
(:func:`testbed.sim.nix_cmd.realise`). ``--serve`` is not Nix's worker protocol but the test
bed's own stand-in for it, which the operator-side ``nix``/``nixos-rebuild`` stand-ins speak
when they copy a closure: one store path per line in, ``valid PATH``/``invalid PATH`` per line
out.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from testbed.sim.host import Host
from testbed.store import SimError


def nix_store(argv: Sequence[str]) -> int:
    try:
        host = Host.load()
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args = list(argv)
    if "--version" in args:
        print("nix-store (Nix) 2.28.3")
        return 0
    flags = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    known = {
        "--serve",
        "--write",
        "--realise",
        "-r",
        "--query",
        "-q",
        "--requisites",
        "-R",
        "--check-validity",
        "--verify-path",
        "--quiet",
        "-v",
    }
    for flag in flags:
        if flag not in known:
            print(f"error: unrecognised flag '{flag}'", file=sys.stderr)
            print("Try 'nix-store --help' for more information.", file=sys.stderr)
            return 1

    def valid(path: str) -> bool:
        return path.startswith(host.store.rstrip("/") + "/") and Path(path).exists()

    if "--serve" in flags:
        # the test bed's copy protocol: one store path per line in, "valid"/"invalid" per line out
        code = 0
        for line in sys.stdin:
            path = line.strip()
            if not path:
                continue
            ok = valid(path)
            code = code or (0 if ok else 1)
            print(f"{'valid' if ok else 'invalid'} {path}", flush=True)
        return code
    if {"--realise", "-r"} & set(flags) and any(p.endswith(".drv") for p in paths):
        # classic nixos-rebuild builds on a --build-host with `nix-store -r DRV` over ssh
        # (nixos-rebuild.sh, nixFlakeBuild): a derivation realises to its out path
        from testbed.sim.nix_cmd import realise

        try:
            outs = [realise(p) if p.endswith(".drv") else p for p in paths]
        except SimError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for out in outs:
            print(out)
        return 0
    for path in paths:
        if not valid(path):
            print(f"error: path '{path}' is not valid", file=sys.stderr)
            return 1
    if {"--realise", "-r", "--query", "-q"} & set(flags):
        for path in paths:
            print(path)
    return 0
