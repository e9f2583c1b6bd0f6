"""Hooks around the real `invoke rebuild`: the host's audit record on stdin, the REBUILD_*
variables in the environment, `on` filtering, and a failing hook that changes no exit code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.integration.conftest import Deployment


def add_hooks(d: Deployment, out: Path, *, on_capture: str | None = None) -> None:
    """Three hooks: one that captures its stdin and environment, one filtered out, one that
    fails."""
    capture_on = f"on = {json.dumps([on_capture])}\n" if on_capture else ""
    never = "rolled_back" if on_capture != "rolled_back" else "ok"
    hooks = (
        "\n[[hooks]]\n" + capture_on
        + f'run = "cat > {out}/stdin.json; env | grep ^REBUILD_ | sort > {out}/env.txt"\n'
        + f'\n[[hooks]]\non = ["{never}"]\nrun = "touch {out}/filtered-ran"\n'
        + '\n[[hooks]]\nrun = "echo broken hook >&2; exit 3"\n'
    )  # fmt: skip
    d.inventory.write_text(d.inventory.read_text() + hooks)


def environment(out: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines())


def head(d: Deployment) -> str:
    return subprocess.run(["git", "-C", str(d.flake), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def test_hooks_after_a_deploy(deployment: Deployment) -> None:
    """After a good deploy (exit 0): the capturing hook got the record and the variables, the
    hook for another result did not run, the failing hook is one warning line, exit stays 0."""
    d = deployment
    out = d.tb.root / "hook-out"
    out.mkdir()
    add_hooks(d, out)
    done = d.invoke("rebuild", "--host", "vps", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = d.records()
    assert json.loads((out / "stdin.json").read_text()) == record
    assert environment(out) == {
        "REBUILD_RUN_ID": record["run_id"],
        "REBUILD_HOST": "vps",
        "REBUILD_RESULT": "ok",
        "REBUILD_EXIT_CODE": "0",
        "REBUILD_COMMIT": head(d),
        "REBUILD_OPERATOR": "ci",
        # the test bed's own variables, inherited from the operator's environment
        **{k: v for k, v in d.env().items() if k.startswith("REBUILD_")},
    }
    assert not (out / "filtered-ran").exists()
    warnings = [line for line in done.stderr.splitlines() if "hook `" in line]
    assert warnings == [
        "warning: [vps] hook `echo broken hook >&2; exit 3` failed: exit code 3 (the run's "
        "exit code is unchanged)"
    ]
    assert "[vps] hook: broken hook" in done.stderr


def test_hooks_after_a_refusal(deployment: Deployment) -> None:
    """A refused run (dirty tree, exit 3) runs the hooks that want `refused`, with exit code 3
    in the environment; the failing hook leaves the exit code at 3."""
    d = deployment
    out = d.tb.root / "hook-out"
    out.mkdir()
    add_hooks(d, out, on_capture="refused")
    (d.flake / "hosts" / "vps.json").write_text("{}\n")
    done = d.invoke("rebuild", "--host", "vps", "--yes")
    assert done.returncode == 3, done.stdout + done.stderr
    env = environment(out)
    assert (env["REBUILD_RESULT"], env["REBUILD_EXIT_CODE"]) == ("refused", "3")
    assert json.loads((out / "stdin.json").read_text())["result"] == "refused"
    assert not (out / "filtered-ran").exists()
    assert "failed: exit code 3" in done.stderr


def test_dry_run_runs_no_hook(deployment: Deployment) -> None:
    d = deployment
    out = d.tb.root / "hook-out"
    out.mkdir()
    add_hooks(d, out)
    done = d.invoke("rebuild", "--host", "vps", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert not (out / "stdin.json").exists()
