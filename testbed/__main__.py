"""``python -m testbed cleanup-stale``: remove what crashed test runs left behind.

Test beds (``$TMPDIR/rbtb-*``) whose creating process is gone: their recorded processes are
ended and their directories deleted; ``rbtb-*`` network namespaces of dead creators too.
"""

from __future__ import annotations

import sys

from testbed.testbed import cleanup_stale_testbeds


def main(argv: list[str]) -> int:
    if argv != ["cleanup-stale"]:
        print("usage: python -m testbed cleanup-stale", file=sys.stderr)
        return 2
    for path in cleanup_stale_testbeds():
        print(f"removed stale test bed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
