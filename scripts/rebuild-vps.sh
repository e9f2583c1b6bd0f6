#!/usr/bin/env bash
# GENERATED FILE: DO NOT EDIT.
# scripts/rebuild-vps.sh: deploy the host vps with `invoke rebuild --host vps`.
# Generated from the inventory inventory.toml (host vps) by `invoke wrapper --host vps`.
# Do not edit it: change the inventory or rebuild/wrapper.py and run that command again.
# CI fails when it differs from what the inventory generates now (`invoke wrapper --check`).
set -euo pipefail

readonly host='vps'
readonly inventory='inventory.toml'  # relative to the repository root
readonly prog='scripts/rebuild-vps.sh'

usage() {
  cat <<'__REBUILD_WRAPPER_HELP__'
usage: scripts/rebuild-vps.sh [ACTION] [--action ACTION] [--yes] [--dry-run] [OPTIONS]
       scripts/rebuild-vps.sh -h|--help

Deploy the host vps with `invoke rebuild --host vps`: the operator allowlist, the git,
host-key and lock gates, the plan and the confirmation, nixos-rebuild, verification, the dead-man
rollback and the audit record all apply. Works from any directory: it finds the repository from
its own location and uses the repository's .venv.

Inputs:
  ACTION, --action ACTION  switch|boot|test|dry-activate|build
                           (default: the host's action in the inventory, else switch)
  --yes                    do not ask for confirmation (for automation)
  --dry-run                run the gates and show the plan; change nothing anywhere
  --allow-dirty            deploy from an uncommitted tree (recorded in the audit)
  --no-verify              skip verification after activation (recorded in the audit)
  --no-rollback            no dead-man timer, no rollback: a failed host stays on the new system
  --json                   print one JSON object on stdout (logs as JSON on stderr)
  --break-lock             break a stale host lock (recorded in the audit)
  --no-preview             no build ahead and no preview of the changes (one nixos-rebuild)
  --reboot                 reboot after activation when the new system needs it, then verify
  --inventory PATH         another inventory file (default: inventory.toml in the
                           repository; $REBUILD_INVENTORY is not consulted)
  -h, --help               show this help; starts nothing

The host's address, user and default action: `invoke hosts`. Keys, tasks and the audit format:
docs/reference/index.md. Step by step and what to do for each exit code:
docs/playbooks/vps-rebuild.md. Several hosts at once: `invoke rebuild` from the repository.

Exit codes (those of `invoke rebuild`):
  0    done, verified
  1    internal error (a bug)
  2    bad usage or configuration: invalid inventory, unknown host, bad flag
  3    refused by a safety gate: operator not allowlisted, dirty tree, host locked, host key
       unknown or changed, no terminal for the prompt and no --yes, host unreachable before
       anything changed, audit log not writable
  4    declined or aborted at the confirmation (including Ctrl-C before anything changed)
  5    nixos-rebuild failed
  6    verification failed; the host stays on the new system (--no-rollback), or it stopped
       answering after activation
  7    the host was rolled back to the previous system (verification failed, or the host was lost
       and its own timer restored it)
  130  interrupted (Ctrl-C) after changes began; the dead-man timer protects the host
This script exits 2 itself, before the tool starts, for an unknown action or argument, and when
the repository or its .venv is missing.
__REBUILD_WRAPPER_HELP__
}

die() {
  printf '%s: error: %s\n' "$prog" "$1" >&2
  printf "%s: run '%s --help' for the inputs\n" "$prog" "$prog" >&2
  exit 2
}

action=''
set_action() {
  [ -z "$action" ] || die "the action is given twice ('$action' and '$1')"
  case "$1" in
    'switch'|'boot'|'test'|'dry-activate'|'build') action=$1 ;;
    *) die "unknown action '$1'; use one of: switch boot test dry-activate build" ;;
  esac
}

inventory_arg=''
flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --action)
      [ $# -ge 2 ] || die "--action needs a value: switch boot test dry-activate build"
      set_action "$2"; shift 2 ;;
    --action=*) set_action "${1#--action=}"; shift ;;
    --inventory)
      if [ $# -lt 2 ] || [ -z "$2" ]; then die "--inventory needs a path"; fi
      inventory_arg=$2; shift 2 ;;
    --inventory=*)
      inventory_arg=${1#--inventory=}
      [ -n "$inventory_arg" ] || die "--inventory needs a path"
      shift ;;
    --yes|--dry-run|--allow-dirty|--no-verify|--no-rollback|--json|--break-lock|--no-preview|--reboot) flags+=("$1"); shift ;;
    --host|--host=*|--tag|--tag=*|--all|--batch|--batch=*|--canary|--max-fail|--max-fail=*|--jobs|--jobs=*)
      die "$1: this script deploys $host only; for other or several hosts run invoke rebuild" ;;
    -*) die "unknown option '$1'" ;;
    *) set_action "$1"; shift ;;
  esac
done

# The repository is the parent of this script's folder (symlinks to the script are followed).
self=${BASH_SOURCE[0]}
if resolved=$(readlink -f -- "$self" 2>/dev/null) && [ -n "$resolved" ]; then
  self=$resolved
fi
root=$(cd -P -- "$(dirname -- "$self")/.." && pwd -P)
if [ ! -f "$root/tasks.py" ]; then
  die "$root is not the rebuild repository (no tasks.py): keep this script in scripts/"
fi

invoke=$root/.venv/bin/invoke
if [ ! -x "$invoke" ]; then
  {
    printf '%s: error: no virtualenv with rebuild in %s/.venv\n' "$prog" "$root"
    printf 'set it up once (creates .venv, installs rebuild, then runs the demo):\n'
    printf '  cd %q && scripts/setup.sh demo\n' "$root"
    printf 'or, without the demo:\n'
    printf '  cd %q && python3 -m venv .venv && .venv/bin/pip install -e .\n' "$root"
  } >&2
  exit 2
fi

set -- --inventory "${inventory_arg:-$root/$inventory}" ${action:+--action "$action"} \
  ${flags[@]+"${flags[@]}"}
exec "$invoke" --search-root "$root" rebuild --host "$host" "$@"
