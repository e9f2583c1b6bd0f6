"""The preview before the prompt and --reboot, end to end: the real `invoke` against real sshd
hosts whose Nix answers `nix store diff-closures` and `path-info`, whose switch-to-configuration
answers `dry-activate`, and whose `systemctl reboot` reboots them (the test bed's README lists
the sources); and the deploy's cost in evaluations, read from the stand-ins' log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

from rebuild import hostops, hostrun, identity, inventory, nixos, prebuild
from rebuild.driver import arm_script
from rebuild.hostrun import HostRun, endpoint_for
from rebuild.locks import release_remote_lock, remote_lock
from testbed import Testbed
from tests.integration.conftest import Deployment, config, make_deployment

OPENSSL = {"name": "openssl", "from": "3.0.13", "to": "3.0.14"}


def web(port: int, label: str, **extra: Any) -> dict[str, Any]:
    """A configuration whose web.service restarts when it changes (stopIfChanged = false,
    as nginx's module sets it), with packages."""
    units = {"web.service": {"port": port, "stop_if_changed": False}}
    extra.setdefault("packages", {"openssl": "3.0.13", "nginx": "1.24.0"})
    return config(label, port, units=units, **extra)


def prepared(tb: Testbed, head: dict[str, Any] | None = None, **base_extra: Any) -> Deployment:
    """vps running `web(v0)` (booted into the test bed's first system, the same kernel), the
    flake's HEAD `head` (default: openssl 3.0.13 → 3.0.14, web.service changed)."""
    d = make_deployment(tb)
    d.host.activate(tb.build("vps", web(d.web_port, "v0", **base_extra)))
    bump = {"openssl": "3.0.14", "nginx": "1.24.0"}
    d.set_config("vps", head if head is not None else web(d.web_port, "v1", packages=bump))
    return d


def with_setting(d: Deployment, line: str) -> Deployment:
    """One more key in the host's inventory table (after its rollback_timeout)."""
    text = d.inventory.read_text()
    anchor = text.index("rollback_timeout = ")
    end = text.index("\n", anchor)
    d.inventory.write_text(text[: end + 1] + line + "\n" + text[end + 1 :])
    return d


def one_json(done: Any) -> dict[str, Any]:
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(lines[0])
    return data


def full_evaluations(tb: Testbed, since: int = 0) -> list[dict[str, Any]]:
    """The stand-ins' evaluations (testbed/README.md) that Nix's cache did not answer."""
    path = tb.root / "evaluations.jsonl"
    lines = path.read_text().splitlines()[since:] if path.exists() else []
    return [e for e in map(json.loads, lines) if not e["cached"]]


def evaluations_so_far(tb: Testbed) -> int:
    path = tb.root / "evaluations.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


class TestWhatThePreviewShows:
    def test_a_package_bump_and_a_restart(self, testbed: Testbed) -> None:
        """Both versions of the bumped package in the plan and in --json `changes.packages`;
        the changed unit as a restart; no reboot for a package; the deployed system is the
        previewed one."""
        d = prepared(testbed)
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 changed (openssl 3.0.13 → 3.0.14)" in done.stdout
        assert "~ openssl 3.0.13 → 3.0.14" in done.stdout
        assert "restarts web.service" in done.stdout
        assert "REBOOT NEEDED" not in done.stdout
        record = d.records()[-1]
        changes = record["changes"]
        assert changes["packages"] == [OPENSSL] and changes["added"] == changes["removed"] == []
        assert changes["units"] == {"stop": [], "start": [], "restart": ["web.service"],
                                    "reload": []}  # fmt: skip
        assert changes["reboot_needed"] is False and changes["reboot_reasons"] == []
        assert isinstance(changes["size_delta_bytes"], int)
        assert record["expected_system"] == d.host.current_system()

    def test_json_changes_are_what_was_deployed(self, testbed: Testbed) -> None:
        """--json: `changes` as the contract names them, and `expected_system` is what the
        host runs afterwards (the previewed store path, deployed and verified)."""
        d = prepared(testbed)
        data = one_json(d.invoke("rebuild", "--host", "vps", "--yes", "--json"))
        assert data["exit_code"] == 0 and data["result"] == "ok"
        assert data["changes"]["packages"] == [OPENSSL]
        assert data["changes"]["units"]["restart"] == ["web.service"]
        assert data["expected_system"] == data["current_system"] == d.host.current_system()
        assert d.host.current_system() == d.expected("vps", web(d.web_port, "v1", packages={
            "openssl": "3.0.14", "nginx": "1.24.0"}))  # fmt: skip

    def test_a_kernel_change_needs_a_reboot(self, testbed: Testbed) -> None:
        """A new kernel moves the kernel, initrd and modules links away from what the host
        booted: REBOOT NEEDED with its reasons (plan and JSON); without --reboot the deploy
        ends there, the booted system unchanged."""
        d = make_deployment(testbed)
        d.host.activate(testbed.build("vps", web(d.web_port, "v0")))
        d.set_config("vps", web(d.web_port, "v1", kernel="6.6.30"))
        booted = d.host.booted_system()
        data = one_json(d.invoke("rebuild", "--host", "vps", "--yes", "--json"))
        assert data["exit_code"] == 0
        assert data["changes"]["reboot_needed"] is True
        assert data["changes"]["reboot_reasons"] == ["kernel", "initrd", "kernel-modules"]
        assert any(p["name"] == "linux" and p["from"] == "6.6.63" and p["to"] == "6.6.30"
                   for p in data["changes"]["packages"])  # fmt: skip
        assert d.host.booted_system() == booted != d.host.current_system()

    def test_reboot_needed_in_the_plan(self, testbed: Testbed) -> None:
        """The plan's summary line names the reboot and why; an initrd change alone names
        the initrd alone."""
        d = make_deployment(testbed)
        d.host.activate(testbed.build("vps", web(d.web_port, "v0")))
        d.set_config("vps", web(d.web_port, "v1", kernel="6.6.30"))
        done = d.invoke("rebuild", "--host", "vps", "--dry-run")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "REBOOT NEEDED (kernel, initrd, kernel-modules)" in done.stdout
        d.set_config("vps", web(d.web_port, "v1", initrd="with-luks"))
        done = d.invoke("rebuild", "--host", "vps", "--dry-run")
        assert "REBOOT NEEDED (initrd)" in done.stdout


class TestNothingChanges:
    def test_dry_run_shows_the_preview_and_changes_nothing_that_runs(
        self, testbed: Testbed
    ) -> None:
        """--dry-run: the preview (from the host's own tools) and the plan; the running system,
        the generations and the booted system unchanged; nixos-rebuild never ran; exit 0."""
        d = prepared(testbed)
        host = d.host
        before = (host.current_system(), host.generations(), host.booted_system())
        done = d.invoke("rebuild", "--host", "vps", "--dry-run")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "openssl 3.0.13 → 3.0.14" in done.stdout and "restarts web.service" in done.stdout
        assert (host.current_system(), host.generations(), host.booted_system()) == before
        assert d.nixos_rebuild_calls() == []
        assert host.unit_state("web.service") == "active"
        assert d.records()[-1]["changes"]["packages"] == [OPENSSL]

    def test_declined_after_the_preview(self, testbed: Testbed) -> None:
        """At a real terminal: the preview is shown before the prompt; `n` declines (exit 4)
        and leaves the current system and the generations as they were."""
        d = prepared(testbed)
        before = (d.host.current_system(), d.host.generations())
        argv = d.argv("rebuild", "--host", "vps")
        child = pexpect.spawn(argv[0], argv[1:], env=d.env(), encoding="utf-8", timeout=120)
        child.expect_exact("openssl 3.0.13 → 3.0.14")
        child.expect_exact("restarts web.service")
        child.expect_exact(f"Deploy vps ({d.host.address})? [y/N] ")
        child.sendline("n")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert (d.host.current_system(), d.host.generations()) == before
        assert d.nixos_rebuild_calls() == []
        assert d.records()[-1]["result"] == "declined"


class TestReboot:
    def test_reboot_into_the_new_system(self, testbed: Testbed) -> None:
        """--reboot with a kernel change: after the verified switch the host reboots (a new
        boot id), booted = current = the new system, verified again; exit 0."""
        d = make_deployment(testbed)
        d.host.activate(testbed.build("vps", web(d.web_port, "v0")))
        d.set_config("vps", web(d.web_port, "v1", kernel="6.6.30"))
        boot_id = d.host.boot_id()
        data = one_json(d.invoke("rebuild", "--host", "vps", "--yes", "--reboot", "--json"))
        assert data["exit_code"] == 0 and data["result"] == "ok", data
        new = data["expected_system"]
        assert d.host.booted_system() == d.host.current_system() == new
        assert d.host.boot_id() != boot_id and len(d.host.boots()) == 1
        assert d.host.unit_state("web.service") == "active"
        assert "reboot" in data["timings"]

    def test_no_reboot_when_only_a_package_changed(self, testbed: Testbed) -> None:
        d = prepared(testbed)
        boot_id = d.host.boot_id()
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--reboot")
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.boot_id() == boot_id and d.host.boots() == []

    def test_a_host_that_does_not_come_back_is_6(self, testbed: Testbed) -> None:
        """The host's boot hangs (its sshd does not come back): after reboot_timeout, exit 6
        with the console step; the audit says so."""
        d = make_deployment(testbed)
        d.host.activate(testbed.build("vps", web(d.web_port, "v0")))
        d.set_config("vps", web(d.web_port, "v1", kernel="6.6.30"))
        with_setting(d, "reboot_timeout = 6")
        d.host.hang_on_reboot()
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--reboot", timeout=120)
        assert done.returncode == 6, done.stdout + done.stderr
        assert "did not come back after the reboot" in done.stderr
        assert "console" in done.stderr
        assert d.host.boots() and d.host.boots()[0]["hung"] is True
        assert d.records()[-1]["exit_code"] == 6


class TestEvaluations:
    @pytest.mark.parametrize("preview", [True, False], ids=["preview", "no-preview"])
    @pytest.mark.parametrize("flavour", ["ng", "classic"])
    def test_a_whole_deploy_costs_one_evaluation(
        self, testbed: Testbed, preview: bool, flavour: str
    ) -> None:
        """From the gates to the verified switch, one full evaluation of the configuration;
        nixos-rebuild's own build of it is answered by Nix's evaluation cache."""
        d = prepared(testbed)
        if flavour == "classic":
            d.inventory.write_text('nixos_rebuild_flavour = "classic"\n' + d.inventory.read_text())
        since = evaluations_so_far(testbed)
        args = ["rebuild", "--host", "vps", "--yes"] + ([] if preview else ["--no-preview"])
        done = d.invoke(*args, REBUILD_NIXOS_REBUILD=str(testbed.nixos_rebuild(flavour)))
        assert done.returncode == 0, done.stdout + done.stderr
        full = full_evaluations(testbed, since)
        assert [(e["program"], e["command"]) for e in full] == [("nix", "build")], full
        every = [json.loads(x) for x in (testbed.root / "evaluations.jsonl").read_text()
                 .splitlines()[since:]]  # fmt: skip
        assert [(e["program"], e["cached"]) for e in every] == [
            ("nix", False), (f"nixos-rebuild-{flavour}", True)]  # fmt: skip

    def test_a_dirty_tree_is_never_cached(self, testbed: Testbed) -> None:
        """--allow-dirty: Nix caches nothing for a dirty tree, so nixos-rebuild evaluates
        again (two evaluations, as with the real tools)."""
        d = prepared(testbed)
        with (d.flake / "flake.nix").open("a") as flake:  # a tracked file: Nix sees it dirty
            flake.write("# wip\n")
        since = evaluations_so_far(testbed)
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--allow-dirty")
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(full_evaluations(testbed, since)) == 2


def run_processes(folder: str) -> list[str]:
    """Command lines of live processes that name `folder` (a run's ssh config lives there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if folder in text and "pytest" not in text:
            found.append(text)
    return found


class TestSharedConnection:
    """The preview's `nix copy` (Nix's ssh:// store runs plain `ssh $NIX_SSHOPTS`) shares an
    OpenSSH connection rebuild opens ahead, while this machine evaluates and builds."""

    def test_opened_ahead_and_stopped(self, testbed: Testbed, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:  # fmt: skip
        """The shared connection answers `ssh -O check` once opened; stopping it leaves no
        ssh process behind."""
        d = prepared(testbed)
        loaded = inventory.load(str(d.inventory))
        target = loaded.target("vps")
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(testbed.root))
        hostrun.remove_run_dir()  # this process's run folder is made anew, below the test bed
        try:
            hostrun.open_master(loaded, target)
            config = hostrun.ssh_config_file(loaded, target)
            check = [*nixos.ssh_exit_argv(config, f"{d.host.user}@rebuild-vps")]
            check[check.index("exit")] = "check"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                done = subprocess.run(check, capture_output=True, text=True, check=False)
                if done.returncode == 0:
                    break
                time.sleep(0.1)
            assert done.returncode == 0, done.stderr
            hostrun.remove_run_dir()
            assert subprocess.run(check, capture_output=True, check=False).returncode != 0
            assert run_processes(str(config.parent)) == []
        finally:
            hostrun.remove_run_dir()

    def test_no_ssh_of_a_deploy_outlives_it(self, testbed: Testbed) -> None:
        """After a deploy with the preview, no ssh that used the run's config is left (the
        copy's shared connection would otherwise stay for ControlPersist's minute)."""
        d = prepared(testbed)
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert run_processes(f"{testbed.root}/rb-run-") == []


class TestRoundTrips:
    """How many commands a deploy runs over rebuild's own connection (`remote_commands` in the
    audit record), and when the dead-man timer starts: never while an operator reads the
    preview; with --yes in the preview's own round trip."""

    @pytest.mark.parametrize(("preview", "commands"), [(True, 4), (False, 3)],
                             ids=["preview", "no-preview"])  # fmt: skip
    def test_a_one_host_deploy_with_yes(self, testbed: Testbed, preview: bool, commands: int
                                        ) -> None:  # fmt: skip
        """With the preview: lock, preview + arm, verification + re-arm, cancel + release (4).
        Without: lock + arm, verification + re-arm, cancel + release (3, the floor)."""
        d = prepared(testbed)
        args = ["rebuild", "--host", "vps", "--yes"] + ([] if preview else ["--no-preview"])
        done = d.invoke(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "dead-man timer armed" in done.stdout + done.stderr
        record = d.records()[-1]
        assert record["remote_commands"] == commands, record
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]

    def test_at_a_prompt_the_timer_starts_after_the_answer(self, testbed: Testbed) -> None:
        """At a real terminal: no timer while the preview and the prompt are shown; `y` arms
        it (one more round trip than with --yes) and the deploy verifies and cancels it."""
        d = prepared(testbed)
        argv = d.argv("rebuild", "--host", "vps", "--json")
        child = pexpect.spawn(argv[0], argv[1:], env=d.env(), encoding="utf-8", timeout=120)
        child.expect_exact(f"Deploy vps ({d.host.address})? [y/N] ")
        assert d.host.timers() == {}
        child.sendline("y")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert d.records()[-1]["remote_commands"] == 5
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]

    def test_a_timer_armed_ahead_is_taken_back_if_the_deploy_never_starts(
        self, testbed: Testbed
    ) -> None:
        """The release of a run that armed its timer in the preview's round trip and then
        stopped (Ctrl-C before the rollout) stops that timer, then releases the lock."""
        d = prepared(testbed)
        loaded = inventory.load(str(d.inventory), environ=d.env())
        target = loaded.target("vps")
        hr = HostRun(target, endpoint_for(loaded, target), "switch", "20261130-120000-a1b2c3")
        owner = hostops.LockOwner(
            run_id=hr.run_id, operator="test", hostname="here", machine_id="m" * 32,
            pid=os.getpid(), since=time.time(),
        )  # fmt: skip
        try:
            remote_lock(hr, owner, identity.current(), break_lock=False, stale_after=3600)
            assert hr.remote_locked and hr.previous == d.host.current_system()
            arm = arm_script(hr, 90)
            _, armed = prebuild.ask(hr, hr.previous, arm)
            assert armed is not None and armed.ok, armed
            assert list(d.host.timers().values()) == ["waiting"]
            hr.armed_ahead = time.monotonic()
            release_remote_lock(hr)
            assert not hr.remote_locked and hr.armed_ahead is None
            assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]
            assert not (d.host.root / hostops.LOCK_DIR.lstrip("/")).exists()
            assert hr.remote_commands == 3  # lock, preview + arm, cancel + release
        finally:
            hr.close()
