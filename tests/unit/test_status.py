"""`invoke status`: the remote script under a real sh and readlink, the pure parsers on recorded
outputs, the row judgements, the exit codes and the table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rebuild.facts import MARK
from rebuild.status import (
    BOOTED,
    CURRENT,
    HostStatus,
    Probe,
    System,
    describe_deploy,
    exit_code,
    host_status,
    parse,
    parse_last_deploy,
    parse_system,
    reboot_reasons,
    result_of,
    script,
    summary,
    table_rows,
)

NEW = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-24.11.20241120.2ac5bf0"
OLD = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-24.11.20241101.1e2f3a4"
KERNEL_A = "/nix/store/aaaa-linux-6.6.60/bzImage"
KERNEL_B = "/nix/store/bbbb-linux-6.6.62/bzImage"
INITRD = "/nix/store/cccc-initrd-linux-6.6.60/initrd"
MODULES = "/nix/store/dddd-linux-6.6.60-modules"
DEPLOY = {
    "run_id": "20261130-160000-a1b2c3",
    "timestamp": "2026-11-30T16:00:00+00:00",
    "operator": {"name": "work-laptop", "machine_id": "0123456789abcdef0123456789abcdef"},
    "commit": "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b",
    "dirty": False,
    "action": "switch",
    "system": NEW,
    "result": "ok",
}

# What a NixOS host answered (recorded): booted on an older kernel than the current system.
RECORDED = f"""{MARK} current
{NEW}
{KERNEL_B}
{INITRD}
{MODULES}
{MARK} booted
{OLD}
{KERNEL_A}
{INITRD}
{MODULES}
{MARK} failed
● nginx.service loaded failed failed nginx
{MARK} deploys
{json.dumps({**DEPLOY, "run_id": "older", "result": "rolled_back"})}
{json.dumps(DEPLOY)}
{MARK} end
"""


def fake_host(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fake root whose /run and /var/lib are folders here: `readlink` and `tail` are the real
    programs, their /run and /var/lib arguments rewritten (as the test bed's shims do)."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("readlink", "tail"):
        real = shutil.which(name)
        assert real is not None
        tool = bin_dir / name
        tool.write_text(
            "#!/bin/sh\n"
            'for a in "$@"; do case "$a" in /run*|/var/lib*) a="$FAKE_ROOT$a" ;; esac\n'
            '  set -- "$@" "$a"; shift; done\n'
            f'{real} "$@" | sed "s#^$FAKE_ROOT##"\n',
            encoding="utf-8",
        )
        tool.chmod(0o755)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(
        '#!/bin/sh\n[ -n "$FAKE_FAILED" ] && echo "$FAKE_FAILED loaded failed failed x"; true\n',
        encoding="utf-8",
    )
    systemctl.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "FAKE_ROOT": str(root),
        "FAKE_FAILED": "",
        "LC_ALL": "C",
    }
    return root, env


def system_dir(root: Path, name: str, kernel: str | None) -> str:
    """A system folder under the fake root (its own path is what readlink answers)."""
    path = root / "store" / name
    path.mkdir(parents=True)
    if kernel is not None:
        target = root / "store" / f"{kernel}-linux"
        target.mkdir(exist_ok=True)
        (target / "bzImage").write_text("")
        for link in ("kernel", "initrd", "kernel-modules"):
            (path / link).symlink_to(target / "bzImage")
    return f"/store/{name}"


def run_script(env: dict[str, str]) -> str:
    done = subprocess.run(
        ["/bin/sh", "-s"], input=script(), capture_output=True, text=True, env=env, timeout=30,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def link(root: Path, name: str, target: str) -> None:
    (root / "run" / name).symlink_to(f"{root}{target}")


class TestScriptUnderSh:
    def test_script_is_posix_sh(self) -> None:
        """The script parses under sh -n (and dash, Debian's sh)."""
        done = subprocess.run(["/bin/sh", "-n"], input=script(), capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr

    def test_is_shellcheck_clean(self, tmp_path: Path) -> None:
        """shellcheck (POSIX sh) finds nothing in the status script."""
        program = shutil.which("shellcheck")
        if program is None:
            pytest.fail("shellcheck is not installed: apt-get install shellcheck")
        path = tmp_path / "status.sh"
        path.write_text("#!/bin/sh\n" + script(), encoding="utf-8")
        done = subprocess.run([program, "-s", "sh", str(path)], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout

    def test_same_system_booted_no_reboot(self, tmp_path: Path) -> None:
        """Booted and current the same system: no reboot; failed units and the last deploy come
        through; the real readlink answers one line per link."""
        root, env = fake_host(tmp_path)
        system = system_dir(root, "sys-a", kernel="k1")
        link(root, "current-system", system)
        link(root, "booted-system", system)
        deploys = root / "var" / "lib" / "rebuild"
        deploys.mkdir()
        lines = [json.dumps({**DEPLOY, "run_id": f"r{i}"}) for i in range(8)]
        (deploys / "deployments.jsonl").write_text("\n".join(lines) + "\n")
        env["FAKE_FAILED"] = "web.service"
        probe = parse(run_script(env))
        assert probe.complete
        assert probe.current.path == system
        assert probe.booted.path == system
        assert probe.current.links["kernel"] == "/store/k1-linux/bzImage"
        assert probe.failed_units == ("web.service",)
        assert probe.last_deploy is not None and probe.last_deploy["run_id"] == "r7"
        assert reboot_reasons(probe.booted, probe.current) == ()

    def test_new_kernel_needs_a_reboot(self, tmp_path: Path) -> None:
        """A current system with another kernel than the booted one needs a reboot."""
        root, env = fake_host(tmp_path)
        link(root, "current-system", system_dir(root, "sys-new", kernel="k2"))
        link(root, "booted-system", system_dir(root, "sys-old", kernel="k1"))
        probe = parse(run_script(env))
        assert reboot_reasons(probe.booted, probe.current) == ("kernel", "initrd",
                                                                "kernel-modules")  # fmt: skip
        assert probe.last_deploy is None

    def test_systems_without_boot_links_never_need_a_reboot(self, tmp_path: Path) -> None:
        """Systems without kernel links (a container) resolve to themselves: not a reason."""
        root, env = fake_host(tmp_path)
        link(root, "current-system", system_dir(root, "c-new", kernel=None))
        link(root, "booted-system", system_dir(root, "c-old", kernel=None))
        probe = parse(run_script(env))
        assert probe.current.links == {"kernel": None, "initrd": None, "kernel-modules": None}
        assert reboot_reasons(probe.booted, probe.current) == ()

    def test_no_booted_system(self, tmp_path: Path) -> None:
        """A host without /run/booted-system: booted unknown, no reboot claimed."""
        root, env = fake_host(tmp_path)
        link(root, "current-system", system_dir(root, "sys-a", kernel="k1"))
        probe = parse(run_script(env))
        assert probe.booted == System(None)
        assert probe.current.path == "/store/sys-a"
        assert reboot_reasons(probe.booted, probe.current) == ()


class TestParsers:
    def test_recorded_output(self) -> None:
        """A recorded answer parses into both systems, the failed unit and the last deploy."""
        probe = parse(RECORDED)
        assert probe == Probe(
            current=System(NEW, {"kernel": KERNEL_B, "initrd": INITRD, "kernel-modules": MODULES}),
            booted=System(OLD, {"kernel": KERNEL_A, "initrd": INITRD, "kernel-modules": MODULES}),
            failed_units=("nginx.service",),
            last_deploy={k: DEPLOY[k] for k in ("run_id", "timestamp", "operator", "commit",
                                                 "result")},
            complete=True,
        )  # fmt: skip
        assert reboot_reasons(probe.booted, probe.current) == ("kernel",)

    def test_missing_system_answers_itself(self) -> None:
        """`readlink -f /run/booted-system` of a missing link prints the link: no system."""
        assert parse_system([BOOTED], BOOTED) == System(None)
        assert parse_system([], CURRENT) == System(None)

    def test_system_without_all_links(self) -> None:
        """Fewer answers than links: the system is known, its links are not."""
        assert parse_system([NEW, KERNEL_A], CURRENT) == System(NEW)
        assert reboot_reasons(System(OLD), System(NEW)) == ()

    def test_last_deploy_skips_broken_lines(self) -> None:
        """The last line that is a JSON object wins; a torn last line is skipped."""
        lines = [json.dumps(DEPLOY), '{"run_id": "torn', "not json", "[1, 2]"]
        got = parse_last_deploy(lines)
        assert got is not None and got["run_id"] == DEPLOY["run_id"]
        assert set(got) == {"run_id", "timestamp", "operator", "commit", "result"}
        assert parse_last_deploy([]) is None
        assert parse_last_deploy(["garbage"]) is None

    def test_last_deploy_missing_fields_are_null(self) -> None:
        assert parse_last_deploy(['{"run_id": "x"}']) == {
            "run_id": "x", "timestamp": None, "operator": None, "commit": None, "result": None,
        }  # fmt: skip

    def test_cut_short(self) -> None:
        """Output without the end marker is an incomplete probe."""
        assert not parse(f"{MARK} current\n{NEW}\n").complete


def reachable(host: str = "vps", **kw: object) -> HostStatus:
    probe = Probe(System(NEW), System(NEW), (), None, True)
    row = host_status(host, probe, NEW)
    return HostStatus(**{**row.__dict__, **kw})  # type: ignore[arg-type]


class TestRows:
    def test_on_head_is_healthy(self) -> None:
        row = reachable()
        assert not row.drift and row.healthy and result_of(row) == "ok"

    def test_drift(self) -> None:
        """Reachable and not on HEAD drifts."""
        row = reachable(current_system=OLD)
        assert row.drift and not row.healthy and result_of(row) == "verify_failed"

    def test_unknown_expected_is_not_drift(self) -> None:
        """HEAD did not evaluate: drift unknown (false), the record says build_failed."""
        row = reachable(expected_system=None)
        assert not row.drift and result_of(row) == "build_failed"

    def test_unreachable_is_never_drift(self) -> None:
        row = HostStatus("vps", False, expected_system=NEW, error="cannot reach vps: timed out")
        assert not row.drift and not row.healthy
        assert row.to_json()["error"] == "cannot reach vps: timed out"
        assert row.to_json()["reachable"] is False

    def test_json_shape(self) -> None:
        """Exactly the contract's keys for a reachable host."""
        assert set(reachable(last_deploy=DEPLOY).to_json()) == {
            "host", "reachable", "current_system", "booted_system", "expected_system", "drift",
            "reboot_needed", "failed_units", "last_deploy",
        }  # fmt: skip


class TestExitCodes:
    @pytest.mark.parametrize(
        ("rows", "evaluation_failed", "code"),
        [
            ([reachable(), reachable("b")], False, 0),
            ([reachable(), reachable("b", current_system=OLD)], False, 6),
            ([reachable(), reachable("b", failed_units=("x.service",))], False, 6),
            ([reachable(), HostStatus("b", False, error="down")], False, 6),
            ([reachable(), HostStatus("b", False, error="key", refused=True)], False, 3),
            ([reachable(current_system=OLD), HostStatus("b", False, refused=True)], False, 3),
            ([reachable(expected_system=None)], True, 5),
            ([reachable(expected_system=None), HostStatus("b", False)], True, 6),
            ([reachable(reboot_reasons=("kernel",))], False, 0),
        ],
        ids=["clean", "drift", "failed-units", "unreachable", "key-changed", "key-beats-drift",
             "eval-failed", "unreachable-beats-eval", "reboot-alone-is-ok"],
    )  # fmt: skip
    def test_table(self, rows: list[HostStatus], evaluation_failed: bool, code: int) -> None:
        assert exit_code(rows, evaluation_failed=evaluation_failed) == code


class TestTable:
    def test_rows(self) -> None:
        """One row per host: reachable, drift, reboot with reasons, failed units, last deploy."""
        rows = table_rows([
            reachable(last_deploy=DEPLOY, reboot_reasons=("kernel",)),
            reachable("b", current_system=OLD, failed_units=("a.service", "b.service")),
            HostStatus("c", False, error="down"),
        ])  # fmt: skip
        assert rows[0] == ("host", "reachable", "drift", "reboot", "failed units", "last deploy")
        assert rows[1] == ("vps", "yes", "no", "yes (kernel)", "-",
                           "work-laptop 2026-11-30T16:00:00+00:00 4f3c2b1a0e9d ok")  # fmt: skip
        assert rows[2] == ("b", "yes", "yes", "no", "a.service, b.service", "-")
        assert rows[3] == ("c", "no", "-", "-", "-", "-")

    def test_describe_odd_records(self) -> None:
        assert describe_deploy({"operator": "x"}) == "x ? - ?"
        assert describe_deploy(None) == "-"

    def test_summary(self) -> None:
        assert summary([reachable()]) == "1 host: all reachable, on HEAD, no failed units"
        assert summary([reachable(current_system=OLD), HostStatus("b", False)]) == (
            "2 hosts: 1 unreachable, 1 drifting from HEAD"
        )
