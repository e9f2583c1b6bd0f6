"""The preview before the prompt: what a switch to the new system will change on a host, read
from the real tools' own answers in one round trip (pure: the host script and its parsers).

- packages whose version changes, added and removed: `nix store diff-closures CURRENT NEW`
  (Nix's `src/nix/diff-closures.cc`: one line per package name, `name: 1.0 → 1.1, +12.3 KiB`,
  `∅` for absent, `ε` for an empty version, the size only when it changed by 8 KiB or more,
  ANSI colour codes around it even when stdout is no terminal);
- the closure size change: `nix path-info -S --json` of both systems (an object keyed by store
  path from Nix 2.19 on, a list of objects with `path` before);
- the units that would stop, start, restart and reload: `NEW/bin/switch-to-configuration
  dry-activate` (switch-to-configuration-ng `src/src/main.rs`: stderr lines `would stop the
  following units: A, B`, `would NOT stop the following changed units: ...`, `would restart
  the following units: ...`, `would reload ...`, `would start ...`, each only when non-empty);
- a reboot is needed when the new system's `kernel`, `initrd` or `kernel-modules` differ from
  `/run/booted-system`'s (as bento and nxbd decide it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from shlex import quote

from rebuild.facts import parse_store_path, split_sections

MARK = "@@rebuild-preview@@"
BOOT_LINKS = ("kernel", "initrd", "kernel-modules")
EXPERIMENTAL = "--extra-experimental-features nix-command"
DRY_ACTIVATE_TIMEOUT = 120
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# `%+.1f KiB` (Nix 2.28 and before), or renderSize's `12.3 KiB`, `-1.2 MiB` (later Nix:
# src/libutil/util.cc, no plus sign, the unit scaled)
_SIZE = re.compile(r"^([+-]?\d+(?:\.\d+)?) [KMGTPEZY]iB$")


@dataclass(frozen=True)
class PackageChange:
    name: str
    before: tuple[str, ...]
    after: tuple[str, ...]


@dataclass(frozen=True)
class Changes:
    """What the switch will do on one host (the contract's `changes` object)."""

    packages: tuple[PackageChange, ...] = ()  # versions changed
    added: tuple[str, ...] = ()  # "name version"
    removed: tuple[str, ...] = ()
    size_delta_bytes: int | None = None
    units: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reboot_reasons: tuple[str, ...] = ()
    unchanged: bool = False  # the host runs the new system already
    problems: tuple[str, ...] = ()  # a part of the preview the host could not answer

    @property
    def reboot_needed(self) -> bool:
        return bool(self.reboot_reasons)

    def to_json(self) -> dict[str, object]:
        return {
            "packages": [
                {"name": p.name, "from": ", ".join(p.before), "to": ", ".join(p.after)}
                for p in self.packages
            ],
            "added": list(self.added),
            "removed": list(self.removed),
            "size_delta_bytes": self.size_delta_bytes,
            "units": {kind: list(self.units.get(kind, ())) for kind in UNIT_KINDS},
            "reboot_needed": self.reboot_needed,
            "reboot_reasons": list(self.reboot_reasons),
        }

    def summary(self) -> str:
        """One line: `3 packages changed (openssl 3.0.13 → 3.0.14, ...), 2 added, 1 removed,
        +1.2 MiB; restarts nginx.service; reboot needed (kernel)`."""
        if self.unchanged:
            return "no change: the host runs this system already"
        parts: list[str] = []
        if self.packages:
            shown = ", ".join(
                f"{p.name} {', '.join(p.before) or '∅'} → {', '.join(p.after) or '∅'}"
                for p in self.packages[:3]
            )
            more = f", +{len(self.packages) - 3} more" if len(self.packages) > 3 else ""
            parts.append(f"{len(self.packages)} changed ({shown}{more})")
        if self.added:
            parts.append(f"{len(self.added)} added")
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if not parts:
            parts.append("none changed")
        if self.size_delta_bytes is not None:
            parts.append(human_delta(self.size_delta_bytes))
        line = "packages: " + ", ".join(parts)
        units = [
            f"{verb} {', '.join(self.units[kind])}"
            for kind, verb in (
                ("stop", "stops"),
                ("restart", "restarts"),
                ("reload", "reloads"),
                ("start", "starts"),
            )
            if self.units.get(kind)
        ]
        line += "; " + ("; ".join(units) if units else "no unit restarts")
        if self.reboot_needed:
            line += f"; REBOOT NEEDED ({', '.join(self.reboot_reasons)})"
        return line


UNIT_KINDS = ("stop", "start", "restart", "reload")


def human_delta(size: int) -> str:
    sign = "+" if size >= 0 else "-"
    value = float(abs(size))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.1f} {unit}" if unit != "B" else f"{sign}{int(value)} B"
        value /= 1024
    return f"{sign}{value:.1f} GiB"  # pragma: no cover


# --- the host script ---------------------------------------------------------------------------


def script(new: str) -> str:
    """One round trip, as root (dry-activate needs it): the booted and current systems, the boot
    links of both, Nix's diff of the closures, their sizes, and the dry activation."""
    q = quote(new)
    lines = [
        f"cur=$(readlink -f /run/current-system 2>/dev/null); echo '{MARK} current'; echo \"$cur\"",
        f"echo '{MARK} booted'; readlink -f /run/booted-system 2>/dev/null",
    ]
    for link in BOOT_LINKS:
        lines += [
            f"echo '{MARK} booted-{link}'; readlink -e /run/booted-system/{link} 2>/dev/null",
            f"echo '{MARK} new-{link}'; readlink -e {quote(new + '/' + link)} 2>/dev/null",
        ]
    lines += [
        f"echo '{MARK} diff'; nix {EXPERIMENTAL} store diff-closures \"$cur\" {q} 2>&1",
        f"echo '{MARK} sizes'; nix {EXPERIMENTAL} path-info -S --json \"$cur\" {q} 2>/dev/null",
        f"echo '{MARK} activate'; timeout {DRY_ACTIVATE_TIMEOUT} "
        f"{quote(new + '/bin/switch-to-configuration')} dry-activate 2>&1; "
        f"echo '{MARK} activate-rc' $?",
        f"echo '{MARK} end'",
    ]
    return "\n".join(f"{line}; true" for line in lines) + "\n"


# --- parsers ---------------------------------------------------------------------------------


def _versions(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text in ("∅", ""):
        return ()
    return tuple("" if v.strip() == "ε" else v.strip() for v in text.split(", "))


def parse_diff_closures(
    lines: list[str],
) -> tuple[tuple[PackageChange, ...], tuple[str, ...], tuple[str, ...]]:
    """`nix store diff-closures` → (version changes, added, removed). A line is
    `name: V1, V2 → V3, +12.3 KiB` (versions, then optionally the size), or `name: +12.3 KiB`
    (only the size changed, not listed)."""
    changed: list[PackageChange] = []
    added: list[str] = []
    removed: list[str] = []
    for raw in lines:
        line = _ANSI.sub("", raw).strip()
        name, sep, rest = line.partition(": ")
        if not sep or not name or " " in name:
            continue
        if "→" not in rest:
            continue  # a size-only change, or not a diff line (an error message)
        before_text, _, after_text = rest.partition(" → ")
        after_parts = after_text.split(", ")
        if after_parts and _SIZE.match(after_parts[-1]):
            after_parts = after_parts[:-1]
        before, after = _versions(before_text), _versions(", ".join(after_parts))
        if not before:
            added.append(f"{name} {', '.join(after)}".strip())
        elif not after:
            removed.append(f"{name} {', '.join(before)}".strip())
        else:
            changed.append(PackageChange(name, before, after))
    return tuple(changed), tuple(added), tuple(removed)


def parse_path_info_sizes(text: str) -> dict[str, int]:
    """`nix path-info -S --json`: closure size by store path (new and old JSON shapes)."""
    try:
        data = json.loads(text) if text.strip() else None
    except ValueError:
        return {}
    items: list[tuple[str, object]] = []
    if isinstance(data, dict):
        items = [(path, info) for path, info in data.items()]
    elif isinstance(data, list):
        items = [(str(i.get("path")), i) for i in data if isinstance(i, dict)]
    sizes: dict[str, int] = {}
    for path, info in items:
        if isinstance(info, dict) and isinstance(info.get("closureSize"), int):
            sizes[path] = int(info["closureSize"])
    return sizes


_UNIT_LINES = {
    "would stop the following units: ": "stop",
    "would restart the following units: ": "restart",
    "would reload the following units: ": "reload",
    "would start the following units: ": "start",
}


def parse_dry_activate(lines: list[str]) -> dict[str, tuple[str, ...]]:
    """switch-to-configuration dry-activate's lines → units by what would happen to them."""
    units: dict[str, tuple[str, ...]] = {}
    for raw in lines:
        line = raw.strip()
        for prefix, kind in _UNIT_LINES.items():
            if line.startswith(prefix):
                names = tuple(u.strip() for u in line[len(prefix) :].split(",") if u.strip())
                units[kind] = units.get(kind, ()) + names
    return units


def parse(output: str, new: str) -> Changes:
    """Everything the preview script said about one host."""
    s = split_sections(output, MARK)
    current = parse_store_path(s.get("current", []))
    if current == new:
        return Changes(unchanged=True)
    problems: list[str] = []
    reasons = []
    booted = parse_store_path(s.get("booted", []))
    for link in BOOT_LINKS:
        was = parse_store_path(s.get(f"booted-{link}", []))
        will = parse_store_path(s.get(f"new-{link}", []))
        if booted is not None and was != will and (was or will):
            reasons.append(link)
    diff = s.get("diff", [])
    packages, added, removed = parse_diff_closures(diff)
    if any("error:" in line for line in diff):
        problems.append("nix store diff-closures failed: " + " ".join(diff)[-200:])
    sizes = parse_path_info_sizes("\n".join(s.get("sizes", [])))
    delta = (
        sizes[new] - sizes[current]
        if current is not None and new in sizes and current in sizes
        else None
    )
    activate = s.get("activate", [])
    rc_lines = [line for line in s.get("activate-rc", []) if line.strip()]
    units = parse_dry_activate(activate)
    if rc_lines and rc_lines[-1].strip() != "0":
        problems.append("dry-activate failed: " + " ".join(activate)[-200:])
    return Changes(packages, added, removed, delta, units, tuple(reasons),
                   problems=tuple(problems))  # fmt: skip


def totals(changes: list[Changes]) -> str:
    """The fleet's line: hosts changing, units restarting, hosts needing a reboot."""
    changing = sum(1 for c in changes if not c.unchanged)
    restarting = sum(
        len(c.units.get("restart", ())) + len(c.units.get("stop", ())) for c in changes
    )
    reboot = sum(1 for c in changes if c.reboot_needed)
    return (
        f"{changing} of {len(changes)} hosts change; {restarting} units stop or restart; "
        f"{reboot} hosts need a reboot"
    )
