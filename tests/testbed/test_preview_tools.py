"""What rebuild's preview and --reboot read on a host, against real sshd hosts: the host's
`nix store diff-closures`, `nix path-info -S --json` and `nix config show`, the systems' boot
links and packages, switch-to-configuration's dry-activate, `systemctl reboot`; and the
operator-side stand-ins' evaluation log with Nix's flake evaluation cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import SimHost, Testbed
from testbed.sim.nix_query import drv_name
from testbed.store import package_nar_size

from .conftest import free_port, rebuild, ssh, wait_for, web_config

NIX = "nix --extra-experimental-features nix-command"
RED, GREEN, NORMAL = "\x1b[31;1m", "\x1b[32;1m", "\x1b[0m"


def kib(size: int) -> str:
    return f"{size / 1024:+.1f} KiB"


class TestDrvName:
    @pytest.mark.parametrize(
        ("name", "split"),
        [
            ("apache-httpd-2.0.48", ("apache-httpd", "2.0.48")),  # names.cc's own example
            ("openssl-3.0.13", ("openssl", "3.0.13")),
            ("nixos-system-vps-25.05", ("nixos-system-vps", "25.05")),
            ("kernel-modules", ("kernel-modules", "")),
            ("initrd-linux-6.6.30", ("initrd-linux", "6.6.30")),
            ("foo-_bar", ("foo", "_bar")),  # not followed by a letter
        ],
    )
    def test_the_version_starts_after_the_first_dash_not_followed_by_a_letter(
        self, name: str, split: tuple[str, str]
    ) -> None:
        """Nix's DrvName (src/libstore/names.cc)."""
        assert drv_name(name) == split


def systems(tb: Testbed, port: int) -> tuple[str, str]:
    old = web_config("a", port, packages={"openssl": "3.0.13", "curl": "8.1.0", "tzdata": ""})
    new = web_config("b", port, packages={"openssl": "3.0.14", "htop": "3.3.0", "tzdata": ""})
    return tb.build("vps", old), tb.build("vps", new)


class TestHostNix:
    def test_diff_closures_as_nix_prints_it(self, testbed: Testbed) -> None:
        """One line per package name that changed, sorted; ∅ for none; the size delta in KiB
        between ANSI codes when it is 8 KiB or more; a kernel bump groups the kernel and its
        modules (the output suffix `-modules` is stripped before the name splits)."""
        host = testbed.add_host("vps")
        old, new = systems(testbed, free_port())
        kernel = testbed.build("vps", web_config("c", 1, kernel="6.6.30"))
        host.activate(old)
        done = ssh(host, f"{NIX} store diff-closures /run/current-system {new}")
        assert done.returncode == 0, done.stderr
        openssl = package_nar_size("openssl", "3.0.14") - package_nar_size("openssl", "3.0.13")
        assert done.stdout.splitlines() == [
            f"curl: 8.1.0 → ∅, {GREEN}{kib(-package_nar_size('curl', '8.1.0'))}{NORMAL}",
            f"htop: ∅ → 3.3.0, {RED}{kib(package_nar_size('htop', '3.3.0'))}{NORMAL}",
            f"openssl: 3.0.13 → 3.0.14, {RED if openssl > 0 else GREEN}{kib(openssl)}{NORMAL}",
        ]
        bump = ssh(host, f"{NIX} store diff-closures {testbed.build('vps', web_config('c', 1))} "
                   f"{kernel}").stdout.splitlines()  # fmt: skip
        assert bump[0] == "initrd-linux: 6.6.63 → 6.6.30"
        assert bump[1].startswith("linux: 6.6.63 → 6.6.30, ")  # the modules are grouped in

    def test_an_empty_version_is_epsilon_and_errors_are_nix_s(self, testbed: Testbed) -> None:
        """`ε` for an empty version; a path outside the store and the missing feature are
        Nix's errors (exit 1)."""
        host = testbed.add_host("vps")
        a = testbed.build("vps", web_config("a", 1, packages={"tzdata": ""}))
        b = testbed.build("vps", web_config("a", 1, packages={}))
        assert ssh(host, f"{NIX} store diff-closures {a} {b}").stdout.startswith("tzdata: ε → ∅")
        bad = ssh(host, f"{NIX} store diff-closures /etc {b}")
        assert bad.returncode == 1 and "is not in the Nix store" in bad.stderr
        off = ssh(host, f"nix store diff-closures {a} {b}")
        assert off.returncode == 1 and "experimental Nix feature 'nix-command'" in off.stderr

    def test_path_info_json_keyed_by_path(self, testbed: Testbed) -> None:
        """`path-info -S --json`: an object keyed by store path with narSize and closureSize
        (Nix 2.19+); the closure size sums the NAR sizes of the closure (`-r`)."""
        host = testbed.add_host("vps")
        old, new = systems(testbed, free_port())
        host.activate(old)
        done = ssh(host, f"{NIX} path-info -S --json /run/current-system {new}")
        assert done.returncode == 0, done.stderr
        info: dict[str, dict[str, Any]] = json.loads(done.stdout)
        assert set(info) == {old, new}
        for path in (old, new):
            listing = ssh(host, f"{NIX} path-info -rs {path}").stdout.splitlines()
            sizes = [int(line.split("\t")[1]) for line in listing]
            assert info[path]["closureSize"] == sum(sizes)
            assert info[path]["narSize"] > 0 and path not in info[path]["references"]
        assert any(r.endswith("-openssl-3.0.14") for r in info[new]["references"])

    def test_config_show_trusted_users(self, testbed: Testbed) -> None:
        """`nix config show trusted-users`: root (and the test bed's own user) by default, what
        the test sets otherwise; an unknown setting is Nix's error."""
        host = testbed.add_host("vps")
        shown = ssh(host, f"{NIX} config show trusted-users").stdout.split()
        assert shown[0] == "root" and host.user in shown
        host.set_trusted_users(["root", "@wheel"])
        assert ssh(host, f"{NIX} config show trusted-users").stdout == "root @wheel\n"
        assert "trusted-users = root @wheel" in ssh(host, f"{NIX} show-config").stdout
        bad = ssh(host, f"{NIX} config show no-such-setting")
        assert bad.returncode == 1 and "could not find setting 'no-such-setting'" in bad.stderr


class TestSystems:
    def test_boot_links_and_the_booted_system(self, testbed: Testbed) -> None:
        """A system links kernel, initrd and kernel-modules (readlink -e resolves them); the
        kernel version moves all three, `initrd` the initrd alone; the first system a host
        activates is the one it booted."""
        host = testbed.add_host("vps")
        assert host.booted_system() == host.current_system()
        plain = testbed.build("vps", web_config("a", 1))
        newer = testbed.build("vps", web_config("a", 1, kernel="6.6.30"))
        initrd = testbed.build("vps", web_config("a", 1, initrd="with-luks"))
        links: dict[str, list[str]] = {}
        for system in (plain, newer, initrd):
            done = ssh(
                host,
                "; ".join(
                    f"readlink -e {system}/{link}"
                    for link in ("kernel", "initrd", "kernel-modules")
                ),
            )
            assert done.returncode == 0, done.stderr
            links[system] = done.stdout.split()
        assert links[plain][0].endswith("-linux-6.6.63/bzImage")
        assert all(a != b for a, b in zip(links[plain], links[newer], strict=True))
        assert [a == b for a, b in zip(links[plain], links[initrd], strict=True)] == [
            True, False, True]  # fmt: skip
        booted = host.booted_system()
        host.activate(newer)
        assert host.booted_system() == booted != host.current_system()


def dry_activate(host: SimHost, system: str) -> list[str]:
    done = ssh(host, f"{system}/bin/switch-to-configuration dry-activate")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # all on stderr
    return done.stderr.splitlines()


class TestDryActivate:
    def test_every_line_in_stc_ng_s_order(self, testbed: Testbed) -> None:
        """Removed: stop; changed service (the default stopIfChanged): stop and start;
        stop_if_changed false: restart; reload_if_changed or only reload_triggers: reload;
        restart_if_changed false: NOT stopped; new units: not listed (the targets start
        them); a new systemd: restart systemd. Sorted, case-insensitively."""
        host = testbed.add_host("vps")
        old = {"units": {"sshd.service": {}, "gone.service": {}, "Web.service": {"x": 1},
                         "api.service": {"x": 1, "stop_if_changed": False},
                         "dns.service": {"x": 1, "reload_if_changed": True},
                         "cron.service": {"reload_triggers": "a"},
                         "db.service": {"x": 1, "restart_if_changed": False},
                         "same.service": {"description": "old words"}},
               "label": "a", "systemd": "256.8"}  # fmt: skip
        new = {"units": {"sshd.service": {}, "new.service": {}, "Web.service": {"x": 2},
                         "api.service": {"x": 2, "stop_if_changed": False},
                         "dns.service": {"x": 2, "reload_if_changed": True},
                         "cron.service": {"reload_triggers": "b"},
                         "db.service": {"x": 2, "restart_if_changed": False},
                         "same.service": {"description": "new words"}},
               "label": "b", "systemd": "257.1"}  # fmt: skip
        host.activate(testbed.build("vps", old))
        before = (host.current_system(), host.generations())
        assert dry_activate(host, testbed.build("vps", new)) == [
            "would stop the following units: gone.service, Web.service",
            "would NOT stop the following changed units: db.service",
            "would activate the configuration...",
            "would restart systemd",
            "would reload the following units: cron.service, dns.service",
            "would restart the following units: api.service",
            "would start the following units: Web.service",
        ]
        assert (host.current_system(), host.generations()) == before
        assert host.unit_state("gone.service") == "active"

    def test_nothing_changed_says_only_activate(self, testbed: Testbed) -> None:
        host = testbed.add_host("vps")
        assert dry_activate(host, str(host.current_system())) == [
            "would activate the configuration..."]  # fmt: skip

    def test_the_switch_does_what_dry_activate_said(self, testbed: Testbed) -> None:
        """The switch restarts the restarted unit (a new process), keeps a reloaded one, starts
        the new one and names it."""
        host = testbed.add_host("vps")
        port = free_port()
        old = web_config("a", port, units={"sshd.service": {},
                                           "web.service": {"port": port, "stop_if_changed": False},
                                           "cron.service": {"reload_triggers": 1}})  # fmt: skip
        new = web_config("b", port, units={"sshd.service": {}, "new.service": {},
                                           "web.service": {"port": port, "stop_if_changed": False},
                                           "cron.service": {"reload_triggers": 2}})  # fmt: skip
        host.activate(testbed.build("vps", old))
        system = testbed.build("vps", new)
        assert "would restart the following units: web.service" in dry_activate(host, system)
        done = ssh(host, f"{system}/bin/switch-to-configuration switch")
        assert done.returncode == 0, done.stderr
        assert "restarting the following units: web.service" in done.stderr
        assert "reloading the following units: cron.service" in done.stderr
        assert "the following new units were started: new.service" in done.stderr
        assert host.unit_state("new.service") == "active"
        assert dry_activate(host, system) == ["would activate the configuration..."]


class TestReboot:
    def test_reboot_into_the_boot_default(self, testbed: Testbed) -> None:
        """`systemctl reboot` from a transient timer: the open SSH session drops, /run is
        emptied, a new boot id, booted = current = the profile's system (not the running
        one), its units run again."""
        host = testbed.add_host("vps")
        port = free_port()
        first = testbed.build("vps", web_config("a", port))
        second = testbed.build("vps", web_config("b", port, kernel="6.6.30"))
        host.activate(first)
        assert ssh(host, f"nix-env -p /nix/var/nix/profiles/system --set {second}").returncode == 0
        (host.root / "run" / "rebuild-lock").mkdir()
        before = ssh(host, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
        assert before == host.boot_id()
        session = subprocess.Popen(
            [*host.ssh_argv(), "--", "echo open; sleep 60"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert session.stdout is not None and session.stdout.readline() == "open\n"
        done = ssh(host, "systemd-run --on-active=1 --collect --quiet --unit=rebuild-reboot-x "
                         "-- systemctl reboot")  # fmt: skip
        assert done.returncode == 0, done.stderr
        session.wait(timeout=20)  # the connection went
        wait_for(lambda: len(host.boots()) == 1, 20, "the reboot")
        after = ssh(host, "cat /proc/sys/kernel/random/boot_id; readlink -f /run/booted-system; "
                          "readlink -f /run/current-system")  # fmt: skip
        assert after.stdout.split() == [host.boot_id(), second, second]
        assert host.boot_id() != before
        assert not (host.root / "run" / "rebuild-lock").exists()
        assert host.unit_state("web.service") == "active"
        assert host.timers() == {}

    def test_a_host_that_hangs_does_not_come_back(self, testbed: Testbed) -> None:
        host = testbed.add_host("vps")
        host.hang_on_reboot()
        assert ssh(host, "systemctl reboot").returncode == 0
        wait_for(lambda: len(host.boots()) == 1, 20, "the reboot")
        assert host.boots()[0]["hung"] is True
        assert ssh(host, "true", connect_timeout=2).returncode == 255


class TestEvaluations:
    def evaluations(self, tb: Testbed) -> list[dict[str, Any]]:
        path = tb.root / "evaluations.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def nix(self, tb: Testbed, *args: str, path: str | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """The test bed's `nix` with flakes enabled; `path`: a PATH of its own."""
        env = {**os.environ, **tb.env(), **({"PATH": path} if path is not None else {})}
        argv = [env["REBUILD_NIX"], "--extra-experimental-features", "nix-command flakes", *args]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                              check=False, cwd=tb.root)  # fmt: skip

    def test_nix_s_evaluation_cache(self, testbed: Testbed, tmp_path: Path) -> None:
        """`nix build` of an attribute a build of the same clean commit evaluated is a cache
        hit (nixos-rebuild's build too); `nix eval` always evaluates, and its result does not
        spare a build; a dirty tree is never cached; `--dry-run --json` names the out path."""
        flake = testbed.make_flake(tmp_path / "flake", {"vps": web_config("a", 1)})
        top = f"{flake}#nixosConfigurations.vps.config.system.build.toplevel"
        dry = self.nix(testbed, "build", "--dry-run", "--json", "--no-link", top)
        [answer] = json.loads(dry.stdout)
        assert answer["outputs"]["out"] == testbed.store_path("vps", web_config("a", 1))
        assert self.nix(testbed, "build", "--no-link", top).returncode == 0
        assert self.nix(testbed, "eval", "--raw", f"{top}.outPath").returncode == 0
        host = testbed.add_host("vps")
        assert rebuild(testbed, host, flake, "vps", "build").returncode == 0
        (flake / "hosts" / "vps.json").write_text(json.dumps(web_config("b", 1)))
        assert self.nix(testbed, "build", "--no-link", top).returncode == 0
        assert self.nix(testbed, "build", "--no-link", top).returncode == 0
        seen = [(e["program"], e["command"], e["cached"], e["dirty"])
                for e in self.evaluations(testbed)]  # fmt: skip
        assert seen == [
            ("nix", "build", False, False),
            ("nix", "build", True, False),
            ("nix", "eval", False, False),
            ("nixos-rebuild-ng", "build", True, False),
            ("nix", "build", False, True),
            ("nix", "build", False, True),
        ]

    def test_many_systems_in_one_evaluator(self, testbed: Testbed, tmp_path: Path) -> None:
        """`nix eval --json FLAKE#nixosConfigurations --apply 'cs: map ...'`: each host's
        system in order, one process, a full evaluation each; a missing name fails it all."""
        configs = {"a": web_config("a", 1), "b": web_config("b", 2)}
        flake = testbed.make_flake(tmp_path / "flake", configs)
        apply = 'cs: map (n: cs.${n}.config.system.build.toplevel.outPath) [ "b" "a" ]'
        done = self.nix(testbed, "eval", "--json", f"{flake}#nixosConfigurations",
                        "--apply", apply)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [testbed.store_path("b", configs["b"]),
                                           testbed.store_path("a", configs["a"])]  # fmt: skip
        seen = self.evaluations(testbed)
        assert [e["attr"].split(".")[1] for e in seen] == ["b", "a"]
        assert len({e["pid"] for e in seen}) == 1
        missing = apply.replace('"a"', '"zz"')
        done = self.nix(testbed, "eval", "--json", f"{flake}#nixosConfigurations",
                        "--apply", missing)  # fmt: skip
        assert done.returncode == 1
        assert "error: attribute 'zz' missing" in done.stderr

    def test_one_command_fetches_the_flake_once(self, testbed: Testbed, tmp_path: Path) -> None:
        """As Nix copies a git flake to the store once per command and evaluates every
        attribute from that copy, the stand-in asks git the same questions for six hosts as
        for one (it used to ask them again for each host)."""
        configs = {name: web_config(name, n) for n, name in enumerate("abcdef", 1)}
        flake = testbed.make_flake(tmp_path / "flake", configs)
        real_git = shutil.which("git")
        assert real_git is not None
        wrappers = tmp_path / "bin"
        wrappers.mkdir()
        asked = tmp_path / "git-calls"
        (wrappers / "git").write_text(f'#!/bin/sh\necho "$*" >>{asked}\nexec {real_git} "$@"\n')
        (wrappers / "git").chmod(0o755)

        def git_calls(names: str) -> int:
            asked.unlink(missing_ok=True)
            listed = " ".join(f'"{name}"' for name in names)
            apply = f"cs: map (n: cs.${{n}}.config.system.build.toplevel.outPath) [ {listed} ]"
            done = self.nix(testbed, "eval", "--json", f"{flake}#nixosConfigurations",
                            "--apply", apply, path=f"{wrappers}:{os.environ['PATH']}")  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert len(json.loads(done.stdout)) == len(names)
            return len(asked.read_text().splitlines())

        assert git_calls("abcdef") == git_calls("a") > 0

    def test_the_re_exec_is_its_own_evaluation(self, testbed: Testbed, tmp_path: Path) -> None:
        """ng's re-exec builds the configuration's nixos-rebuild: another attribute, another
        evaluation; the toplevel's own build after it is one more."""
        flake = testbed.make_flake(tmp_path / "flake", {"vps": web_config("a", free_port())})
        host = testbed.add_host("vps")
        done = rebuild(testbed, host, flake, "vps", "switch", reexec=True)
        assert done.returncode == 0, done.stderr
        attrs = [(e["attr"].rsplit(".", 1)[1], e["cached"]) for e in self.evaluations(testbed)]
        assert attrs == [("nixos-rebuild", False), ("toplevel", False)]


def test_reboot_leaves_no_process_behind(testbed: Testbed) -> None:
    """The reboot's own worker ends; the host closes cleanly afterwards."""
    host = testbed.add_host("vps")
    assert ssh(host, "systemctl reboot").returncode == 0
    wait_for(lambda: len(host.boots()) == 1, 20, "the reboot")
    time.sleep(0.3)
    assert host.close() == []
