"""The fast shims (sh shims, the simulator's client) answer exactly as the Python shims do.

Every command line runs twice on the same host: through the host's PATH (``hostbin/``: sh shims
and the client of the host's simulator) and through a PATH of the Python shims
(``hostbin/py/``); stdout, stderr and the exit code must be the same. Then the simulator's
process model: signals, a client that dies, a simulator that is gone, its lifecycle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import SimHost, Testbed
from testbed.procs import children_of, is_alive
from testbed.sim.dispatch import SHIM_NAMES
from testbed.sim.host import SIM_ROOT_MARKER
from testbed.store import PACKAGE_PARENT
from testbed.testbed import HOST_PATH_TAIL

from .conftest import ssh, wait_for, web_config

PROFILE = "/nix/var/nix/profiles/system"

PATH_CASES = [
    "readlink -f /run/current-system",
    "readlink /run/current-system; readlink -f /nix/var/nix/profiles/system",
    "readlink -f /run/nope/deeper; echo rc=$?",
    "readlink -f /run/rebuild-lock; readlink -fm /run/a/../b",
    "readlink -zf /run/current-system | od -c | head -2",
    "readlink --bogus; echo rc=$?",
    "cat /run/nope; echo rc=$?",
    "cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f1",
    "cat /etc/ssh/ssh_host_NOPE_key.pub; echo rc=$?",
    "mkdir /run/lk && mkdir /run/lk; echo rc=$?; LC_ALL=C mkdir /run/lk; echo rc=$?; "
    "rmdir /run/lk; rmdir /run/lk; echo rc=$?",
    "mkdir -p /run/a/b && ls /run/a && ls -d /run/a/b && ls /run/nope; echo rc=$?; rm -r /run/a",
    "ls --zero /nix/var/nix | od -c | head -2; ls -d --hide=x /var/lib",
    "echo hi | tee /run/t && tee -a /run/t </dev/null && cat /run/t && rm /run/t /run/t; echo $?",
    "printf 'a\\nb\\nc\\n' > /dev/null; tail -n 1 /run/nope; echo rc=$?",
    "mkdir /run/x && echo one | tee /run/x/f >/dev/null && tail -n1 /run/x/f && rm -rf /run/x; "
    "ls /run/x",
    "flock -w 1 /run/fl true; echo rc=$?; flock -n /run/nope/x true; echo rc=$?; rm -f /run/fl",
    "flock /run/fl sh -c 'readlink -f /run/current-system'; rm /run/fl",
    "mkdir --mode=700 /run/m && ls -ld /run/m | cut -c1-10 && rm -r --interactive=never /run/m",
    "env -i PATH=$PATH readlink -f /run/current-system",
    "env -i PATH=$PATH sh -c 'cat /run/nope'; echo rc=$?",
    "LANG=C mkdir /run/no/x; LC_ALL=C.UTF-8 mkdir /run/no/x; LC_CTYPE=POSIX mkdir /run/no/x; "
    "LC_ALL=C mkdir /run/no/x; LC_ALL= LANG=C.UTF-8 mkdir /run/no/x",
]

SERVED_CASES = [
    "systemctl is-system-running; echo rc=$?",
    "systemctl is-active sshd web.service nope; echo rc=$?",
    "systemctl is-failed web; echo rc=$?; systemctl is-active; echo rc=$?",
    "systemctl show -p Id,LoadState,ActiveState,SubState --no-pager -- sshd.service web nope",
    "systemctl show --value -p ActiveState sshd; systemctl show; systemctl show -pSubState web",
    "systemctl list-units --no-legend; systemctl list-units --state=failed --plain --no-legend",
    "systemctl list-units; systemctl list-units --all --type=service 'web*'; systemctl",
    "systemctl status sshd web; echo rc=$?; systemctl status nope; echo rc=$?",
    "systemctl list-timers; systemctl --user status; echo rc=$?; systemctl --bogus; echo rc=$?",
    "systemctl frobnicate; echo rc=$?; systemctl -p; echo rc=$?; systemctl stop nope; echo $?",
    f"nix-env -p {PROFILE} --list-generations; nix-env --version; nix-env; echo rc=$?",
    f"nix-env --bogus; echo rc=$?; nix-env --list-generations; echo rc=$?; nix-env -p {PROFILE}",
    f"nix-env -p {PROFILE} --switch-generation 9; echo rc=$?; nix-env -p {PROFILE} -G x; echo $?",
    "nix-store --version; nix-store --check-validity /run; echo rc=$?; nix-store --bogus",
    'nix-store -q "$(readlink -f /run/current-system)"; echo rc=$?',
    'printf "%s\\n/nope\\n" "$(readlink -f /run/current-system)" | nix-store --serve; echo $?',
    "hostname; hostname -I; hostname --fqdn",
    "systemd-run; echo rc=$?; systemd-run --user true; echo rc=$?; systemd-run -Z true",
    "systemd-run --on-active=soon true; echo rc=$?; systemd-run --unit sshd true; echo $?",
    "env -i PATH=$PATH systemctl is-system-running; env -i PATH=$PATH hostname",
    "cd /tmp && env -i PATH=$PATH HOME=/nowhere TZ=UTC0 nix-env -p /nix/var/nix/profiles/system"
    " --list-generations",
    "systemctl show sshd </dev/null >&- 2>&-; echo rc=$?; systemctl bogus 2>&-; echo rc=$?",
    "ulimit -n 64; systemctl show -p Id sshd; umask 077; systemctl is-active sshd",
    # what the caller ignores, the command and the service it starts ignore too (exec keeps it)
    "trap '' HUP USR1; systemd-run --quiet --pipe --wait grep -E '^Sig(Ign|Blk)' /proc/self/status",
    "systemd-run --quiet --pipe --wait --setenv=A=1 sh -c 'echo $A; pwd; exit 3'; echo rc=$?",
]


def python_shims_path(tb: Testbed, host: SimHost, where: Path) -> str:
    """A PATH whose shims are the Python ones (hostbin/py/NAME), for the same host."""
    where.mkdir(exist_ok=True)
    for name in SHIM_NAMES:
        link = where / name
        if not link.is_symlink():
            link.symlink_to(tb.hostbin_dir / "py" / name)
    (where / SIM_ROOT_MARKER).write_text(f"{host.root}\n", encoding="utf-8")
    return f"{where}:{HOST_PATH_TAIL}"


def both(host: SimHost, py_path: str, script: str) -> tuple[tuple[int, str, str], ...]:
    """(exit code, stdout, stderr) of the script with the fast shims, then with Python's."""
    out = []
    for path in (host.path, py_path):
        env = {**host.local_env(), "PATH": path}
        done = subprocess.run(
            ["sh", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
            cwd="/",
        )
        out.append((done.returncode, done.stdout, done.stderr))
    return tuple(out)


@pytest.fixture
def web_host(testbed: Testbed) -> SimHost:
    host = testbed.add_host("vps", initial_config=web_config("v1", 1))
    failing = {"units": {"sshd.service": {}, "web.service": {"fail": True}}, "label": "v2"}
    host.activate(testbed.build("vps", failing))
    return host


class TestSameAnswers:
    def test_path_shims_answer_as_the_python_shims(
        self, testbed: Testbed, web_host: SimHost, tmp_path: Path
    ) -> None:
        """readlink, cat, mkdir, rm, rmdir, ls, tee, tail and flock in sh: the same output,
        errors (paths shown as on the host) and exit codes as the Python path shim."""
        py_path = python_shims_path(testbed, web_host, tmp_path / "py")
        for script in PATH_CASES:
            fast, slow = both(web_host, py_path, script)
            assert fast == slow, script

    def test_served_commands_answer_as_the_python_shims(
        self, testbed: Testbed, web_host: SimHost, tmp_path: Path
    ) -> None:
        """systemctl, nix-env, nix-store, hostname and systemd-run through the simulator: the
        same output, errors and exit codes as the Python shims run as their own processes."""
        assert testbed.client_kind in ("c", "python")
        py_path = python_shims_path(testbed, web_host, tmp_path / "py")
        for script in SERVED_CASES:
            fast, slow = both(web_host, py_path, script)
            assert fast == slow, script

    def test_the_python_client_answers_the_same(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Without a C compiler the client is Python (RBTB_CLIENT=python): same answers."""
        monkeypatch.setenv("RBTB_CLIENT", "python")
        with Testbed() as tb:
            assert tb.client_kind == "python"
            host = tb.add_host("vps", initial_config=web_config("v1", 1))
            py_path = python_shims_path(tb, host, tmp_path / "py")
            for script in SERVED_CASES[:4] + SERVED_CASES[-4:]:
                fast, slow = both(host, py_path, script)
                assert fast == slow, script

    def test_sudo_shim_passes_path_and_sim_root(self, testbed: Testbed) -> None:
        """sudo (sh) keeps the host's PATH and SIM_ROOT for the command and maps its paths;
        VAR=value before the command stays in front of it."""
        if os.geteuid() != 0:
            pytest.skip("needs root: sudo as root needs no password")
        host = testbed.add_host("vps")
        done = host.run_local(
            ["sh", "-c", "sudo -n -- FOO=bar sh -c 'echo $FOO; systemctl is-system-running' "
             "&& sudo -u root readlink -f /run/current-system && sudo -n cat /run/nope"]
        )  # fmt: skip
        assert done.stdout.splitlines() == ["bar", "running", host.current_system()]
        assert "cat: /run/nope: No such file or directory" in done.stderr
        assert done.returncode == 1


class TestSimulatorProcesses:
    def test_over_ssh_the_commands_are_the_hosts(self, testbed: Testbed) -> None:
        """In an SSH session the fast shims are on PATH and answer for this host."""
        host = testbed.add_host("vps")
        # one name per `command -v`: dash (a non-root user's /bin/sh) prints only the first
        probe = ssh(host, "command -v systemctl; command -v readlink; hostname; "
                    "systemctl is-system-running")  # fmt: skip
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split() == [
            str(host.bin_dir / "systemctl"),
            str(host.bin_dir / "readlink"),
            "vps",
            "running",
        ]

    def test_a_signal_to_the_client_ends_the_command_the_same_way(self, testbed: Testbed) -> None:
        """SIGTERM to a waiting `nix-store --serve` ends it as it ends the Python shim: killed
        by SIGTERM; SIGINT: KeyboardInterrupt, then killed by SIGINT, as CPython ends."""
        host = testbed.add_host("vps")
        assert host.server is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc = subprocess.Popen(
                ["nix-store", "--serve"],
                env=host.local_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
            )
            wait_for(lambda: bool(children_of(host.server.pid)), 10, "the command to start")
            if sig == signal.SIGINT:  # CPython prints KeyboardInterrupt once its handler is in
                wait_for(lambda: handles_sigint(host.server.pid), 10, "the SIGINT handler")
            proc.send_signal(sig)
            proc.wait(timeout=10)  # stdin still open: the signal ends it, not an EOF
            _, err = proc.communicate(timeout=10)
            assert proc.returncode == -sig
            if sig == signal.SIGINT:
                assert err.decode().rstrip().endswith("KeyboardInterrupt")
            wait_for(lambda: not children_of(host.server.pid), 10, "the command to end")

    def test_a_killed_client_takes_its_command_with_it(self, testbed: Testbed) -> None:
        """SIGKILL to the client (nothing to forward): the simulator kills the command."""
        host = testbed.add_host("vps")
        assert host.server is not None
        proc = subprocess.Popen(
            ["nix-store", "--serve"], env=host.local_env(), stdin=subprocess.PIPE, cwd="/"
        )
        wait_for(lambda: bool(children_of(host.server.pid)), 10, "the command to start")
        [child] = children_of(host.server.pid)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not is_alive(child), 10, "the command to be killed")
        assert ssh(host, "systemctl is-system-running").stdout == "running\n"

    def test_without_its_simulator_a_host_still_answers(self, testbed: Testbed) -> None:
        """The simulator gone, the client runs the Python shim: slower, same answers."""
        host = testbed.add_host("vps")
        assert host.server is not None
        host.server.terminate()
        host.server.wait(timeout=10)
        probe = ssh(host, "systemctl is-system-running; nix-env -p " + PROFILE + " --version")
        assert probe.stdout.split("\n")[:2] == ["running", "nix-env (Nix) 2.28.3"]

    def test_close_and_stale_cleanup_end_the_simulator(self) -> None:
        """The simulator ends with its host; a crashed test bed's is ended by cleanup-stale."""
        with Testbed() as tb:
            host = tb.add_host("vps")
            assert host.server is not None
            pid = host.server.pid
            assert is_alive(pid)
        assert not is_alive(pid)
        script = (
            f"import json, os, sys; sys.path.insert(0, {PACKAGE_PARENT!r})\n"
            "from testbed import Testbed\n"
            "tb = Testbed(); host = tb.add_host('vps')\n"
            "print(json.dumps({'root': str(tb.root), 'server': host.server.pid}), flush=True)\n"
            "os._exit(0)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        left = json.loads(out.stdout)
        assert is_alive(left["server"])
        from testbed import cleanup_stale_testbeds

        assert left["root"] in cleanup_stale_testbeds()
        deadline = time.monotonic() + 10
        while is_alive(left["server"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(left["server"])


def handles_sigint(server: int) -> bool:
    """Has the command the simulator runs installed CPython's SIGINT handler yet?"""
    return any(catches(child, signal.SIGINT) for child in children_of(server))


def catches(pid: int, sig: int) -> bool:
    """Has process `pid` installed a handler for `sig` (SigCgt in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False
