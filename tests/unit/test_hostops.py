"""Host-side scripts: the deploy lock, the dead-man timer and the rollback, run under a real sh."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from rebuild import hostops
from rebuild.hostops import (
    TIMER_RESTORE,
    LockOwner,
    acquire_script,
    arm_timer_script,
    break_script,
    cancel_timer_script,
    generation_path_script,
    lock_is_stale,
    parse_acquire,
    parse_arm_section,
    parse_cancel,
    parse_generations,
    parse_lock_lost,
    parse_owner,
    parse_reboot_check,
    parse_trust,
    reboot_check_script,
    reboot_script,
    refresh_lock_script,
    release_script,
    restore_command,
    rollback_now_script,
    timer_gone,
    timer_unit,
)

SYSTEM = "/nix/store/9d0mxm9bvyw2l7h8dz1mkvdbgtqlxdfn-nixos-system-vps-24.11.20241120.2ac5bf0"
PREVIOUS = "/nix/store/2b7qfbq1bzkbwkl4w3pdyq1qjbcxxr8h-nixos-system-vps-24.11.20241101.1e2f3a4"
RUN_ID = "20261125-193000-a1b2c3"
MID = "0123456789abcdef0123456789abcdef"

ME = LockOwner(RUN_ID, "work-laptop", "laptop", MID, 4242, 1_764_099_000.0)
OTHER = LockOwner("20261125-194500-d4e5f6", "ci", "runner", "f" * 32, 77, 1_764_099_900.0)

# Stand-ins for the host's programs that record their argv (one argument a line).
RECORDER = """#!/bin/sh
{ echo "$(basename "$0")"; for a in "$@"; do printf '[%s]\\n' "$a"; done; } >> "$FAKE_LOG"
"""
READLINK = f"""#!/bin/sh
case "$2" in
  /run/current-system) echo {SYSTEM} ;;
  /nix/var/nix/profiles/system) echo {PREVIOUS} ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake host root: the lock lives under tmp_path, programs are recorders."""
    monkeypatch.setattr(hostops, "LOCK_DIR", str(tmp_path / "run" / "rebuild-lock"))
    monkeypatch.setattr(hostops, "DEPLOY_LOG", str(tmp_path / "var" / "deployments.jsonl"))
    (tmp_path / "run").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemctl", "systemd-run", "nix-env"):
        (bin_dir / name).write_text(RECORDER, encoding="utf-8")
    (bin_dir / "readlink").write_text(READLINK, encoding="utf-8")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return tmp_path


def sh(root: Path, script: str, *, check: bool = True, **env: str) -> str:
    values = {
        "PATH": f"{root / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "FAKE_LOG": str(root / "calls.log"),
        "LC_ALL": "C",
    }
    values.update(env)
    done = subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, env=values, timeout=30,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0 or not check, done.stderr
    return done.stdout


def take_lock(root: Path) -> None:
    """This run (ME) holds the host's lock, as it does whenever it arms a timer."""
    assert parse_acquire(sh(root, acquire_script(ME))).acquired


def calls(root: Path) -> list[list[str]]:
    """The recorded program calls: [program, arg, arg, ...]."""
    out: list[list[str]] = []
    log = root / "calls.log"
    for line in (log.read_text(encoding="utf-8") if log.exists() else "").splitlines():
        if line.startswith("[") and line.endswith("]"):
            out[-1].append(line[1:-1])
        else:
            out.append([line])
    return out


class TestRemoteLock:
    def test_first_acquire_takes_the_lock(self, host: Path) -> None:
        """The first acquire takes the lock, records its owner and reports both systems."""
        answer = parse_acquire(sh(host, acquire_script(ME)))
        assert answer.acquired
        assert answer.holder is None
        assert answer.error == ""
        assert (answer.current_system, answer.profile_system) == (SYSTEM, PREVIOUS)
        owner = (Path(hostops.LOCK_DIR) / "owner").read_text(encoding="utf-8")
        assert parse_owner(owner) == ME

    def test_second_acquire_reports_the_holder(self, host: Path) -> None:
        """A second run finds the lock held and learns exactly who holds it."""
        sh(host, acquire_script(ME))
        answer = parse_acquire(sh(host, acquire_script(OTHER)))
        assert not answer.acquired
        assert answer.holder == ME
        assert answer.error == ""
        assert answer.current_system == SYSTEM

    def test_unexpected_failure_is_an_error(
        self, host: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A lock folder that cannot be created is an error with mkdir's reason, not 'held'."""
        monkeypatch.setattr(hostops, "LOCK_DIR", str(host / "missing" / "rebuild-lock"))
        answer = parse_acquire(sh(host, acquire_script(ME)))
        assert not answer.acquired
        assert answer.holder is None
        assert "No such file or directory" in answer.error

    def test_release_removes_only_our_lock(self, host: Path) -> None:
        """Another run's release leaves our lock; our own release removes it."""
        sh(host, acquire_script(ME))
        sh(host, release_script(OTHER.run_id))
        assert Path(hostops.LOCK_DIR).is_dir()
        sh(host, release_script(ME.run_id))
        assert not Path(hostops.LOCK_DIR).exists()
        assert parse_acquire(sh(host, acquire_script(OTHER))).acquired

    def test_break_only_the_lock_judged_stale(self, host: Path) -> None:
        """Breaking a stale lock removes it only if the same run still holds it."""
        sh(host, acquire_script(OTHER))
        assert sh(host, break_script(ME.run_id)) == ""
        assert Path(hostops.LOCK_DIR).is_dir()
        assert sh(host, break_script(OTHER.run_id)).strip() == "broken"
        assert not Path(hostops.LOCK_DIR).exists()

    def test_release_without_lock_is_harmless(self, host: Path) -> None:
        """Releasing when no lock exists does nothing and does not fail."""
        sh(host, release_script(ME.run_id))
        assert not Path(hostops.LOCK_DIR).exists()

    def test_held_lock_recognised_in_any_language(self, host: Path) -> None:
        """A held lock is reported as held on a host whose messages are in German."""
        probe = subprocess.run(
            ["mkdir", str(host)], capture_output=True, text=True, check=False,
            env={"LANG": "C.UTF-8", "LANGUAGE": "de", "PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
        if "exists" in probe.stderr:
            pytest.skip("coreutils translations are not installed here")
        german = {"LC_ALL": "", "LANG": "C.UTF-8", "LANGUAGE": "de"}
        sh(host, acquire_script(ME), **german)
        answer = parse_acquire(sh(host, acquire_script(OTHER), **german))
        assert answer.holder == ME


class TestParseAcquire:
    def test_no_answer(self) -> None:
        """Output without the lock section is an error, never an acquired lock."""
        answer = parse_acquire("")
        assert not answer.acquired
        assert answer.error == "no answer from the lock step"

    def test_held_with_unreadable_owner(self) -> None:
        """A held lock whose owner file is garbage is still held, with an unknown holder."""
        answer = parse_acquire("@@rebuild-op@@ lock\nheld\nnot json\n\n@@rebuild-op@@ end\n")
        assert not answer.acquired
        assert answer.holder is None
        assert answer.error == ""


class TestLockOwner:
    def test_json_round_trip(self) -> None:
        """The owner written to the host reads back identical."""
        assert parse_owner(ME.to_json()) == ME

    @pytest.mark.parametrize("text", ["", "{", "[]", '{"run_id": "x"}', '{"pid": "abc"}'])
    def test_garbage_is_no_owner(self, text: str) -> None:
        """An unreadable owner file gives no owner rather than an exception."""
        assert parse_owner(text) is None

    def test_describe(self) -> None:
        """The refusal names the run, the operator, the machine, the pid and since when (UTC)."""
        assert ME.describe() == (
            f"run {RUN_ID} by work-laptop on laptop (pid 4242), since 2025-11-25T19:30:00Z"
        )


class TestLockIsStale:
    def test_own_machine_dead_pid(self) -> None:
        """A lock from this machine whose process is gone is stale at once."""
        assert lock_is_stale(ME, now=ME.since + 5, stale_after=3600, machine_id=MID,
                             pid_alive=False)  # fmt: skip

    def test_own_machine_live_pid(self) -> None:
        """A recent lock of a live process on this machine is not stale."""
        assert not lock_is_stale(ME, now=ME.since + 5, stale_after=3600, machine_id=MID,
                                 pid_alive=True)  # fmt: skip

    def test_other_machine_recent(self) -> None:
        """Another machine's recent lock is respected even if a pid with its number is dead here."""
        assert not lock_is_stale(OTHER, now=OTHER.since + 60, stale_after=3600, machine_id=MID,
                                 pid_alive=False)  # fmt: skip

    def test_other_machine_old(self) -> None:
        """Any lock older than the limit is stale."""
        assert lock_is_stale(OTHER, now=OTHER.since + 3601, stale_after=3600, machine_id=MID,
                             pid_alive=True)  # fmt: skip

    def test_exactly_at_the_limit(self) -> None:
        """A lock exactly as old as the limit is not yet stale."""
        assert not lock_is_stale(OTHER, now=OTHER.since + 3600, stale_after=3600,
                                 machine_id=MID, pid_alive=True)  # fmt: skip


class TestDeadManTimer:
    def test_unit_name(self) -> None:
        """The timer unit is rebuild-rollback-<run id>."""
        assert timer_unit(RUN_ID) == f"rebuild-rollback-{RUN_ID}"

    def test_arm_runs_systemd_run_with_the_restore(self, host: Path) -> None:
        """Arming stops this run's old timer, then schedules the restore of the previous system."""
        take_lock(host)
        sh(host, arm_timer_script(RUN_ID, PREVIOUS, 90))
        show, stop, run = calls(host)
        unit = f"rebuild-rollback-{RUN_ID}"
        assert show[:2] == ["systemctl", "show"] and show[-1] == f"{unit}.timer"
        assert stop == ["systemctl", "stop", f"{unit}.timer", f"{unit}.service"]
        assert run[0] == "systemd-run"
        assert "--on-active=90s" in run
        assert f"--unit={unit}" in run
        assert f"--description=rebuild dead-man rollback to {PREVIOUS}" in run
        sep = run.index("--")
        assert run[sep + 1 :] == ["/bin/sh", "-c", TIMER_RESTORE, "rebuild-restore", PREVIOUS]

    def test_restore_command_really_restores(self, host: Path) -> None:
        """The command the timer runs sets the profile, then activates the previous system."""
        previous = host / "store" / "old system"
        (previous / "bin").mkdir(parents=True)
        activate = previous / "bin" / "switch-to-configuration"
        activate.write_text(RECORDER, encoding="utf-8")
        activate.chmod(0o755)
        take_lock(host)
        sh(host, arm_timer_script(RUN_ID, str(previous), 30))
        run = calls(host)[2]
        (host / "calls.log").unlink()
        sh(host, shlex.join(run[run.index("--") + 1 :]))  # what the timer's service runs
        assert calls(host) == [
            ["nix-env", "-p", "/nix/var/nix/profiles/system", "--set", str(previous)],
            ["switch-to-configuration", "switch"],
        ]

    def test_the_lock_step_arms_the_timer_for_the_system_it_read(self, host: Path) -> None:
        """With `arm`, the lock's round trip arms the timer to restore the system it has just
        read, and reports the arm step's answer."""
        out = sh(host, acquire_script(ME, arm=90))
        assert parse_acquire(out).acquired and parse_acquire(out).current_system == SYSTEM
        assert parse_arm_section(out) == (0, "")
        # the script took the lock itself and the run's timer cannot exist yet: no ownership
        # check, no `systemctl show`/`stop` of an earlier timer, just systemd-run
        (run,) = calls(host)
        assert run[0] == "systemd-run" and "--on-active=90s" in run
        assert f"--description=rebuild dead-man rollback to {SYSTEM}" in run
        assert run[run.index("--") + 1 :] == [
            "/bin/sh", "-c", TIMER_RESTORE, "rebuild-restore", SYSTEM]  # fmt: skip

    def test_the_lock_step_arms_nothing_without_the_lock_or_a_system(self, host: Path) -> None:
        """A lock held by another run, or no current system read: nothing is armed."""
        sh(host, acquire_script(OTHER))
        out = sh(host, acquire_script(ME, arm=90))
        assert not parse_acquire(out).acquired and parse_arm_section(out) is None
        assert calls(host) == []
        sh(host, release_script(OTHER.run_id))
        (host / "bin" / "readlink").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        out = sh(host, acquire_script(ME, arm=90))
        assert parse_acquire(out).acquired and parse_arm_section(out) is None
        assert calls(host) == []

    def test_fired_timer_is_not_rearmed(self, host: Path) -> None:
        """A timer that already fired is reported (`fired`) and never armed again."""
        systemctl = host / "bin" / "systemctl"
        systemctl.write_text(
            RECORDER + 'case "$1" in show) echo SubState=elapsed;; esac\n', encoding="utf-8"
        )
        take_lock(host)
        out = sh(host, arm_timer_script(RUN_ID, PREVIOUS, 90))
        assert out.strip() == "fired"
        assert [c[:2] for c in calls(host)] == [["systemctl", "show"]]

    def test_a_broken_lock_arms_nothing(self, host: Path) -> None:
        """Another run broke this run's lock and took it: nothing is armed, and the answer
        names the new holder."""
        sh(host, acquire_script(OTHER))
        out = sh(host, arm_timer_script(RUN_ID, PREVIOUS, 90))
        assert calls(host) == []
        holder = parse_lock_lost(out)
        assert holder is not None and OTHER.run_id in holder and "ci on runner" in holder

    def test_a_removed_lock_arms_nothing(self, host: Path) -> None:
        """No lock at all (broken, not retaken) is a lost lock too."""
        out = sh(host, arm_timer_script(RUN_ID, PREVIOUS, 90))
        assert calls(host) == [] and parse_lock_lost(out) == "nobody (the lock was removed)"

    def test_arming_refreshes_the_lock(self, host: Path) -> None:
        """With this run's owner entry, arming also rewrites it with a fresh `refreshed` time,
        so a long build does not make the lock look abandoned."""
        take_lock(host)
        fresh = dataclasses.replace(ME, refreshed=ME.since + 4000)
        sh(host, arm_timer_script(RUN_ID, PREVIOUS, 90, fresh))
        owner = parse_owner((host / "run" / "rebuild-lock" / "owner").read_text(encoding="utf-8"))
        assert owner == fresh
        assert not lock_is_stale(owner, now=ME.since + 4100, stale_after=3600, machine_id="x",
                                 pid_alive=True)  # fmt: skip

    def test_refresh_alone_keeps_a_held_lock_and_reports_a_lost_one(self, host: Path) -> None:
        """Without a timer the heartbeat only refreshes the lock; another run's lock is left
        alone and reported."""
        take_lock(host)
        fresh = dataclasses.replace(ME, refreshed=ME.since + 10)
        assert parse_lock_lost(sh(host, refresh_lock_script(fresh))) is None
        lock = host / "run" / "rebuild-lock" / "owner"
        assert parse_owner(lock.read_text(encoding="utf-8")) == fresh
        lock.write_text(OTHER.to_json() + "\n", encoding="utf-8")
        holder = parse_lock_lost(sh(host, refresh_lock_script(fresh)))
        assert holder is not None and OTHER.run_id in holder
        assert parse_owner(lock.read_text(encoding="utf-8")) == OTHER

    def test_a_held_lock_is_not_lost(self) -> None:
        """Any other answer of the arm step is not a lost lock."""
        assert parse_lock_lost("fired\n") is None and parse_lock_lost("") is None

    def test_cancel_stops_the_timer_and_shows_it(self, host: Path) -> None:
        """Cancelling stops the timer, then asks systemd for its state, and reads what the host
        runs, in the same round trip."""
        out = sh(host, cancel_timer_script(RUN_ID))
        unit = f"rebuild-rollback-{RUN_ID}.timer"
        assert calls(host) == [
            ["systemctl", "stop", unit],
            ["systemctl", "show", "-p", "Id,LoadState,ActiveState,SubState", "--no-pager", "--",
             unit],
        ]  # fmt: skip
        assert parse_cancel(out) == (False, SYSTEM)  # the recorder printed no state

    def test_parse_cancel(self) -> None:
        """A timer systemd no longer knows is gone; the current system follows its marker."""
        out = (f"Id=x.timer\nLoadState=not-found\nActiveState=inactive\n"
               f"{hostops.MARK} current\n{SYSTEM}\n")  # fmt: skip
        assert parse_cancel(out) == (True, SYSTEM)
        assert parse_cancel("LoadState=loaded\nActiveState=active\n") == (False, None)

    def test_rollback_now(self, host: Path) -> None:
        """Rolling back at once cancels the timer, then restores the old system in a transient
        unit with the same restore the timer runs."""
        sh(host, rollback_now_script(RUN_ID, PREVIOUS))
        stop, run = calls(host)
        assert stop == ["systemctl", "stop", f"rebuild-rollback-{RUN_ID}.timer"]
        assert run[0] == "systemd-run"
        assert "--wait" in run
        assert f"--unit=rebuild-rollback-{RUN_ID}-now" in run
        assert run[-3:] == ["/bin/sh", "-c", restore_command(PREVIOUS)]

    def test_restore_sets_the_profile_then_switches(self, host: Path) -> None:
        """The restore pins the profile to the previous system and activates it, once when
        the switch succeeds."""
        previous = host / "store" / "old"
        (previous / "bin").mkdir(parents=True)
        (previous / "bin" / "switch-to-configuration").write_text(RECORDER, encoding="utf-8")
        (previous / "bin" / "switch-to-configuration").chmod(0o755)
        sh(host, restore_command(str(previous)) + "\n")
        assert calls(host) == [
            ["nix-env", "-p", "/nix/var/nix/profiles/system", "--set", str(previous)],
            ["switch-to-configuration", "switch"],
        ]

    def test_restore_retries_while_a_switch_holds_the_lock(self, host: Path) -> None:
        """switch-to-configuration exits 11 (EAGAIN, "Could not acquire lock") while another
        switch runs: the restore tries again (bounded), and stops at the first other answer."""
        previous = host / "store" / "old"
        (previous / "bin").mkdir(parents=True)
        stc = previous / "bin" / "switch-to-configuration"
        count = host / "count"
        stc.write_text(
            RECORDER + f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}\n"
            '[ "$n" -lt 3 ] && { echo "Could not acquire lock" >&2; exit 11; }; exit 0\n',
            encoding="utf-8",
        )
        stc.chmod(0o755)
        script = restore_command(str(previous)).replace("sleep 2", "sleep 0")
        sh(host, script + "\n")
        assert [c[0] for c in calls(host)] == ["nix-env", "switch-to-configuration"] * 3

    def test_scripts_quote_the_previous_path(self) -> None:
        """A previous path with shell syntax stays one quoted word in every script."""
        evil = "/nix/store/x-$(reboot); echo"
        for text in (arm_timer_script(RUN_ID, evil, 90), rollback_now_script(RUN_ID, evil)):
            assert shlex.quote(evil) in text
            assert f"rebuild-rollback-{RUN_ID}" in text


class TestTimerGone:
    def test_not_found_is_gone(self) -> None:
        """A timer systemd no longer knows is gone."""
        assert timer_gone(f"Id=rebuild-rollback-{RUN_ID}.timer\nLoadState=not-found\n"
                          "ActiveState=inactive\nSubState=dead\n")  # fmt: skip

    def test_loaded_but_stopped_is_gone(self) -> None:
        """A stopped timer not yet garbage-collected will not fire."""
        assert timer_gone("LoadState=loaded\nActiveState=inactive\nSubState=dead\n")

    def test_waiting_timer_is_not_gone(self) -> None:
        """A loaded, active, waiting timer will still fire."""
        assert not timer_gone(
            f"Id=rebuild-rollback-{RUN_ID}.timer\nLoadState=loaded\nActiveState=active\n"
            "SubState=waiting\n"
        )

    @pytest.mark.parametrize("output", ["ActiveState=active\nSubState=waiting\n", ""])
    def test_no_proof_is_not_gone(self, output: str) -> None:
        """Output that does not say the timer is unloaded or stopped is no proof it is gone."""
        assert not timer_gone(output)


class TestGenerations:
    LIST = (
        "  41   2025-10-01 09:12:44   \n"
        "  42   2025-11-20 18:03:10   \n"
        "  43   2025-11-25 19:30:02   (current)\n"
    )

    def test_parse(self) -> None:
        """nix-env --list-generations gives the numbers and the current one."""
        assert parse_generations(self.LIST) == ([41, 42, 43], 43)

    def test_no_current(self) -> None:
        """Output without a (current) mark has no current generation."""
        assert parse_generations("  1   2025-01-01 00:00:00\n") == ([1], None)

    def test_error_output(self) -> None:
        """An error message gives no generations."""
        error = "error: opening lock file '/nix/var/nix/profiles/system.lock'"
        assert parse_generations(error) == ([], None)

    def test_generation_path_script(self) -> None:
        """The path of generation N is read from system-N-link."""
        assert "/nix/var/nix/profiles/system-42-link" in generation_path_script(42)


class TestTrustedUser:
    def test_asked_only_when_wanted(self, host: Path) -> None:
        """The trust section is in the lock round trip only when the user copies paths."""
        assert "trust" not in acquire_script(ME)
        assert parse_trust(sh(host, acquire_script(ME))) is None

    def test_a_real_sh_reads_user_groups_and_the_setting(self, host: Path) -> None:
        """Under a real sh: the user and groups from `id`, trusted-users from `nix config`."""
        nix = host / "bin" / "nix"
        nix.write_text("#!/bin/sh\necho 'root @wheel deploy'\n", encoding="utf-8")
        nix.chmod(0o755)
        trust = parse_trust(sh(host, acquire_script(ME, trust=True)))
        assert trust is not None and trust.trusted_users == ("root", "@wheel", "deploy")
        assert trust.user and trust.groups

    @pytest.mark.parametrize(
        ("listed", "user", "groups", "trusted"),
        [
            (("root", "deploy"), "deploy", (), True),
            (("root", "@wheel"), "deploy", ("users", "wheel"), True),
            (("*",), "deploy", (), True),
            (("root",), "deploy", ("wheel",), False),
            ((), "deploy", (), False),
            (None, "deploy", (), None),
        ],
    )
    def test_trusted(
        self, listed: tuple[str, ...] | None, user: str, groups: tuple[str, ...],
        trusted: bool | None,
    ) -> None:  # fmt: skip
        """A name, a group it is in (`@wheel`) or `*` trusts; no answer from Nix is unknown."""
        assert hostops.Trust(user, groups, listed).trusted is trusted


class TestReboot:
    def test_reboot_check_under_a_real_sh(self, host: Path) -> None:
        """The booted and running systems' boot links: a changed kernel is a reason."""
        readlink = host / "bin" / "readlink"
        readlink.write_text(
            '#!/bin/sh\ncase "$2" in\n'
            "  /run/booted-system/kernel) echo /nix/store/k1-linux-6.6.30/bzImage ;;\n"
            "  /run/current-system/kernel) echo /nix/store/k2-linux-6.6.31/bzImage ;;\n"
            "  */initrd) echo /nix/store/i-initrd/initrd ;;\n"
            "  */kernel-modules) echo /nix/store/m-modules ;;\nesac\n",
            encoding="utf-8",
        )
        assert parse_reboot_check(sh(host, reboot_check_script())) == ("kernel",)

    def test_same_links_need_no_reboot(self) -> None:
        same = "".join(f"{hostops.MARK} {x}\n/nix/store/a\n\n/nix/store/a\n"
                       for x in ("kernel", "initrd", "kernel-modules"))  # fmt: skip
        assert parse_reboot_check(same) == ()

    def test_reboot_returns_before_the_connection_goes(self) -> None:
        """The reboot comes from a transient timer two seconds later, after the boot id."""
        script = reboot_script(RUN_ID)
        assert script.startswith(f"cat {hostops.BOOT_ID}; systemd-run --on-active=2 ")
        assert f"--unit=rebuild-reboot-{RUN_ID} -- systemctl reboot" in script


class TestCancelAndRelease:
    def test_a_gone_timer_releases_in_the_same_round_trip(self, host: Path) -> None:
        """Verified: the cancel step also notes the result and removes this run's lock, once
        systemd says the timer is gone."""
        systemctl = host / "bin" / "systemctl"
        systemctl.write_text(RECORDER + 'case "$1" in show) echo LoadState=not-found;; esac\n',
                             encoding="utf-8")  # fmt: skip
        take_lock(host)
        out = sh(host, cancel_timer_script(RUN_ID, '{"result": "ok"}'))
        assert hostops.parse_released(out) and parse_cancel(out)[0]
        assert not (host / "run" / "rebuild-lock").exists()
        assert (host / "var" / "deployments.jsonl").read_text() == '{"result": "ok"}\n'

    def test_a_timer_still_waiting_keeps_the_lock(self, host: Path) -> None:
        """Not proven gone: nothing is released (the deploy's outcome is decided first)."""
        systemctl = host / "bin" / "systemctl"
        systemctl.write_text(RECORDER + 'case "$1" in show) echo ActiveState=active;; esac\n',
                             encoding="utf-8")  # fmt: skip
        take_lock(host)
        out = sh(host, cancel_timer_script(RUN_ID, '{"result": "ok"}'))
        assert not hostops.parse_released(out)
        assert (host / "run" / "rebuild-lock").exists()
