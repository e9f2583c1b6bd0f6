"""Exact argv of nix eval and nixos-rebuild, and the ssh options rebuild imposes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rebuild.inventory import HostSettings, Target
from rebuild.nixos import (
    BuildHost,
    Flavour,
    SshHost,
    build_image_argv,
    evaluation_args,
    flake_metadata_argv,
    locked_flake_ref,
    nix_build_argv,
    nix_dry_build_argv,
    nix_eval_argv,
    nix_eval_systems_argv,
    nix_sshopts,
    nixos_rebuild_argv,
    parse_build_host,
    parse_dry_build,
    parse_systems,
    render,
    ssh_config_text,
    ssh_exit_argv,
    ssh_master_argv,
)

FLAKE = "/srv/infra"


def vps(**settings: Any) -> Target:
    return Target("vps", HostSettings(address="203.0.113.10", **settings))


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

    def test_many_systems_in_one_evaluator(self) -> None:
        """Several hosts' systems: one nix eval --json of nixosConfigurations with an --apply
        that maps the names (Nix string literals, escaped) to their toplevel outPath."""
        assert nix_eval_systems_argv("nix", FLAKE, ["app1", 'we"ird${x}\\'], ["--impure"]) == [
            "nix", "--extra-experimental-features", "nix-command flakes", "eval", "--json",
            "--impure", "/srv/infra#nixosConfigurations", "--apply",
            'cs: map (n: cs.${n}.config.system.build.toplevel.outPath) '
            '[ "app1" "we\\"ird\\${x}\\\\" ]',
        ]  # fmt: skip

    def test_many_systems_answer(self) -> None:
        """One store path per asked attribute, in order; anything else is no answer."""
        a, b = "/nix/store/a-nixos-system-app1", "/nix/store/b-nixos-system-app2"
        assert parse_systems(json.dumps([a, b]), ["app1", "app2"]) == {"app1": a, "app2": b}
        assert parse_systems(json.dumps([a]), ["app1", "app2"]) is None
        assert parse_systems(json.dumps([a, "x"]), ["app1", "app2"]) is None
        assert parse_systems("error: nope", ["app1"]) is None

    def test_shared_connection_argv(self) -> None:
        """The connection `nix copy` shares: a master under the run's config, in the background
        once authenticated; and its stop."""
        config = Path("/run/user/1000/rb-run-x/ssh_config.vps")
        assert ssh_master_argv(config, "deploy@rebuild-vps") == [
            "ssh", "-F", str(config), "-M", "-N", "-f", "deploy@rebuild-vps"]  # fmt: skip
        assert ssh_exit_argv(config, "deploy@rebuild-vps") == [
            "ssh", "-F", str(config), "-O", "exit", "deploy@rebuild-vps"]  # fmt: skip

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


class TestDryBuild:
    TOP = "/srv/infra#nixosConfigurations.vps.config.system.build.toplevel"

    def test_argv(self) -> None:
        """Without the preview: evaluated as nixos-rebuild's build will be, nothing built."""
        assert nix_dry_build_argv("nix", FLAKE, "vps", ["--impure"]) == [
            "nix", "--extra-experimental-features", "nix-command flakes",
            "build", "--dry-run", "--json", "--no-link", "--impure", self.TOP,
        ]  # fmt: skip

    def test_the_out_path(self) -> None:
        """Nix's derived path JSON (src/libstore/derived-path.cc) names the out path."""
        answer = '[{"drvPath":"/nix/store/a-x.drv","outputs":{"out":"/nix/store/b-x"}}]'
        assert parse_dry_build(answer) == "/nix/store/b-x"

    @pytest.mark.parametrize(
        "answer",
        ["", "not json", "[]", '[{"drvPath": "/nix/store/a-x.drv", "outputs": ["out"]}]',
         '[{"drvPath": "/nix/store/a-x.drv", "outputs": {"out": null}}]', "{}"],
    )  # fmt: skip
    def test_no_out_path_is_none(self, answer: str) -> None:
        """Anything else (an older Nix, a content-addressed output): None, so `nix eval`."""
        assert parse_dry_build(answer) is None


T = "rebuild-vps"  # the ssh alias nixos-rebuild is given for the host


class TestNixosRebuildArgv:
    @pytest.mark.parametrize("action", ["switch", "boot", "test", "dry-activate"])
    def test_activation_actions_target_the_host(self, action: str) -> None:
        """switch/boot/test/dry-activate go to the host's alias, never re-exec, and use
        substitutes by default (ng)."""
        assert nixos_rebuild_argv("nixos-rebuild", action, FLAKE, vps()) == [
            "nixos-rebuild", action, "--flake", "/srv/infra#vps", "--no-reexec",
            "--target-host", f"root@{T}", "--use-substitutes",
        ]  # fmt: skip

    def test_classic_never_reexecs_either(self) -> None:
        """Classic nixos-rebuild re-executes too unless --fast (it has no --no-reexec)."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps(), flavour="classic")
        assert "--fast" in argv and "--no-reexec" not in argv

    def test_build_stays_local(self) -> None:
        """`build` has no target host, no sudo and no substitutes from the target."""
        assert nixos_rebuild_argv("nixos-rebuild", "build", FLAKE, vps(sudo=True)) == [
            "nixos-rebuild", "build", "--flake", "/srv/infra#vps", "--no-reexec",
        ]  # fmt: skip

    def test_user_and_attr(self) -> None:
        """The host's user and attr shape --target-host and the flake attribute."""
        argv = nixos_rebuild_argv("nixos-rebuild", "switch", FLAKE, vps(user="deploy", attr="web"))
        assert argv[2:4] == ["--flake", "/srv/infra#web"]
        assert argv[argv.index("--target-host") + 1] == f"deploy@{T}"

    def test_ipv6_needs_no_brackets(self) -> None:
        """The alias stands for any address: an IPv6 target is not bracketed in argv (the
        ssh config's HostName carries it)."""
        target = Target("vps", HostSettings(address="2001:db8::10"))
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, target)
        assert argv[argv.index("--target-host") + 1] == f"root@{T}"

    def test_build_host_empty_builds_locally(self) -> None:
        """build_host "" adds no --build-host."""
        assert "--build-host" not in nixos_rebuild_argv("nr", "switch", FLAKE, vps(build_host=""))

    def test_build_host_target_builds_on_the_host(self) -> None:
        """build_host "target" builds on the target itself."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps(build_host="target", user="deploy"))
        i = argv.index("--build-host")
        assert argv[i + 1] == f"deploy@{T}"
        assert argv.index("--target-host") < i

    def test_build_host_builder(self) -> None:
        """build_host user@builder[:port] is reached through its own alias (own port)."""
        argv = nixos_rebuild_argv(
            "nr", "boot", FLAKE, vps(build_host="nix@builder.example.org:2222")
        )
        assert argv[argv.index("--build-host") + 1] == "nix@rebuild-vps-builder"
        assert parse_build_host("nix@builder.example.org:2222") == BuildHost(
            "nix", "builder.example.org", 2222
        )
        assert parse_build_host("nix@[2001:db8::1]:22") == BuildHost("nix", "2001:db8::1", 22)
        assert parse_build_host("nix@b") == BuildHost("nix", "b", 22)

    @pytest.mark.parametrize(
        ("flavour", "flag"), [("ng", "--sudo"), ("classic", "--use-remote-sudo")]
    )
    def test_sudo_flag_per_flavour(self, flavour: Flavour, flag: str) -> None:
        """sudo = true: ng gets --sudo, classic --use-remote-sudo (it rejects --sudo)."""
        argv = nixos_rebuild_argv("nr", "switch", FLAKE, vps(sudo=True, user="deploy"),
                                  flavour=flavour)  # fmt: skip
        assert flag in argv
        assert {"--sudo", "--use-remote-sudo"} - {flag} & set(argv) == set()

    def test_ask_sudo_password_is_ng_only(self) -> None:
        """A stored password: ng asks once (--ask-sudo-password); classic has no such flag."""
        target = vps(sudo=True, user="deploy")
        ng = nixos_rebuild_argv("nr", "switch", FLAKE, target, ask_sudo_password=True)
        classic = nixos_rebuild_argv("nr", "switch", FLAKE, target, flavour="classic",
                                     ask_sudo_password=True)  # fmt: skip
        assert "--ask-sudo-password" in ng and "--ask-sudo-password" not in classic

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

    def test_evaluation_args(self) -> None:
        """The flags that change the evaluation reach `nix eval` too; the others do not."""
        extra = ("--override-input", "nixpkgs", "path:/n", "--impure", "-v", "--option",
                 "pure-eval", "false", "-I", "foo=/bar", "--max-jobs", "4")  # fmt: skip
        assert evaluation_args(extra) == [
            "--override-input", "nixpkgs", "path:/n", "--impure", "--option", "pure-eval",
            "false", "-I", "foo=/bar",
        ]  # fmt: skip
        argv = nix_eval_argv("nix", FLAKE, "vps", evaluation_args(extra))
        assert argv[5:7] == ["--override-input", "nixpkgs"] and argv[-1].endswith(".outPath")

    def test_build_image(self) -> None:
        """build-image uses the host's image variant."""
        assert build_image_argv("nr", FLAKE, vps(image_variant="amazon")) == [
            "nr", "build-image", "--image-variant", "amazon", "--flake", "/srv/infra#vps",
        ]  # fmt: skip

    def test_render_quotes_for_display(self) -> None:
        """The plan shows a copy-pasteable command line."""
        assert render(["nr", "switch", "--option", "a b"]) == "nr switch --option 'a b'"


KNOWN = Path("/home/op/my infra/known_hosts")


def config(**overrides: Any) -> str:
    hosts = overrides.pop("hosts", [SshHost(T, "203.0.113.10", 2200, "root", None)])
    values: dict[str, Any] = {"known_hosts": KNOWN, "connect_timeout": 10, "control_dir": None,
                              "agent": None}  # fmt: skip
    values.update(overrides)
    return ssh_config_text(hosts, **values)


def blocks(text: str) -> dict[str, dict[str, str]]:
    """Host pattern -> {option: value} (first value wins, as in ssh)."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        if key == "Host":
            current = out.setdefault(value, {})
        else:
            current.setdefault(key, value)
    return out


class TestSshConfig:
    def test_each_host_its_own_port_and_key(self) -> None:
        """A target on 2200 and a builder on 22, each with its address, user and key: both
        work in one run (one NIX_SSHOPTS could not carry two ports)."""
        text = config(hosts=[
            SshHost(T, "2001:db8::10", 2200, "deploy", Path("/k/id")),
            SshHost("rebuild-vps-builder", "builder.example.org", 22, "nix", Path("/k/id")),
        ])  # fmt: skip
        b = blocks(text)
        assert b[T] == {"HostName": "2001:db8::10", "Port": "2200", "User": "deploy",
                        "IdentityFile": '"/k/id"', "IdentitiesOnly": "yes"}  # fmt: skip
        assert b["rebuild-vps-builder"]["Port"] == "22"

    def test_strict_for_every_host(self) -> None:
        """Every host: strict keys from the inventory's known_hosts (quoted: a folder with
        spaces works), no global file, no key from DNS or a command, no proxy, batch mode."""
        star = blocks(config())["*"]
        assert star["StrictHostKeyChecking"] == "yes"
        assert star["UserKnownHostsFile"] == f'"{KNOWN}"'
        assert star["GlobalKnownHostsFile"] == "/dev/null"
        assert (star["KnownHostsCommand"], star["VerifyHostKeyDNS"]) == ("none", "no")
        assert (star["ProxyCommand"], star["ProxyJump"], star["BatchMode"]) == (
            "none",
            "none",
            "yes",
        )

    def test_bounded_but_patient(self) -> None:
        """ConnectTimeout bounds a connection; ServerAlive lets a long activation's network
        stall pass (2 minutes), the dead-man timer being the safety net."""
        star = blocks(config(connect_timeout=7))["*"]
        assert star["ConnectTimeout"] == "7"
        assert int(star["ServerAliveInterval"]) * int(star["ServerAliveCountMax"]) >= 120
        long = blocks(config(rollback_timeout=600))["*"]
        assert int(long["ServerAliveInterval"]) * int(long["ServerAliveCountMax"]) >= 600

    def test_agent_kept(self) -> None:
        """The operator's agent is named in the config, so a nix-copy-closure that drops
        SSH_AUTH_SOCK from its environment still finds agent-only keys."""
        assert blocks(config(agent="/run/user/1000/agent.sock"))["*"]["IdentityAgent"] == (
            '"/run/user/1000/agent.sock"'
        )
        assert blocks(config())["*"]["IdentityAgent"] == "none"

    def test_connection_sharing(self, tmp_path: Path) -> None:
        """With a control folder, one connection per host is shared under it."""
        star = blocks(config(control_dir=tmp_path))["*"]
        assert star["ControlMaster"] == "auto" and star["ControlPath"] == f'"{tmp_path}/%C"'
        assert "ControlMaster" not in blocks(config())["*"]

    def test_a_quote_in_a_path_is_refused(self) -> None:
        """A path ssh_config cannot quote is an error, not a broken config."""
        with pytest.raises(ValueError, match="double quote"):
            config(known_hosts=Path('/x/"y'))

    def test_nix_sshopts_is_the_config_alone(self) -> None:
        """NIX_SSHOPTS is `-F <config>`: no ssh_config of the user or the system is read."""
        assert nix_sshopts(Path("/run/rb-run-x/ssh_config.vps")) == (
            "-F /run/rb-run-x/ssh_config.vps"
        )


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
