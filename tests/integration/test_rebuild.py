"""`invoke rebuild` end to end, as a subprocess, against a real sshd test host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pexpect
import pytest

from tests.integration.conftest import Deployment, config, git
from tests.integration.interrupts import SIGINT_DISPOSITIONS, Watched, busy_cores, launch


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """Every core busy while the test runs: an operator's loaded machine."""
    with busy_cores():
        yield


class TestGoodDeploy:
    def test_switch_verifies_and_cancels_the_timer(self, deployment: Deployment) -> None:
        """A clean deploy ends on the expected system, exit 0, timer gone, audit ok."""
        d = deployment
        want = d.expected("vps", config("v1", d.web_port))
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == want
        assert "verification: PASS" in done.stdout
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]
        [record] = d.records()
        assert record["result"] == "ok" and record["exit_code"] == 0
        assert record["expected_system"] == want
        assert record["command"][1:6] == [
            "switch",
            "--flake",
            f"{d.flake}#vps",
            "--no-reexec",
            "--target-host",
        ]
        assert {c["name"] for c in record["checks"]} >= {"current-system", "system-state"}
        assert all(c["ok"] for c in record["checks"])

    def test_json_output_is_one_object(self, deployment: Deployment) -> None:
        """--json prints one object per host with result and exit code on stdout."""
        done = deployment.invoke("rebuild", "--host", "vps", "--yes", "--json")
        assert done.returncode == 0, done.stderr
        [line] = done.stdout.strip().splitlines()
        data = json.loads(line)
        assert data["host"] == "vps" and data["ok"] is True and data["result"] == "ok"
        assert data["exit_code"] == 0 and data["current_system"] == data["expected_system"]
        # seconds per phase, in the JSON and the audit; together within the run's duration
        record = deployment.records()[-1]
        assert data["timings"] == record["timings"]
        assert {"build", "copy", "activation", "verification"} <= set(record["timings"])
        assert 0 < sum(record["timings"].values()) <= record["duration_s"] + 0.1
        assert data["changes"] == record["changes"] and "units" in data["changes"]
        assert record["tools"]["nixos-rebuild"]["path"].endswith("recording-nixos-rebuild")


class TestGates:
    def test_not_allowlisted_runs_nothing(self, deployment: Deployment) -> None:
        """A machine missing from [[operators]] is refused (3); nixos-rebuild never runs."""
        d = deployment
        text = d.inventory.read_text()
        start = text.index("[[operators]]")
        end = text.index("\n\n", start)
        d.inventory.write_text(text[:start] + text[end + 2 :])
        before = d.host.current_system()
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 3
        assert "may not deploy" in done.stderr and "invoke operator" in done.stderr
        assert d.nixos_rebuild_calls() == []
        assert d.host.current_system() == before
        assert d.records()[0]["result"] == "refused"

    def test_dirty_tree_refused_and_listed(self, deployment: Deployment) -> None:
        """An uncommitted change refuses (3) and names the file; --allow-dirty is recorded."""
        d = deployment
        (d.flake / "notes.txt").write_text("wip\n")
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 3 and "notes.txt" in done.stderr
        assert d.nixos_rebuild_calls() == []
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--allow-dirty")
        assert done.returncode == 0, done.stderr
        assert d.records()[-1]["overrides"] == ["allow-dirty"]
        assert d.records()[-1]["dirty"] is True

    def test_unknown_host_key_refused(self, deployment: Deployment) -> None:
        """A host missing from known_hosts refuses (3) with how to verify and add it."""
        d = deployment
        d.tb.known_hosts.write_text("")
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 3
        assert "not in" in done.stderr and "ssh-keyscan" in done.stderr
        assert d.nixos_rebuild_calls() == []

    def test_changed_host_key_refused_before_any_command(self, deployment: Deployment) -> None:
        """A known_hosts entry with another key refuses (3) and no command ran on the host."""
        d = deployment
        other = d.tb.root / "other_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True
        )
        pub = (other.with_suffix(".pub")).read_text().split()[:2]
        line = d.tb.known_hosts.read_text().split()[0]
        d.tb.known_hosts.write_text(f"{line} {pub[0]} {pub[1]}\n")
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 3 and "HOST KEY CHANGED" in done.stderr
        assert d.nixos_rebuild_calls() == []
        assert not (d.host.root / "run" / "rebuild-lock").exists()

    def test_no_terminal_and_no_yes_refused(self, deployment: Deployment) -> None:
        """Without a terminal for the prompt and without --yes the run refuses (3)."""
        done = deployment.invoke("rebuild", "--host", "vps")
        assert done.returncode == 3 and "--yes" in done.stderr

    def test_unknown_host_is_usage_error(self, deployment: Deployment) -> None:
        """An unknown host name exits 2 naming the known hosts."""
        done = deployment.invoke("rebuild", "--host", "nope", "--yes")
        assert done.returncode == 2 and "unknown host 'nope'" in done.stderr
        assert "Traceback" not in done.stderr

    def test_dry_run_changes_nothing(self, deployment: Deployment) -> None:
        """--dry-run shows the plan, runs nothing on the host, exit 0."""
        d = deployment
        before = (d.host.current_system(), d.host.generations())
        done = d.invoke("rebuild", "--host", "vps", "--dry-run")
        assert done.returncode == 0, done.stderr
        assert "--target-host" in done.stdout and "dry-run" in done.stdout
        assert d.nixos_rebuild_calls() == []
        assert (d.host.current_system(), d.host.generations()) == before
        assert not (d.host.root / "run" / "rebuild-lock").exists()


class TestPrompt:
    def spawn(self, d: Deployment) -> pexpect.spawn:
        argv = d.argv("rebuild", "--host", "vps")
        return pexpect.spawn(argv[0], argv[1:], env=d.env(), encoding="utf-8", timeout=60)

    def test_declined_at_a_real_terminal(self, deployment: Deployment) -> None:
        """Answering anything but y at the prompt declines (4) and changes nothing."""
        d = deployment
        before = d.host.current_system()
        child = self.spawn(d)
        child.expect_exact(f"Deploy vps ({d.host.address})? [y/N] ")
        child.sendline("n")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert d.nixos_rebuild_calls() == []
        assert d.host.current_system() == before
        assert d.records()[-1]["result"] == "declined"
        assert not (d.host.root / "run" / "rebuild-lock").exists()

    @pytest.mark.usefixtures("busy_cpu")
    @pytest.mark.parametrize("sigint", SIGINT_DISPOSITIONS)
    def test_ctrl_c_at_the_prompt_declines_cleanly(
        self, deployment: Deployment, sigint: str
    ) -> None:
        """Ctrl-C at the prompt exits 4 without a traceback; lock released, audit written; on
        a busy machine, and when rebuild was started with SIGINT ignored."""
        d = deployment
        argv = launch(d.argv("rebuild", "--host", "vps"), sigint)
        child = pexpect.spawn(argv[0], argv[1:], env=d.env(), encoding="utf-8", timeout=60)
        child.expect_exact("[y/N] ")  # the phase: rebuild waits for the answer
        child.sendintr()
        child.expect(pexpect.EOF, timeout=30)
        out = child.before
        child.close()
        assert child.exitstatus == 4, out
        assert "Traceback" not in out
        assert d.records()[-1]["result"] == "declined"
        assert not (d.host.root / "run" / "rebuild-lock").exists()

    def test_yes_at_the_prompt_deploys(self, deployment: Deployment) -> None:
        """Answering y deploys."""
        d = deployment
        child = self.spawn(d)
        child.expect_exact("[y/N] ")
        child.sendline("y")
        child.expect(pexpect.EOF, timeout=120)
        child.close()
        assert child.exitstatus == 0
        assert d.host.current_system() == d.expected("vps", config("v1", d.web_port))


class TestFailures:
    def test_build_failure_exit_5(self, deployment: Deployment) -> None:
        """A configuration that fails to build exits 5 with its error, before the prompt (the
        build ahead of the preview) or in nixos-rebuild (--no-preview); host unchanged;
        audited; no timer left."""
        d = deployment
        before = d.host.current_system()
        d.set_config("vps", config("v2", d.web_port, build_fail=True))
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 5, done.stdout + done.stderr
        assert "cannot build vps" in done.stderr and "simulated build failure" in done.stderr
        assert d.nixos_rebuild_calls() == []  # it failed before anything was asked
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--no-preview")
        assert done.returncode == 5, done.stdout + done.stderr
        assert "nixos-rebuild exited" in done.stderr or "cannot evaluate" in done.stderr
        assert d.host.current_system() == before
        record = d.records()[-1]
        assert record["result"] == "build_failed" and record["exit_code"] == 5
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]

    def test_failed_unit_rolls_back_exit_7(self, deployment: Deployment) -> None:
        """A failed unit after the switch: rebuild rolls back at once and exits 7."""
        d = deployment
        before = d.host.current_system()
        d.set_config("vps", config("v2", d.web_port, units={"backup.service": {"fail": True}}))
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 7, done.stdout + done.stderr
        assert d.host.current_system() == before
        record = d.records()[-1]
        assert record["result"] == "rolled_back" and record["final_system"] == before
        failed = [c for c in record["checks"] if not c["ok"]]
        assert any("backup.service" in c["detail"] for c in failed)
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]

    def test_failed_unit_no_rollback_exit_6(self, deployment: Deployment) -> None:
        """With --no-rollback a failed verification exits 6 and the host keeps the new system."""
        d = deployment
        cfg = config("v2", d.web_port, units={"backup.service": {"fail": True}})
        d.set_config("vps", cfg)
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--no-rollback")
        assert done.returncode == 6, done.stdout + done.stderr
        assert d.host.current_system() == d.expected("vps", cfg)
        assert d.records()[-1]["result"] == "verify_failed"


class TestLocks:
    def test_two_rebuilds_at_once_one_refused(self, deployment: Deployment) -> None:
        """Two rebuilds of one host started together: one proceeds, the other exits 3."""
        d = deployment
        d.set_config("vps", config("v2", d.web_port, build_seconds=4))
        procs = [
            subprocess.Popen(
                d.argv("rebuild", "--host", "vps", "--yes"),
                env=d.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=180) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 3], outs
        refused = next(o for p, o in zip(procs, outs, strict=True) if p.returncode == 3)
        assert "locked" in refused[1]

    def test_remote_lock_from_another_machine_refuses(self, deployment: Deployment) -> None:
        """A lock held on the host by another operator refuses (3) and names the holder."""
        d = deployment
        lock = d.host.root / "run" / "rebuild-lock"
        lock.mkdir(parents=True)
        (lock / "owner").write_text(
            json.dumps(
                {
                    "run_id": "20260101-000000-abcdef",
                    "operator": "alice",
                    "hostname": "alice-laptop",
                    "machine_id": "f" * 32,
                    "pid": 1,
                    "since": time.time(),
                }
            )
        )
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 3
        assert "alice" in done.stderr and "alice-laptop" in done.stderr
        assert d.nixos_rebuild_calls() == []
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--break-lock")
        assert done.returncode == 3 and "not stale" in done.stderr


class TestInterrupt:
    @pytest.mark.usefixtures("busy_cpu")
    @pytest.mark.parametrize("sigint", SIGINT_DISPOSITIONS)
    def test_sigint_during_nixos_rebuild(self, deployment: Deployment, sigint: str) -> None:
        """Ctrl-C during nixos-rebuild's build: child stopped, exit 130, lock released, audit
        written; on a busy machine, and when rebuild was started with SIGINT ignored."""
        d = deployment
        d.set_config("vps", config("v2", d.web_port, build_seconds=60))
        argv = d.argv("rebuild", "--host", "vps", "--yes", "--no-preview")
        run = Watched(launch(argv, sigint), d.env())
        try:
            run.wait_for("[vps] building '", timeout=90)  # the phase: nixos-rebuild builds
            started = time.monotonic()
            run.proc.send_signal(signal.SIGINT)
            code, out, err = run.finish(timeout=60)
        finally:
            run.kill()
        assert code == 130, out + err
        assert time.monotonic() - started < 30  # stopped, not waited for
        assert "Traceback" not in err
        assert d.records()[-1]["result"] == "interrupted"
        assert not (d.host.root / "run" / "rebuild-lock").exists()

    @pytest.mark.usefixtures("busy_cpu")
    @pytest.mark.parametrize("sigint", SIGINT_DISPOSITIONS)
    def test_sigint_during_the_build_ahead(self, deployment: Deployment, sigint: str) -> None:
        """Ctrl-C while the preview's build runs: the build is stopped, nothing changed on the
        host (exit 4, declined), lock released, audit written."""
        d = deployment
        before = d.host.generations()
        d.set_config("vps", config("v2", d.web_port, build_seconds=60))
        run = Watched(launch(d.argv("rebuild", "--host", "vps", "--yes"), sigint), d.env())
        try:
            run.wait_for("[vps] building '", timeout=90)  # the phase: rebuild's own nix build
            started = time.monotonic()
            run.proc.send_signal(signal.SIGINT)
            code, out, err = run.finish(timeout=60)
        finally:
            run.kill()
        assert code == 4, out + err
        assert time.monotonic() - started < 30
        assert "Traceback" not in err and "before anything changed" in err
        assert d.records()[-1]["result"] == "declined"
        assert d.nixos_rebuild_calls() == [] and d.host.generations() == before
        assert not (d.host.root / "run" / "rebuild-lock").exists()


@pytest.mark.usefixtures("deployment")
class TestHistory:
    def test_history_reads_back(self, deployment: Deployment) -> None:
        """`invoke history --json` prints every record; the table names host and result."""
        d = deployment
        d.invoke("rebuild", "--host", "vps", "--dry-run")
        (d.flake / "x").write_text("x")
        d.invoke("rebuild", "--host", "vps", "--yes")
        done = d.invoke("history", "--json")
        rows = [json.loads(x) for x in done.stdout.splitlines()]
        assert [r["result"] for r in rows] == ["ok", "refused"]
        table = d.invoke("history", "--host", "vps")
        assert "refused" in table.stdout and "vps" in table.stdout
        os.remove(d.flake / "x")
        git(d.flake, "status")
