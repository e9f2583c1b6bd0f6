"""The console is the one output path: its methods, and no module of rebuild/ prints around it."""

from __future__ import annotations

import ast
import io
import json
import os
from pathlib import Path

import pytest

from rebuild.console import Console
from rebuild.verify import Check, Report

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rebuild"
STREAMS = frozenset({"stdout", "stderr", "__stdout__", "__stderr__"})


def _is_std_stream(node: ast.expr) -> bool:
    """`sys.stdout`, `sys.stderr` (and their `__std*__` originals), or their `.buffer`."""
    if isinstance(node, ast.Attribute) and node.attr == "buffer":
        node = node.value
    return (
        isinstance(node, ast.Attribute)
        and node.attr in STREAMS
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def direct_output(source: str) -> list[str]:
    """Where `source` reaches the terminal around the console: `print` (called or passed on),
    a write to sys.stdout/sys.stderr, `from sys import stdout`, `os.write(1|2, ...)`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name) and node.id == "print":
            found.append((line, "print"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if func.attr in ("write", "writelines") and _is_std_stream(func.value):
                found.append((line, ast.unparse(func)))
            elif (
                func.attr == "write"
                and isinstance(func.value, ast.Name)
                and func.value.id == "os"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in (1, 2)
            ):
                found.append((line, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and node.module == "sys":
            found += [(line, f"from sys import {a.name}") for a in node.names if a.name in STREAMS]
    return [f"{line}: {what}" for line, what in sorted(found)]


def modules() -> list[str]:
    """Every module of the package but console.py, relative to rebuild/."""
    return sorted(
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "console.py"
    )


class TestOnePlaceThatPrints:
    @pytest.mark.parametrize("module", modules())
    def test_module_writes_only_through_the_console(self, module: str) -> None:
        """No module of rebuild/ but console.py prints or writes to sys.stdout/sys.stderr."""
        found = direct_output((PACKAGE / module).read_text(encoding="utf-8"))
        assert not found, f"rebuild/{module} writes around rebuild.console.Console: {found}"

    def test_scan_covers_the_package(self) -> None:
        """The scan reads the real package (an empty list would pass vacuously)."""
        assert {"cli.py", "deploy.py", "enroll.py", "wrapper.py"} <= set(modules())

    def test_scan_finds_every_kind_of_direct_write(self) -> None:
        """The scan itself sees each way around the console, and not look-alikes."""
        source = (
            "import os, sys\n"
            "from sys import stderr\n"
            "print('a')\n"
            "run(on_line=print)\n"
            "sys.stdout.write('b')\n"
            "sys.stderr.writelines(['c'])\n"
            "sys.stdout.buffer.write(b'd')\n"
            "os.write(2, b'e')\n"
            "result.stdout.strip()\n"
            "handle.write('f')\n"
            "sys.stderr.isatty()\n"
            "text = \"sys.stderr.write('g')\"\n"
        )
        assert [f.split(":")[0] for f in direct_output(source)] == [
            "2", "3", "4", "5", "6", "7", "8",
        ]  # fmt: skip


class TestConsole:
    def test_say_goes_to_out(self) -> None:
        """Human lines go to the console's output stream, one whole line each."""
        out = io.StringIO()
        Console(out=out).say("hello")
        assert out.getvalue() == "hello\n"

    def test_json_mode_sends_human_lines_to_stderr(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With --json, stdout carries only JSON: human lines go to stderr."""
        console = Console(json_mode=True)
        console.say("a human line")
        console.json({"b": 1, "a": [True, None]})
        captured = capsys.readouterr()
        assert captured.out == '{"a": [true, null], "b": 1}\n'
        assert captured.err == "a human line\n"

    def test_json_is_one_sorted_line(self) -> None:
        """Console.json writes one JSON document per line, keys sorted, to the data stream."""
        data, out = io.StringIO(), io.StringIO()
        console = Console(out=out, data=data)
        console.json({"z": "multi\nline", "a": 1})
        console.json([1, 2])
        lines = data.getvalue().splitlines()
        assert lines == ['{"a": 1, "z": "multi\\nline"}', "[1, 2]"]
        assert [json.loads(line) for line in lines] == [{"a": 1, "z": "multi\nline"}, [1, 2]]
        assert out.getvalue() == ""

    def test_table_aligns_columns(self) -> None:
        """Rows become left-aligned columns two spaces apart, without trailing spaces."""
        out = io.StringIO()
        Console(out=out).table([("host", "address", "tags"), ("vps", "203.0.113.10:22", "-")])
        assert out.getvalue() == (
            "host  address          tags\n"
            "vps   203.0.113.10:22  -\n"
        )  # fmt: skip

    def test_table_of_nothing_prints_nothing(self) -> None:
        """No rows, no output."""
        out = io.StringIO()
        Console(out=out).table([])
        assert out.getvalue() == ""

    def test_notice_and_error_go_to_stderr(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Problems go to stderr in both modes; error() prefixes `error: `, notice() does not."""
        console = Console()
        console.notice("note: something")
        console.error("broken")
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == "note: something\nerror: broken\n"

    def test_report_lines(self) -> None:
        """A verification report is a PASS/FAIL line and one line per check, per host."""
        out = io.StringIO()
        report = Report("vps", None, None, (Check("sshd.service", False, "inactive"),))
        Console(out=out).report(report)
        assert out.getvalue() == "[vps] verification: FAIL\n[vps]   FAIL sshd.service: inactive\n"


@pytest.fixture
def inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-host inventory with its audit log in tmp_path; no REBUILD_* from the caller."""
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)
    path = tmp_path / "inventory.toml"
    path.write_text(
        f'audit_log = "{tmp_path / "audit.jsonl"}"\n'
        '[hosts.vps]\naddress = "203.0.113.10"\ntags = ["prod"]\n',
        encoding="utf-8",
    )
    return path


class TestTasksOutput:
    """cli imports deploy, hence imported inside the tests: the scan above never depends on it."""

    def test_hosts_is_a_table_on_stdout(
        self, inventory: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`invoke hosts`: a header and one aligned line per host, on stdout."""
        from rebuild import cli

        assert cli.hosts(str(inventory)) == 0
        captured = capsys.readouterr()
        assert captured.out.splitlines() == [
            "host  address          user  action  attr  tags",
            "vps   203.0.113.10:22  root  switch  vps   prod",
        ]
        assert captured.err == ""

    def test_history_json_is_only_json_lines(
        self, inventory: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`invoke history --json`: one JSON object per record on stdout, nothing else."""
        from rebuild import cli

        records = [{"host": "vps", "run_id": "r1", "result": "ok"},
                   {"host": "vps", "run_id": "r2", "result": "refused"}]  # fmt: skip
        (inventory.parent / "audit.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
        )
        assert cli.history(str(inventory), None, True, 0) == 0
        captured = capsys.readouterr()
        assert [json.loads(line) for line in captured.out.splitlines()] == records
        assert captured.err == ""

    def test_history_without_records_says_so(
        self, inventory: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An empty audit log is one human line naming the log."""
        from rebuild import cli

        assert cli.history(str(inventory), "vps", False, 0) == 0
        log = inventory.parent / "audit.jsonl"
        assert capsys.readouterr().out == f"no audit records in {log}\n"
