"""A test bed's ``hostbin/``: the programs at the front of every simulated host's PATH.

Each host's PATH directory links to these (:class:`testbed.testbed.SimHost`). What runs for each
name, chosen for start-up time (a Python shim costs about 40 ms a command, which on a small
machine made the simulated fleet the floor of every benchmark):

- the path shims (``readlink``, ``mkdir``, ``rm``, ``rmdir``, ``cat``, ``tee``, ``ls``,
  ``tail``, ``flock``: :data:`testbed.sim.shims.PATH_SHIMS`): ``sim/pathshim.sh``, the same
  shim in POSIX sh around the real programs;
- ``sudo``: ``sim/sudoshim.sh``, the same shim in POSIX sh, which execs the real sudo in the
  caller's own process (its terminal, its credentials);
- ``rbtb-sim``: the test bed's own helper (transient services, timers, unit servers, and the
  simulator itself), in Python;
- every other name (``systemctl``, ``systemd-run``, ``nix-env``, ``nix-store``, ``hostname``,
  ...): the client, which runs the command in the host's simulator
  (:mod:`testbed.sim.server`): ``sim/client.c`` compiled with the system's ``cc`` (once per user
  and source, cached in ``$TMPDIR/rebuild-testbed-<uid>/``), or ``sim/client.py`` when there is
  no C compiler or ``RBTB_CLIENT=python`` is set;
- ``py/NAME``: the Python shim of every name (:func:`testbed.sim.dispatch.main`): what the
  client and the sh shims run when they cannot find their host or its simulator.

Each name is a file of its own (not a link to a shared one), so a test can replace one command
of a host by writing through the link in the host's PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from testbed.sim.shims import PATH_SHIMS
from testbed.store import script_header

SIM_DIR = Path(__file__).resolve().parent / "sim"
# rbtb-sim is what starts the simulator (and its helpers: `python -IS hostbin/rbtb-sim ...`)
PYTHON_NAMES = ("rbtb-sim",)
CLIENT_ENV = "RBTB_CLIENT"  # "python": the Python client even when cc is there


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o755)


def _cache_dir() -> Path | None:
    """This user's private cache folder in the temp directory, or None if it is not safe."""
    path = Path(tempfile.gettempdir()) / f"rebuild-testbed-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path


def compiled_client() -> Path | None:
    """``sim/client.c`` built with the system's cc (cached), None without a compiler."""
    if os.environ.get(CLIENT_ENV) == "python":
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    cache = _cache_dir()
    if cc is None or cache is None:
        return None
    source = SIM_DIR / "client.c"
    digest = hashlib.sha256(
        b"\0".join([source.read_bytes(), cc.encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    target = cache / f"client-{digest}"
    if target.is_file():
        return target
    tmp = cache / f".client-{digest}.{os.getpid()}"
    try:
        result = subprocess.run(
            [cc, "-O2", "-o", str(tmp), str(source)],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    tmp.replace(target)
    return target


def install(hostbin: Path, python: str, names: Sequence[str]) -> str:
    """Fill ``hostbin`` for the shim ``names``; returns the client's kind, ``c`` or ``python``."""
    header = script_header(python)
    py_dir = hostbin / "py"
    py_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        script = (
            header
            + "from testbed.sim.dispatch import main\n"
            + f"sys.exit(main({name!r}, sys.argv[1:]))\n"
        )
        _write(py_dir / name, script.encode())
    binary = compiled_client()
    if binary is not None:
        client = binary.read_bytes()
        kind = "c"
    else:
        source = (SIM_DIR / "client.py").read_text(encoding="utf-8")
        client = f"#!{python} -IS\n{source}\nsys.exit(main({str(py_dir)!r}))\n".encode()
        kind = "python"
    # a copy per name, not links to one file: a test may replace one command of a host by
    # writing through its link in the host's PATH
    for name in names:
        if name in PATH_SHIMS:
            _write(hostbin / name, (SIM_DIR / "pathshim.sh").read_bytes())
        elif name == "sudo":
            _write(hostbin / name, (SIM_DIR / "sudoshim.sh").read_bytes())
        elif name in PYTHON_NAMES:
            (hostbin / name).symlink_to(Path("py") / name)
        else:
            _write(hostbin / name, client)
    return kind
