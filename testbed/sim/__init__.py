"""Host side of the simulated NixOS host: the commands a test host's PATH provides.

Every simulated host has a state directory ``SIM_ROOT``; ``/run`` and ``/nix/var`` of the host
are ``$SIM_ROOT/run`` and ``$SIM_ROOT/nix/var``. Internal state lives in ``$SIM_ROOT/sim``
(``host.json`` written by the test bed, ``state.json`` guarded by ``lock``, ``pids/`` for
teardown, ``log/``).

One module per program it imitates:

- :mod:`~testbed.sim.host`: the host as seen from inside (``SIM_ROOT``, path mapping, the
  locked state file), shared by every shim;
- :mod:`~testbed.sim.units`: systemd's unit states and the units a configuration defines;
- :mod:`~testbed.sim.unit_server`: the process behind a configuration's unit with a port;
- :mod:`~testbed.sim.activation`: nixpkgs' ``switch-to-configuration``;
- :mod:`~testbed.sim.systemctl`: systemd's ``systemctl``;
- :mod:`~testbed.sim.reboot`: ``systemctl reboot``, a host rebooting into its boot default;
- :mod:`~testbed.sim.systemd_run`: systemd's ``systemd-run`` and the transient services and
  timers the manager then runs;
- :mod:`~testbed.sim.nix_env`: Nix's ``nix-env`` on profiles;
- :mod:`~testbed.sim.nix_store`: Nix's ``nix-store`` (validity checks);
- :mod:`~testbed.sim.nix_cmd`, :mod:`~testbed.sim.nix_query`: Nix's ``nix`` on the host
  (``build`` of a derivation; ``store diff-closures``, ``path-info``, ``config show``);
- :mod:`~testbed.sim.shims`: ``sudo``, ``hostname`` and the path-mapping ``readlink``/``mkdir``/
  ``rm``/``rmdir``/``cat``/``tee``/``ls``;
- :mod:`~testbed.sim.dispatch`: :func:`~testbed.sim.dispatch.main`, the entry point of every
  shim, by the name the shim was called by (``systemctl``, ``systemd-run``, ``nix-env``,
  ``nix-store``, ``readlink``, ``mkdir``, ``rm``, ``rmdir``, ``cat``, ``tee``, ``ls``, ``sudo``,
  ``hostname``, ``rbtb-sim``); :func:`~testbed.sim.activation.stc_main` is a store path's
  ``bin/switch-to-configuration``.

How a command reaches that code fast (:mod:`testbed.hostbin` says which name runs what):

- :mod:`~testbed.sim.server`: the host's simulator, one long-lived process per host with these
  modules imported, which forks a child per command that becomes the caller's process (its
  argv, environment, credentials, stdio, working directory, signals) and runs
  :func:`~testbed.sim.dispatch.main`; the helpers that child starts are forks too;
- ``client.c`` (compiled with the system's cc) or :mod:`~testbed.sim.client` (Python without
  imports): the command's side, which hands its process over and exits as the command did;
- ``pathshim.sh`` and ``sudoshim.sh``: the path shims and ``sudo`` of :mod:`~testbed.sim.shims`
  in POSIX sh.

Each falls back to the Python shim (``hostbin/py/NAME``) when it cannot find its host or the
simulator. Only the standard library is used, and the dispatcher imports only the module of the
program called, so even that starts quickly under any Python 3.11. This package imports nothing
itself.
"""
