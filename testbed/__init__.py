"""Faithful simulated NixOS hosts for rebuild's integration tests and ``invoke demo``.

NixOS cannot run on the development machine, so each "host" is a real OpenSSH ``sshd`` (own
host key, key-only auth, on a private 127.x.y.z address or inside a network namespace) whose
sessions get ``PATH=<testbed>/hostbin:...`` and ``SIM_ROOT=<host state dir>`` through sshd's
``SetEnv``. ``hostbin/`` holds shims with NixOS's command names (``systemctl``,
``systemd-run``, ``nix-env``, ``nix-store``, and path-mapping ``readlink``/``mkdir``/``rm``/
``rmdir``/``cat``/``tee``/``ls``, plus ``sudo`` and ``hostname``) so the tool runs exactly the
commands it runs on real NixOS. A command costs a few milliseconds, as on a real host, not the
40 ms of a Python start-up: the path shims and ``sudo`` are POSIX sh around the real programs,
and the others are a small client of the host's simulator, one long-lived process per host
(started and ended with its sshd) that has the simulation imported and forks a child per
command (:mod:`testbed.hostbin`, :mod:`testbed.sim.server`). Store paths are real directories of
a shared store
(``NIX_STORE_DIR``). The operator-side ``nix`` and ``nixos-rebuild`` stand-ins live in
``<testbed>/bin`` and are announced through :meth:`Testbed.env`.

A host's ``/etc/ssh/ssh_host_*_key.pub`` (read with ``cat``) is ``$SIM_ROOT/etc/ssh/...``, a
link to the key its sshd serves. ``Testbed(other_users=True)`` lets hosts log in real local
users besides the test bed's own (the test suite creates them, ``tests/support/users.py``:
passwordless sudo, password sudo, no sudo); without sudo such a user can read a host's state
but not change it, as on NixOS.

Layout: :mod:`testbed.testbed` (the :class:`Testbed` and its hosts), :mod:`testbed.sim` (the
host-side shims, one module per program they imitate, and the host's simulator),
:mod:`testbed.hostbin` (what each command name runs), :mod:`testbed.standins` (operator-side
``nix``/``nixos-rebuild``), :mod:`testbed.store` (store and flakes), :mod:`testbed.netns`,
:mod:`testbed.proxy`, :mod:`testbed.procs`, :mod:`testbed.demo` (``invoke demo``). This is its
own distribution (``testbed/pyproject.toml``, ``rebuild-testbed``), installed for the tests and
the demo only: the ``rebuild`` wheel that operators install contains none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if (
    TYPE_CHECKING
):  # the real imports are lazy: host-side shims import submodules and must start fast
    from testbed.netns import cleanup_stale_netns, netns_available
    from testbed.proxy import LatencyProxy
    from testbed.testbed import (
        BASE_CONFIG,
        SimHost,
        Testbed,
        TestbedError,
        cleanup_stale_testbeds,
        sshd_missing_message,
    )

_EXPORTS = {
    "BASE_CONFIG": "testbed.testbed",
    "LatencyProxy": "testbed.proxy",
    "SimHost": "testbed.testbed",
    "Testbed": "testbed.testbed",
    "TestbedError": "testbed.testbed",
    "cleanup_stale_netns": "testbed.netns",
    "cleanup_stale_testbeds": "testbed.testbed",
    "netns_available": "testbed.netns",
    "sshd_missing_message": "testbed.testbed",
}

__all__ = [
    "BASE_CONFIG",
    "LatencyProxy",
    "SimHost",
    "Testbed",
    "TestbedError",
    "cleanup_stale_netns",
    "cleanup_stale_testbeds",
    "netns_available",
    "sshd_missing_message",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
