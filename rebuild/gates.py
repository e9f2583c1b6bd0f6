"""The gates every task shares: who may act, what is deployed (a clean tree), which host
(a known key), and whether someone can be asked. Each refuses with GateRefused (exit 3) and
one line that names the problem and the fix; each returns the overrides it let through."""

from __future__ import annotations

from collections.abc import Iterable

from rebuild import gitstate, identity
from rebuild.console import stdin_is_terminal
from rebuild.errors import GateRefused
from rebuild.inventory import Loaded
from rebuild.remote import Endpoint, host_key_problem


def operator_gate(loaded: Loaded, me: identity.Identity) -> str:
    """Refuse unless this machine is on the allowlist; returns the operator's name."""
    operator = identity.authorize(me, loaded.inventory.operators)
    if operator is None:
        why = "the allowlist is empty" if not loaded.inventory.operators else "it is not listed"
        raise GateRefused(
            f"this machine ({me.hostname}, machine-id {me.machine_id or 'unknown'}) "
            f"may not deploy: "
            f"{why} in {loaded.path} [[operators]]; run `invoke operator` to see the lines that "
            "would authorize it, and have them reviewed and committed"
        )
    return operator.name


def git_gate(state: gitstate.GitState | None, allow_dirty: bool) -> list[str]:
    """Refuse an uncommitted tree unless --allow-dirty; returns the overrides used."""
    if state is None or not state.dirty:
        return []
    if allow_dirty:
        return ["allow-dirty"]
    if not state.is_repo:
        raise GateRefused(
            "the flake is not in a git repository, so what is deployed cannot be traced to a "
            "commit; commit it to git, or pass --allow-dirty (recorded in the audit)"
        )
    shown = ", ".join(state.dirty_files[: gitstate.MAX_LISTED])
    more = len(state.dirty_files) - gitstate.MAX_LISTED
    extra = f" (+{more} more)" if more > 0 else ""
    raise GateRefused(
        f"the flake's git tree is dirty: {shown}{extra}; commit or stash the changes, or pass "
        "--allow-dirty (recorded in the audit)"
    )


def host_key_gate(endpoints: Iterable[Endpoint]) -> None:
    """Refuse a host whose key is not in the inventory's known_hosts (checked again, strictly,
    on every connection)."""
    for endpoint in endpoints:
        problem = host_key_problem(endpoint)
        if problem is not None:
            raise GateRefused(problem)


def terminal_gate(*, yes: bool, dry_run: bool) -> None:
    """Refuse to deploy unattended unless told to (--yes)."""
    if not yes and not dry_run and not stdin_is_terminal():
        raise GateRefused(
            "no terminal to ask for confirmation; pass --yes to deploy without a prompt"
        )
