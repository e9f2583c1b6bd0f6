"""What will run where, rendered for the confirmation prompt (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from rebuild.inventory import VerifySpec
from rebuild.nixos import render
from rebuild.preview import Changes


@dataclass(frozen=True)
class HostPlan:
    host: str
    address: str
    user: str
    action: str
    flake_attr: str
    command: tuple[str, ...]
    expected_system: str | None
    current_system: str | None
    checks: tuple[str, ...]
    rollback_timeout: int
    changes: Changes | None = None  # the preview (None: not built ahead)
    preview_note: str = ""  # why there is no preview


@dataclass(frozen=True)
class Plan:
    run_id: str
    commit: str | None
    subject: str
    dirty_files: tuple[str, ...]
    overrides: tuple[str, ...]
    hosts: tuple[HostPlan, ...]
    batches: tuple[tuple[str, ...], ...]
    totals: str = ""  # the fleet's preview totals


def check_names(spec: VerifySpec, action: str, verify: bool) -> tuple[str, ...]:
    """The checks that will run after this action, in report order."""
    if not verify or action in ("build", "dry-activate"):
        return ()
    if action == "boot":
        return ("ssh", "system-profile")
    names = ["ssh", "current-system", "system-state", "failed-units"]
    names += [f"unit {u}" for u in spec.units]
    names += [f"port {p}" for p in spec.ports]
    names += [f"http {h.url}" for h in spec.http]
    names += [f"command {c.name}" for c in spec.commands]
    return tuple(names)


def render_plan(plan: Plan) -> str:
    lines = [f"Plan (run {plan.run_id})"]
    commit = (plan.commit or "unknown")[:12]
    lines.append(f"  commit:    {commit} {plan.subject}".rstrip())
    if plan.dirty_files:
        shown = list(plan.dirty_files[:10])
        more = len(plan.dirty_files) - len(shown)
        lines.append("  dirty:     yes: " + ", ".join(shown) + (f" (+{more} more)" if more else ""))
    else:
        lines.append("  dirty:     no")
    lines.append("  overrides: " + (", ".join(plan.overrides) if plan.overrides else "none"))
    for hp in plan.hosts:
        lines.append("")
        lines.append(f"  host {hp.host}")
        lines.append(f"    address:  {hp.user}@{hp.address}")
        lines.append(f"    action:   {hp.action}")
        lines.append(f"    flake:    {hp.flake_attr}")
        lines.append(f"    expected: {hp.expected_system or 'unknown'}")
        if hp.current_system is not None:
            same = " (unchanged)" if hp.current_system == hp.expected_system else ""
            lines.append(f"    running:  {hp.current_system}{same}")
        lines.append(f"    command:  {render(hp.command)}")
        timer = (
            f"rollback in {hp.rollback_timeout}s unless verified"
            if hp.rollback_timeout and hp.action in ("switch", "test")
            else "off"
        )
        lines.append(f"    dead-man: {timer}")
        lines.append("    checks:   " + (", ".join(hp.checks) if hp.checks else "none"))
        lines += preview_lines(hp)
    if len(plan.hosts) > 1:
        lines.append("")
        if plan.totals:
            lines.append(f"  changes:   {plan.totals}")
        for i, batch in enumerate(plan.batches, 1):
            lines.append(f"  batch {i}: {', '.join(batch)}")
    return "\n".join(lines)


MAX_LISTED = 12


def preview_lines(hp: HostPlan) -> list[str]:
    """The preview under a host: a summary line, then what it is made of."""
    if hp.changes is None:
        return [f"    changes:  {hp.preview_note}"] if hp.preview_note else []
    c = hp.changes
    lines = [f"    changes:  {c.summary()}"]
    for p in c.packages[:MAX_LISTED]:
        lines.append(f"      ~ {p.name} {', '.join(p.before) or '∅'} → {', '.join(p.after) or '∅'}")
    lines += [f"      + {name}" for name in c.added[:MAX_LISTED]]
    lines += [f"      - {name}" for name in c.removed[:MAX_LISTED]]
    hidden = sum(max(0, len(x) - MAX_LISTED) for x in (c.packages, c.added, c.removed))
    if hidden:
        lines.append(f"      ... and {hidden} more (--json lists them all)")
    lines += [f"      ! {problem}" for problem in c.problems]
    return lines


def batches(hosts: list[str], *, batch: int | None, canary: bool) -> tuple[tuple[str, ...], ...]:
    """Split a rollout: the canary alone first, then groups of `batch` (default: all at once)."""
    rest = list(hosts)
    out: list[tuple[str, ...]] = []
    if canary and rest:
        out.append((rest.pop(0),))
    size = batch if batch and batch > 0 else max(len(rest), 1)
    for i in range(0, len(rest), size):
        out.append(tuple(rest[i : i + size]))
    return tuple(out)
