"""Exact argv of nix eval and nixos-rebuild, and the ssh options rebuild imposes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from rebuild.inventory import HostSettings, Target
from rebuild.nixos import (
    SshSettings,
    build_image_argv,
    flake_metadata_argv,
    locked_flake_ref,
    nix_build_argv,
    nix_eval_argv,
    nix_sshopts,
    nixos_rebuild_argv,
    render,
    ssh_options,
)

FLAKE = "/srv/infra"


def vps(**settings: Any) -> Target:
    return Target("vps", HostSettings(address="203.0.113.10", **settings))


def ssh(**overrides: Any) -> SshSettings:
    values: dict[str, Any] = {
        "port": 22,
        "known_hosts": Path("/home/op/infra/known_hosts"),
        "identity_file": None,
        "connect_timeout": 10,
        "control_dir": None,
    }
    values.update(overrides)
    return SshSettings(**values)


def option_values(opts: list[str]) -> list[str]:
    """The values of every `-o` in order."""
    return [opts[i + 1] for i, o in enumerate(opts) if o == "-o"]


class TestNixEval:
    def test_exact_argv(self) -> None:
        """nix eval --raw of the host's toplevel outPath, with flakes enabled."""
        assert nix_eval_argv("nix", FLAKE, "vps") == [
            "nix",
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--raw",
            "/srv/infra#nixosConfigurations.vps.config.system.build.toplevel.outPath",
        ]

    def test_program_and_url_flake(self) -> None:
        """The configured nix program and a flake URL are used verbatim."""
        argv = nix_eval_argv("/opt/nix", "github:o/r", "linode-vps")
        assert argv[0] == "/opt/nix"
        assert argv[-1] == (
            "github:o/r#nixosConfigurations.linode-vps.config.system.build.toplevel.outPath"
        )

    def test_build_argv(self) -> None:
        """nix build of a named output prints its store path and leaves no result link."""
        assert nix_build_argv("nix", FLAKE, "images.vps") == [
            "nix", "--extra-experimental-features", "nix-command flakes",
            "build", "--print-out-paths", "--no-link", "/srv/infra#images.vps",
        ]  # fmt: skip


class TestNixosRebuildArgv:
    @pytest.mark.parametrize("action", ["switch", "boot", "test", "dry-activate"])
    def test_activation_actions_target_the_host(self, action: str) -> None:
        """switch/boot/test/dry-activate go to user@address with substitutes by default."""
        assert nixos_rebuild_argv("nixos-rebuild", action, FLAKE, vps()) == [
            "nixos-rebuild", action, "--flake", "/srv/infra#vps",
            "--target-host", "root@203.0.113.10", "--use-substitutes",
        ]  # fmt: skip

    def test_build_stays_local(self) -> None:
        """`build` has no target host, no sudo and no substitutes from the target."""
        assert nixos_rebuild_argv("nixos-rebuild", "build", FLAKE, vps(sudo=True)) == [
            "nixos-rebuild", "build", "--flake", "/srv/infra#vps",
        ]  # fmt: skip

    def test_user_and_attr(self) -> None:
        """The host's user and attr shape --target-host and the flake attribute."""
        argv = nixos_rebuild_argv("nixos-rebuild", "switch", FLAKE, vps(user="deploy", attr="web"))
        assert argv[2:6] == ["--flake", "/srv/infra#web", "--target-host", "deploy@203.0.113.10"]

    def test_build_host_empty_builds_locally(self) -> None:
        """build_host "" adds no --build-host."""
        assert "--build-host" not in nixos_rebuild_argv("nr", "switch", FLAKE, vps(build_host=""))

    def test_build_host_target_builds_on_the_host(self) -> None:
        """build_host "target" builds on the target itself."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps(build_host="target", user="deploy"))
        i = argv.index("--build-host")
        assert argv[i + 1] == "deploy@203.0.113.10"
        assert argv.index("--target-host") < i

    def test_build_host_builder(self) -> None:
        """build_host user@builder is passed as given."""
        argv = nixos_rebuild_argv("nr", "boot", FLAKE, vps(build_host="nix@builder.example.org"))
        assert argv[argv.index("--build-host") + 1] == "nix@builder.example.org"

    def test_sudo_flag(self) -> None:
        """sudo = true adds --sudo (or the configured --use-remote-sudo) after the hosts."""
        assert nixos_rebuild_argv("nr", "switch", FLAKE, vps(sudo=True, user="deploy")) == [
            "nr", "switch", "--flake", "/srv/infra#vps",
            "--target-host", "deploy@203.0.113.10", "--sudo", "--use-substitutes",
        ]  # fmt: skip
        old = nixos_rebuild_argv("nr", "test", FLAKE, vps(sudo=True, sudo_flag="--use-remote-sudo"))
        assert "--use-remote-sudo" in old
        assert "--sudo" not in old

    def test_no_sudo_by_default(self) -> None:
        """Without sudo neither flag appears."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps())
        assert "--sudo" not in argv
        assert "--use-remote-sudo" not in argv

    def test_use_substitutes_off(self) -> None:
        """use_substitutes = false drops --use-substitutes."""
        assert "--use-substitutes" not in nixos_rebuild_argv(
            "nr", "switch", FLAKE, vps(use_substitutes=False)
        )

    def test_extra_args_come_last(self) -> None:
        """extra_args are appended verbatim after everything rebuild adds."""
        argv = nixos_rebuild_argv(
            "nr", "switch", FLAKE,
            vps(sudo=True, build_host="target", extra_args=("--show-trace", "--option", "a b")),
        )  # fmt: skip
        assert argv[-3:] == ["--show-trace", "--option", "a b"]
        assert argv.index("--sudo") < argv.index("--show-trace")

    def test_rollback(self) -> None:
        """`invoke rollback` adds --rollback before the extra args."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps(extra_args=("-v",)), rollback=True)
        assert argv[-2:] == ["--rollback", "-v"]

    def test_build_image(self) -> None:
        """build-image uses the host's image variant."""
        assert build_image_argv("nr", FLAKE, vps(image_variant="amazon")) == [
            "nr", "build-image", "--image-variant", "amazon", "--flake", "/srv/infra#vps",
        ]  # fmt: skip

    def test_render_quotes_for_display(self) -> None:
        """The plan shows a copy-pasteable command line."""
        assert render(["nr", "switch", "--option", "a b"]) == "nr switch --option 'a b'"


class TestSshOptions:
    def test_strict_host_key_checking_comes_first(self) -> None:
        """StrictHostKeyChecking=yes is the very first option (ssh keeps the first value)."""
        assert ssh_options(ssh())[2:4] == ["-o", "StrictHostKeyChecking=yes"]

    def test_known_hosts_is_the_inventory_file(self) -> None:
        """UserKnownHostsFile is the inventory's known_hosts; the global file is not trusted."""
        values = option_values(ssh_options(ssh()))
        assert values[1] == "UserKnownHostsFile=/home/op/infra/known_hosts"
        assert "GlobalKnownHostsFile=/dev/null" in values
        assert "BatchMode=yes" in values

    def test_bounded_time(self) -> None:
        """ConnectTimeout and ServerAliveInterval bound how long a vanished host can hang us."""
        values = option_values(ssh_options(ssh(connect_timeout=7)))
        assert "ConnectTimeout=7" in values
        assert "ServerAliveInterval=5" in values
        assert "ServerAliveCountMax=3" in values

    def test_connection_sharing(self, tmp_path: Path) -> None:
        """With a control folder the ssh connection is shared under it."""
        values = option_values(ssh_options(ssh(control_dir=tmp_path)))
        assert "ControlMaster=auto" in values
        assert f"ControlPath={tmp_path}/%C" in values
        assert "ControlPersist=60" in values

    def test_no_connection_sharing_without_folder(self) -> None:
        """Without a control folder no Control* option is given."""
        assert not [v for v in option_values(ssh_options(ssh())) if v.startswith("Control")]

    def test_identity_file(self) -> None:
        """An identity adds -i and IdentitiesOnly=yes so no agent key is tried instead."""
        opts = ssh_options(ssh(identity_file=Path("/home/op/.ssh/id_ed25519")))
        assert "IdentitiesOnly=yes" in option_values(opts)
        assert opts[opts.index("-i") + 1] == "/home/op/.ssh/id_ed25519"

    def test_no_identity(self) -> None:
        """Without an identity there is no -i and no IdentitiesOnly."""
        opts = ssh_options(ssh())
        assert "-i" not in opts
        assert "IdentitiesOnly=yes" not in opts

    def test_port(self) -> None:
        """The host's port is passed with -p."""
        opts = ssh_options(ssh(port=2200))
        assert opts[opts.index("-p") + 1] == "2200"


class TestNixSshopts:
    def test_round_trips_to_ssh_options(self, tmp_path: Path) -> None:
        """shlex.split(NIX_SSHOPTS) is exactly rebuild's ssh options."""
        settings = ssh(
            port=2200,
            known_hosts=Path("/home/op/infra/known_hosts"),
            identity_file=Path("/home/op/.ssh/id_ed25519"),
            control_dir=tmp_path,
        )
        assert shlex.split(nix_sshopts(settings)) == ssh_options(settings)

    def test_only_rebuilds_options(self) -> None:
        """NIX_SSHOPTS is rebuild's options and nothing else."""
        assert nix_sshopts(ssh()) == shlex.join(ssh_options(ssh()))


class TestSshCannotBeRedirected:
    def test_no_ssh_config_is_read(self) -> None:
        """`-F none` comes first: no ~/.ssh/config or /etc/ssh/ssh_config can set a HostName,
        ProxyCommand or a weaker host-key policy for nixos-rebuild's ssh."""
        assert ssh_options(ssh())[:2] == ["-F", "none"]

    def test_no_other_key_sources(self) -> None:
        """No key from DNS or a KnownHostsCommand is trusted."""
        values = option_values(ssh_options(ssh()))
        assert "KnownHostsCommand=none" in values and "VerifyHostKeyDNS=no" in values


REV = "0123456789abcdef0123456789abcdef01234567"


class TestLockedFlakeRef:
    def test_metadata_argv(self) -> None:
        """`nix flake metadata --json` with the experimental features, as an argv list."""
        assert flake_metadata_argv("nix", "github:o/r") == [
            "nix", "--extra-experimental-features", "nix-command flakes", "flake", "metadata",
            "--json", "github:o/r",
        ]  # fmt: skip

    def test_locked_url_of_older_nix(self) -> None:
        """Nix before 2.20 prints `lockedUrl` with the revision: used as it is."""
        meta = {"lockedUrl": f"github:o/r/{REV}", "url": "github:o/r"}
        assert locked_flake_ref("github:o/r", meta) == f"github:o/r/{REV}"

    def test_url_of_newer_nix(self) -> None:
        """Newer Nix prints the locked URL as `url`."""
        meta = {"url": f"git+https://example.org/r.git?ref=main&rev={REV}"}
        assert locked_flake_ref("git+https://example.org/r.git?ref=main", meta) == meta["url"]

    def test_revision_appended_when_only_the_rev_is_given(self) -> None:
        """Only `revision` (or `locked.rev`): the reference gets `?rev=` (or `&rev=`)."""
        assert locked_flake_ref("github:o/r", {"revision": REV}) == f"github:o/r?rev={REV}"
        ref = locked_flake_ref("git+https://e.org/r?ref=main", {"locked": {"rev": REV}})
        assert ref == f"git+https://e.org/r?ref=main&rev={REV}"

    def test_a_pinned_reference_stays(self) -> None:
        """A reference that already names a revision is kept."""
        assert locked_flake_ref(f"github:o/r?rev={REV}", {}) == f"github:o/r?rev={REV}"

    def test_no_revision_means_no_pin(self) -> None:
        """Metadata without a revision (a dirty or unlockable flake) cannot be pinned."""
        assert locked_flake_ref("github:o/r", {"url": "github:o/r"}) is None
        assert locked_flake_ref("github:o/r", {"revision": "not-a-rev"}) is None
