"""Remote facts: the sh that gathers them, run under a real sh, and the parsers of its output."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rebuild.facts import (
    CommandOutcome,
    Facts,
    UnitState,
    parse,
    parse_command,
    parse_failed_units,
    parse_listening,
    parse_show,
    parse_store_path,
    script,
    split_sections,
)
from rebuild.inventory import CommandCheck, HttpCheck, VerifySpec

DATA = Path(__file__).parent / "data"
SYSTEM = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-24.11.20241120.2ac5bf0"
OLD = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-24.11.20241101.1e2f3a4"

SPEC = VerifySpec(
    units=("sshd.service", "nginx.service"),
    ports=(22, 443),
    http=(HttpCheck(url="https://127.0.0.1/", status=200),),
    commands=(CommandCheck(name="secrets decrypted", run="test -s /run/secrets/example"),),
)

# Stand-ins for the host's programs: they answer like systemd/iproute2/curl on NixOS and
# record the arguments they were given, so quoting can be checked end to end.
FAKE_TOOLS = {
    "readlink": r"""#!/bin/sh
case "$2" in
  /run/current-system) echo "$FAKE_CURRENT" ;;
  /nix/var/nix/profiles/system) echo "$FAKE_PROFILE" ;;
  *) exit 1 ;;
esac
""",
    "systemctl": r"""#!/bin/sh
case "$1" in
  is-system-running) echo "$FAKE_STATE"; [ "$FAKE_STATE" = running ] ;;
  list-units) [ -n "$FAKE_FAILED" ] && echo "$FAKE_FAILED loaded failed failed Failed unit"; true ;;
  show)
    seen=; first=1
    for arg in "$@"; do
      if [ -n "$seen" ]; then
        printf '%s\n' "$arg" >> "$FAKE_LOG/units"
        [ -n "$first" ] || echo
        first=
        printf 'Id=%s\nLoadState=loaded\nActiveState=active\nSubState=running\n' "$arg"
      fi
      [ "$arg" = "--" ] && seen=1
    done ;;
esac
""",
    "ss": r"""#!/bin/sh
echo 'LISTEN 0      128          0.0.0.0:22        0.0.0.0:*          '
echo 'LISTEN 0      511             [::]:8080         [::]:*          '
""",
    "curl": r"""#!/bin/sh
for arg in "$@"; do last=$arg; done
printf '%s\n' "$last" >> "$FAKE_LOG/urls"
printf '%s' "$FAKE_HTTP"
""",
}


def run_script(tmp_path: Path, text: str, **env: str) -> str:
    """Run a generated script under the real sh with the fake host programs first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_TOOLS.items():
        tool = bin_dir / name
        tool.write_text(body, encoding="utf-8")
        tool.chmod(0o755)
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    values = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "FAKE_LOG": str(log),
        "FAKE_CURRENT": SYSTEM,
        "FAKE_PROFILE": SYSTEM,
        "FAKE_STATE": "running",
        "FAKE_FAILED": "",
        "FAKE_HTTP": "200",
        "LC_ALL": "C",
    }
    values.update(env)
    done = subprocess.run(
        ["/bin/sh", "-s"], input=text, capture_output=True, text=True, env=values, timeout=30,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


class TestScriptUnderSh:
    def test_healthy_host(self, tmp_path: Path) -> None:
        """On a healthy host the script's output parses into the host's real state."""
        spec = VerifySpec(
            units=("sshd.service",),
            ports=(22, 8080),
            http=(HttpCheck(url="http://127.0.0.1:8080/"),),
            commands=(CommandCheck(name="ok", run="true"),),
        )
        facts = parse(run_script(tmp_path, script(spec)), spec)
        assert facts == Facts(
            current_system=SYSTEM,
            profile_system=SYSTEM,
            system_state="running",
            failed_units=(),
            units={"sshd.service": UnitState("loaded", "active", "running")},
            listening=frozenset({22, 8080}),
            http={0: "200"},
            commands={0: CommandOutcome(0, "")},
        )

    def test_degraded_host(self, tmp_path: Path) -> None:
        """A degraded state and its failed unit come through."""
        out = run_script(
            tmp_path, script(SPEC), FAKE_STATE="degraded", FAKE_FAILED="nginx.service",
            FAKE_CURRENT=OLD,
        )  # fmt: skip
        facts = parse(out, SPEC)
        assert facts.system_state == "degraded"
        assert facts.failed_units == ("nginx.service",)
        assert facts.current_system == OLD

    def test_command_with_single_quotes_round_trips(self, tmp_path: Path) -> None:
        """An operator command with quotes, $ and ; runs exactly as written in the inventory."""
        run = "x='it'\"'\"'s $HOME; fine'; printf '%s\\n' \"$x\" \"second line\"; exit 3"
        spec = VerifySpec(commands=(CommandCheck(name="quotes", run=run),))
        facts = parse(run_script(tmp_path, script(spec)), spec)
        assert facts.commands == {0: CommandOutcome(3, "it's $HOME; fine\nsecond line")}

    def test_command_output_is_cut_to_its_tail(self, tmp_path: Path) -> None:
        """Only the last lines of a chatty command's output are kept."""
        spec = VerifySpec(commands=(CommandCheck(name="chatty", run="seq 1 50; exit 2"),))
        facts = parse(run_script(tmp_path, script(spec)), spec)
        assert facts.commands[0] == CommandOutcome(2, "46\n47\n48\n49\n50")

    def test_command_stdin_is_closed(self, tmp_path: Path) -> None:
        """A check command reading stdin gets EOF instead of swallowing the rest of the script."""
        spec = VerifySpec(
            units=("sshd.service",),
            commands=(CommandCheck(name="reads stdin", run="cat; echo done"),),
        )
        facts = parse(run_script(tmp_path, script(spec)), spec)
        assert facts.commands[0] == CommandOutcome(0, "done")
        assert "sshd.service" in facts.units

    def test_unit_names_are_passed_verbatim(self, tmp_path: Path) -> None:
        """Unit names with @ and backslash escapes reach systemctl unchanged."""
        units = ("sshd.service", r"systemd-fsck@dev-disk-by\x2dlabel-root.service")
        spec = VerifySpec(units=units)
        facts = parse(run_script(tmp_path, script(spec)), spec)
        logged = (tmp_path / "log" / "units").read_text(encoding="utf-8").splitlines()
        assert tuple(logged) == units
        assert set(facts.units) == set(units)

    def test_urls_are_passed_verbatim(self, tmp_path: Path) -> None:
        """A URL with & and ? reaches curl as one argument."""
        url = "http://127.0.0.1:8080/health?check=1&verbose=yes"
        spec = VerifySpec(http=(HttpCheck(url=url, status=204),))
        facts = parse(run_script(tmp_path, script(spec), FAKE_HTTP="204"), spec)
        assert (tmp_path / "log" / "urls").read_text(encoding="utf-8") == url + "\n"
        assert facts.http == {0: "204"}

    def test_boot_script_reads_systems_only(self, tmp_path: Path) -> None:
        """Without services only the systems are gathered (after a boot nothing else changed)."""
        text = script(SPEC, services=False)
        assert "systemctl" not in text
        assert "curl" not in text
        facts = parse(run_script(tmp_path, text, FAKE_PROFILE=OLD), SPEC)
        assert (facts.current_system, facts.profile_system) == (SYSTEM, OLD)
        assert facts.system_state == ""

    def test_script_survives_every_step_failing(self, tmp_path: Path) -> None:
        """With no host programs answering, the script still ends and parses to empty facts."""
        out = run_script(tmp_path, script(SPEC), PATH=str(tmp_path / "empty"))
        assert out.rstrip().endswith("@@rebuild-fact@@ end")
        facts = parse(out, SPEC)
        assert facts.current_system is None
        assert facts.units == {}
        assert facts.commands[0].returncode != 0

    def test_checks_run_side_by_side(self, tmp_path: Path) -> None:
        """Command checks run alongside each other: the first waits for a file only the second
        creates, so run one after the other the first would time out and fail."""
        flag = tmp_path / "flag"
        first = (f"i=0; while [ ! -e {flag} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
                 f"test -e {flag} && echo saw it")  # fmt: skip
        spec = VerifySpec(
            commands=(CommandCheck(name="waits", run=first),
                      CommandCheck(name="creates", run=f"touch {flag}; exit 4")),
            command_timeout=20,
        )  # fmt: skip
        facts = parse(run_script(tmp_path, script(spec)), spec)
        assert facts.commands == {0: CommandOutcome(0, "saw it"), 1: CommandOutcome(4, "")}

    def test_temporary_folder_is_removed(self, tmp_path: Path) -> None:
        """The checks' outputs live in a private folder that is gone when the script ends."""
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        run_script(tmp_path, script(SPEC), TMPDIR=str(tmp))
        assert list(tmp.iterdir()) == []

    def test_without_mktemp_checks_fail_with_the_reason(self, tmp_path: Path) -> None:
        """A host that cannot make a temporary folder fails each HTTP and command check, naming
        the cause, and still reports the rest."""
        bin_dir = tmp_path / "bin"
        run_script(tmp_path, "true")  # writes the fake tools
        mktemp = bin_dir / "mktemp"
        mktemp.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        mktemp.chmod(0o755)
        facts = parse(run_script(tmp_path, script(SPEC)), SPEC)
        assert facts.commands == {0: CommandOutcome(255, "rebuild: mktemp -d failed on the host")}
        assert facts.http == {0: "rebuild: mktemp -d failed on the host"}
        assert facts.units["sshd.service"].active == "active"

    def test_is_shellcheck_clean(self, tmp_path: Path) -> None:
        """shellcheck (POSIX sh) finds nothing in the facts script."""
        program = shutil.which("shellcheck")
        if program is None:
            pytest.fail("shellcheck is not installed: apt-get install shellcheck")
        path = tmp_path / "facts.sh"
        path.write_text("#!/bin/sh\n" + script(SPEC), encoding="utf-8")
        done = subprocess.run([program, "-s", "sh", str(path)], capture_output=True, text=True,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout


class TestParseRecorded:
    def test_healthy_recording(self) -> None:
        """A recorded healthy NixOS host parses into its systems, units, ports and checks."""
        facts = parse((DATA / "facts_healthy.txt").read_text(encoding="utf-8"), SPEC)
        assert facts.current_system == SYSTEM
        assert facts.profile_system == SYSTEM
        assert facts.system_state == "running"
        assert facts.failed_units == ()
        assert facts.units == {
            "sshd.service": UnitState("loaded", "active", "running"),
            "nginx.service": UnitState("loaded", "active", "running"),
        }
        assert facts.listening == frozenset({22, 443, 53, 9100})
        assert facts.http == {0: "200"}
        assert facts.commands == {0: CommandOutcome(0, "")}

    def test_degraded_recording(self) -> None:
        """A recorded degraded host gives its failed units, a closed port and a failing check."""
        facts = parse((DATA / "facts_degraded.txt").read_text(encoding="utf-8"), SPEC)
        assert facts.system_state == "degraded"
        assert facts.failed_units == ("nginx.service", "acme-vps.example.org.service")
        assert facts.units["nginx.service"] == UnitState("loaded", "failed", "failed")
        assert facts.listening == frozenset({22})
        assert facts.http[0].endswith("000")
        assert facts.commands[0] == CommandOutcome(
            1,
            "secrets: /run/secrets/example: No such file or directory\n"
            "sops-install-secrets: failed to decrypt",
        )

    def test_truncated_output(self) -> None:
        """Output cut off after the first section leaves the rest unknown, not invented."""
        facts = parse(f"@@rebuild-fact@@ current\n{SYSTEM}\n", SPEC)
        assert facts.current_system == SYSTEM
        assert facts.system_state == ""
        assert facts.units == {}
        assert facts.commands[0].returncode == 255


class TestParsers:
    def test_split_sections(self) -> None:
        """Lines go to the section of the marker above them; text before any marker is dropped."""
        out = "motd\n@@rebuild-fact@@ a\n1\n2\n@@rebuild-fact@@ b\n@@rebuild-fact@@ end\n"
        assert split_sections(out) == {"a": ["1", "2"], "b": [], "end": []}

    def test_store_path_skips_noise(self) -> None:
        """The first absolute path is the system; other lines are ignored."""
        assert parse_store_path(["warning: x", f"  {SYSTEM}  ", OLD]) == SYSTEM
        assert parse_store_path(["readlink: missing"]) is None

    def test_failed_units_with_and_without_bullet(self) -> None:
        """Failed units are the first column, with or without systemd's bullet."""
        lines = [
            "● nginx.service loaded failed failed nginx",
            "foo.mount loaded failed failed x",
            "",
        ]
        assert parse_failed_units(lines) == ("nginx.service", "foo.mount")

    def test_show_blocks(self) -> None:
        """`systemctl show` blocks are keyed by unit Id, whatever the property order."""
        lines = [
            "Id=sshd.service", "LoadState=loaded", "ActiveState=active", "SubState=running", "",
            "SubState=dead", "ActiveState=inactive", "LoadState=not-found", "Id=nope.service",
        ]  # fmt: skip
        assert parse_show(lines) == {
            "sshd.service": UnitState("loaded", "active", "running"),
            "nope.service": UnitState("not-found", "inactive", "dead"),
        }

    def test_listening_ports(self) -> None:
        """IPv4, IPv6, interface-scoped and wildcard listeners all give their port."""
        lines = [
            "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*",
            "LISTEN 0 128 [::1]:5432 [::]:*",
            "LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:*",
            "LISTEN 0 4096 *:9100 *:*",
            "garbage",
        ]
        assert parse_listening(lines) == frozenset({22, 5432, 53, 9100})

    def test_command_outcome(self) -> None:
        """The rc marker gives the exit code; the other non-blank lines are the output tail."""
        lines = ["error: nope", "", "@@rebuild-fact@@ rc 4"]
        assert parse_command(lines) == CommandOutcome(4, "error: nope")

    @pytest.mark.parametrize("lines", [[], ["output only"], ["@@rebuild-fact@@ rc x"]])
    def test_command_without_exit_code_fails(self, lines: list[str]) -> None:
        """A command whose exit code never arrived counts as failed (255)."""
        assert parse_command(lines).returncode == 255
