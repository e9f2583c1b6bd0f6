"""Real sshd hosts, the nixos-rebuild and nix stand-ins, activation (no mocks)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed import Testbed

from .conftest import V1, curl, free_port, rebuild, ssh, web_config


def test_host_answers_with_testbed_key_and_known_hosts(testbed: Testbed) -> None:
    host = testbed.add_host("vps")
    result = ssh(host, "readlink -f /run/current-system; hostname; systemctl is-system-running")
    assert result.returncode == 0, result.stderr
    current, name, state = result.stdout.split()
    assert current == host.current_system()
    assert Path(current).parent == testbed.store_dir
    assert name == "vps"
    assert state == "running"
    assert host.known_hosts_line in testbed.known_hosts.read_text()
    assert host.known_hosts_line.endswith(host.host_key_line)


def test_wrong_key_or_known_hosts_fails_and_host_unchanged(
    testbed: Testbed, tmp_path: Path
) -> None:
    host = testbed.add_host("vps")
    flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
    before = (host.current_system(), host.generations())

    empty_known_hosts = tmp_path / "other_known_hosts"
    empty_known_hosts.write_text("")
    bad_known = host.nix_sshopts().replace(str(testbed.known_hosts), str(empty_known_hosts))
    result = rebuild(testbed, host, flake, "vps", sshopts=bad_known)
    assert result.returncode != 0
    assert "Host key verification failed" in result.stderr

    other_key = tmp_path / "other_id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
        check=True,
        timeout=30,
    )
    bad_identity = host.nix_sshopts().replace(str(testbed.client_key), str(other_key))
    result = rebuild(testbed, host, flake, "vps", sshopts=bad_identity)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr

    wrong_port = host.nix_sshopts().replace(f"-p {host.port}", "-p 1")
    result = rebuild(testbed, host, flake, "vps", sshopts=wrong_port)
    assert result.returncode != 0

    assert (host.current_system(), host.generations()) == before
    assert host.unit_state("web.service") == "inactive"


def test_two_hosts_have_separate_systems(testbed: Testbed, tmp_path: Path) -> None:
    a, b = testbed.add_host("alpha"), testbed.add_host("beta")
    configs = {
        "alpha": {"units": {"sshd.service": {}}, "label": "a1"},
        "beta": {"units": {"sshd.service": {}, "cron.service": {}}, "label": "b1"},
    }
    flake = testbed.make_flake(tmp_path / "flake", configs)
    assert rebuild(testbed, a, flake, "alpha").returncode == 0
    assert rebuild(testbed, b, flake, "beta").returncode == 0
    assert a.current_system() == testbed.store_path("alpha", configs["alpha"])
    assert b.current_system() == testbed.store_path("beta", configs["beta"])
    assert a.current_system() != b.current_system()
    assert a.unit_state("cron.service") == "inactive"
    assert b.unit_state("cron.service") == "active"
    assert ssh(a, "readlink -f /nix/var/nix/profiles/system").stdout.strip() == a.current_system()
    assert ssh(b, "readlink -f /nix/var/nix/profiles/system").stdout.strip() == b.current_system()


def test_nix_eval_matches_store_path_and_rejects_unknown_flags(
    testbed: Testbed, tmp_path: Path
) -> None:
    flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
    nix = testbed.env()["REBUILD_NIX"]
    env = {**os.environ, **testbed.env()}
    attr = "nixosConfigurations.vps.config.system.build.toplevel.outPath"

    def run(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [nix, *args], env=env, capture_output=True, text=True, timeout=30, cwd=cwd, check=False
        )

    flags = ("--extra-experimental-features", "nix-command flakes")
    for ref in (str(flake), f"path:{flake}", f"git+file://{flake}"):
        result = run(*flags, "eval", "--raw", f"{ref}#{attr}")
        assert result.returncode == 0, result.stderr
        assert result.stdout == testbed.store_path("vps", V1)
    # options after the subcommand and `.` from inside the flake work as with real nix
    result = run("eval", f".#{attr}", "--raw", *flags, cwd=flake)
    assert result.stdout == testbed.store_path("vps", V1)
    assert not Path(result.stdout).exists()  # eval does not build

    result = run(*flags, "eval", "--foo", "--raw", f"{flake}#{attr}")
    assert result.returncode == 1
    assert "error: unrecognised flag '--foo'" in result.stderr

    result = run(
        *flags,
        "eval",
        "--raw",
        f"{flake}#nixosConfigurations.nope.config.system.build.toplevel.outPath",
    )
    assert result.returncode == 1
    assert f"error: flake 'git+file://{flake}' does not provide attribute" in result.stderr

    result = run("eval", "--raw", f"{flake}#{attr}")  # flakes not enabled
    assert result.returncode == 1
    assert "experimental Nix feature 'nix-command' is disabled" in result.stderr

    result = run(
        *flags, "eval", "--json", f"{flake}#nixosConfigurations", "--apply", "builtins.attrNames"
    )
    assert result.stdout.strip() == '["vps"]'

    # untracked host files do not exist for nix (git flake semantics)
    (flake / "hosts" / "ghost.json").write_text("{}")
    result = run(
        *flags,
        "eval",
        "--raw",
        f"{flake}#nixosConfigurations.ghost.config.system.build.toplevel.outPath",
    )
    assert result.returncode == 1


def test_nixos_rebuild_unknown_option_is_an_argparse_error(testbed: Testbed) -> None:
    result = subprocess.run(
        [testbed.env()["REBUILD_NIXOS_REBUILD"], "switch", "--frobnicate"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **testbed.env()},
        check=False,
    )
    assert result.returncode == 2
    assert "nixos-rebuild: error: unrecognized arguments: --frobnicate" in result.stderr


def test_switch_activates_units_and_serves_http(testbed: Testbed, tmp_path: Path) -> None:
    host = testbed.add_host("vps")
    web, api = free_port(), free_port()
    config = {
        "units": {
            "sshd.service": {},
            "web.service": {"port": web, "http_status": 200},
            "api.service": {"port": api, "http_status": 503},
        },
        "label": "v1",
    }
    flake = testbed.make_flake(tmp_path / "flake", {"vps": config})
    result = rebuild(testbed, host, flake, "vps")
    assert result.returncode == 0, result.stderr
    expected = testbed.store_path("vps", config)
    assert host.current_system() == expected
    assert host.profile_system() == expected
    assert [g for g, _ in host.generations()] == [1, 2]
    for unit in ("sshd.service", "web.service", "api.service"):
        assert host.unit_state(unit) == "active"
    assert curl(f"http://{host.address}:{web}/") == ("200", "web.service v1")
    assert curl(f"http://{host.address}:{api}/") == ("503", "api.service v1")

    show = ssh(
        host,
        "systemctl show -p Id,LoadState,ActiveState,SubState --no-pager -- web.service nope.timer",
    )
    assert show.stdout == (
        "Id=web.service\nLoadState=loaded\nActiveState=active\nSubState=running\n\n"
        "Id=nope.timer\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n"
    )
    listening = ssh(host, "ss -Htln")
    assert f"{host.address}:{web} " in listening.stdout

    # v2 drops api.service: its server stops, web keeps answering with the new label
    config2 = web_config("v2", web)
    testbed.write_config(flake, "vps", config2)
    assert rebuild(testbed, host, flake, "vps").returncode == 0
    assert host.unit_state("api.service") == "inactive"
    assert curl(f"http://{host.address}:{web}/") == ("200", "web.service v2")
    assert curl(f"http://{host.address}:{api}/")[0] == "000"


@pytest.mark.parametrize("flavour", ["ng", "classic"])
def test_failed_unit_fails_the_switch_and_degrades(
    testbed: Testbed, tmp_path: Path, flavour: str
) -> None:
    """switch-to-configuration exits 4: ng exits with it (CalledProcessError), classic warns and
    exits 1; the host runs the new system, degraded."""
    host = testbed.add_host("vps")
    config = {"units": {"sshd.service": {}, "broken.service": {"fail": True}}, "label": "bad"}
    flake = testbed.make_flake(tmp_path / "flake", {"vps": config})
    result = rebuild(testbed, host, flake, "vps", flavour=flavour)
    if flavour == "ng":
        assert result.returncode == 4, result.stderr
        assert "bin/switch-to-configuration switch' returned non-zero exit status 4." in (
            result.stderr
        )
    else:
        assert result.returncode == 1, result.stderr
        assert "warning: error(s) occurred while switching to the new configuration" in (
            result.stderr
        )
    assert host.current_system() == testbed.store_path("vps", config)
    state = ssh(host, "systemctl is-system-running")
    assert (state.returncode, state.stdout) == (1, "degraded\n")
    failed = ssh(host, "systemctl list-units --state=failed --no-legend --plain --no-pager")
    assert failed.stdout == "broken.service loaded failed failed Broken unit\n"
    assert ssh(host, "systemctl is-active broken.service").stdout == "failed\n"


def test_build_failure_changes_nothing(testbed: Testbed, tmp_path: Path) -> None:
    host = testbed.add_host("vps")
    config = {**V1, "build_fail": True}
    flake = testbed.make_flake(tmp_path / "flake", {"vps": config})
    before = (host.current_system(), host.generations())
    result = rebuild(testbed, host, flake, "vps")
    assert result.returncode == 1
    assert "error: builder for '" in result.stderr
    assert "-nixos-system-vps-25.05.drv' failed with exit code 1" in result.stderr
    assert (host.current_system(), host.generations()) == before
    assert not Path(testbed.store_path("vps", config)).exists()


def test_sudo_rollback_and_boot(testbed: Testbed, tmp_path: Path) -> None:
    """--sudo (as root only), boot (profile only) and --rollback follow nixos-rebuild."""
    host = testbed.add_host("vps")
    base = host.current_system()
    flake = testbed.make_flake(tmp_path / "flake", {"vps": V1})
    extra = ("--sudo",) if os.geteuid() == 0 else ()
    result = rebuild(testbed, host, flake, "vps", "boot", extra=extra)
    assert result.returncode == 0, result.stderr
    assert host.profile_system() == testbed.store_path("vps", V1)
    assert host.current_system() == base  # boot changes nothing running
    assert host.unit_state("web.service") == "inactive"
    result = rebuild(testbed, host, flake, "vps", "switch", extra=("--rollback", *extra))
    assert result.returncode == 0, result.stderr
    assert host.current_system() == base
    assert host.profile_system() == base
    assert host.current_generation() == 1
