"""docs/reference/index.md stays true: keys, defaults, tasks, flags, exit codes, audit, hosts;
the README's exit-code table too."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
from pathlib import Path
from types import ModuleType

import pytest
from invoke.collection import Collection
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rebuild import audit, inventory
from rebuild.inventory import (
    CommandCheck,
    Defaults,
    Hook,
    HostSettings,
    HttpCheck,
    Inventory,
    Operator,
    VerifySpec,
    load,
)
from rebuild.results import MEANINGS

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "reference" / "index.md"
PLAYBOOK = REPO / "docs" / "playbooks" / "vps-rebuild.md"
README = REPO / "README.md"

# Where each model's keys appear in the inventory, as the reference spells the key paths.
TABLES: dict[str, type[BaseModel]] = {
    "": Inventory,
    "operators[].": Operator,
    "defaults.": Defaults,
    "hosts.<name>.": HostSettings,
    "hosts.<name>.verify.": VerifySpec,
    "hosts.<name>.verify.http[].": HttpCheck,
    "hosts.<name>.verify.commands[].": CommandCheck,
    "hooks[].": Hook,
}


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's own REBUILD_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def section(text: str, title: str) -> str:
    """The body of the `## title` section (up to the next `## ` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def exit_code_table(body: str) -> dict[int, str]:
    """The `| code | meaning |` rows of a section, the meaning without Markdown backticks."""
    table: dict[int, str] = {}
    for number, meaning in re.findall(r"^\| (\d+) \| (.*) \|$", body, re.M):
        assert int(number) not in table, f"exit code {number} is documented twice"
        table[int(number)] = meaning.replace("`", "")
    return table


def rows(body: str) -> list[list[str]]:
    """The cells of every table row whose first cell is code (`...`)."""
    out = []
    for line in body.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            out.append([c.strip() for c in cells])
    return out


def code(cell: str) -> str:
    match = re.match(r"`([^`]*)`", cell)
    assert match, cell
    return match.group(1)


def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def key_rows() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for cells in rows(section(reference(), "Inventory keys")):
        key = code(cells[0])
        assert key not in found, f"{key} is documented twice"
        assert len(cells) == 4, f"{key}: want | key | type | default | meaning |"
        found[key] = cells
    return found


def model_keys() -> dict[str, FieldInfo]:
    return {
        prefix + name: info
        for prefix, model in TABLES.items()
        for name, info in model.model_fields.items()
    }


def toml_default(info: FieldInfo) -> str | None:
    """How the reference writes a field's default, or None where it is described in words."""
    if info.default_factory is not None:
        return None
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{value:g}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if value == ():
        return "`[]`"
    return None


def tasks_collection() -> Collection:
    spec = importlib.util.spec_from_file_location("rebuild_tasks_for_docs", REPO / "tasks.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Collection.from_module(module)


def task_sections() -> dict[str, str]:
    body = section(reference(), "Tasks")
    parts = re.split(r"^### `invoke ([a-z][a-z0-9_.-]*)`\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


class TestInventoryKeys:
    def test_every_model_is_mapped(self) -> None:
        """Every pydantic model of rebuild.inventory has its place in TABLES (a new model must
        be documented too)."""
        models = {
            cls
            for _, cls in inspect.getmembers(inventory, inspect.isclass)
            if issubclass(cls, BaseModel) and cls.__module__ == inventory.__name__
            and not cls.__name__.startswith("_")
        }  # fmt: skip
        assert models == set(TABLES.values())

    def test_no_model_key_is_missing(self) -> None:
        """Every field of the models has a row in the reference."""
        missing = sorted(set(model_keys()) - set(key_rows()))
        assert not missing, f"add these keys to {REFERENCE}: {missing}"

    def test_no_documented_key_is_made_up(self) -> None:
        """Every key row of the reference is a field of a model."""
        extra = sorted(set(key_rows()) - set(model_keys()))
        assert not extra, f"{REFERENCE} documents keys the models do not have: {extra}"

    def test_defaults_match_the_models(self) -> None:
        """The default column says what the model's default is."""
        documented = key_rows()
        wrong = []
        for key, info in model_keys().items():
            want = toml_default(info)
            if want is not None and want not in documented[key][2]:
                wrong.append(f"{key}: the model's default is {want}, the reference says "
                             f"{documented[key][2]!r}")  # fmt: skip
        assert not wrong, "\n".join(wrong)

    def test_every_row_has_a_type_and_a_meaning(self) -> None:
        """No empty cells."""
        for key, cells in key_rows().items():
            assert cells[1] and cells[3], key


class TestTasks:
    def test_every_task_is_documented(self) -> None:
        """Every task of tasks.py has its `### invoke NAME` section."""
        missing = sorted(set(tasks_collection().task_names) - set(task_sections()))
        assert not missing, f"document these tasks in {REFERENCE}: {missing}"

    def test_every_flag_is_documented(self) -> None:
        """Every flag of every task appears in the first column of its section's table."""
        collection = tasks_collection()
        sections = task_sections()
        missing = []
        for name in collection.task_names:
            documented = {
                flag
                for cells in rows(sections.get(name, ""))
                for flag in re.findall(r"`(--[a-z][a-z0-9-]*)", cells[0])
            }
            for arg in collection[name].get_arguments():
                flags = {f"--{n}" for n in arg.names}
                if not flags & documented:
                    missing.append(f"invoke {name} {sorted(flags)[0]}")
        assert not missing, f"document these flags in {REFERENCE}: {missing}"

    def test_documented_flags_exist(self) -> None:
        """A flag documented for a task that exists is a flag of that task."""
        collection = tasks_collection()
        made_up = []
        for name, body in task_sections().items():
            if name not in collection.task_names:
                continue  # documented ahead of its implementation (the contract's tasks)
            real = {f"--{n}" for arg in collection[name].get_arguments() for n in arg.names}
            for cells in rows(body):
                made_up += [
                    f"invoke {name} {flag}"
                    for flag in re.findall(r"`(--[a-z][a-z0-9-]*)", cells[0])
                    if flag not in real
                ]
        assert not made_up, f"{REFERENCE} documents flags that do not exist: {made_up}"


class TestExitCodesAndAudit:
    def test_exit_codes(self) -> None:
        """The exit code table lists exactly the contract's codes, in order."""
        body = section(reference(), "Exit codes")
        documented = [int(m) for m in re.findall(r"^\| (\d+) \|", body, re.M)]
        assert documented == sorted(MEANINGS)

    @pytest.mark.parametrize(
        ("doc", "title"),
        [(REFERENCE, "Exit codes"), (README, "Exit codes (every task)")],
        ids=["reference", "readme"],
    )
    def test_exit_code_meanings_are_the_results_table(self, doc: Path, title: str) -> None:
        """Each documented code says what rebuild.results.MEANINGS says, word for word (Markdown
        backticks aside), and no code is missing or made up."""
        documented = exit_code_table(section(doc.read_text(encoding="utf-8"), title))
        assert documented == MEANINGS

    def test_audit_fields_both_ways(self) -> None:
        """The audit table lists exactly the fields of audit.Record (extra keys aside)."""
        fields = {f.name for f in dataclasses.fields(audit.Record)} - {"extra"}
        documented = {code(cells[0]) for cells in rows(section(reference(), "Audit record"))}
        assert documented == fields

    def test_audit_results(self) -> None:
        """Every result value the audit can hold is explained."""
        body = section(reference(), "Audit record")
        for result in audit.RESULTS:
            assert f"`{result}`" in body, result


class TestHosts:
    def test_hosts_table_matches_the_inventory(self) -> None:
        """The hosts table lists exactly the repo's hosts, with their address, attr and action."""
        loaded = load(str(REPO / "inventory.toml"))
        documented = {code(cells[0]): cells for cells in rows(section(reference(), "Hosts"))}
        assert set(documented) == {t.name for t in loaded.targets()}
        assert "vps" in documented
        for target in loaded.targets():
            cells = documented[target.name]
            spec = target.settings
            assert f"`{spec.address}:{spec.port}`" in cells[1]
            assert f"`{spec.user}`" in cells[2]
            assert f"`nixosConfigurations.{target.attr}`" in cells[3]
            assert f"`{spec.action}`" in cells[4]
            assert f"--image-variant {spec.image_variant}" in cells[7]


class TestLinks:
    @pytest.mark.parametrize("doc", [REFERENCE, PLAYBOOK], ids=lambda p: p.name)
    def test_relative_links_resolve(self, doc: Path) -> None:
        """Every relative link of the documents points at an existing file."""
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"

    def test_playbook_covers_every_exit_code(self) -> None:
        """The playbook says what to do for each exit code."""
        body = section(PLAYBOOK.read_text(encoding="utf-8"), "Exit codes: what to do")
        for code_ in MEANINGS:
            assert re.search(rf"^### {code_}\b", body, re.M), f"no '### {code_}' in the playbook"
