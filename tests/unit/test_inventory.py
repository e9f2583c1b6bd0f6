"""The inventory: strict validation with file and key path, defaults, env overrides, selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from rebuild.errors import ConfigError
from rebuild.inventory import Loaded, inventory_path, is_flake_url, load

REPO_INVENTORY = Path(__file__).resolve().parents[2] / "inventory.toml"

HOST = '[hosts.vps]\naddress = "203.0.113.10"\n'
MACHINE_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's own REBUILD_* variables must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "inventory.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, name: str = "inventory.toml") -> Loaded:
    return load(str(write(tmp_path, text, name)))


# Each case: an id, the inventory text, the key path the message must name.
BAD_INVENTORIES = [
    ("unknown-top-level-key", 'colour = "red"\n' + HOST, "colour"),
    ("unknown-host-key", HOST + 'adress = "203.0.113.11"\n', "hosts.vps.adress"),
    (
        "unknown-verify-key",
        HOST + '[hosts.vps.verify]\nunit = ["sshd.service"]\n',
        "hosts.vps.verify.unit",
    ),
    ("unknown-defaults-key", '[defaults]\nusr = "root"\n' + HOST, "defaults.usr"),
    ("port-wrong-type", HOST + 'port = "ssh"\n', "hosts.vps.port"),
    ("port-zero", HOST + "port = 0\n", "hosts.vps.port"),
    ("port-too-high", HOST + "port = 70000\n", "hosts.vps.port"),
    ("address-semicolon", '[hosts.vps]\naddress = "1.2.3.4; rm -rf /"\n', "hosts.vps.address"),
    ("address-substitution", '[hosts.vps]\naddress = "$(reboot)"\n', "hosts.vps.address"),
    (
        "address-ssh-option",
        '[hosts.vps]\naddress = "-oProxyCommand=touch /tmp/pwned"\n',
        "hosts.vps.address",
    ),
    ("user-shell", HOST + 'user = "root;reboot"\n', "hosts.vps.user"),
    ("user-option", HOST + 'user = "-oProxyCommand=x"\n', "hosts.vps.user"),
    (
        "unit-no-suffix",
        HOST + '[hosts.vps.verify]\nunits = ["sshd"]\n',
        "hosts.vps.verify.units[0]",
    ),
    (
        "unit-shell",
        HOST + '[hosts.vps.verify]\nunits = ["sshd.service", "$(reboot).service"]\n',
        "hosts.vps.verify.units[1]",
    ),
    (
        "url-scheme",
        HOST + '[[hosts.vps.verify.http]]\nurl = "file:///etc/shadow"\n',
        "hosts.vps.verify.http[0].url",
    ),
    (
        "url-quote",
        HOST + '[[hosts.vps.verify.http]]\nurl = "http://127.0.0.1/\'x"\n',
        "hosts.vps.verify.http[0].url",
    ),
    (
        "http-status-range",
        HOST + '[[hosts.vps.verify.http]]\nurl = "http://127.0.0.1/"\nstatus = 999\n',
        "hosts.vps.verify.http[0].status",
    ),
    (
        "command-without-run",
        HOST + '[[hosts.vps.verify.commands]]\nname = "secrets"\n',
        "hosts.vps.verify.commands[0].run",
    ),
    ("bad-action", HOST + 'action = "deploy"\n', "hosts.vps.action"),
    ("tag-with-space", HOST + 'tags = ["prod eu"]\n', "hosts.vps.tags[0]"),
    ("identity-with-space", HOST + 'identity_file = "~/.ssh/my key"\n', "hosts.vps.identity_file"),
    (
        "machine-id-short",
        f'[[operators]]\nname = "laptop"\nmachine_id = "0123"\n{HOST}',
        "operators[0].machine_id",
    ),
    (
        "machine-id-uppercase",
        f'[[operators]]\nname = "laptop"\nmachine_id = "{MACHINE_ID.upper()}"\n{HOST}',
        "operators[0].machine_id",
    ),
    (
        "operator-hostname",
        f'[[operators]]\nname = "laptop"\nmachine_id = "{MACHINE_ID}"\nhostname = "a b"\n',
        "operators[0].hostname",
    ),
    ("missing-address", "[hosts.vps]\nport = 22\n", "hosts.vps.address"),
    (
        "rollback-within-settle",
        HOST + "rollback_timeout = 30\n[hosts.vps.verify]\nsettle_timeout = 60\n",
        "hosts.vps: rollback_timeout (30)",
    ),
    (
        "rollback-equals-settle",
        HOST + "rollback_timeout = 60\n[hosts.vps.verify]\nsettle_timeout = 60\n",
        "hosts.vps: rollback_timeout (60)",
    ),
    ("build-host-option", HOST + 'build_host = "-oProxyCommand=x"\n', "hosts.vps.build_host"),
    ("build-host-no-host", HOST + 'build_host = "root@"\n', "hosts.vps.build_host"),
    ("build-host-shell", HOST + 'build_host = "root@b;reboot"\n', "hosts.vps.build_host"),
    ("host-name-shell", '[hosts."vps;reboot"]\naddress = "203.0.113.10"\n', "hosts.vps;reboot"),
    ("flavour", 'nixos_rebuild_flavour = "nixos"\n' + HOST, "nixos_rebuild_flavour"),
    (
        "classic-with-a-build-host",
        'nixos_rebuild_flavour = "classic"\n' + HOST + 'build_host = "nix@203.0.113.20:2222"\n',
        "hosts.vps.build_host: 'nix@203.0.113.20:2222' needs nixos_rebuild_flavour = \"ng\"",
    ),
    (
        "classic-with-a-default-build-host",
        'nixos_rebuild_flavour = "classic"\n[defaults]\nbuild_host = "nix@b"\n' + HOST,
        "hosts.vps.build_host: 'nix@b' needs",
    ),
    ("extra-arg-newline", HOST + 'extra_args = ["--option\\nx"]\n', "hosts.vps.extra_args[0]"),
    ("known-hosts-space", 'known_hosts = "~/my hosts"\n' + HOST, "known_hosts"),
    ("flake-shell", 'flake = "./x;reboot"\n' + HOST, "flake"),
    ("defaults-port-type", '[defaults]\nport = "x"\n' + HOST, "defaults.port"),
]


class TestBadInventory:
    @pytest.mark.parametrize(
        ("text", "key_path"),
        [pytest.param(text, key, id=case) for case, text, key in BAD_INVENTORIES],
    )
    def test_names_file_and_key_path_and_exits_2(
        self, tmp_path: Path, text: str, key_path: str
    ) -> None:
        """An invalid inventory is refused with the file, the exact key path, and exit 2."""
        path = write(tmp_path, text, "fleet.toml")
        with pytest.raises(ConfigError) as caught:
            load(str(path))
        message = str(caught.value)
        assert f"{path}: {key_path}" in message
        assert "fleet.toml" in message
        assert caught.value.exit_code == 2

    def test_unknown_key_says_it_is_unknown(self, tmp_path: Path) -> None:
        """A misspelt key is reported as unknown, not silently dropped."""
        with pytest.raises(ConfigError, match=r"hosts\.vps\.verify\.unit: unknown key"):
            load_text(tmp_path, HOST + '[hosts.vps.verify]\nunit = ["sshd.service"]\n')

    def test_bad_value_is_quoted_in_the_message(self, tmp_path: Path) -> None:
        """The offending value is shown so the operator can find it."""
        with pytest.raises(ConfigError, match=r"'1\.2\.3\.4; rm -rf /'"):
            load_text(tmp_path, '[hosts.vps]\naddress = "1.2.3.4; rm -rf /"\n')

    def test_every_problem_is_reported(self, tmp_path: Path) -> None:
        """Two mistakes give two lines, one per key path."""
        with pytest.raises(ConfigError) as caught:
            load_text(tmp_path, '[hosts.vps]\naddress = "$(x)"\nport = 0\n')
        lines = str(caught.value).splitlines()
        assert len(lines) == 2
        assert any("hosts.vps.address" in line for line in lines)
        assert any("hosts.vps.port" in line for line in lines)

    def test_toml_syntax_error_names_the_file(self, tmp_path: Path) -> None:
        """A file that is not TOML is refused with its name and exit 2."""
        path = write(tmp_path, HOST + "port = \n", "broken.toml")
        with pytest.raises(ConfigError) as caught:
            load(str(path))
        assert str(path) in str(caught.value)
        assert "invalid TOML" in str(caught.value)
        assert caught.value.exit_code == 2

    def test_missing_file_names_the_file(self, tmp_path: Path) -> None:
        """A missing inventory is exit 2 with the path that was looked for."""
        path = tmp_path / "nowhere" / "inventory.toml"
        with pytest.raises(ConfigError) as caught:
            load(str(path))
        assert str(path) in str(caught.value)
        assert caught.value.exit_code == 2

    def test_boolean_port_is_a_wrong_type(self, tmp_path: Path) -> None:
        """`port = true` is refused as a wrong type instead of deploying to port 1."""
        with pytest.raises(ConfigError, match=r"hosts\.vps\.port"):
            load_text(tmp_path, HOST + "port = true\n")


class TestDefaults:
    TEXT = (
        '[defaults]\nuser = "deploy"\nport = 2222\ntags = ["linode"]\nsudo = true\n'
        '[hosts.vps]\naddress = "203.0.113.10"\n'
        '[hosts.web]\naddress = "web.example.org"\nport = 22\nuser = "admin"\n'
    )

    def test_defaults_apply_to_hosts_that_do_not_set_the_key(self, tmp_path: Path) -> None:
        """A host without `user`/`port` takes them from [defaults]."""
        vps = load_text(tmp_path, self.TEXT).target("vps").settings
        assert (vps.user, vps.port, vps.tags, vps.sudo) == ("deploy", 2222, ("linode",), True)

    def test_host_values_win_over_defaults(self, tmp_path: Path) -> None:
        """A host's own value beats the default; untouched keys still inherit."""
        web = load_text(tmp_path, self.TEXT).target("web").settings
        assert (web.user, web.port, web.sudo) == ("admin", 22, True)

    def test_verify_defaults_merge_key_by_key(self, tmp_path: Path) -> None:
        """A host that sets its own `verify.ports` keeps the `[defaults.verify] units`."""
        text = (
            '[defaults.verify]\nunits = ["sshd.service"]\nsettle_timeout = 20\n'
            '[hosts.vps]\naddress = "203.0.113.10"\n[hosts.vps.verify]\nports = [443]\n'
        )
        verify = load_text(tmp_path, text).target("vps").settings.verify
        assert (verify.units, verify.ports) == (("sshd.service",), (443,))
        assert verify.settle_timeout == 20

    def test_built_in_defaults_without_a_defaults_table(self, tmp_path: Path) -> None:
        """A minimal host gets port 22, user root, action switch and a 90 s dead-man timer."""
        vps = load_text(tmp_path, HOST).target("vps")
        assert (vps.settings.port, vps.settings.user, vps.settings.action) == (22, "root", "switch")
        assert vps.settings.rollback_timeout == 90
        assert vps.attr == "vps"
        assert vps.destination == "root@203.0.113.10"

    def test_attr_overrides_the_host_name(self, tmp_path: Path) -> None:
        """`attr` selects nixosConfigurations.<attr> instead of the host's name."""
        loaded = load_text(tmp_path, HOST + 'attr = "linode-vps"\n')
        assert loaded.target("vps").attr == "linode-vps"


class TestEnvironment:
    @pytest.mark.parametrize(
        "name",
        [
            "REBUILD_HOSTS__VPS__PORT",
            "REBUILD_OPERATORS",
            "REBUILD_KNOWN_HOSTS",
            "REBUILD_AUDIT_LOG",
            "REBUILD_FLAKE",
            "REBUILD_CONFIRM_COUNT_ABOVE",
            "REBUILD_HOSTS__VPS__VERIFY__COMMANDS",
            "REBUILD_HOSTS__VPS__EXTRA_ARGS",
            "REBUILD_HOSTS__VPS__ROLLBACK_TIMEOUT",
            "REBUILD_anything",
        ],
    )
    def test_a_setting_from_the_environment_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
    ) -> None:
        """No safety setting can come from the environment: exit 2 naming the variable."""
        monkeypatch.setenv(name, "x")
        with pytest.raises(ConfigError) as caught:
            load_text(tmp_path, HOST)
        assert caught.value.exit_code == 2
        assert name in str(caught.value) and "committed inventory" in str(caught.value)

    def test_nixos_rebuild_program_override(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """REBUILD_NIXOS_REBUILD names the program to run; the default is nixos-rebuild."""
        assert load_text(tmp_path, HOST).nixos_rebuild_program == "nixos-rebuild"
        monkeypatch.setenv("REBUILD_NIXOS_REBUILD", "/opt/bin/nixos-rebuild")
        loaded = load_text(tmp_path, HOST)
        assert loaded.nixos_rebuild_program == "/opt/bin/nixos-rebuild"
        assert loaded.inventory.nixos_rebuild == "nixos-rebuild"  # the file's own value

    def test_nix_program_override(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """REBUILD_NIX names the nix program."""
        monkeypatch.setenv("REBUILD_NIX", "/opt/bin/nix")
        assert load_text(tmp_path, HOST).nix_program == "/opt/bin/nix"

    def test_the_variables_rebuild_sets_for_hooks_are_allowed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A hook that runs rebuild again inherits REBUILD_RUN_ID and friends: not an error."""
        monkeypatch.setenv("REBUILD_RUN_ID", "20261125-193000-a1b2c3")
        monkeypatch.setenv("REBUILD_RESULT", "ok")
        assert load_text(tmp_path, HOST).target("vps").address == "203.0.113.10"

    def test_rebuild_inventory_selects_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """REBUILD_INVENTORY points load() at the file and does not upset validation."""
        path = write(tmp_path, HOST, "elsewhere.toml")
        monkeypatch.setenv("REBUILD_INVENTORY", str(path))
        loaded = load()
        assert loaded.path == path.resolve()
        assert loaded.target("vps").address == "203.0.113.10"


class TestLocalFlakeUrls:
    @pytest.mark.parametrize(
        ("flake", "folder"),
        [
            ("path:/srv/infra", "/srv/infra"),
            ("path:/srv/infra?dir=nixos", "/srv/infra/nixos"),
            ("git+file:///srv/infra?ref=main", "/srv/infra"),
            ("git+file:/srv/infra", "/srv/infra"),
            ("file:///srv/infra", "/srv/infra"),
            ("path:infra", "INV/infra"),
        ],
    )
    def test_a_local_flake_in_any_spelling_gets_the_git_gate(
        self, tmp_path: Path, flake: str, folder: str
    ) -> None:
        """`path:`, `git+file:` and `file:` name this machine's files: the gate checks them."""
        loaded = load_text(tmp_path, f'flake = "{flake}"\n' + HOST)
        assert loaded.flake_dir == Path(folder.replace("INV", str(tmp_path))).resolve()
        assert loaded.flake == flake  # nix still gets the URL as written

    @pytest.mark.parametrize(
        "flake", ["github:o/r", "git+https://example.org/r.git", "file://other-host/srv/x"]
    )
    def test_a_remote_flake_has_no_local_folder(self, tmp_path: Path, flake: str) -> None:
        """A flake on another machine has no folder here (it is pinned to a revision instead)."""
        assert load_text(tmp_path, f'flake = "{flake}"\n' + HOST).flake_dir is None


class TestPaths:
    def test_relative_flake_resolves_against_the_inventory_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`flake = "../nix"` means next to the inventory's folder, wherever rebuild runs."""
        monkeypatch.chdir("/")
        loaded = load_text(tmp_path, 'flake = "../nix"\n' + HOST, "infra/inventory.toml")
        assert loaded.flake == str((tmp_path / "nix").resolve())
        assert loaded.flake_dir == (tmp_path / "nix").resolve()

    def test_dot_flake_is_the_inventory_folder(self, tmp_path: Path) -> None:
        """The default flake "." is the folder holding the inventory."""
        loaded = load_text(tmp_path, HOST, "infra/inventory.toml")
        assert loaded.flake == str((tmp_path / "infra").resolve())

    def test_flake_url_stays_as_is(self, tmp_path: Path) -> None:
        """A flake URL is passed to nix untouched and has no local folder."""
        loaded = load_text(tmp_path, 'flake = "github:o/r"\n' + HOST)
        assert loaded.flake == "github:o/r"
        assert loaded.flake_dir is None

    @pytest.mark.parametrize(
        ("flake", "url"),
        [
            ("github:o/r", True),
            ("git+https://example.org/r.git", True),
            ("path:/srv/flake", True),
            (".", False),
            ("../x", False),
            ("/srv/flake", False),
        ],
    )
    def test_is_flake_url(self, flake: str, url: bool) -> None:
        """Scheme-prefixed references are URLs; plain paths are local."""
        assert is_flake_url(flake) is url

    def test_known_hosts_and_identity_resolve_against_the_inventory(self, tmp_path: Path) -> None:
        """Relative key files are next to the inventory, not the current directory."""
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "id").write_text("key", encoding="utf-8")
        loaded = load_text(
            tmp_path, 'known_hosts = "keys/known_hosts"\n' + HOST + 'identity_file = "keys/id"\n'
        )
        assert loaded.known_hosts == tmp_path / "keys" / "known_hosts"
        assert loaded.identity_file(loaded.target("vps")) == tmp_path / "keys" / "id"

    def test_inventory_path_precedence(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--inventory beats $REBUILD_INVENTORY, which beats ./inventory.toml."""
        assert inventory_path(None) == Path("inventory.toml")
        monkeypatch.setenv("REBUILD_INVENTORY", "/srv/env.toml")
        assert inventory_path(None) == Path("/srv/env.toml")
        assert inventory_path("/srv/flag.toml") == Path("/srv/flag.toml")


class TestSelect:
    TEXT = (
        '[hosts.vps]\naddress = "203.0.113.10"\ntags = ["linode", "prod"]\n'
        '[hosts.web]\naddress = "203.0.113.11"\ntags = ["prod"]\n'
        '[hosts.lab]\naddress = "192.0.2.5"\ntags = ["test"]\n'
    )

    @pytest.fixture
    def loaded(self, tmp_path: Path) -> Loaded:
        return load_text(tmp_path, self.TEXT)

    def test_by_name(self, loaded: Loaded) -> None:
        """--host picks exactly the named hosts, in inventory order."""
        assert [t.name for t in loaded.select(names=["lab", "vps"])] == ["vps", "lab"]

    def test_by_tag(self, loaded: Loaded) -> None:
        """--tag picks every host carrying the tag."""
        assert [t.name for t in loaded.select(tags=["prod"])] == ["vps", "web"]

    def test_names_and_tags_are_a_union(self, loaded: Loaded) -> None:
        """--host and --tag together add up, without duplicates."""
        assert [t.name for t in loaded.select(names=["vps", "lab"], tags=["prod"])] == [
            "vps",
            "web",
            "lab",
        ]

    def test_all(self, loaded: Loaded) -> None:
        """--all picks every host."""
        assert [t.name for t in loaded.select(every=True)] == ["vps", "web", "lab"]

    def test_unknown_host(self, loaded: Loaded) -> None:
        """An unknown host name is exit 2 and the message lists the known hosts."""
        with pytest.raises(ConfigError) as caught:
            loaded.select(names=["vsp"])
        assert "'vsp'" in str(caught.value)
        assert "vps, web, lab" in str(caught.value)
        assert caught.value.exit_code == 2

    def test_unknown_tag(self, loaded: Loaded) -> None:
        """A tag no host has is exit 2 naming the tag."""
        with pytest.raises(ConfigError, match="'staging'"):
            loaded.select(tags=["staging"])

    def test_nothing_selected(self, loaded: Loaded) -> None:
        """No --host, --tag or --all is an error that says what to pass."""
        with pytest.raises(ConfigError, match="--host NAME, --tag TAG or --all"):
            loaded.select()


class TestRepositoryInventory:
    def test_repo_inventory_validates_with_vps(self) -> None:
        """The inventory shipped in the repository is valid and has vps at 203.0.113.10."""
        loaded = load(str(REPO_INVENTORY))
        vps = loaded.target("vps")
        assert vps.address == "203.0.113.10"
        assert vps.attr == "vps"
        assert vps.settings.rollback_timeout > vps.settings.verify.settle_timeout


class TestFlavourAndBuildHost:
    @pytest.mark.parametrize(
        ("flavour", "build_host"),
        [("classic", ""), ("classic", "target"), ("ng", "nix@203.0.113.20:2222")],
    )
    def test_what_each_flavour_can_build_on(
        self, tmp_path: Path, flavour: str, build_host: str
    ) -> None:
        """Classic builds here or on the target; only ng builds on a separate build host (its
        `nix copy --from ssh://BUILD --to ssh://TARGET` runs here, through rebuild's ssh)."""
        text = f'nixos_rebuild_flavour = "{flavour}"\n' + HOST + f'build_host = "{build_host}"\n'
        loaded = load_text(tmp_path, text)
        assert loaded.target("vps").settings.build_host == build_host
