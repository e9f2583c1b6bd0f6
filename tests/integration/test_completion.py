"""Shell completion, as the README enables it: Invoke's own completion script, sourced into a
real bash, completes rebuild's tasks and their flags from the repository root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)  # the virtualenv's invoke


def env() -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("REBUILD_")}
    values["PATH"] = f"{BIN}:{values.get('PATH', '/usr/bin:/bin')}"
    return values


def bash_complete(*words: str) -> list[str]:
    """What bash offers for `words` (the last one being completed) with the README's line."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    quoted = " ".join(f"'{w}'" for w in words)
    script = (
        'source <(invoke --print-completion-script bash)\n'
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        f"_complete_invoke invoke '{words[-1]}' '{words[-2]}'\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )  # fmt: skip
    done = subprocess.run([bash, "-c", script], capture_output=True, text=True, env=env(),
                          cwd=REPO, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line]


def test_task_names() -> None:
    assert bash_complete("invoke", "reb") == ["rebuild"]
    assert bash_complete("invoke", "st") == ["status"]
    assert bash_complete("invoke", "do") == ["doctor"]
    offered = bash_complete("invoke", "")
    for task in ("rebuild", "verify", "rollback", "status", "doctor", "hosts", "history"):
        assert task in offered


def test_flags_of_a_task() -> None:
    assert bash_complete("invoke", "rebuild", "--ho") == ["--host"]
    flags = bash_complete("invoke", "rebuild", "--")
    for flag in ("--host", "--tag", "--all", "--action", "--yes", "--dry-run", "--json",
                 "--inventory"):  # fmt: skip
        assert flag in flags
    assert set(bash_complete("invoke", "status", "--")) == {
        "--host", "--tag", "--all", "--json", "--inventory",
    }  # fmt: skip


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_every_shell_has_a_script(shell: str) -> None:
    """The README's line for each shell prints a script that asks `invoke --complete`."""
    done = subprocess.run([f"{BIN}/invoke", "--print-completion-script", shell],
                          capture_output=True, text=True, env=env(), cwd=REPO, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--complete" in done.stdout
