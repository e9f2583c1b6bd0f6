"""``sudo``, ``hostname`` and the path-mapping ``readlink``/``mkdir``/``rm``/``rmdir``/``cat``/...

The path shims (``readlink``, ``mkdir``, ``rm``, ``rmdir``, ``cat``, ``tee``, ``ls``, ``tail``,
``flock``) run
the real coreutils from ``/usr/bin``/``/bin`` with ``/run``, ``/nix/var`` and ``/var/lib``
arguments rewritten into
``SIM_ROOT`` (:func:`testbed.sim.host.map_arg`) and host paths shown back in their output, so
that rebuild's POSIX sh scripts (locks under ``/run``, ``readlink /run/current-system``) behave
as on NixOS. ``sudo`` is the real sudo(8): the shim finds where the command starts (sudo's
options as sudo(8) lists them, some of which take a value) and runs ``sudo OPTIONS --
/usr/bin/env PATH=... SIM_ROOT=... COMMAND``, because sudo's ``env_reset`` (sudoers(5)) resets
both; ``-i``/``-s`` and sudo without a command go to the real sudo untouched. ``hostname``
prints the simulated host's name (``-I``: its address), as hostname(1) does on the real host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

from testbed.sim.host import Host, find_sim_root, map_arg, unmap_text
from testbed.store import SimError

# `cat` also reads the host's SSH host public keys (what `invoke enroll` reads): the host's
# /etc/ssh is $SIM_ROOT/etc/ssh, whose ssh_host_*_key.pub link to the keys its sshd serves
HOST_KEY_RE = re.compile(r"^/etc/ssh/ssh_host_[a-z0-9]+_key\.pub$")

PATH_SHIMS = {
    "readlink": "readlink",
    "mkdir": "mkdir",
    "rm": "rm",
    "rmdir": "rmdir",
    "cat": "cat",
    "tee": "tee",
    "ls": "ls",
    "tail": "tail",
    # the dead-man restore waits on switch-to-configuration's lock with flock(1)
    # (rebuild.hostops.restore_command): the host's /run/nixos lock, never this machine's
    "flock": "flock",
}


def _real_binary(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/bin")
    if found is None:
        raise SimError(f"{name}: not found in /usr/bin or /bin")
    return found


def path_shim(name: str, argv: Sequence[str]) -> int:
    """readlink/mkdir/rm/rmdir/cat/tee/ls with /run and /nix/var mapped into SIM_ROOT."""
    try:
        root = find_sim_root()
        real = _real_binary(PATH_SHIMS[name])
    except SimError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    mapped = [map_arg(a, root) for a in argv]
    if name == "cat":
        mapped = [f"{root}{a}" if HOST_KEY_RE.match(a) else a for a in mapped]
    capture_out = name in ("readlink", "ls")
    result = subprocess.run(
        [name, *mapped],
        executable=real,
        stdout=subprocess.PIPE if capture_out else None,
        stderr=subprocess.PIPE,
        check=False,
    )
    if capture_out:
        sys.stdout.write(unmap_text(result.stdout.decode(errors="surrogateescape"), root))
        sys.stdout.flush()
    sys.stderr.write(unmap_text(result.stderr.decode(errors="surrogateescape"), root))
    return result.returncode


_SUDO_ARG_SHORT = set("CDgpRrtTUu")
_SUDO_ARG_LONG = {
    "--close-from",
    "--chdir",
    "--group",
    "--host",
    "--prompt",
    "--chroot",
    "--role",
    "--type",
    "--command-timeout",
    "--other-user",
    "--user",
}


def _exec(path: str, argv: list[str]) -> NoReturn:
    os.execv(path, argv)  # noqa: S606 (replacing the shim by the real program is the point)


def sudo_shim(argv: Sequence[str]) -> int:
    """Real sudo, but the command keeps the host's PATH and SIM_ROOT (sudo resets both)."""
    real = "/usr/bin/sudo"
    args = list(argv)
    i = 0
    shell_mode = False
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg.startswith("--"):
            key = arg.split("=", 1)[0]
            i += 1
            if key in _SUDO_ARG_LONG and "=" not in arg:
                i += 1
            if key in ("--login", "--shell"):
                shell_mode = True
            continue
        i += 1
        letters = arg[1:]
        for pos, ch in enumerate(letters):
            if ch in "is":
                shell_mode = True
            if ch in _SUDO_ARG_SHORT:
                if pos == len(letters) - 1:
                    i += 1
                break
    options, command = args[: min(i, len(args))], args[min(i, len(args)) :]
    if options and options[-1] == "--":
        options = options[:-1]
    if not command or shell_mode:
        _exec(real, [real, *args])
    try:
        root = find_sim_root()
    except SimError:
        _exec(real, [real, *args])
    assignments: list[str] = []
    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
        assignments.append(command.pop(0))
    if not command:
        _exec(real, [real, *args])
    command = [map_arg(a, root) for a in command]
    path = os.environ.get("PATH", "/usr/bin:/bin")
    env_cmd = ["/usr/bin/env", f"PATH={path}", f"SIM_ROOT={root}", *assignments]
    _exec(real, [real, *options, "--", *env_cmd, *command])


def hostname_shim(argv: Sequence[str]) -> int:
    """``hostname`` prints the simulated host's name (``-I``: its address)."""
    try:
        host = Host.load()
    except SimError:
        _exec("/usr/bin/hostname", ["hostname", *argv])
    if not argv or argv[0] in ("-s", "--short", "-f", "--fqdn", "--long", "-A"):
        print(host.name)
        return 0
    if argv[0] in ("-I", "--all-ip-addresses", "-i", "--ip-address"):
        print(host.address)
        return 0
    _exec("/usr/bin/hostname", ["hostname", *argv])
