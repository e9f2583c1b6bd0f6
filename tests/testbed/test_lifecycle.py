"""Startup states, build actions, and teardown of everything the test bed started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testbed import Testbed, cleanup_stale_testbeds
from testbed.procs import is_alive, run_unpiped, wait_child
from testbed.sim.host import Host, locked_state
from testbed.store import PACKAGE_PARENT
from testbed.testbed import FAST_KEX

from .conftest import curl, free_port, rebuild, ssh, wait_for, web_config


def test_starting_seconds_reports_starting_then_running(testbed: Testbed, tmp_path: Path) -> None:
    host = testbed.add_host("vps")
    port = free_port()
    flake = testbed.make_flake(
        tmp_path / "flake", {"vps": web_config("v1", port, starting_seconds=2)}
    )
    assert rebuild(testbed, host, flake, "vps", "test").returncode == 0
    # `test` activates without touching the profile
    assert host.profile_system() != host.current_system()
    probe = ssh(host, "systemctl is-system-running; systemctl is-active web.service")
    assert probe.stdout.split() == ["starting", "activating"]
    wait_for(lambda: host.system_state() == "running", 10, "the system to finish starting")
    assert host.unit_state("web.service") == "active"
    assert curl(f"http://{host.address}:{port}/") == ("200", "web.service v1")


def test_build_and_build_image_make_result_links(testbed: Testbed, tmp_path: Path) -> None:
    flake = testbed.make_flake(tmp_path / "flake", {"vps": web_config("v1", 1)})
    env = {**os.environ, **testbed.env()}
    nixos_rebuild = testbed.env()["REBUILD_NIXOS_REBUILD"]
    out = subprocess.run(
        [nixos_rebuild, "build", "--flake", ".#vps"],
        cwd=flake, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (flake / "result").resolve() == Path(testbed.store_path("vps", web_config("v1", 1)))
    image = subprocess.run(
        [nixos_rebuild, "build-image", "--image-variant", "linode", "--flake", ".#vps"],
        cwd=flake, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert image.returncode == 0, image.stderr
    # ng's print_result: the words on stderr, the path alone on stdout
    assert image.stderr.endswith("Done. The disk image can be found in ")
    img = Path(image.stdout.strip())
    assert img.is_file() and img.name.endswith(".img")
    assert (flake / "result").resolve() == img.parent
    nix = subprocess.run(
        [testbed.env()["REBUILD_NIX"], "--extra-experimental-features", "nix-command flakes",
         "build", "--print-out-paths", "--no-link",
         ".#nixosConfigurations.vps.config.system.build.images.linode"],
        cwd=flake, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert nix.stdout.strip() == str(img.parent)


def test_close_stops_every_process_and_removes_the_directory(tmp_path: Path) -> None:
    port = free_port()
    with Testbed() as tb:
        host = tb.add_host("vps", initial_config=web_config("v1", port))
        arm = ssh(host, "systemd-run --on-active=300s --unit=left-behind -- /bin/true")
        assert arm.returncode == 0
        with locked_state(Host.load(host.root), write=False) as state:
            server = state["units"]["web.service"]["pid"]
            sleeper = state["units"]["left-behind.timer"]["sleeper_pid"]
        sshd = host.sshd
        assert sshd is not None
        assert is_alive(server) and is_alive(sleeper)
        root = tb.root
    assert not is_alive(server)
    assert not is_alive(sleeper)
    assert sshd.poll() is not None
    assert not root.exists()
    assert curl(f"http://127.0.0.1:{port}/")[0] == "000"


CRASHING = """
import os, sys, json
sys.path.insert(0, {package!r})
from testbed import Testbed
from testbed.sim.host import Host, locked_state
tb = Testbed()
host = tb.add_host("vps", initial_config={config!r})
with locked_state(Host.load(host.root), write=False) as state:
    server = state["units"]["web.service"]["pid"]
print(json.dumps({{"root": str(tb.root), "sshd": host.sshd.pid, "server": server}}), flush=True)
os._exit(0)  # a crash: nothing is cleaned up
"""


def test_stale_testbeds_of_dead_processes_are_cleaned_up() -> None:
    script = CRASHING.format(package=PACKAGE_PARENT, config=web_config("v1", free_port()))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    left = json.loads(out.stdout)
    assert Path(left["root"]).exists()
    assert is_alive(left["sshd"]) and is_alive(left["server"])
    assert left["root"] in cleanup_stale_testbeds()
    assert not Path(left["root"]).exists()
    assert not is_alive(left["sshd"]) and not is_alive(left["server"])


def test_a_child_is_waited_for_with_its_exit_code_and_a_bound() -> None:
    """The stand-ins wait for a child without pipes like the real program (the code it exited
    with), bounded: past the bound the child is killed and the caller told."""
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"]) as proc:
        assert wait_child(proc, 30) == 7
    assert run_unpiped([sys.executable, "-c", "raise SystemExit(5)"], timeout=30) == 5
    marker = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", marker], stdout=subprocess.PIPE) as proc:
        try:
            wait_child(proc, 0.2)
        except subprocess.TimeoutExpired:
            timed_out = True
        else:
            timed_out = False
        proc.kill()
        proc.wait()
    assert timed_out
    try:
        run_unpiped([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.2)
    except subprocess.TimeoutExpired as exc:
        assert exc.timeout == 0.2
    else:
        raise AssertionError("run_unpiped returned before the child ended")


def test_kex_restricts_what_the_hosts_sshd_offers() -> None:
    """`Testbed(kex=...)` is the hosts' sshd `KexAlgorithms`: a client that insists on another
    key exchange is refused; without it, OpenSSH's defaults (sntrup761x25519 among them)."""
    slow = "sntrup761x25519-sha512@openssh.com"
    for kex, refused in ((FAST_KEX, True), ((), False)):
        with Testbed(kex=kex) as tb:
            host = tb.add_host("vps")
            argv = host.ssh_argv()
            insisting = [
                argv[0],
                "-o",
                "LogLevel=INFO",
                "-o",
                f"KexAlgorithms={slow}",
                *argv[1:],
                "true",
            ]
            done = subprocess.run(insisting, capture_output=True, text=True, check=False)
            fast = subprocess.run([*argv, "true"], capture_output=True, text=True, check=False)
        assert fast.returncode == 0, fast.stderr
        if refused:
            assert done.returncode == 255 and "no matching key exchange" in done.stderr
        else:
            assert done.returncode == 0, done.stderr
