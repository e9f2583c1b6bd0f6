"""Whether some process holds a flock(2) on a file, asked without taking it for long."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def flock_held(path: Path) -> bool:
    """Does some process hold an exclusive-incompatible flock on `path` (False: no file)?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
