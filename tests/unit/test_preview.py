"""The preview's parsers, fed the real tools' outputs as their sources print them, and its
host script run under a real sh."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from rebuild import preview
from rebuild.preview import Changes, PackageChange

OLD = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-25.05.1"
NEW = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-25.05.2"
RED, GREEN, NORMAL = "\x1b[31;1m", "\x1b[32;1m", "\x1b[0m"

# `nix store diff-closures OLD NEW` (Nix src/nix/diff-closures.cc): versions, then the size in
# KiB coloured red (grew) or green (shrank), only when it changed by 8 KiB or more.
DIFF = [
    f"openssl: 3.0.13 → 3.0.14, {RED}+12.3 KiB{NORMAL}",
    f"nginx: 1.24.0 → 1.26.1, {GREEN}-3.1 KiB{NORMAL}",
    f"htop: ∅ → 3.3.0, {RED}+402.0 KiB{NORMAL}",
    f"nano: 7.2 → ∅, {GREEN}-2790.5 KiB{NORMAL}",
    f"linux: 6.6.30, 6.6.30-modules → 6.6.31, 6.6.31-modules, {RED}+10.2 KiB{NORMAL}",
    f"nixos-system-vps: {RED}+8.1 KiB{NORMAL}",
    "etc: ε → 1",
]
# switch-to-configuration-ng dry-activate (src/src/main.rs), on stderr, in this order.
DRY = [
    "would stop the following units: old-backup.timer",
    "would NOT stop the following changed units: sshd.service",
    "would activate the configuration...",
    "would reload the following units: dbus.service",
    "would restart the following units: nginx.service, postgresql.service",
    "would start the following units: htop-exporter.service",
]


class TestDiffClosures:
    def test_versions_added_removed(self) -> None:
        """Changed versions, added and removed packages; the size-only line is no change of
        version; colours do not leak into names or versions."""
        changed, added, removed = preview.parse_diff_closures(DIFF)
        assert changed == (
            PackageChange("openssl", ("3.0.13",), ("3.0.14",)),
            PackageChange("nginx", ("1.24.0",), ("1.26.1",)),
            PackageChange("linux", ("6.6.30", "6.6.30-modules"), ("6.6.31", "6.6.31-modules")),
            PackageChange("etc", ("",), ("1",)),
        )
        assert added == ("htop 3.3.0",) and removed == ("nano 7.2",)

    def test_later_nix_sizes_are_no_versions(self) -> None:
        """Nix after 2.28 prints the size with renderSize: no plus sign, the unit scaled."""
        lines = [f"zlib: 1.3 → 1.3.1, {RED}1.2 MiB{NORMAL}",
                 f"xz: 5.4 → 5.6, {GREEN}-9.0 KiB{NORMAL}"]  # fmt: skip
        changed, _, _ = preview.parse_diff_closures(lines)
        assert changed == (PackageChange("zlib", ("1.3",), ("1.3.1",)),
                           PackageChange("xz", ("5.4",), ("5.6",)))  # fmt: skip

    def test_an_error_is_no_package(self) -> None:
        """`error: ...` lines (no store path) do not look like packages."""
        assert preview.parse_diff_closures(["error: path '/x' is not valid"]) == ((), (), ())


class TestDryActivate:
    def test_units_by_what_happens_to_them(self) -> None:
        """stop, reload, restart, start; the units that would NOT be stopped are not stops."""
        assert preview.parse_dry_activate(DRY) == {
            "stop": ("old-backup.timer",),
            "reload": ("dbus.service",),
            "restart": ("nginx.service", "postgresql.service"),
            "start": ("htop-exporter.service",),
        }

    def test_nothing_to_do(self) -> None:
        """A configuration change that touches no unit prints only the activation line."""
        assert preview.parse_dry_activate(["would activate the configuration..."]) == {}


class TestPathInfo:
    def test_new_json_shape(self) -> None:
        """Nix 2.19+: an object keyed by store path."""
        text = json.dumps({OLD: {"closureSize": 1000, "narSize": 5}, NEW: {"closureSize": 3048}})
        assert preview.parse_path_info_sizes(text) == {OLD: 1000, NEW: 3048}

    def test_old_json_shape(self) -> None:
        """Before 2.19: a list of objects with `path`."""
        text = json.dumps([{"path": OLD, "closureSize": 7}, {"path": NEW, "closureSize": 9}])
        assert preview.parse_path_info_sizes(text) == {OLD: 7, NEW: 9}

    def test_garbage(self) -> None:
        assert preview.parse_path_info_sizes("error: x") == {}


def section(name: str, *lines: str) -> str:
    return "\n".join([f"{preview.MARK} {name}", *lines])


def output(**overrides: list[str]) -> str:
    parts = {
        "current": [OLD],
        "booted": [OLD],
        "booted-kernel": ["/nix/store/k1-linux-6.6.30/bzImage"],
        "new-kernel": ["/nix/store/k2-linux-6.6.31/bzImage"],
        "booted-initrd": ["/nix/store/i1-initrd/initrd"],
        "new-initrd": ["/nix/store/i1-initrd/initrd"],
        "booted-kernel-modules": ["/nix/store/m1-modules"],
        "new-kernel-modules": ["/nix/store/m2-modules"],
        "diff": DIFF,
        "sizes": [json.dumps({OLD: {"closureSize": 1_000_000}, NEW: {"closureSize": 1_250_000}})],
        "activate": DRY,
        "activate-rc": ["0"],
    }
    parts.update(overrides)
    return "\n".join(section(k, *v) for k, v in parts.items()) + f"\n{preview.MARK} end\n"


class TestParse:
    def test_everything(self) -> None:
        """All parts together: the contract's JSON shape, the reboot reasons."""
        changes = preview.parse(output(), NEW)
        data = changes.to_json()
        assert data["packages"][0] == {"name": "openssl", "from": "3.0.13", "to": "3.0.14"}
        assert data["added"] == ["htop 3.3.0"] and data["removed"] == ["nano 7.2"]
        assert data["size_delta_bytes"] == 250_000
        assert data["units"] == {
            "stop": ["old-backup.timer"], "start": ["htop-exporter.service"],
            "restart": ["nginx.service", "postgresql.service"], "reload": ["dbus.service"],
        }  # fmt: skip
        assert (data["reboot_needed"], data["reboot_reasons"]) == (
            True,
            ["kernel", "kernel-modules"],
        )
        assert changes.problems == ()

    def test_only_packages_no_reboot(self) -> None:
        """Same kernel, initrd and modules: no reboot needed."""
        same = {f"new-{link}": output_value for link, output_value in (
            ("kernel", ["/nix/store/k1-linux-6.6.30/bzImage"]),
            ("initrd", ["/nix/store/i1-initrd/initrd"]),
            ("kernel-modules", ["/nix/store/m1-modules"]),
        )}  # fmt: skip
        changes = preview.parse(output(**same), NEW)
        assert not changes.reboot_needed and changes.reboot_reasons == ()

    def test_host_already_runs_it(self) -> None:
        """The host runs the new system already: nothing to preview."""
        changes = preview.parse(output(current=[NEW]), NEW)
        assert changes.unchanged and "no change" in changes.summary()

    def test_a_failed_dry_activation_is_a_problem_not_a_crash(self) -> None:
        """dry-activate failing (not root, broken system) is reported in the preview."""
        changes = preview.parse(output(activate=["error: permission denied"],
                                       **{"activate-rc": ["1"]}), NEW)  # fmt: skip
        assert changes.units == {} and "dry-activate failed" in changes.problems[0]

    def test_summary_line(self) -> None:
        """One readable line: versions, counts, size, units, reboot."""
        line = preview.parse(output(), NEW).summary()
        assert line.startswith("packages: 4 changed (openssl 3.0.13 → 3.0.14, nginx 1.24.0")
        assert "1 added, 1 removed, +244.1 KiB" in line
        assert "restarts nginx.service, postgresql.service" in line
        assert line.endswith("REBOOT NEEDED (kernel, kernel-modules)")

    def test_summary_without_package_changes(self) -> None:
        """Only the size moved: "none changed", then the size."""
        line = Changes(size_delta_bytes=56, units={"restart": ("web.service",)}).summary()
        assert line == "packages: none changed, +56 B; restarts web.service"

    def test_fleet_totals(self) -> None:
        """Hosts changing, units stopping or restarting, hosts needing a reboot."""
        changed = preview.parse(output(), NEW)
        line = preview.totals([changed, Changes(unchanged=True), changed])
        assert line == "2 of 3 hosts change; 6 units stop or restart; 2 hosts need a reboot"


def test_the_host_script_under_a_real_sh(tmp_path: Path) -> None:
    """The script's shape: every section present, the new system's paths quoted, and the
    tools called with the arguments their sources take."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for tool in ("nix", "readlink", "timeout"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (bin_dir / tool).chmod(0o755)
    new = "/nix/store/x y-$(reboot)"
    out = subprocess.run(
        ["/bin/sh", "-c", preview.script(new)], capture_output=True, text=True, timeout=30,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True,
    ).stdout  # fmt: skip
    for name in ("current", "booted", "diff", "sizes", "activate", "activate-rc", "end"):
        assert f"{preview.MARK} {name}" in out
    calls = log.read_text().splitlines()
    assert f"nix --extra-experimental-features nix-command store diff-closures  {new}" in calls
    assert f"timeout 120 {new}/bin/switch-to-configuration dry-activate" in calls
