"""Per-host deploy scripts, `scripts/rebuild-NAME.sh`, generated from the inventory.

A wrapper is a thin, shellcheck-clean bash script: it finds the repository from its own location,
uses the repository's `.venv`, refuses bad arguments itself (exit 2, before the tool starts) and
then `exec`s `invoke rebuild --host NAME ...`, so every gate applies and the exit code is the
tool's.

`render` is pure and deterministic (no timestamps, no machine paths), so `invoke wrapper --check`
can compare a committed wrapper byte for byte with what the inventory gives now. A wrapper holds
no host facts but the host's name: a new address does not make it stale; a new host makes its
wrapper missing.
"""

from __future__ import annotations

import os
import re
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rebuild.console import Console
from rebuild.errors import ConfigError
from rebuild.inventory import ACTIONS, DEFAULT_INVENTORY, Loaded, Target, load
from rebuild.results import MEANINGS

SCRIPTS_DIR = "scripts"
MARKER = "# GENERATED FILE: DO NOT EDIT."
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_SAFE_RELPATH = re.compile(r"^[A-Za-z0-9_@+,.-]+(/[A-Za-z0-9_@+,.-]+)*$")


@dataclass(frozen=True)
class Flag:
    """A flag of `invoke rebuild` that a wrapper passes through unchanged."""

    name: str
    help: str


# Switches passed through as they are; each must be a flag of `invoke rebuild` (a test checks).
PASSTHROUGH: tuple[Flag, ...] = (
    Flag("--yes", "do not ask for confirmation (for automation)"),
    Flag("--dry-run", "run the gates and show the plan; change nothing anywhere"),
    Flag("--allow-dirty", "deploy from an uncommitted tree (recorded in the audit)"),
    Flag("--no-verify", "skip verification after activation (recorded in the audit)"),
    Flag("--no-rollback", "no dead-man timer, no rollback: a failed host stays on the new system"),
    Flag("--json", "print one JSON object on stdout (logs as JSON on stderr)"),
    Flag("--break-lock", "break a stale host lock (recorded in the audit)"),
    Flag("--no-preview", "no build ahead and no preview of the changes (one nixos-rebuild)"),
    Flag("--reboot", "reboot after activation when the new system needs it, then verify"),
)
# Flags of `invoke rebuild` that select other hosts or steer a fleet: a wrapper refuses them.
FLEET_FLAGS = ("--host", "--tag", "--all", "--batch", "--canary", "--max-fail", "--jobs")
_VALUED = frozenset({"--host", "--tag", "--batch", "--max-fail", "--jobs"})


def _sq(value: str) -> str:
    """A bash single-quoted literal (always quoted, whatever the value)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _plain_relpath(path: str) -> bool:
    """Letters, digits and `_@+,.-` in `/`-separated parts, none of them `.` or `..`."""
    return bool(_SAFE_RELPATH.match(path)) and not {".", ".."} & set(path.split("/"))


def script_relpath(host: str) -> str:
    """Where a host's wrapper lives, relative to the repository root."""
    return f"{SCRIPTS_DIR}/rebuild-{host}.sh"


def script_path(root: Path, host: str) -> Path:
    return root / SCRIPTS_DIR / f"rebuild-{host}.sh"


def command(inventory_path_relative: str, host: str) -> str:
    """The command that (re)generates a host's wrapper."""
    extra = "" if inventory_path_relative == DEFAULT_INVENTORY else (
        f" --inventory {inventory_path_relative}"
    )  # fmt: skip
    return f"invoke wrapper --host {host}{extra}"


def render(
    inventory_path_relative: str, target: Target, *, actions: Sequence[str] = ACTIONS
) -> str:
    """The wrapper script for one host (pure, deterministic)."""
    name = target.name
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"host name {name!r} cannot name a wrapper script")
    if not _plain_relpath(inventory_path_relative):
        raise ConfigError(f"{inventory_path_relative!r} is not a plain relative inventory path")
    for action in actions:
        if not _SAFE_NAME.match(action):
            raise ConfigError(f"action {action!r} cannot appear in a wrapper script")
    rel = script_relpath(name)
    regenerate = command(inventory_path_relative, name)
    action_list = "|".join(actions)
    action_words = " ".join(actions)
    action_patterns = "|".join(_sq(a) for a in actions)
    passthrough_patterns = "|".join(f.name for f in PASSTHROUGH)
    fleet_patterns = "|".join(f"{f}|{f}=*" if f in _VALUED else f for f in FLEET_FLAGS)
    width = max(len(f.name) for f in PASSTHROUGH) + 2
    width = max(width, len("ACTION, --action ACTION") + 2)
    flag_lines = "\n".join(f"  {f.name:<{width}}{f.help}" for f in PASSTHROUGH)
    exit_lines = "\n".join(
        textwrap.fill(meaning, 98, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
        for code, meaning in sorted(MEANINGS.items())
    )
    inventory_line = "--inventory PATH"
    help_text = f"""\
usage: {rel} [ACTION] [--action ACTION] [--yes] [--dry-run] [OPTIONS]
       {rel} -h|--help

Deploy the host {name} with `invoke rebuild --host {name}`: the operator allowlist, the git,
host-key and lock gates, the plan and the confirmation, nixos-rebuild, verification, the dead-man
rollback and the audit record all apply. Works from any directory: it finds the repository from
its own location and uses the repository's .venv.

Inputs:
  {"ACTION, --action ACTION":<{width}}{action_list}
  {"":<{width}}(default: the host's action in the inventory, else switch)
{flag_lines}
  {inventory_line:<{width}}another inventory file (default: {inventory_path_relative} in the
  {"":<{width}}repository; $REBUILD_INVENTORY is not consulted)
  {"-h, --help":<{width}}show this help; starts nothing

The host's address, user and default action: `invoke hosts`. Keys, tasks and the audit format:
docs/reference/index.md. Step by step and what to do for each exit code:
docs/playbooks/vps-rebuild.md. Several hosts at once: `invoke rebuild` from the repository.

Exit codes (those of `invoke rebuild`):
{exit_lines}
This script exits 2 itself, before the tool starts, for an unknown action or argument, and when
the repository or its .venv is missing."""
    return f"""\
#!/usr/bin/env bash
{MARKER}
# {rel}: deploy the host {name} with `invoke rebuild --host {name}`.
# Generated from the inventory {inventory_path_relative} (host {name}) by `{regenerate}`.
# Do not edit it: change the inventory or rebuild/wrapper.py and run that command again.
# CI fails when it differs from what the inventory generates now (`invoke wrapper --check`).
set -euo pipefail

readonly host={_sq(name)}
readonly inventory={_sq(inventory_path_relative)}  # relative to the repository root
readonly prog={_sq(rel)}

usage() {{
  cat <<'__REBUILD_WRAPPER_HELP__'
{help_text}
__REBUILD_WRAPPER_HELP__
}}

die() {{
  printf '%s: error: %s\\n' "$prog" "$1" >&2
  printf "%s: run '%s --help' for the inputs\\n" "$prog" "$prog" >&2
  exit 2
}}

action=''
set_action() {{
  [ -z "$action" ] || die "the action is given twice ('$action' and '$1')"
  case "$1" in
    {action_patterns}) action=$1 ;;
    *) die "unknown action '$1'; use one of: {action_words}" ;;
  esac
}}

inventory_arg=''
flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --action)
      [ $# -ge 2 ] || die "--action needs a value: {action_words}"
      set_action "$2"; shift 2 ;;
    --action=*) set_action "${{1#--action=}}"; shift ;;
    --inventory)
      if [ $# -lt 2 ] || [ -z "$2" ]; then die "--inventory needs a path"; fi
      inventory_arg=$2; shift 2 ;;
    --inventory=*)
      inventory_arg=${{1#--inventory=}}
      [ -n "$inventory_arg" ] || die "--inventory needs a path"
      shift ;;
    {passthrough_patterns}) flags+=("$1"); shift ;;
    {fleet_patterns})
      die "$1: this script deploys $host only; for other or several hosts run invoke rebuild" ;;
    -*) die "unknown option '$1'" ;;
    *) set_action "$1"; shift ;;
  esac
done

# The repository is the parent of this script's folder (symlinks to the script are followed).
self=${{BASH_SOURCE[0]}}
if resolved=$(readlink -f -- "$self" 2>/dev/null) && [ -n "$resolved" ]; then
  self=$resolved
fi
root=$(cd -P -- "$(dirname -- "$self")/.." && pwd -P)
if [ ! -f "$root/tasks.py" ]; then
  die "$root is not the rebuild repository (no tasks.py): keep this script in {SCRIPTS_DIR}/"
fi

invoke=$root/.venv/bin/invoke
if [ ! -x "$invoke" ]; then
  {{
    printf '%s: error: no virtualenv with rebuild in %s/.venv\\n' "$prog" "$root"
    printf 'set it up once (creates .venv, installs rebuild, then runs the demo):\\n'
    printf '  cd %q && scripts/setup.sh demo\\n' "$root"
    printf 'or, without the demo:\\n'
    printf '  cd %q && python3 -m venv .venv && .venv/bin/pip install -e .\\n' "$root"
  }} >&2
  exit 2
fi

set -- --inventory "${{inventory_arg:-$root/$inventory}}" ${{action:+--action "$action"}} \\
  ${{flags[@]+"${{flags[@]}}"}}
exec "$invoke" --search-root "$root" rebuild --host "$host" "$@"
"""


# --- IO ----------------------------------------------------------------------------------------


def relative_inventory(root: Path, inventory: Path) -> str:
    """The inventory's path relative to the repository root, as a wrapper records it."""
    try:
        rel = inventory.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ConfigError(
            f"{inventory}: the inventory is outside the repository {root}; a wrapper finds the "
            "inventory relative to its own location, so keep the inventory in the repository"
        ) from None
    if not _plain_relpath(rel):
        raise ConfigError(
            f"{inventory}: a wrapper needs a plain inventory path (letters, digits, '._-/')"
        )
    return rel


def expected(loaded: Loaded, root: Path, targets: Sequence[Target]) -> dict[Path, str]:
    """Every selected host's wrapper path and the text the inventory gives now."""
    rel = relative_inventory(root, loaded.path)
    return {script_path(root, t.name): render(rel, t) for t in targets}


def problem(path: Path, text: str) -> str | None:
    """Why the wrapper at `path` is not `text` (missing, different, not executable), or None."""
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable ({exc})"
    if current != text:
        return "differs from what the inventory generates now (edited, or generated by older code)"
    if not os.access(path, os.X_OK):
        return "not executable"
    return None


def orphans(root: Path, hosts: Sequence[str]) -> list[Path]:
    """Generated wrappers of hosts that are no longer in the inventory."""
    wanted = {script_path(root, h) for h in hosts}
    found = []
    for path in sorted((root / SCRIPTS_DIR).glob("rebuild-*.sh")):
        if path in wanted:
            continue
        try:
            head = path.read_text(encoding="utf-8")[:200]
        except (OSError, UnicodeDecodeError):
            continue
        if MARKER in head:
            found.append(path)
    return found


def write(path: Path, text: str) -> None:
    """Write atomically (a temporary file renamed into place), mode 0755."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        Path(tmp).chmod(0o755)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(inventory: str | None, hosts: list[str], *, every: bool, check: bool, root: Path) -> int:
    """`invoke wrapper`: write the selected wrappers, or with `check` report stale ones (exit 1)."""
    loaded = load(inventory)
    if not hosts and not every and not check:
        raise ConfigError("no host selected: give --host NAME or --all")
    whole = every or not hosts
    targets = loaded.targets() if whole else loaded.select(hosts)
    wanted = expected(loaded, root, targets)
    rel = relative_inventory(root, loaded.path)
    leftovers = orphans(root, [t.name for t in loaded.targets()]) if whole else []

    console = Console()

    def shown(path: Path) -> str:
        return path.relative_to(root).as_posix()

    if check:
        problems = []
        for target in targets:
            path = script_path(root, target.name)
            why = problem(path, wanted[path])
            if why is not None:
                problems.append(f"{shown(path)}: {why}; run `{command(rel, target.name)}`")
            else:
                console.say(f"{shown(path)}: up to date")
        for path in leftovers:
            problems.append(
                f"{shown(path)}: generated for a host that is no longer in {rel}; remove it "
                f"(git rm {shown(path)})"
            )
        for line in problems:
            console.notice(line)
        if problems:
            console.notice(
                f"{len(problems)} wrapper(s) out of date with {rel}; fix them and commit the result"
            )
            return 1
        return 0
    for path, text in wanted.items():
        if problem(path, text) is None:
            console.say(f"{shown(path)}: up to date")
            continue
        write(path, text)
        console.say(f"wrote {shown(path)}")
    for path in leftovers:
        console.notice(
            f"note: {shown(path)} was generated for a host that is no longer in {rel}; "
            f"remove it (git rm {shown(path)})"
        )
    return 0
