"""Run the benchmarks: `.venv/bin/python -m benchmarks [--only fleet|verify|status|preview|startup]
[--hosts N]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import fleet, preview, startup, status, verification
from benchmarks.bed import require_tools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only",
        choices=("fleet", "verify", "status", "preview", "startup"),
        help="run one benchmark only",
    )
    parser.add_argument("--hosts", type=int, default=20, help="fleet size (default 20)")
    parser.add_argument(
        "--reps",
        type=int,
        default=2,
        help="repetitions of the short measurements (median; default 2)",
    )
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="loopback hosts even when network namespaces are available",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    why = require_tools()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    compiled()

    started = time.monotonic()
    out: dict[str, object] = {}
    reports = []
    if args.only in (None, "startup"):
        st = startup.run(max(args.reps, 5), say=say)
        out["startup"] = st
        reports.append(startup.report(st))
    if args.only in (None, "verify"):
        v = verification.run(reps=max(args.reps, 3), say=say)
        out["verification"] = v
        reports.append(verification.report(v))
    if args.only in (None, "fleet"):
        f = fleet.run(args.hosts, args.reps, want_netns=not args.loopback, say=say)
        pairs = f.pop("_pairs")
        reports.append(fleet.report({**f, "_pairs": pairs}))
        out["fleet"] = f
    if args.only in (None, "status"):
        s = status.run(args.hosts, max(args.reps, 3), want_netns=not args.loopback, say=say)
        out["status"] = s
        reports.append(status.report(s))
    if args.only in (None, "preview"):
        p = preview.run(max(args.reps, 3), want_netns=not args.loopback, say=say)
        out["preview"] = p
        reports.append(preview.report(p))
    for text in reports:
        print(text)
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


def compiled() -> None:
    """Byte-compile what the measured commands import, as an install has it: a source newer
    than its cached bytecode is compiled again by every run, and with PYTHONDONTWRITEBYTECODE
    (set on some machines) never written back (measured: 30-75 ms more per command)."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for name in ("rebuild", "testbed", "tasks.py"):
        path = root / name
        if path.is_dir():
            compileall.compile_dir(path, quiet=1)
        elif path.exists():
            compileall.compile_file(path, quiet=1)


if __name__ == "__main__":
    sys.exit(main())
