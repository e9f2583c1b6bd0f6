"""The plan shown at the confirmation, the checks it lists, and how a rollout is batched."""

from __future__ import annotations

from typing import Any

import pytest

from rebuild.inventory import CommandCheck, HttpCheck, VerifySpec
from rebuild.plan import HostPlan, Plan, batches, check_names, render_plan

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EXPECTED = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-vps-24.11"
RUNNING = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-vps-24.11"
COMMAND = (
    "nixos-rebuild", "switch", "--flake", "/srv/infra#vps",
    "--target-host", "root@203.0.113.10", "--use-substitutes", "--option", "a b",
)  # fmt: skip


def host_plan(**overrides: Any) -> HostPlan:
    values: dict[str, Any] = {
        "host": "vps",
        "address": "203.0.113.10",
        "user": "root",
        "action": "switch",
        "flake_attr": "/srv/infra#vps",
        "command": COMMAND,
        "expected_system": EXPECTED,
        "current_system": RUNNING,
        "checks": ("ssh", "current-system", "unit sshd.service", "port 22"),
        "rollback_timeout": 90,
    }
    values.update(overrides)
    return HostPlan(**values)


def plan(**overrides: Any) -> Plan:
    values: dict[str, Any] = {
        "run_id": "20261125-193000-a1b2c3",
        "commit": COMMIT,
        "subject": "vps: enable sshd",
        "dirty_files": (),
        "overrides": (),
        "hosts": (host_plan(),),
        "batches": (("vps",),),
    }
    values.update(overrides)
    return Plan(**values)


class TestRenderPlan:
    def test_shows_what_runs_where(self) -> None:
        """Host, user@address, action, flake#attr, systems and the run id are all shown."""
        text = render_plan(plan())
        assert "20261125-193000-a1b2c3" in text
        assert "host vps" in text
        assert "root@203.0.113.10" in text
        assert "action:   switch" in text
        assert "flake:    /srv/infra#vps" in text
        assert f"expected: {EXPECTED}" in text
        assert f"running:  {RUNNING}" in text

    def test_commit_short_hash_and_subject(self) -> None:
        """The commit is shown as its 12-character short hash followed by the subject."""
        text = render_plan(plan())
        assert f"{COMMIT[:12]} vps: enable sshd" in text
        assert COMMIT not in text

    def test_unknown_commit(self) -> None:
        """A flake outside git shows the commit as unknown."""
        assert "commit:    unknown" in render_plan(plan(commit=None, subject=""))

    def test_exact_command_line(self) -> None:
        """The nixos-rebuild command is shown exactly, quoted as a shell would need."""
        assert (
            "command:  nixos-rebuild switch --flake '/srv/infra#vps' --target-host "
            "root@203.0.113.10 --use-substitutes --option 'a b'"
        ) in render_plan(plan())

    def test_checks_listed(self) -> None:
        """The checks that will run after activation are listed in order."""
        assert "checks:   ssh, current-system, unit sshd.service, port 22" in render_plan(plan())

    def test_no_checks(self) -> None:
        """A build has no checks and the plan says none."""
        text = render_plan(plan(hosts=(host_plan(action="build", checks=()),)))
        assert "checks:   none" in text

    def test_clean_tree_and_no_overrides(self) -> None:
        """A clean run says dirty: no and overrides: none."""
        text = render_plan(plan())
        assert "dirty:     no" in text
        assert "overrides: none" in text

    def test_dirty_files_are_listed(self) -> None:
        """Dirty files are listed by name."""
        text = render_plan(plan(dirty_files=("flake.nix", "hosts/vps.nix")))
        assert "dirty:     yes: flake.nix, hosts/vps.nix" in text
        assert "more" not in text

    def test_at_most_ten_dirty_files(self) -> None:
        """Beyond ten dirty files the plan says how many more there are."""
        files = tuple(f"f{i:02}.nix" for i in range(13))
        text = render_plan(plan(dirty_files=files))
        assert "f09.nix (+3 more)" in text
        assert "f10.nix" not in text

    def test_overrides(self) -> None:
        """Bypassed gates are shown."""
        assert "overrides: allow-dirty" in render_plan(plan(overrides=("allow-dirty",)))

    def test_dead_man_timer(self) -> None:
        """A switch with a rollback timeout says when the host rolls back on its own."""
        assert "dead-man: rollback in 90s unless verified" in render_plan(plan())

    @pytest.mark.parametrize(("action", "timeout"), [("boot", 90), ("switch", 0), ("build", 90)])
    def test_dead_man_timer_off(self, action: str, timeout: int) -> None:
        """No timer for boot/build or with rollback_timeout 0."""
        hp = host_plan(action=action, rollback_timeout=timeout)
        assert "dead-man: off" in render_plan(plan(hosts=(hp,)))

    def test_unchanged_system(self) -> None:
        """When the host already runs the expected system the plan says so."""
        text = render_plan(plan(hosts=(host_plan(current_system=EXPECTED),)))
        assert f"running:  {EXPECTED} (unchanged)" in text

    def test_batches_shown_for_a_fleet(self) -> None:
        """With several hosts the plan lists the batches in order."""
        hosts = (host_plan(), host_plan(host="web"), host_plan(host="lab"))
        text = render_plan(plan(hosts=hosts, batches=(("vps",), ("web", "lab"))))
        assert "batch 1: vps" in text
        assert "batch 2: web, lab" in text
        assert text.index("host web") < text.index("host lab")

    def test_no_batches_for_one_host(self) -> None:
        """A single host needs no batch lines."""
        assert "batch 1" not in render_plan(plan())


class TestCheckNames:
    SPEC = VerifySpec(
        units=("sshd.service", "nginx.service"),
        ports=(22, 443),
        http=(HttpCheck(url="http://127.0.0.1/", status=204),),
        commands=(CommandCheck(name="secrets decrypted", run="test -s /run/secrets/x"),),
    )

    @pytest.mark.parametrize("action", ["switch", "test"])
    def test_activation_checks(self, action: str) -> None:
        """switch/test check the system, then every unit, port, URL and command."""
        assert check_names(self.SPEC, action, verify=True) == (
            "ssh", "current-system", "system-state", "failed-units",
            "unit sshd.service", "unit nginx.service", "port 22", "port 443",
            "http http://127.0.0.1/", "command secrets decrypted",
        )  # fmt: skip

    def test_boot_checks_the_profile(self) -> None:
        """boot checks only that the host answers and the profile points at the new system."""
        assert check_names(self.SPEC, "boot", verify=True) == ("ssh", "system-profile")

    @pytest.mark.parametrize("action", ["build", "dry-activate"])
    def test_nothing_to_check(self, action: str) -> None:
        """build and dry-activate change nothing, so nothing is checked."""
        assert check_names(self.SPEC, action, verify=True) == ()

    def test_no_verify(self) -> None:
        """--no-verify drops every check."""
        assert check_names(self.SPEC, "switch", verify=False) == ()


class TestBatches:
    HOSTS = ("a", "b", "c", "d", "e")

    def test_default_is_all_at_once(self) -> None:
        """Without --batch or --canary every host goes in one batch."""
        assert batches(list(self.HOSTS), batch=None, canary=False) == (("a", "b", "c", "d", "e"),)

    def test_batch_size(self) -> None:
        """--batch 2 makes groups of two, the last one shorter."""
        assert batches(list(self.HOSTS), batch=2, canary=False) == (("a", "b"), ("c", "d"), ("e",))

    def test_canary_alone_first(self) -> None:
        """--canary deploys the first host alone, then the rest together."""
        assert batches(list(self.HOSTS), batch=None, canary=True) == (("a",), ("b", "c", "d", "e"))

    def test_canary_then_batches(self) -> None:
        """--canary --batch 2: the canary, then groups of two."""
        assert batches(list(self.HOSTS), batch=2, canary=True) == (("a",), ("b", "c"), ("d", "e"))

    def test_batch_of_one(self) -> None:
        """--batch 1 is one host at a time, in order."""
        assert batches(["a", "b", "c"], batch=1, canary=False) == (("a",), ("b",), ("c",))

    def test_batch_larger_than_fleet(self) -> None:
        """A batch larger than the fleet is one batch."""
        assert batches(["a", "b"], batch=10, canary=False) == (("a", "b"),)

    @pytest.mark.parametrize("size", [0, -1])
    def test_non_positive_batch_means_all(self, size: int) -> None:
        """--batch 0 (or less) means no batching."""
        assert batches(["a", "b", "c"], batch=size, canary=False) == (("a", "b", "c"),)

    def test_canary_with_one_host(self) -> None:
        """A lone host is its own canary and nothing follows."""
        assert batches(["a"], batch=None, canary=True) == (("a",),)

    def test_no_hosts(self) -> None:
        """No hosts, no batches."""
        assert batches([], batch=3, canary=True) == ()

    def test_every_host_exactly_once(self) -> None:
        """Whatever the combination, each host appears once and the order is kept."""
        hosts = [f"h{i}" for i in range(11)]
        for batch in (None, 1, 3, 4, 20):
            for canary in (False, True):
                flat = [h for group in batches(hosts, batch=batch, canary=canary) for h in group]
                assert flat == hosts
