"""Dead-man rollback, `invoke rollback` and the timer, against real sshd test hosts."""

from __future__ import annotations

import time

from rebuild.hostops import timer_unit
from testbed import Testbed
from tests.integration.conftest import Deployment, config, make_deployment, netns_or_skip


class TestDeadMan:
    def test_network_cut_host_restores_itself(self, testbed: Testbed) -> None:
        """A configuration that cuts the network: the host's own timer restores the previous
        system, rebuild reconnects, reports it and exits 7; the audit says rolled_back."""
        netns_or_skip()
        d = make_deployment(testbed, netns=True, rollback_timeout=12, settle_timeout=3)
        before = d.host.current_system()
        d.set_config("vps", config("v2", d.web_port, cut_network=True))
        started = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes", timeout=240)
        elapsed = time.monotonic() - started
        assert done.returncode == 7, done.stdout + done.stderr
        assert d.host.current_system() == before
        record = d.records()[-1]
        assert record["result"] == "rolled_back" and record["exit_code"] == 7
        assert record["final_system"] == before
        assert elapsed < 150, elapsed
        assert "dead-man timer restored" in d.records()[-1]["message"]
        # the host answers over ssh again
        ssh = testbed.root / "probe"
        ssh.write_text("")
        import subprocess

        probe = subprocess.run(
            [*d.host.ssh_argv(), "true"], capture_output=True, timeout=30, check=False
        )
        assert probe.returncode == 0

    def test_good_deploy_cancels_the_timer(self, deployment: Deployment) -> None:
        """After a verified deploy the run's timer no longer exists on the host."""
        d = deployment
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stderr
        unit = timer_unit(d.records()[-1]["run_id"]) + ".timer"
        assert "dead-man timer armed" in done.stdout
        assert unit not in d.host.timers()
        state = d.host.run_local(["systemctl", "show", "-p", "LoadState", "--", unit])
        assert "LoadState=not-found" in state.stdout

    def test_failed_unit_rollback_keeps_no_timer(self, deployment: Deployment) -> None:
        """An immediate rollback (exit 7) also removes the run's timer."""
        d = deployment
        d.set_config("vps", config("v2", d.web_port, units={"bad.service": {"fail": True}}))
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 7
        unit = timer_unit(d.records()[-1]["run_id"]) + ".timer"
        assert d.host.timers().get(unit) != "waiting"


class TestRollbackTask:
    def test_rollback_to_previous_generation(self, deployment: Deployment) -> None:
        """`invoke rollback` returns the host to the generation before the current one."""
        d = deployment
        before = d.host.current_system()
        assert d.invoke("rebuild", "--host", "vps", "--yes").returncode == 0
        assert d.host.current_system() != before
        done = d.invoke("rollback", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == before
        record = d.records()[-1]
        assert record["event"] == "rollback" and record["result"] == "ok"
        assert "--rollback" in record["command"]
        assert record["expected_system"] == before

    def test_rollback_dry_run_shows_plan(self, deployment: Deployment) -> None:
        """`invoke rollback --dry-run` shows the plan and changes nothing."""
        d = deployment
        before = d.host.current_system()
        done = d.invoke("rollback", "--host", "vps", "--dry-run")
        assert done.returncode == 0, done.stderr
        assert "--rollback" in done.stdout
        assert d.host.current_system() == before


class TestHostLost:
    def test_host_lost_until_its_timer_restores_it(self, testbed: Testbed) -> None:
        """The new system cuts the host's network mid-switch. nixos-rebuild's ssh outlasts the
        cut (its ServerAlive patience is at least the dead-man timer, so it never leaves the
        host half switched); the host's own timer restores the previous system, the
        connection comes back, and rebuild reports it: exit 7."""
        netns_or_skip()
        d = make_deployment(testbed, netns=True, rollback_timeout=30, settle_timeout=3)
        before = d.host.current_system()
        d.set_config("vps", config("v2", d.web_port, cut_network=True))
        started = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes", timeout=300)
        elapsed = time.monotonic() - started
        assert done.returncode == 7, done.stdout + done.stderr
        assert 30 <= elapsed < 150, elapsed  # it waited for the host's own timer
        assert d.host.current_system() == before
        record = d.records()[-1]
        assert record["result"] == "rolled_back" and record["final_system"] == before
        assert "dead-man timer restored" in record["message"]
