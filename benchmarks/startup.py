"""Start-up and test bed costs: `invoke --list`, a task's imports, and one simulated host command.

- `invoke --list` (issue #17: under 0.3 s), next to a bare `python -c pass` measured in the
  same run;
- the imports a deploy needs (`import rebuild.deploy`), the part of every task's start that
  rebuild controls;
- one command on a simulated host (issue #17: at most 5 ms each), run as the host runs it (its
  PATH of shims, its SIM_ROOT) in a loop of 20 inside one `sh`, next to `/bin/true` in the
  same loop: the command's own cost is the difference.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.bed import REPO, median
from testbed import Testbed

LOOP = 20
LIST_GOAL_S = 0.3
COMMAND_GOAL_MS = 5.0
COMMANDS = {
    "readlink -f /run/current-system": "readlink -f /run/current-system",
    "systemctl is-system-running": "systemctl is-system-running",
    "systemctl show -p ActiveState sshd.service": "systemctl show -p ActiveState sshd.service",
    "nix-env --list-generations (system)": (
        "nix-env -p /nix/var/nix/profiles/system --list-generations"
    ),
    "cat (a mapped /run path)": "cat /run/current-system/nixos-version",
}


def wall(argv: list[str], reps: int, **kwargs: Any) -> float:
    """Median wall seconds of `argv` over `reps` runs (after one warm-up)."""
    times = []
    for i in range(reps + 1):
        started = time.monotonic()
        subprocess.run(argv, capture_output=True, check=False, timeout=120, **kwargs)
        if i:
            times.append(time.monotonic() - started)
    return median(times)


def per_command_ms(env: dict[str, str], command: str, reps: int) -> float:
    script = f"i=0; while [ $i -lt {LOOP} ]; do {command} >/dev/null 2>&1; i=$((i+1)); done"
    return wall(["sh", "-c", script], reps, env=env, cwd="/") / LOOP * 1000


def run(reps: int = 5, say: Callable[[str], None] = print) -> dict[str, Any]:
    say("start-up benchmark: invoke --list, imports, one simulated host command")
    results: dict[str, Any] = {"reps": reps}
    python = sys.executable
    results["python_pass_s"] = round(wall([python, "-c", "pass"], reps), 3)
    results["invoke_list_s"] = round(
        wall([python, "-m", "invoke", "--search-root", str(REPO), "--list"], reps), 3
    )
    results["import_deploy_s"] = round(wall([python, "-c", "import rebuild.deploy"], reps), 3)
    with Testbed() as tb:
        host = tb.add_host("h00")
        env = host.local_env()
        base = per_command_ms(env, "/bin/true", reps)
        results["true_ms"] = round(base, 2)
        results["commands_ms"] = {
            name: round(per_command_ms(env, command, reps) - base, 2)
            for name, command in COMMANDS.items()
        }
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "",
        f"Start-up and the test bed (median of {results['reps']})",
        "",
        f"  python -c pass (baseline)            {results['python_pass_s']:6.3f}s",
        f"  invoke --list                        {results['invoke_list_s']:6.3f}s   "
        f"goal < {LIST_GOAL_S}s: {'ok' if results['invoke_list_s'] < LIST_GOAL_S else 'MISSED'}",
        f"  import rebuild.deploy                {results['import_deploy_s']:6.3f}s",
        "",
        f"  one simulated host command, over /bin/true ({results['true_ms']:.2f} ms) in the same "
        f"loop; goal <= {COMMAND_GOAL_MS:g} ms",
    ]
    for name, ms in results["commands_ms"].items():
        verdict = "ok" if ms <= COMMAND_GOAL_MS else "MISSED"
        lines.append(f"  {name:45} {ms:6.2f} ms  {verdict}")
    return "\n".join(lines)
