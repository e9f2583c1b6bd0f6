"""The entry point of every host-side shim: dispatch by the name it was installed as.

Not an imitation itself: ``hostbin/<name>`` (``systemctl``, ``systemd-run``, ``nix-env``, ...)
runs :func:`main` with its own name, which imports only the module that imitates that program
(start-up stays fast: a readlink shim does not load systemctl). ``rbtb-sim`` is the test bed's
own helper command, which the other shims start (transient services, timers, unit servers).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from testbed.store import SimError


def internal(argv: Sequence[str]) -> int:
    """``rbtb-sim SUBCOMMAND``: helpers the other shims start."""
    if not argv:
        print("usage: rbtb-sim run-service|timer|unit-server|server|find-root ...", file=sys.stderr)
        return 2
    sub, rest = argv[0], list(argv[1:])
    if sub == "unit-server":
        from testbed.sim.unit_server import serve

        return serve(rest)
    if sub == "server":
        from testbed.sim import server

        return server.serve(rest)
    from testbed.sim.host import Host, find_sim_root

    if sub == "find-root":
        print(find_sim_root())
        return 0
    host = Host.load()
    if sub == "run-service":
        from testbed.sim.systemd_run import run_service

        return run_service(host, rest)
    if sub == "timer":
        from testbed.sim.systemd_run import run_timer

        return run_timer(host, rest)
    print(f"rbtb-sim: unknown subcommand {sub}", file=sys.stderr)
    return 2


def main(name: str, argv: Sequence[str]) -> int:
    """Dispatch a shim invocation by the name it was installed as."""
    try:
        if name == "systemctl":
            from testbed.sim.systemctl import systemctl

            return systemctl(argv)
        if name == "systemd-run":
            from testbed.sim.systemd_run import systemd_run

            return systemd_run(argv)
        if name == "nix-env":
            from testbed.sim.nix_env import nix_env

            return nix_env(argv)
        if name == "nix-store":
            from testbed.sim.nix_store import nix_store

            return nix_store(argv)
        if name == "rbtb-sim":
            return internal(argv)
        if name in ("nix", "nix-copy-closure"):
            from testbed.sim import nix_cmd

            return nix_cmd.nix(argv) if name == "nix" else nix_cmd.nix_copy_closure(argv)
        from testbed.sim import shims

        if name in shims.PATH_SHIMS:
            return shims.path_shim(name, argv)
        if name == "sudo":
            return shims.sudo_shim(argv)
        if name == "hostname":
            return shims.hostname_shim(argv)
        if name == STC and argv:  # the system's own script hands over its path first
            from testbed.sim.activation import stc_main

            return stc_main(argv[0], argv[1:])
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141
    print(f"rebuild test bed: unknown shim {name}", file=sys.stderr)
    return 127


# run through the simulator, but on no host's PATH: a system's bin/switch-to-configuration
# (testbed.store.build_system) execs it with its own path first
STC = "switch-to-configuration"
STORE_NAMES = (STC,)

SHIM_NAMES = (
    "systemctl",
    "systemd-run",
    "nix-env",
    "nix-store",
    "readlink",
    "mkdir",
    "rm",
    "rmdir",
    "cat",
    "tee",
    "ls",
    "tail",
    "flock",
    "sudo",
    "hostname",
    "rbtb-sim",
    "nix",
    "nix-copy-closure",
)
