"""Dead-man timers: systemd-run --on-active fires detached; systemctl stop cancels it."""

from __future__ import annotations

import time
from pathlib import Path

from testbed import Testbed
from testbed.procs import is_alive
from testbed.sim.host import Host, locked_state

from .conftest import curl, free_port, rebuild, ssh, wait_for, web_config


def _rollback_script(store_path: str) -> str:
    return (
        f"nix-env -p /nix/var/nix/profiles/system --set {store_path} && "
        f"{store_path}/bin/switch-to-configuration switch"
    )


def test_timer_fires_after_session_end_and_rolls_back(testbed: Testbed, tmp_path: Path) -> None:
    port = free_port()
    host = testbed.add_host("vps", initial_config=web_config("v1", port))
    old = host.current_system()
    assert old is not None
    flake = testbed.make_flake(tmp_path / "flake", {"vps": web_config("v2", port)})
    assert rebuild(testbed, host, flake, "vps").returncode == 0
    assert curl(f"http://{host.address}:{port}/") == ("200", "web.service v2")

    arm = ssh(
        host,
        "systemd-run --on-active=2s --unit=rebuild-rollback-r1 --collect "
        f"--description='rebuild dead-man rollback' -- /bin/sh -c '{_rollback_script(old)}'",
    )
    assert arm.returncode == 0, arm.stderr
    assert "Running timer as unit: rebuild-rollback-r1.timer" in arm.stderr
    show = ssh(host, "systemctl show -p ActiveState,SubState rebuild-rollback-r1.timer")
    assert show.stdout == "ActiveState=active\nSubState=waiting\n"

    wait_for(lambda: host.current_system() == old, 15, "the dead-man timer to roll back")
    wait_for(lambda: host.unit_state("rebuild-rollback-r1.service") != "active", 10, "the service")
    assert host.profile_system() == old
    assert host.timers() == {"rebuild-rollback-r1.timer": "elapsed"}
    show = ssh(host, "systemctl show -p LoadState,ActiveState,SubState rebuild-rollback-r1.timer")
    assert show.stdout == "LoadState=loaded\nActiveState=active\nSubState=elapsed\n"
    assert curl(f"http://{host.address}:{port}/") == ("200", "web.service v1")
    assert ssh(host, "systemctl is-system-running").stdout == "running\n"
    # the name stays taken while the fired timer is loaded, as with real systemd
    again = ssh(host, "systemd-run --on-active=60s --unit=rebuild-rollback-r1 -- /bin/true")
    assert again.returncode == 1
    assert "was already loaded" in again.stderr


def test_stopped_timer_never_runs(testbed: Testbed) -> None:
    host = testbed.add_host("vps")
    marker = host.root / "run" / "rbtb-fired"
    arm = ssh(
        host,
        "systemd-run --on-active=2s --unit=rebuild-rollback-r2 --collect "
        "--description=cancel-me -- /bin/sh -c 'mkdir /run/rbtb-fired'",
    )
    assert arm.returncode == 0, arm.stderr
    with locked_state(Host.load(host.root), write=False) as state:
        sleeper = state["units"]["rebuild-rollback-r2.timer"]["sleeper_pid"]
    assert is_alive(sleeper)
    stop = ssh(host, "systemctl stop rebuild-rollback-r2.timer")
    assert stop.returncode == 0, stop.stderr
    show = ssh(host, "systemctl show -p LoadState,ActiveState,SubState rebuild-rollback-r2.timer")
    assert show.stdout == "LoadState=not-found\nActiveState=inactive\nSubState=dead\n"
    assert not is_alive(sleeper)
    time.sleep(3.0)  # well past the moment it would have fired
    assert not marker.exists()
    assert host.timers() == {}
    assert ssh(host, "systemctl stop rebuild-rollback-r2.timer").returncode == 5


def test_systemd_run_wait_and_unknown_option(testbed: Testbed) -> None:
    host = testbed.add_host("vps")
    result = ssh(
        host,
        "systemd-run --wait --collect --quiet --unit=probe --service-type=exec -E FOO=bar "
        "--pipe --no-ask-password -- /bin/sh -c 'echo $FOO; exit 3'",
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "bar\n", "")
    assert host.unit_state("probe.service") == "inactive"  # collected
    failed = ssh(
        host, "systemd-run --wait --quiet --unit=keep -- /bin/false; systemctl is-system-running"
    )
    assert failed.stdout == "degraded\n"  # a failed transient unit without --collect degrades
    assert (
        ssh(host, "systemctl reset-failed keep.service; systemctl is-system-running").stdout
        == "running\n"
    )
    bad = ssh(host, "systemd-run --bogus -- true")
    assert bad.returncode == 1
    assert bad.stderr == "systemd-run: unrecognized option '--bogus'\n"


def test_nix_env_generations_and_rollback(testbed: Testbed) -> None:
    host = testbed.add_host("vps")
    paths = [host.current_system()] + [testbed.build("vps", web_config(f"v{i}", 1)) for i in (2, 3)]
    for path in paths[1:]:
        assert ssh(host, f"nix-env -p /nix/var/nix/profiles/system --set {path}").returncode == 0
    listing = ssh(host, "nix-env -p /nix/var/nix/profiles/system --list-generations").stdout
    assert [line.split()[0] for line in listing.splitlines()] == ["1", "2", "3"]
    assert listing.splitlines()[-1].endswith("(current)")
    rb = ssh(host, "nix-env -p /nix/var/nix/profiles/system --rollback")
    assert rb.stderr == "switching profile from version 3 to 2\n"
    # after a rollback, --rollback goes further down (2 -> 1), not back to where we came from
    rb = ssh(host, "nix-env -p /nix/var/nix/profiles/system --rollback")
    assert rb.stderr == "switching profile from version 2 to 1\n"
    assert ssh(host, "readlink -f /nix/var/nix/profiles/system").stdout.strip() == paths[0]
    assert ssh(host, "nix-env -p /nix/var/nix/profiles/system --rollback").returncode == 1
    sw = ssh(host, "nix-env -p /nix/var/nix/profiles/system --switch-generation 3")
    assert sw.returncode == 0
    assert host.profile_system() == paths[2]
    assert (
        ssh(host, "nix-env -p /nix/var/nix/profiles/system --switch-generation 9").returncode == 1
    )
