"""The two nixos-rebuild stand-ins (ng and classic) against real sshd hosts: their parsers, the
re-exec, the result link, stdout and stderr, NIX_SSHOPTS on every ssh, build hosts; and the
host's switch lock with the flock shim."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

from testbed import SimHost, Testbed
from tests.support.flock import flock_held

from .conftest import V1, rebuild, ssh

NG_ONLY = ("--sudo", "--ask-sudo-password", "--no-reexec", "--store-path", "--diff", "--elevate")


def run(
    tb: Testbed, flavour: str, *args: str, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tb.nixos_rebuild(flavour)), *args], cwd=cwd, env={**os.environ, **tb.env(flavour),
        **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def events(tb: Testbed) -> list[dict[str, Any]]:
    path = tb.root / "standins.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def builds_of(found: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [e for e in found if e.get("event") == "nix" and any(
        str(a).endswith(suffix) for a in e["argv"])]  # fmt: skip


def ssh_config(tb: Testbed, hosts: dict[str, SimHost]) -> Path:
    """An ssh config naming each host by an alias, as rebuild writes one (NIX_SSHOPTS=-F it)."""
    path = tb.root / "ssh_config.test"
    blocks = [f"Host {alias}\n  HostName {h.address}\n  Port {h.port}\n  User {h.user}\n"
              for alias, h in hosts.items()]  # fmt: skip
    path.write_text("".join(blocks) + (
        f"Host *\n  IdentityFile {tb.client_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {tb.known_hosts}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
    ))  # fmt: skip
    return path


class TestParsers:
    @pytest.mark.parametrize("flag", NG_ONLY)
    def test_classic_refuses_ng_only_flags(
        self, testbed: Testbed, tmp_path: Path, flag: str
    ) -> None:
        """Classic: "$0: unknown option `X'", exit 1 (nixos-rebuild.sh's option loop)."""
        done = run(testbed, "classic", "switch", flag, "--flake", ".#vps", cwd=tmp_path)
        program = testbed.nixos_rebuild("classic")
        assert (done.returncode, done.stderr) == (1, f"{program}: unknown option `{flag}'\n")

    def test_ng_refuses_unknown_flags_as_argparse_does(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """ng: argparse's usage error, exit 2 (--store-path and --diff are newer than 25.11)."""
        for flag in ("--store-path", "--diff", "--frobnicate"):
            done = run(testbed, "ng", "switch", flag, "--flake", ".#vps", cwd=tmp_path)
            assert done.returncode == 2
            assert f"nixos-rebuild: error: unrecognized arguments: {flag}" in done.stderr

    def test_deprecated_flags_warn_in_ng(self, testbed: Testbed, tmp_path: Path) -> None:
        """ng accepts --fast and --use-remote-sudo with a warning each (__init__.py)."""
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        done = run(testbed, "ng", "build", "--fast", "--use-remote-sudo", "--flake", ".#vps",
                   cwd=flake)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert (
            "nixos-rebuild: warning: --fast is deprecated, use --no-reexec instead" in done.stderr
        )
        assert "--use-remote-sudo is deprecated, use --sudo instead" in done.stderr


class TestReexec:
    def test_sudo_fails_inside_a_classic_configuration_unless_no_reexec(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """ng re-executes the *configuration's* nixos-rebuild for switch (one more build): a
        classic one then refuses --sudo (nixpkgs issue 425637); --no-reexec keeps ng."""
        if os.geteuid() != 0:
            pytest.skip("needs root: sudo as root needs no password")
        host = testbed.add_host("vps")
        config = {**V1, "nixos_rebuild_flavour": "classic"}
        flake = testbed.make_flake(tmp_path / "flake", {"vps": config})
        done = rebuild(testbed, host, flake, "vps", extra=("--sudo",), reexec=True)
        assert done.returncode == 1
        assert done.stderr.endswith(
            "-nixos-rebuild-24.11/bin/nixos-rebuild: unknown option `--sudo'\n"
        )
        seen = events(testbed)
        assert len(builds_of(seen, ".config.system.build.nixos-rebuild")) == 1
        assert next(e["into"] for e in seen if e["event"] == "reexec").endswith(
            "-nixos-rebuild-24.11/bin/nixos-rebuild"
        )
        assert host.current_system() != testbed.store_path("vps", config)
        (testbed.root / "standins.jsonl").unlink()
        done = rebuild(testbed, host, flake, "vps", extra=("--sudo",))  # --no-reexec
        assert done.returncode == 0, done.stderr
        assert not builds_of(events(testbed), ".config.system.build.nixos-rebuild")
        assert host.current_system() == testbed.store_path("vps", config)

    def test_classic_reexecs_only_for_switch_boot_test_and_not_with_fast(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """Classic re-execs into the configuration's nixos-rebuild (here ng) for test, not for
        build, and never with --fast."""
        host = testbed.add_host("vps")
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        assert rebuild(testbed, host, flake, "vps", "test", flavour="classic",
                       reexec=True).returncode == 0  # fmt: skip
        starts = [e for e in events(testbed) if e["event"] == "start"]
        assert [(e["flavour"], e["reexec"]) for e in starts] == [("classic", False), ("ng", True)]
        (testbed.root / "standins.jsonl").unlink()
        assert rebuild(testbed, host, flake, "vps", "test", flavour="classic").returncode == 0
        assert [e["flavour"] for e in events(testbed) if e["event"] == "start"] == ["classic"]


class TestOutputs:
    @pytest.mark.parametrize("flavour", ["ng", "classic"])
    def test_result_link_and_stdout(self, testbed: Testbed, tmp_path: Path, flavour: str) -> None:
        """build leaves ./result in the working folder; test and switch with a target host do
        not; ng prints the store path alone on stdout (the words on stderr), classic prints
        nothing on stdout for a switch."""
        host = testbed.add_host("vps")
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        work = tmp_path / "work"
        work.mkdir()
        fast = "--no-reexec" if flavour == "ng" else "--fast"
        expected = testbed.store_path("vps", V1)
        done = run(testbed, flavour, "build", fast, "--flake", f"{flake}#vps", cwd=work)
        assert done.returncode == 0, done.stderr
        assert (work / "result").resolve() == Path(expected)
        (work / "result").unlink()
        env = {"NIX_SSHOPTS": host.nix_sshopts()}
        for action in ("test", "switch"):
            done = run(testbed, flavour, action, fast, "--flake", f"{flake}#vps", "--target-host",
                       host.destination, cwd=work, **env)  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert not (work / "result").exists()
            if flavour == "ng":
                assert done.stdout == expected + "\n"
                assert done.stderr.endswith("Done. The new configuration is ")
            else:
                assert done.stdout == ""
        assert host.current_system() == expected

    @pytest.mark.parametrize("flavour", ["ng", "classic"])
    def test_build_image_prints_the_path_alone_on_stdout(
        self, testbed: Testbed, tmp_path: Path, flavour: str
    ) -> None:
        """build-image: the path on stdout, the words before it on stderr (classic: two spaces
        after "Done.")."""
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        done = run(testbed, flavour, "build-image", "--image-variant", "linode", "--flake",
                   ".#vps", cwd=flake)  # fmt: skip
        assert done.returncode == 0, done.stderr
        image = Path(done.stdout.strip())
        assert image.is_file() and (flake / "result").resolve() == image.parent
        words = "Done.  The" if flavour == "classic" else "Done. The"
        assert done.stderr.endswith(f"{words} disk image can be found in ")


class TestSshOptions:
    def test_quoted_nix_sshopts_split_like_a_shell_only_by_ng(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """ng splits NIX_SSHOPTS with shlex; classic's `ssh $SSHOPTS` on whitespace, so a quoted
        value with a space breaks there (nixos-rebuild.sh; nix PR 12020 for Nix itself)."""
        host = testbed.add_host("vps")
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        opts = host.nix_sshopts() + " -o 'ServerAliveInterval 30'"
        assert rebuild(testbed, host, flake, "vps", sshopts=opts).returncode == 0
        done = rebuild(testbed, host, flake, "vps", sshopts=opts, flavour="classic")
        assert done.returncode == 1, done.stderr  # its first ssh: nix-copy-closure's
        assert 'no argument after keyword "\'serveraliveinterval"' in done.stderr

    @pytest.mark.parametrize("build_host", ["target", "builder"])
    def test_every_ssh_of_an_ng_run_reads_nix_sshopts(
        self, testbed: Testbed, tmp_path: Path, build_host: str
    ) -> None:
        """With a build host (the target, or another host on another port), ng builds there
        (`nix build DRV^*` over ssh) and copies with `nix copy --from --to` run here: every ssh
        it starts carries NIX_SSHOPTS (here `-F config`, the only way the aliases resolve)."""
        target, builder = testbed.add_host("vps"), testbed.add_host("builder")
        assert target.port != builder.port
        config = ssh_config(testbed, {"t": target, "b": builder})
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        alias = "t" if build_host == "target" else "b"
        done = run(testbed, "ng", "switch", "--no-reexec", "--flake", f"{flake}#vps",
                   "--target-host", "t", "--build-host", alias, cwd=tmp_path,
                   NIX_SSHOPTS=f"-F {config}")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert target.current_system() == testbed.store_path("vps", V1)
        ssh_runs = [e["argv"] for e in events(testbed) if e["event"] == "ssh"]
        assert len(ssh_runs) >= 5
        for argv in ssh_runs:
            assert argv[0] == "ssh" and "-F" in argv and str(config) in argv, argv
        remote = [a for a in ssh_runs if a[a.index("--") + 1 : a.index("--") + 2] == ["nix"]]
        assert len(remote) == 1 and alias in remote[0]  # built on the build host

    def test_classic_copies_from_a_build_host_with_that_hosts_own_ssh(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """Classic builds on the build host with `nix-store -r DRV`, then runs `nix-copy-closure
        --to TARGET` *there*, without NIX_SSHOPTS: the operator's alias does not resolve."""
        target, builder = testbed.add_host("vps"), testbed.add_host("builder")
        config = ssh_config(testbed, {"t": target, "b": builder})
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        before = target.current_system()
        done = run(testbed, "classic", "switch", "--fast", "--flake", f"{flake}#vps",
                   "--target-host", "t", "--build-host", "b", cwd=tmp_path,
                   NIX_SSHOPTS=f"-F {config}")  # fmt: skip
        assert done.returncode == 1
        assert "ssh: Could not resolve hostname t" in done.stderr
        assert target.current_system() == before
        done = run(testbed, "classic", "switch", "--fast", "--flake", f"{flake}#vps",
                   "--target-host", "t", "--build-host", "t", cwd=tmp_path,
                   NIX_SSHOPTS=f"-F {config}")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert target.current_system() == testbed.store_path("vps", V1)

    def test_ng_asks_the_sudo_password_once_with_getpass(
        self, testbed: Testbed, tmp_path: Path
    ) -> None:
        """--ask-sudo-password: `[sudo] password for USER@HOST: ` on the terminal, once, then
        `sudo --prompt= --stdin` on the host."""
        if os.geteuid() != 0:
            pytest.skip("needs root: sudo as root needs no password")
        host = testbed.add_host("vps")
        flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
        env = {**os.environ, **testbed.env(), "NIX_SSHOPTS": host.nix_sshopts()}
        child = pexpect.spawn(str(testbed.nixos_rebuild()), ["test", "--no-reexec", "--sudo",
                              "--ask-sudo-password", "--flake", f"{flake}#vps", "--target-host",
                              host.destination], env=env, encoding="utf-8", timeout=60)  # fmt: skip
        child.expect_exact(f"[sudo] password for {host.destination}: ")
        child.sendline("not-needed-as-root")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        sudo = [e["argv"] for e in events(testbed) if e["event"] == "ssh" and "sudo" in e["argv"]]
        assert sudo and all(a[a.index("sudo") + 1:a.index("sudo") + 3] == ["--prompt=", "--stdin"]
                            for a in sudo)  # fmt: skip


class TestSwitchLock:
    def test_a_second_switch_exits_11_and_flock_waits_on_the_hosts_lock(
        self, testbed: Testbed
    ) -> None:
        """switch-to-configuration holds /run/nixos/switch-to-configuration.lock (the host's,
        mapped) for the whole switch: a second one exits 11, "Could not acquire lock"; the
        host's `flock -w` waits for it; this machine's /run is never touched."""
        had_run_nixos = Path("/run/nixos").exists()
        host = testbed.add_host("vps")
        slow = testbed.build("vps", {**V1, "activation_seconds": 3})
        quick = testbed.build("vps", {**V1, "label": "quick"})
        lock = host.root / "run" / "nixos" / "switch-to-configuration.lock"
        first = subprocess.Popen(
            [*host.ssh_argv(), "--", f"{slow}/bin/switch-to-configuration test"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not flock_held(lock) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert flock_held(lock)
            second = ssh(host, f"{quick}/bin/switch-to-configuration test")
            assert (second.returncode, second.stderr) == (11, "Could not acquire lock\n")
            began = time.monotonic()
            waited = ssh(host, "flock -w 30 /run/nixos/switch-to-configuration.lock true; echo $?")
            assert waited.stdout == "0\n"
            assert time.monotonic() - began > 0.5
            assert first.wait(timeout=30) == 0
        finally:
            if first.poll() is None:
                first.kill()
        assert "activation_seconds: 3 s of simulated work left..." in (
            first.stderr.read() if first.stderr else ""
        )
        journal = [
            json.loads(x)
            for x in (host.root / "sim/log/activations.jsonl").read_text().splitlines()
            if json.loads(x)["phase"] == "end"
        ]
        assert [(Path(j["system"]) == Path(quick), j["code"]) for j in journal[-2:]] == [
            (True, 11),
            (False, 0),
        ]
        assert Path("/run/nixos").exists() == had_run_nixos
