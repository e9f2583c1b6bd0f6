"""`invoke status` against real sshd test hosts: one row per host (on HEAD, drifting, needing a
reboot, with a failed unit, unreachable), the last deploy from the host's own record, the exit
codes, the gates and the audit records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed import Testbed
from tests.integration.conftest import Deployment, config, inventory_text
from tests.integration.test_fleet import Fleet, make_fleet

NAMES = ["app1", "app2", "db1", "edge1"]
DEPLOY = {
    "run_id": "20261130-160000-a1b2c3",
    "timestamp": "2026-11-30T16:00:00+00:00",
    "operator": {"name": "other-laptop", "machine_id": "f" * 32},
    "commit": "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b",
    "dirty": False,
    "action": "switch",
    "system": "/nix/store/x",
    "result": "ok",
}


def seed_deploys(f: Fleet, name: str, records: list[dict[str, Any]]) -> None:
    """The host's own deployments.jsonl, through its state folder (/var/lib is mapped)."""
    folder = f.hosts[name].root / "var" / "lib" / "rebuild"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records]
    (folder / "deployments.jsonl").write_text("\n".join(lines) + "\n")


def boot_into(f: Fleet, name: str, system: str) -> None:
    """/run/booted-system of the host (what it booted) points at `system`."""
    link = f.hosts[name].root / "run" / "booted-system"
    link.unlink(missing_ok=True)
    link.symlink_to(system)


def old_kernel_system(f: Fleet) -> str:
    """A booted system whose kernel, initrd and modules links resolve (the running one's
    systems in the test bed have none)."""
    system = f.tb.root / "booted-old"
    files = f.tb.root / "linux-6.6.1"
    files.mkdir()
    system.mkdir()
    for link in ("kernel", "initrd", "kernel-modules"):
        (files / link).write_text("")
        (system / link).symlink_to(files / link)
    return str(system)


@pytest.fixture
def fleet(testbed: Testbed) -> Fleet:
    """app1 on HEAD (booted into it, deployed by another operator), app2 on v0 (drift) booted
    into an older kernel, db1 on HEAD with a failed unit, edge1 down."""
    f = make_fleet(testbed, NAMES, head={})
    failing = config("v1", f.ports["db1"], units={"backup.service": {"fail": True}})
    f.set_config("db1", failing)
    f.hosts["db1"].activate(testbed.build("db1", failing))
    f.hosts["app1"].activate(testbed.build("app1", config("v1", f.ports["app1"])))
    boot_into(f, "app1", str(f.hosts["app1"].current_system()))
    seed_deploys(f, "app1", [{**DEPLOY, "run_id": "older", "result": "rolled_back"}, DEPLOY])
    boot_into(f, "app2", old_kernel_system(f))
    sshd = f.hosts["edge1"].sshd
    assert sshd is not None
    sshd.terminate()
    sshd.wait(timeout=10)
    return f


def status(f: Fleet, *args: str) -> tuple[int, dict[str, Any], str]:
    done = f.invoke("status", *args, "--json", timeout=120)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    return done.returncode, json.loads(lines[0]), done.stderr


class TestFleet:
    def test_every_row(self, fleet: Fleet) -> None:
        """One row per host, in inventory order: on HEAD with its last deploy, drifting and due
        a reboot, a failed unit, unreachable; exit 6."""
        f = fleet
        code, data, stderr = status(f)
        assert code == 6, stderr
        rows = {row["host"]: row for row in data["hosts"]}
        assert [row["host"] for row in data["hosts"]] == NAMES
        app1 = rows["app1"]
        assert app1 == {
            "host": "app1", "reachable": True,
            "current_system": f.v1("app1"), "booted_system": f.v1("app1"),
            "expected_system": f.v1("app1"), "drift": False, "reboot_needed": False,
            "failed_units": [],
            "last_deploy": {k: DEPLOY[k] for k in ("run_id", "timestamp", "operator", "commit",
                                                    "result")},
        }  # fmt: skip
        app2 = rows["app2"]
        assert app2["drift"] is True and app2["reachable"] is True
        assert app2["current_system"] == f.hosts["app2"].current_system() != f.v1("app2")
        assert app2["reboot_needed"] is True
        assert app2["booted_system"] == str(f.tb.root / "booted-old")
        assert app2["last_deploy"] is None
        db1 = rows["db1"]
        assert db1["failed_units"] == ["backup.service"] and db1["drift"] is False
        edge1 = rows["edge1"]
        assert edge1["reachable"] is False and edge1["drift"] is False
        assert "cannot reach edge1" in edge1["error"]
        assert edge1["current_system"] is None

    def test_audit_one_record_per_host(self, fleet: Fleet) -> None:
        """Each host gets one record with event status and its own result."""
        status(fleet)
        records = {r["host"]: r for r in fleet.records()}
        assert set(records) == set(NAMES)
        assert {r["event"] for r in records.values()} == {"status"}
        assert len({r["run_id"] for r in records.values()}) == 1
        assert {h: r["result"] for h, r in records.items()} == {
            "app1": "ok", "app2": "verify_failed", "db1": "verify_failed",
            "edge1": "verify_failed",
        }  # fmt: skip
        assert records["app2"]["reboot_reasons"] == ["kernel", "initrd", "kernel-modules"]
        assert records["app1"]["operator"]["name"] == "ci"

    def test_healthy_selection_exits_0(self, fleet: Fleet) -> None:
        """A selection of healthy hosts (a pending reboot alone is fine) exits 0; the table
        shows the last deploy: who, when, commit[:12], result."""
        done = fleet.invoke("status", "--host", "app1")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split() == ["host", "reachable", "drift", "reboot", "failed", "units",
                                    "last", "deploy"]  # fmt: skip
        assert lines[1].split() == ["app1", "yes", "no", "no", "-", "other-laptop",
                                    DEPLOY["timestamp"], "4f3c2b1a0e9d", "ok"]  # fmt: skip
        assert lines[-1] == "1 host: all reachable, on HEAD, no failed units"

    def test_table_names_the_problems(self, fleet: Fleet) -> None:
        done = fleet.invoke("status", "--tag", "prod", "--tag", "staging")
        assert done.returncode == 6
        out = done.stdout
        assert "yes (kernel, initrd, kernel-modules)" in out
        assert "backup.service" in out
        assert "edge1: unreachable: cannot reach edge1" in out
        assert "4 hosts: 1 unreachable, 1 drifting from HEAD, 1 need a reboot, 1 with failed " \
               "units" in out  # fmt: skip


class TestGates:
    def test_not_allowlisted_is_3_with_records(self, fleet: Fleet) -> None:
        f = fleet
        entries = {n: (h, f.ports[n], {}) for n, h in f.hosts.items()}
        text = inventory_text(
            f.tb.root, f.flake, f.tb.known_hosts, f.tb.client_key, entries, operators=False
        )
        f.inventory.write_text(text)
        done = f.invoke("status")
        assert done.returncode == 3
        assert "may not deploy" in done.stderr
        assert {r["result"] for r in f.records()} == {"refused"}
        assert len(f.records()) == len(NAMES)

    def test_unknown_host_key_is_3_before_any_connection(self, fleet: Fleet) -> None:
        f = fleet
        lines = f.tb.known_hosts.read_text().splitlines()
        f.tb.known_hosts.write_text("\n".join(lines[1:]) + "\n")  # app1's key is gone
        done = f.invoke("status", "--json")
        assert done.returncode == 3
        assert done.stdout == ""
        assert "host key of app1" in done.stderr and "ssh-keyscan" in done.stderr

    def test_changed_host_key_is_3_in_its_row(self, fleet: Fleet) -> None:
        """A host offering another key than known_hosts has is a refused row, exit 3."""
        f = fleet
        lines = f.tb.known_hosts.read_text().splitlines()
        other_key = " ".join(lines[1].split()[1:])
        lines[0] = lines[0].split()[0] + " " + other_key
        f.tb.known_hosts.write_text("\n".join(lines) + "\n")
        code, data, _ = status(f, "--host", "app1", "--host", "db1")
        assert code == 3
        app1 = data["hosts"][0]
        assert app1["reachable"] is False and "HOST KEY CHANGED" in app1["error"]
        assert data["hosts"][1]["reachable"] is True

    def test_unwritable_audit_log_is_3(self, fleet: Fleet) -> None:
        """Nothing is asked when its records could not be written (the audit gate)."""
        fleet.audit_log.mkdir()
        done = fleet.invoke("status")
        assert done.returncode == 3, done.stderr
        assert done.stdout == ""

    def test_unknown_host_is_2(self, fleet: Fleet) -> None:
        done = fleet.invoke("status", "--host", "nope")
        assert done.returncode == 2 and "unknown host 'nope'" in done.stderr


def test_head_that_does_not_evaluate_is_5(testbed: Testbed, tmp_path: Path) -> None:
    """A host whose attribute HEAD lacks: drift unknown ("?"), exit 5."""
    f = make_fleet(testbed, ["solo"])
    f.hosts["solo"].activate(testbed.build("solo", config("v1", f.ports["solo"])))
    text = f.inventory.read_text().replace("[hosts.solo]\n", '[hosts.solo]\nattr = "missing"\n')
    f.inventory.write_text(text)
    done = f.invoke("status")
    assert done.returncode == 5, done.stderr
    assert "missing" in done.stderr
    assert done.stdout.splitlines()[1].split()[:3] == ["solo", "yes", "?"]


def test_one_evaluation_process_for_the_fleet(testbed: Testbed) -> None:
    """HEAD is evaluated for every host by one `nix eval` (one evaluator, one flake fetch):
    each host's expected system is its own."""
    f = make_fleet(testbed, ["app1", "app2", "db1"])
    for name in f.hosts:
        f.hosts[name].activate(testbed.build(name, config("v1", f.ports[name])))
    code, data, stderr = status(f)
    assert code == 0, stderr
    assert {r["host"]: r["expected_system"] for r in data["hosts"]} == {
        name: f.v1(name) for name in ("app1", "app2", "db1")
    }
    seen = [json.loads(x) for x in (testbed.root / "evaluations.jsonl").read_text().splitlines()]
    ours = [e for e in seen if e["command"] == "eval"]
    assert len({e["pid"] for e in ours}) == 1
    assert sorted(e["attr"].split(".")[1] for e in ours) == ["app1", "app2", "db1"]


def test_a_host_that_does_not_evaluate_is_named_alone(testbed: Testbed) -> None:
    """One host's attribute missing from HEAD: that host's drift is unknown and named, the
    others are checked as usual (each evaluated alone after the shared evaluation fails)."""
    f = make_fleet(testbed, ["app1", "app2"])
    for name in f.hosts:
        f.hosts[name].activate(testbed.build(name, config("v1", f.ports[name])))
    text = f.inventory.read_text().replace("[hosts.app2]\n", '[hosts.app2]\nattr = "gone"\n')
    f.inventory.write_text(text)
    code, data, stderr = status(f)
    assert code == 5, stderr
    rows = {r["host"]: r for r in data["hosts"]}
    assert rows["app1"]["expected_system"] == f.v1("app1") and rows["app1"]["drift"] is False
    assert rows["app2"]["expected_system"] is None
    assert "app2: cannot evaluate gone" in stderr


def test_two_operators_deploy_in_turn_and_status_shows_the_second(
    deployment: Deployment,
) -> None:
    """Two operator identities deploy the same host in turn (each its own inventory, as on two
    machines): the host's own log has both deploys (started and final lines), `status` shows
    the second one's operator, commit and result, and drift appears after a new commit."""
    d = deployment
    second = d.inventory.with_name("second.toml")
    second.write_text(d.inventory.read_text().replace('name = "ci"', 'name = "bob"'))
    assert d.invoke("rebuild", "--host", "vps", "--yes").returncode == 0
    d.set_config("vps", config("v2", d.web_port))
    done = subprocess.run(
        [*d.argv("rebuild", "--host", "vps", "--yes")[:-1], str(second)], env=d.env(),
        capture_output=True, text=True, timeout=240, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    log = d.host.root / "var" / "lib" / "rebuild" / "deployments.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["operator"]["name"], x["result"]) for x in lines] == [
        ("ci", "started"), ("ci", "ok"), ("bob", "started"), ("bob", "ok"),
    ]  # fmt: skip
    head = git_head(d.flake)
    code, data, _ = status_of(d)
    (row,) = data["hosts"]
    assert code == 0 and row["drift"] is False
    assert row["last_deploy"]["operator"]["name"] == "bob"
    assert (row["last_deploy"]["commit"], row["last_deploy"]["result"]) == (head, "ok")
    d.set_config("vps", config("v3", d.web_port))
    code, data, _ = status_of(d)
    assert code == 6 and data["hosts"][0]["drift"] is True


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def status_of(d: Deployment) -> tuple[int, dict[str, Any], str]:
    done = d.invoke("status", "--json", timeout=120)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr
