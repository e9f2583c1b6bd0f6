"""Fleet rollouts end to end: `invoke rebuild` over several real sshd test hosts at once.

Every host is its own sshd on its own loopback address. The flake's HEAD moves every host from
v0 to v1; a test that wants a host to fail commits a failing configuration for it first.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pexpect
import pytest

from testbed import Testbed, netns_available
from tests.integration.conftest import (
    Deployment,
    config,
    free_port,
    inventory_text,
    recording_wrapper,
)

# inventory order is rollout order: app1, app2, db1, edge1
TAGS = {
    "app1": ["prod", "app"],
    "app2": ["prod", "app"],
    "db1": ["prod", "db"],
    "edge1": ["staging"],
}
PREFIX = re.compile(r"^\[(?P<host>[a-z0-9]+)\] ")
ANY_PREFIX = re.compile(r"\[(app1|app2|db1|edge1)\] ")


@dataclass
class Fleet(Deployment):
    """Several hosts behind one inventory; `ports` holds each host's web port."""

    ports: dict[str, int] = field(default_factory=dict)

    def systems(self) -> dict[str, tuple[str | None, list[tuple[int, str]]]]:
        """What every host runs, and its generations: proof that a host was left alone."""
        return {n: (h.current_system(), h.generations()) for n, h in self.hosts.items()}

    def v1(self, name: str) -> str:
        return self.expected(name, config("v1", self.ports[name]))

    def locked(self, name: str) -> bool:
        return (self.hosts[name].root / "run" / "rebuild-lock").exists()

    def waiting_timers(self, name: str) -> list[str]:
        return [t for t, sub in self.hosts[name].timers().items() if sub == "waiting"]

    def deployed(self) -> set[str]:
        """Hosts nixos-rebuild was run for (from the recorded --flake arguments)."""
        return {
            m.group(1) for line in self.nixos_rebuild_calls() if (m := re.search(r"#(\S+)", line))
        }

    def spawn(self, *args: str) -> pexpect.spawn:
        argv = self.argv("rebuild", *args)
        return pexpect.spawn(argv[0], argv[1:], env=self.env(), encoding="utf-8", timeout=90)


def make_fleet(tb: Testbed, names: list[str], *, netns: bool = False,
               head: dict[str, dict[str, Any]] | None = None) -> Fleet:  # fmt: skip
    """Hosts on v0 (each on its own address), a flake whose HEAD is v1, an inventory."""
    hosts = {}
    ports: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        ports[name] = free_port()
        hosts[name] = tb.add_host(
            name, netns=netns, address=None if netns else f"127.0.77.{i}",
            initial_config=config("v0", ports[name]),
        )  # fmt: skip
    configs = {name: config("v1", ports[name]) for name in names}
    configs.update(head or {})
    flake = tb.make_flake(tb.root / "flake", configs)
    calls = tb.root / "nixos-rebuild-calls.log"
    recording_wrapper(tb, calls)
    inventory = tb.root / "inventory.toml"
    entries = {n: (h, ports[n], {"tags": TAGS.get(n, ["test"])}) for n, h in hosts.items()}
    inventory.write_text(inventory_text(tb.root, flake, tb.known_hosts, tb.client_key, entries))
    first = hosts[names[0]]
    return Fleet(tb, first, flake, inventory, ports[names[0]], calls, hosts, ports)


@pytest.fixture
def fleet(testbed: Testbed) -> Fleet:
    return make_fleet(testbed, list(TAGS))


def records_of(f: Fleet) -> dict[str, dict[str, Any]]:
    """The one run's audit records by host: exactly one per host, all with one run id."""
    records = f.records()
    by_host = {r["host"]: r for r in records}
    assert len(by_host) == len(records), "one audit record per host"
    assert len({r["run_id"] for r in records}) == 1, "the records share the run id"
    return by_host


def host_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if PREFIX.match(line)]


class TestSelection:
    def test_tags_are_a_union_and_the_plan_lists_every_host(self, fleet: Fleet) -> None:
        """--tag app --tag db selects app1, app2, db1 (not edge1); the plan shows each one's
        address, action and attr; the batches are listed; nothing runs."""
        f = fleet
        before = f.systems()
        done = f.invoke("rebuild", "--tag", "app", "--tag", "db", "--dry-run", "--batch", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        planned = re.findall(r"^  host (\S+)$", done.stdout, re.MULTILINE)
        assert planned == ["app1", "app2", "db1"]
        for name in planned:
            block = done.stdout.split(f"  host {name}\n", 1)[1]
            assert f"address:  {f.hosts[name].user}@{f.hosts[name].address}\n" in block
            assert "action:   switch\n" in block
            assert f"flake:    {f.flake}#{name}\n" in block
        assert "batch 1: app1, app2" in done.stdout and "batch 2: db1" in done.stdout
        assert "edge1" not in done.stdout
        assert f.systems() == before and f.nixos_rebuild_calls() == []
        assert set(records_of(f)) == {"app1", "app2", "db1"}

    def test_host_and_tag_combine(self, fleet: Fleet) -> None:
        """--host edge1 --tag db selects both; an unknown tag is a usage error (exit 2)."""
        done = fleet.invoke("rebuild", "--host", "edge1", "--tag", "db", "--dry-run")
        assert done.returncode == 0, done.stderr
        assert re.findall(r"^  host (\S+)$", done.stdout, re.MULTILINE) == ["db1", "edge1"]
        done = fleet.invoke("rebuild", "--tag", "nope", "--dry-run")
        assert done.returncode == 2 and "nope" in done.stderr


class TestParallelRollout:
    def test_rollout_by_tag_prefixes_every_line(self, fleet: Fleet) -> None:
        """Three hosts deploy in parallel: every nixos-rebuild line carries its host's prefix
        and is whole, a summary table ends the run, one record per host shares the run id,
        and the host outside the selection is untouched."""
        f = fleet
        edge_before = f.systems()["edge1"]
        done = f.invoke("rebuild", "--tag", "app", "--tag", "db", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        for name in ("app1", "app2", "db1"):
            assert f.hosts[name].current_system() == f.v1(name)
            assert not f.waiting_timers(name) and not f.locked(name)
        assert f.systems()["edge1"] == edge_before
        assert f.deployed() == {"app1", "app2", "db1"}
        lines = done.stdout.splitlines()
        plan = next(i for i, line in enumerate(lines) if line.startswith("Plan (run "))
        assert all(line == "" or PREFIX.match(line) for line in lines[:plan])  # the build ahead
        start = next(i for i, line in enumerate(lines) if i > plan and PREFIX.match(line))
        end = next(i for i, line in enumerate(lines) if line.startswith("host "))
        for line in lines[start:end]:
            assert line == "" or PREFIX.match(line), f"unprefixed line: {line!r}"
            # whole lines: no second prefix (another host's output) inside a line
            assert not ANY_PREFIX.search(line.split("] ", 1)[-1]), f"interleaved: {line!r}"
        for name in ("app1", "app2", "db1"):
            own = [line for line in host_lines(done.stdout) if line.startswith(f"[{name}] ")]
            assert f"[{name}] building the system configuration..." in own
            assert f"[{name}] verification: PASS" in own
            assert any(line.startswith(f"[{name}] activating the configuration") for line in own)
        table = lines[end:]
        assert table[0].split() == ["host", "result", "exit", "duration", "system"]
        rows = {row.split()[0]: row.split() for row in table[1:]
                if row.strip() and not row.startswith(" ")}  # fmt: skip
        phases = [row.split() for row in table[1:] if row.startswith(" ")]
        assert len(phases) == 3  # seconds per phase under each host's row
        for words in phases:
            spent = dict(zip(words[0::2], (float(w.rstrip("s,")) for w in words[1::2]),
                             strict=True))  # fmt: skip
            assert {"build", "copy", "act", "verify"} <= set(spent)
        assert set(rows) == {"app1", "app2", "db1"}
        for name, row in rows.items():
            assert row[1:3] == ["ok", "0"] and row[3].endswith("s") and row[4] == f.v1(name)
        records = records_of(f)
        assert {r["result"] for r in records.values()} == {"ok"}

    def test_jobs_bounds_the_parallelism(self, fleet: Fleet) -> None:
        """--jobs 1 runs a batch's hosts one after the other: their outputs do not overlap."""
        f = fleet
        done = f.invoke("rebuild", "--host", "app1", "--host", "edge1", "--yes", "--jobs", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        after_plan = done.stdout[done.stdout.index("Plan (run ") :]  # not the builds ahead
        order = [line[1 : line.index("]")] for line in host_lines(after_plan)]
        first = order[0]
        switch = order.index(next(h for h in order if h != first))
        assert set(order[:switch]) == {first} and first not in order[switch:]


class TestFailures:
    def test_failing_batch_stops_and_later_hosts_are_untouched(self, testbed: Testbed) -> None:
        """--batch 2: app2 fails to build in batch 1 (found by the build ahead, so its
        nixos-rebuild never runs), so batch 2 (db1, edge1) is skipped: no nixos-rebuild, no
        lock, no timer, same system and generations; exit 5; --json prints one object per
        host."""
        f = make_fleet(testbed, list(TAGS))
        f.set_config("app2", config("v2", f.ports["app2"], build_fail=True))
        before = f.systems()
        done = f.invoke("rebuild", "--all", "--yes", "--batch", "2", "--json")
        assert done.returncode == 5, done.stdout + done.stderr
        assert f.hosts["app1"].current_system() == f.v1("app1")
        assert f.systems()["app2"] == before["app2"]
        for name in ("db1", "edge1"):
            assert f.systems()[name] == before[name]
            assert not f.locked(name) and not f.hosts[name].timers()
        assert f.deployed() == {"app1"}
        objects = {o["host"]: o for o in map(json.loads, done.stdout.splitlines())}
        assert list(objects) == list(TAGS)
        assert [objects[n]["result"] for n in TAGS] == ["ok", "build_failed", "skipped", "skipped"]
        assert [objects[n]["exit_code"] for n in TAGS] == [0, 5, 0, 0]
        assert objects["db1"]["ok"] is False and objects["app1"]["ok"] is True
        records = records_of(f)
        assert records["edge1"]["result"] == "skipped"
        assert records["edge1"]["final_system"] == before["edge1"][0]

    def test_canary_failure_skips_the_rest_and_max_fail_lets_it_go_on(
        self, testbed: Testbed
    ) -> None:
        """--canary: a failing first host stops the run before any other host (its build fails
        ahead, before the prompt: no nixos-rebuild at all); with --max-fail 1 the same failure
        is tolerated and the others deploy."""
        f = make_fleet(testbed, ["app1", "app2", "db1"])
        f.set_config("app1", config("v2", f.ports["app1"], build_fail=True))
        before = f.systems()
        done = f.invoke("rebuild", "--all", "--yes", "--canary")
        assert done.returncode == 5, done.stdout + done.stderr
        assert f.systems() == before and f.deployed() == set()
        assert [r["result"] for r in f.records()] == ["build_failed", "skipped", "skipped"]
        done = f.invoke("rebuild", "--all", "--yes", "--canary", "--max-fail", "1")
        assert done.returncode == 5, done.stdout + done.stderr
        assert f.hosts["app2"].current_system() == f.v1("app2")
        assert f.hosts["db1"].current_system() == f.v1("db1")

    def test_exit_code_is_the_most_severe_outcome(self, testbed: Testbed) -> None:
        """ok + build failure (5) + rolled back (7) exits 7; with --no-rollback the failed
        verification (6) outranks the build failure (5). Each host keeps its own outcome."""
        f = make_fleet(testbed, ["app1", "app2", "db1"])
        f.set_config("app2", config("v2", f.ports["app2"], build_fail=True))
        bad_db = config("v2", f.ports["db1"], units={"backup.service": {"fail": True}})
        f.set_config("db1", bad_db)
        db_before = f.hosts["db1"].current_system()
        done = f.invoke("rebuild", "--all", "--yes")
        assert done.returncode == 7, done.stdout + done.stderr
        results = {r["host"]: (r["result"], r["exit_code"]) for r in f.records()}
        assert results == {"app1": ("ok", 0), "app2": ("build_failed", 5),
                           "db1": ("rolled_back", 7)}  # fmt: skip
        assert f.hosts["db1"].current_system() == db_before
        assert not f.waiting_timers("db1")
        rows = done.stdout[done.stdout.index("\nhost ") :].split("\n")[2:]
        assert [row.split()[:3] for row in rows if row and not row.startswith(" ")] == [
            ["app1", "ok", "0"], ["app2", "build_failed", "5"], ["db1", "rolled_back", "7"],
        ]  # fmt: skip
        done = f.invoke("rebuild", "--host", "app2", "--host", "db1", "--yes", "--no-rollback")
        assert done.returncode == 6, done.stdout + done.stderr
        assert f.hosts["db1"].current_system() == f.expected("db1", bad_db)
        assert [r["exit_code"] for r in f.records()[-2:]] == [5, 6]


class TestGatesForTheWholeFleet:
    def test_locked_host_refuses_the_run_before_any_host_changes(self, fleet: Fleet) -> None:
        """db1 is locked by another operator: the run exits 3 naming db1 and the holder; no
        host was deployed, every other host's lock is released, db1's lock stays alice's,
        and every host has a `refused` record of the same run."""
        f = fleet
        lock = f.hosts["db1"].root / "run" / "rebuild-lock"
        lock.mkdir(parents=True)
        owner = {"run_id": "20260101-000000-abcdef", "operator": "alice",
                 "hostname": "alice-laptop", "machine_id": "f" * 32, "pid": 1,
                 "since": time.time()}  # fmt: skip
        (lock / "owner").write_text(json.dumps(owner))
        before = f.systems()
        done = f.invoke("rebuild", "--all", "--yes")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "db1" in done.stderr and "alice" in done.stderr
        assert f.nixos_rebuild_calls() == [] and f.systems() == before
        for name in ("app1", "app2", "edge1"):
            assert not f.locked(name) and not f.hosts[name].timers()
        assert json.loads((lock / "owner").read_text())["operator"] == "alice"
        records = records_of(f)
        assert set(records) == set(TAGS)
        assert {r["result"] for r in records.values()} == {"refused"}

    def test_unknown_host_key_refuses_the_run(self, fleet: Fleet) -> None:
        """One host missing from known_hosts refuses the whole run (3), naming it; no host
        is even locked."""
        f = fleet
        edge = f.hosts["edge1"]
        lines = f.tb.known_hosts.read_text().splitlines()
        f.tb.known_hosts.write_text(
            "".join(line + "\n" for line in lines if line != edge.known_hosts_line)
        )
        done = f.invoke("rebuild", "--all", "--yes")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "host key of edge1" in done.stderr
        assert f.nixos_rebuild_calls() == []
        assert not any(f.locked(n) for n in TAGS)


class TestConfirmation:
    def test_all_needs_the_host_count_typed(self, fleet: Fleet) -> None:
        """At a real terminal, --all asks for the number of hosts: `y` declines (4, nothing
        changed); typing 4 deploys them all."""
        f = fleet
        before = f.systems()
        child = f.spawn("--all")
        child.expect_exact("Deploy 4 hosts? Type 4 to confirm: ")
        child.sendline("y")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert f.systems() == before and f.nixos_rebuild_calls() == []
        assert {r["result"] for r in f.records()} == {"declined"}
        assert not any(f.locked(n) for n in TAGS)
        child = f.spawn("--all")
        child.expect_exact("Type 4 to confirm: ")
        child.sendline("4")
        child.expect(pexpect.EOF, timeout=120)
        child.close()
        assert child.exitstatus == 0, child.before
        assert all(f.hosts[n].current_system() == f.v1(n) for n in TAGS)

    def test_selection_above_confirm_count_above_needs_the_count(self, fleet: Fleet) -> None:
        """A selection larger than `confirm_count_above` asks for the count too; a small one
        asks y/N."""
        f = fleet
        f.inventory.write_text("confirm_count_above = 1\n" + f.inventory.read_text())
        child = f.spawn("--tag", "app")
        child.expect_exact("Deploy 2 hosts? Type 2 to confirm: ")
        child.sendline("3")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        f.inventory.write_text(f.inventory.read_text().replace("confirm_count_above = 1", ""))
        child = f.spawn("--tag", "app")
        child.expect_exact("Deploy app1, app2? [y/N] ")
        child.sendline("n")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4
        assert f.nixos_rebuild_calls() == []


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_hosts_in_network_namespaces_deploy_in_parallel(testbed: Testbed) -> None:
    """Two hosts in their own network namespaces (10.214.0.0/16) deploy in one run."""
    f = make_fleet(testbed, ["ns1", "ns2"], netns=True)
    done = f.invoke("rebuild", "--all", "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("ns1", "ns2"):
        assert f.hosts[name].address.startswith("10.214.")
        assert f.hosts[name].current_system() == f.v1(name)


def test_live_lines_on_a_terminal(testbed: Testbed) -> None:
    """On a real pseudo-terminal a fleet rollout draws one live line per host, redrawn in
    place (cursor up, line cleared), with the phase and its seconds (a wait's countdown is
    drawn too: tests/unit/test_progress.py); each line ends with the host's result; the summary
    follows. Without a terminal
    (every other test here) the lines are plain and prefixed."""
    f = make_fleet(testbed, ["app1", "app2"])
    argv = f.argv("rebuild", "--all", "--yes")
    child = pexpect.spawn(argv[0], argv[1:], env=f.env(), encoding="utf-8", timeout=180,
                          dimensions=(40, 160))  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    out = child.before or ""
    assert child.exitstatus == 0, out
    assert "\x1b[2A" in out and out.count("\x1b[2K[app1]") >= 2
    assert re.search(r"\[app1\] (nixos-rebuild|verifying) \d+s", out), out
    assert "[app1] ok (exit 0)" in out and "[app2] ok (exit 0)" in out
    assert "\nhost " in out.replace("\r\n", "\n")
