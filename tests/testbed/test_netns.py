"""Hosts in network namespaces (root only): reachability, a cut network, cleanup."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from testbed import Testbed, cleanup_stale_netns
from testbed.netns import list_namespaces, run_ip

from .conftest import curl, free_port, rebuild, ssh, wait_for, web_config

pytestmark = pytest.mark.usefixtures("netns_required")


def test_netns_host_cut_network_and_dead_man_restores(testbed: Testbed, tmp_path: Path) -> None:
    port = free_port()
    host = testbed.add_host("edge", netns=True, initial_config=web_config("v1", port))
    assert host.address.startswith("10.214.")
    assert host.port == 22
    assert host.known_hosts_line.startswith(f"{host.address} ssh-ed25519 ")
    assert ssh(host, "hostname").stdout == "edge\n"
    assert curl(f"http://{host.address}:{port}/") == ("200", "web.service v1")
    old = host.current_system()

    # armed the way rebuild does it (through `sudo -n -- sh -c`, PATH handed to the unit)
    profile = "/nix/var/nix/profiles/system"
    restore = f"nix-env -p {profile} --set {old} && {old}/bin/switch-to-configuration switch"
    arm = ssh(
        host,
        "sudo -n -- sh -c "
        + shlex.quote(
            "systemd-run --on-active=12s --unit=rebuild-rollback-n1 --collect "
            f'--setenv=PATH="$PATH" -- /bin/sh -c {shlex.quote(restore)}'
        ),
    )
    assert arm.returncode == 0, arm.stderr
    v2 = web_config("v2", port, cut_network=True)
    flake = testbed.make_flake(tmp_path / "flake", {"edge": v2})
    opts = (
        host.nix_sshopts(connect_timeout=2) + " -o ServerAliveInterval=1 -o ServerAliveCountMax=2"
    )
    deploy = rebuild(testbed, host, flake, "edge", sshopts=opts, timeout=30)
    # the activation completes on the host; the session dies with the link (ServerAlive): ng
    # exits with ssh's code (CalledProcessError)
    assert deploy.returncode == 255
    assert "returned non-zero exit status 255" in deploy.stderr
    assert host.current_system() == testbed.store_path("edge", v2)
    assert host.timers() == {"rebuild-rollback-n1.timer": "waiting"}, (
        "machine too slow for this test"
    )
    # the quick probe first: the timer must not have fired yet (12 s) on a busy machine
    assert curl(f"http://{host.address}:{port}/")[0] == "000"
    cut = ssh(host, "true", connect_timeout=2, timeout=15)
    assert cut.returncode == 255
    wait_for(
        lambda: host.current_system() == old, 20, "the dead-man timer to restore the old system"
    )
    wait_for(lambda: ssh(host, "true", connect_timeout=2).returncode == 0, 10, "ssh to work again")
    assert curl(f"http://{host.address}:{port}/") == ("200", "web.service v1")
    assert host.timers() == {"rebuild-rollback-n1.timer": "elapsed"}


def test_cut_and_restore_link_directly(testbed: Testbed) -> None:
    host = testbed.add_host("edge", netns=True)
    host.cut_link()
    assert ssh(host, "true", connect_timeout=1, timeout=10).returncode == 255
    host.restore_link()
    wait_for(lambda: ssh(host, "true", connect_timeout=2).returncode == 0, 10, "ssh after restore")


def test_namespace_removed_after_close_even_when_body_raised() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), Testbed() as tb:
        host = tb.add_host("edge", netns=True)
        assert host.netns is not None
        names.append(host.netns.name)
        assert names[0] in list_namespaces()
        sshd = host.sshd
        assert sshd is not None
        raise RuntimeError("boom")
    assert names[0] not in list_namespaces()
    assert run_ip("link", "show", f"rbtb{names[0].rsplit('-', 1)[1]}h", check=False).returncode != 0
    assert sshd.poll() is not None


def test_stale_namespace_cleanup() -> None:
    # a namespace whose creator pid is gone is deleted by the stale-cleanup helper
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"rbtb-{dead.pid}-16383"
    run_ip("netns", "add", name)
    try:
        assert name in cleanup_stale_netns()
        assert name not in list_namespaces()
    finally:
        run_ip("netns", "del", name, check=False)
