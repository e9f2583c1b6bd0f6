"""The wrapper generator: the pure `render`, the stale check and the writer."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from rebuild import errors
from rebuild.errors import ConfigError
from rebuild.inventory import ACTIONS, HostSettings, Target, load
from rebuild.results import MEANINGS
from rebuild.wrapper import (
    FLEET_FLAGS,
    MARKER,
    PASSTHROUGH,
    command,
    orphans,
    problem,
    relative_inventory,
    render,
    run,
    script_path,
)

REPO = Path(__file__).resolve().parents[2]
VPS = Target("vps", HostSettings(address="203.0.113.10"))
INVENTORY = '[hosts.vps]\naddress = "203.0.113.10"\n'


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's own REBUILD_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def tasks_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rebuild_tasks_under_test", REPO / "tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shellcheck(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    program = shutil.which("shellcheck")
    assert program is not None, (
        "shellcheck is not installed: apt-get install shellcheck (scripts/setup.sh test does)"
    )
    path = tmp_path / "wrapper.sh"
    path.write_text(text, encoding="utf-8")
    return subprocess.run(
        [program, "--shell=bash", "--severity=style", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


class TestRender:
    def test_is_deterministic(self) -> None:
        """Two renders of the same input are byte for byte the same (no timestamp)."""
        assert render("inventory.toml", VPS) == render("inventory.toml", VPS)

    def test_is_a_strict_bash_script(self) -> None:
        """A bash shebang, then the generated-file marker, then `set -euo pipefail`."""
        lines = render("inventory.toml", VPS).splitlines()
        assert lines[0] == "#!/usr/bin/env bash"
        assert lines[1] == MARKER
        assert "set -euo pipefail" in lines[:10]

    def test_header_names_inventory_command_and_says_do_not_edit(self) -> None:
        """The header says it is generated, from which inventory, by which command."""
        head = "\n".join(render("inventory.toml", VPS).splitlines()[:8])
        assert "GENERATED FILE: DO NOT EDIT." in head
        assert "from the inventory inventory.toml (host vps)" in head
        assert "`invoke wrapper --host vps`" in head
        assert "Do not edit it" in head

    def test_non_default_inventory_is_in_the_command(self) -> None:
        """A wrapper made from another inventory regenerates with `--inventory` that path."""
        assert command("inventory.toml", "vps") == "invoke wrapper --host vps"
        assert command("envs/prod.toml", "vps") == (
            "invoke wrapper --host vps --inventory envs/prod.toml"
        )
        text = render("envs/prod.toml", VPS)
        assert "readonly inventory='envs/prod.toml'" in text
        assert "`invoke wrapper --host vps --inventory envs/prod.toml`" in text

    def test_inventory_values_are_single_quoted_literals(self) -> None:
        """The host name and the inventory path reach bash only as single-quoted literals."""
        text = render("inventory.toml", Target("web-1_a", HostSettings(address="192.0.2.1")))
        assert "readonly host='web-1_a'\n" in text
        assert "readonly inventory='inventory.toml'" in text
        assert 'exec "$invoke" --search-root "$root" rebuild --host "$host" "$@"' in text

    def test_address_and_other_facts_are_not_embedded(self) -> None:
        """Only the name is embedded: a new address does not make the wrapper stale."""
        moved = Target("vps", HostSettings(address="198.51.100.7", port=2222, user="deploy"))
        assert render("inventory.toml", moved) == render("inventory.toml", VPS)

    def test_actions_come_from_the_inventory_module(self) -> None:
        """The case pattern lists exactly rebuild.inventory.ACTIONS."""
        text = render("inventory.toml", VPS)
        assert "    " + "|".join(f"'{a}'" for a in ACTIONS) + ") action=$1 ;;" in text

    def test_help_lists_inputs_and_exit_codes(self) -> None:
        """The help text names the action, every passed-through flag and every exit code."""
        text = render("inventory.toml", VPS)
        usage = text.split("<<'__REBUILD_WRAPPER_HELP__'\n", 1)[1].split(
            "\n__REBUILD_WRAPPER_HELP__\n", 1
        )[0]
        assert "ACTION, --action ACTION" in usage and "|".join(ACTIONS) in usage
        for flag in PASSTHROUGH:
            assert f"  {flag.name} " in usage
        assert "--inventory PATH" in usage and "-h, --help" in usage
        for code, meaning in MEANINGS.items():
            assert f"\n  {code:<5}{meaning.split()[0]}" in usage

    def test_help_exit_codes_are_the_results_table(self) -> None:
        """The help's exit codes and their meanings are rebuild.results.MEANINGS, word for word
        (one table, no copy in the wrapper)."""
        text = render("inventory.toml", VPS)
        block = text.split("Exit codes (those of `invoke rebuild`):\n", 1)[1].split(
            "\nThis script exits 2 itself", 1
        )[0]
        shown: dict[int, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith("       "):
                assert last is not None, line
                shown[last] += " " + line.strip()
            else:
                code_, meaning = line.split(maxsplit=1)
                last = int(code_)
                shown[last] = meaning
        assert shown == MEANINGS

    @pytest.mark.parametrize("name", ["a;b", "$(reboot)", "a b", "-rf", "x'y", "a\nb"], ids=repr)
    def test_refuses_a_name_with_shell_syntax(self, name: str) -> None:
        """A name that validation would refuse never reaches the script."""
        with pytest.raises(ConfigError):
            render("inventory.toml", Target(name, HostSettings(address="192.0.2.1")))

    @pytest.mark.parametrize(
        "rel", ["/etc/inventory.toml", "../inventory.toml", "a b.toml", "x\n.toml", "a/./b", ""]
    )
    def test_refuses_an_inventory_path_that_is_not_plain(self, rel: str) -> None:
        """The inventory path must be a plain relative path (it appears in comments too)."""
        with pytest.raises(ConfigError):
            render(rel, VPS)

    def test_is_shellcheck_clean(self, tmp_path: Path) -> None:
        """shellcheck (all severities) finds nothing in a generated wrapper."""
        for rel, target in [
            ("inventory.toml", VPS),
            ("deploy/fleet-inventory.toml", Target("db_2-b", HostSettings(address="db.example"))),
        ]:
            done = shellcheck(render(rel, target), tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr

    def test_committed_wrapper_is_shellcheck_clean(self, tmp_path: Path) -> None:
        """The committed scripts/rebuild-vps.sh passes shellcheck too."""
        done = shellcheck((REPO / "scripts" / "rebuild-vps.sh").read_text(), tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr


class TestContractTables:
    def test_exit_codes_cover_every_error_class(self) -> None:
        """The help's exit codes are 0 and every RebuildError subclass's code, nothing else."""
        codes = {0} | {
            cls.exit_code
            for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.RebuildError)
        }
        assert sorted(MEANINGS) == sorted(codes)

    def test_passed_flags_are_flags_of_invoke_rebuild(self) -> None:
        """Every flag a wrapper passes or refuses is a real flag of the `rebuild` task."""
        rebuild_task = tasks_module().rebuild
        flags = {f"--{name}" for arg in rebuild_task.get_arguments() for name in arg.names}
        ours = {f.name for f in PASSTHROUGH} | set(FLEET_FLAGS) | {"--action", "--inventory"}
        assert ours <= flags
        assert flags - ours == set(), "a new rebuild flag: pass it through or refuse it"

    def test_wrapper_task_exists_with_its_flags(self) -> None:
        """`invoke wrapper` has --host, --all, --check and --inventory, each with help."""
        task = tasks_module().wrapper
        args = task.get_arguments()
        assert {name for arg in args for name in arg.names} == {"host", "all", "check", "inventory"}
        assert all(arg.help for arg in args)
        assert "Example: invoke wrapper --host vps" in (task.__doc__ or "")


class TestRelativeInventory:
    def test_inside_the_repository(self, tmp_path: Path) -> None:
        """The path is relative to the root, with forward slashes."""
        (tmp_path / "envs").mkdir()
        inv = tmp_path / "envs" / "prod.toml"
        inv.write_text(INVENTORY)
        assert relative_inventory(tmp_path, inv) == "envs/prod.toml"

    def test_outside_the_repository_is_refused(self, tmp_path: Path) -> None:
        """A wrapper could not find an inventory outside its repository."""
        (tmp_path / "repo").mkdir()
        inv = tmp_path / "inventory.toml"
        inv.write_text(INVENTORY)
        with pytest.raises(ConfigError, match="outside the repository"):
            relative_inventory(tmp_path / "repo", inv)


def repo(tmp_path: Path, text: str = INVENTORY) -> Path:
    (tmp_path / "inventory.toml").write_text(text, encoding="utf-8")
    return tmp_path


class TestRun:
    def test_writes_an_executable_wrapper(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--host vps writes scripts/rebuild-vps.sh, mode 0755, with the rendered text."""
        root = repo(tmp_path)
        assert run(str(root / "inventory.toml"), ["vps"], every=False, check=False, root=root) == 0
        path = root / "scripts" / "rebuild-vps.sh"
        loaded = load(str(root / "inventory.toml"))
        assert path.read_text() == render("inventory.toml", loaded.target("vps"))
        assert path.stat().st_mode & 0o777 == 0o755
        assert "wrote scripts/rebuild-vps.sh" in capsys.readouterr().out

    def test_all_writes_one_per_host(self, tmp_path: Path) -> None:
        """--all writes a wrapper for every host."""
        root = repo(tmp_path, INVENTORY + '[hosts.web]\naddress = "192.0.2.2"\n')
        run(str(root / "inventory.toml"), [], every=True, check=False, root=root)
        assert sorted(p.name for p in (root / "scripts").iterdir()) == [
            "rebuild-vps.sh", "rebuild-web.sh",
        ]  # fmt: skip

    def test_no_selection_is_bad_usage(self, tmp_path: Path) -> None:
        """Writing needs --host or --all."""
        root = repo(tmp_path)
        with pytest.raises(ConfigError, match="--host NAME or --all"):
            run(str(root / "inventory.toml"), [], every=False, check=False, root=root)

    def test_unknown_host_is_bad_usage(self, tmp_path: Path) -> None:
        """An unknown host is a ConfigError (exit 2), nothing written."""
        root = repo(tmp_path)
        with pytest.raises(ConfigError, match="unknown host"):
            run(str(root / "inventory.toml"), ["web"], every=False, check=False, root=root)
        assert not (root / "scripts").exists()

    def test_check_passes_on_current_wrappers(self, tmp_path: Path) -> None:
        """--check after a write exits 0."""
        root = repo(tmp_path)
        inv = str(root / "inventory.toml")
        run(inv, ["vps"], every=False, check=False, root=root)
        assert run(inv, [], every=False, check=True, root=root) == 0

    def test_check_names_missing_edited_and_orphaned_wrappers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--check exits 1 naming every missing, edited or orphaned wrapper and writes nothing."""
        root = repo(tmp_path, INVENTORY + '[hosts.old]\naddress = "192.0.2.9"\n')
        inv = str(root / "inventory.toml")
        run(inv, [], every=True, check=False, root=root)
        vps = script_path(root, "vps")
        vps.write_text(vps.read_text().replace("set -euo pipefail", "set -eu"))
        (root / "inventory.toml").write_text(INVENTORY + '[hosts.web]\naddress = "192.0.2.2"\n')
        before = sorted(p.name for p in (root / "scripts").iterdir())
        capsys.readouterr()
        assert run(inv, [], every=False, check=True, root=root) == 1
        err = capsys.readouterr().err
        assert "scripts/rebuild-vps.sh: differs" in err
        assert "scripts/rebuild-web.sh: missing; run `invoke wrapper --host web`" in err
        assert "scripts/rebuild-old.sh: generated for a host that is no longer in" in err
        assert "3 wrapper(s) out of date" in err
        assert sorted(p.name for p in (root / "scripts").iterdir()) == before
        assert "set -eu\n" in vps.read_text()

    def test_check_of_one_host_ignores_the_others(self, tmp_path: Path) -> None:
        """--check --host vps looks at that wrapper only."""
        root = repo(tmp_path, INVENTORY + '[hosts.web]\naddress = "192.0.2.2"\n')
        inv = str(root / "inventory.toml")
        run(inv, ["vps"], every=False, check=False, root=root)
        assert run(inv, ["vps"], every=False, check=True, root=root) == 0
        assert run(inv, [], every=False, check=True, root=root) == 1

    def test_not_executable_is_stale(self, tmp_path: Path) -> None:
        """A wrapper that lost its executable bit is reported, and rewriting restores it."""
        root = repo(tmp_path)
        inv = str(root / "inventory.toml")
        run(inv, ["vps"], every=False, check=False, root=root)
        path = script_path(root, "vps")
        path.chmod(0o644)
        assert problem(path, path.read_text()) == "not executable"
        run(inv, ["vps"], every=False, check=False, root=root)
        assert os.access(path, os.X_OK)

    def test_hand_written_scripts_are_not_orphans(self, tmp_path: Path) -> None:
        """Only files carrying the generated marker count as orphaned wrappers."""
        (tmp_path / "scripts").mkdir()
        (tmp_path / "scripts" / "rebuild-custom.sh").write_text("#!/bin/sh\necho mine\n")
        (tmp_path / "scripts" / "rebuild-gone.sh").write_text(render("inventory.toml", VPS))
        assert orphans(tmp_path, ["vps"]) == [tmp_path / "scripts" / "rebuild-gone.sh"]
