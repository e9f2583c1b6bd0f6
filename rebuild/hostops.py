"""Remote scripts rebuild runs on a host besides verification: the deploy lock, the dead-man
timer and the rollback. Pure builders and parsers; every value is quoted here."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from shlex import quote

from rebuild.facts import CURRENT_SYSTEM, SYSTEM_PROFILE, parse_store_path, split_sections

LOCK_DIR = "/run/rebuild-lock"
MARK = "@@rebuild-op@@"


def timer_unit(run_id: str) -> str:
    return f"rebuild-rollback-{run_id}"


# --- locks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockOwner:
    """Who holds a host's deploy lock."""

    run_id: str
    operator: str
    hostname: str
    machine_id: str
    pid: int
    since: float
    refreshed: float | None = None  # the last heartbeat of the run holding it

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @property
    def last_seen(self) -> float:
        return self.since if self.refreshed is None else self.refreshed

    def describe(self) -> str:
        return (
            f"run {self.run_id} by {self.operator} on {self.hostname} (pid {self.pid}), "
            f"since {_iso(self.since)}"
        )


def _iso(epoch: float) -> str:

    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_owner(text: str) -> LockOwner | None:
    try:
        data = json.loads(text)
        return LockOwner(
            run_id=str(data["run_id"]),
            operator=str(data["operator"]),
            hostname=str(data["hostname"]),
            machine_id=str(data["machine_id"]),
            pid=int(data["pid"]),
            since=float(data["since"]),
            refreshed=float(data["refreshed"]) if data.get("refreshed") is not None else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


DEPLOY_LOG = "/var/lib/rebuild/deployments.jsonl"
RECORD_FAILED = "record-failed"


def deploy_record(**fields: object) -> str:
    """One line of the host's own deploy log: `run_id`, `timestamp`, `operator` (`name`,
    `machine_id`), `commit`, `dirty`, `action`, `system`, `result` (the contract's)."""
    return json.dumps(fields, sort_keys=True)


def _append_record(line: str) -> str:
    """Append a line to the host's deploy log, bounded and never failing the script: a
    failure is reported (`record-failed`) for a warning, the deploy goes on."""
    return (
        f"{{ mkdir -p {DEPLOY_LOG.rsplit('/', 1)[0]} && printf '%s\\n' {quote(line)} "
        f"| timeout 10 tee -a {DEPLOY_LOG} >/dev/null; }} 2>/dev/null "
        f"|| echo '{MARK} {RECORD_FAILED}'"
    )


def acquire_script(owner: LockOwner, record: str | None = None, *, trust: bool = False,
                   arm: int | None = None) -> str:  # fmt: skip
    """Take the lock atomically (mkdir), note the deploy in the host's own log, and report the
    systems (and, with `trust`, whether the SSH user may copy unsigned paths to the host's
    Nix), in one round trip. With `arm` (seconds), once the lock is taken the dead-man timer
    is armed to restore the system just read (the `arm` section: the arm step's answer and
    its exit status)."""
    note = f"\n  {_append_record(record)}" if record else ""
    cur = '"$cur"'  # the system just read, as a shell word
    arming = ""
    if arm is not None:  # only once the lock is taken and a system was read
        # the lock was taken by this very script and the run's timer cannot exist yet: no
        # ownership check, no earlier timer to look at or stop (two processes fewer)
        section = arm_section(_start_timer(owner.run_id, cur, arm))
        arming = f'case "$acquired$cur" in yes/*)\n{section};;\nesac\n'
    trusted = (
        f"echo '{MARK} trust'; u=${{SUDO_USER:-$(id -un 2>/dev/null)}}; echo \"$u\"; "
        'id -Gn "$u" 2>/dev/null; echo; '  # the SSH user's, also when this runs under sudo
        "{ nix --extra-experimental-features nix-command config show trusted-users "
        "|| nix show-config | sed -n 's/^trusted-users = //p'; } 2>/dev/null | tail -n 1\n"
        if trust
        else ""
    )
    return f"""\
acquired=no
echo '{MARK} lock'
if err=$(LC_ALL=C mkdir {LOCK_DIR} 2>&1); then
  printf '%s\\n' {quote(owner.to_json())} | tee {LOCK_DIR}/owner >/dev/null && echo acquired \\
    && acquired=yes{note}
elif ls -d {LOCK_DIR} >/dev/null 2>&1; then
  echo held; cat {LOCK_DIR}/owner 2>/dev/null; echo
else
  echo "error $err"
fi
cur=$(readlink -f {CURRENT_SYSTEM} 2>/dev/null)
echo '{MARK} current'; printf '%s\\n' "$cur"
echo '{MARK} profile'; readlink -f {SYSTEM_PROFILE} 2>/dev/null
{trusted}{arming}echo '{MARK} end'
"""


def arm_section(arm: str) -> str:
    """The arm step as the last part of a larger script (the lock's, the preview's): its answer
    and exit status follow an `arm` marker (`parse_arm_section`)."""
    return f"echo '{MARK} arm'\n( {arm.strip()}\n) 2>&1; echo \"{MARK} arm-rc $?\"\n"


def parse_arm_section(output: str) -> tuple[int, str] | None:
    """The arm step's exit status and answer from `arm_section`; None when it did not run
    (the lock was not taken, no system was read) or its answer was cut short."""
    _, found, rest = output.partition(f"{MARK} arm\n")
    body, found_rc, tail = rest.partition(f"{MARK} arm-rc ")
    code = tail.split("\n", 1)[0].strip()
    if not found or not found_rc or not code.isdigit():
        return None
    return int(code), body


@dataclass(frozen=True)
class Trust:
    """What the host's Nix says of the SSH user: `trusted-users` (None: Nix did not say)."""

    user: str
    groups: tuple[str, ...]
    trusted_users: tuple[str, ...] | None

    @property
    def trusted(self) -> bool | None:
        """May the user copy unsigned paths (nix.settings.trusted-users)? None: unknown."""
        if self.trusted_users is None or not self.user:
            return None
        for entry in self.trusted_users:
            if entry in ("*", self.user) or (entry.startswith("@") and entry[1:] in self.groups):
                return True
        return False


def parse_trust(output: str) -> Trust | None:
    """The `trust` section of the acquire script, or None when it was not asked."""
    section = split_sections(output, MARK).get("trust")
    if section is None:
        return None
    lines = [line.strip() for line in section]
    user = lines[0] if lines else ""
    groups = tuple(lines[1].split()) if len(lines) > 1 else ()
    listed = lines[3] if len(lines) > 3 and lines[3] else None
    return Trust(user, groups, tuple(listed.split()) if listed is not None else None)


def release_script(run_id: str, record: str | None = None) -> str:
    """Note how the deploy ended in the host's own log, then remove the lock, only if it is
    still ours (one round trip)."""
    note = f"{_append_record(record)}; " if record else ""
    return (
        f"if cat {LOCK_DIR}/owner 2>/dev/null | grep -qF {quote(run_id)}; then "
        f"{note}rm -rf {LOCK_DIR}; fi; true\n"
    )


def record_failed(output: str) -> bool:
    """Did the host refuse the line for its deploy log?"""
    return f"{MARK} {RECORD_FAILED}" in output


def break_script(stale_run_id: str) -> str:
    """Remove a stale lock, only if it still belongs to the run we judged stale."""
    return (
        f"if cat {LOCK_DIR}/owner 2>/dev/null | grep -qF {quote(stale_run_id)}; then "
        f"rm -rf {LOCK_DIR} && echo broken; fi; true\n"
    )


@dataclass(frozen=True)
class LockAnswer:
    acquired: bool
    holder: LockOwner | None
    error: str
    current_system: str | None
    profile_system: str | None


def parse_acquire(output: str) -> LockAnswer:
    s = split_sections(output, MARK)
    lock = [line for line in s.get("lock", []) if line.strip()]
    first = lock[0] if lock else "error no answer from the lock step"
    holder = parse_owner("\n".join(lock[1:])) if first == "held" else None
    return LockAnswer(
        acquired=first == "acquired",
        holder=holder,
        error=first.removeprefix("error ").strip() if first.startswith("error") else "",
        current_system=parse_store_path(s.get("current", [])),
        profile_system=parse_store_path(s.get("profile", [])),
    )


def lock_is_stale(holder: LockOwner, *, now: float, stale_after: float, machine_id: str,
                  pid_alive: bool) -> bool:  # fmt: skip
    """A lock may be broken when it is older than the limit, or when its run on this very
    machine is gone."""
    if holder.machine_id == machine_id and not pid_alive:
        return True
    return now - holder.last_seen > stale_after


# --- dead-man timer and rollback ----------------------------------------------------------


def refresh_lock_script(owner: LockOwner) -> str:
    """Prove the lock is still this run's and refresh its age (a build longer than
    lock_stale_after must not look abandoned); else `lock-lost` and the holder, and stop."""
    return (
        f"if ! cat {LOCK_DIR}/owner 2>/dev/null | grep -qF {quote(owner.run_id)}; then "
        f"echo lock-lost; cat {LOCK_DIR}/owner 2>/dev/null; exit 0; fi; "
        f"printf '%s\\n' {quote(owner.to_json())} | tee {LOCK_DIR}/owner >/dev/null\n"
    )


ARM_TIMEOUT = 30  # seconds the arm (or lock refresh) step may take on the host


def arm_timer_script(run_id: str, previous: str, seconds: int,
                     owner: LockOwner | None = None) -> str:  # fmt: skip
    """(Re-)schedule the rollback to `previous` in `seconds`; the old timer of this run goes.
    With `owner`, the lock is refreshed first (and nothing is armed if it is lost)."""
    return _arm(run_id, quote(previous), seconds, owner)


def _arm(run_id: str, previous: str, seconds: int, owner: LockOwner | None) -> str:
    """`arm_timer_script` for `previous` given as a shell word."""
    unit = timer_unit(run_id)
    # A timer that already fired is left alone (`fired`): the caller must learn that the host
    # restored itself, and re-arming it would roll back once more later. A run whose lock was
    # broken by another run arms nothing (`lock-lost` and the new holder).
    check = (
        refresh_lock_script(owner)
        if owner is not None
        else (
            f"if ! cat {LOCK_DIR}/owner 2>/dev/null | grep -qF {quote(run_id)}; then "
            f"echo lock-lost; cat {LOCK_DIR}/owner 2>/dev/null; exit 0; fi\n"
        )
    )
    return check + (
        f"case $(systemctl show -p SubState --no-pager -- {quote(unit + '.timer')} 2>/dev/null) "
        "in *=elapsed) echo fired; exit 0;; esac; "
        f"systemctl stop {quote(unit + '.timer')} {quote(unit + '.service')} 2>/dev/null; "
        + _start_timer(run_id, previous, seconds)
    )


def _start_timer(run_id: str, previous: str, seconds: int) -> str:
    """`systemd-run` of the run's dead-man timer (`previous` given as a shell word)."""
    unit = timer_unit(run_id)
    return (
        f"systemd-run --on-active={seconds}s --unit={quote(unit)} --collect "
        f"--description={quote('rebuild dead-man rollback to ')}{previous} "
        f'--setenv=PATH="$PATH" -- /bin/sh -c {quote(TIMER_RESTORE)} rebuild-restore {previous}\n'
    )


def timer_state_script(run_id: str) -> str:
    unit = timer_unit(run_id)
    return (
        f"systemctl show -p Id,LoadState,ActiveState,SubState --no-pager -- "
        f"{quote(unit + '.timer')} 2>/dev/null; true\n"
    )


def cancel_timer_script(run_id: str, release: str | None = None) -> str:
    """Stop the timer, then show its state (so the caller can prove it is gone) and what the
    host runs, in one round trip. With `release` (the host's log line for a verified deploy),
    once the timer is proven gone the same round trip notes it and releases the lock."""
    unit = timer_unit(run_id)
    script = (
        f"systemctl stop {quote(unit + '.timer')} 2>/dev/null; "
        f"st=$(systemctl show -p Id,LoadState,ActiveState,SubState --no-pager -- "
        f"{quote(unit + '.timer')} 2>/dev/null); printf '%s\\n' \"$st\"; "
        f"echo '{MARK} current'; readlink -f {CURRENT_SYSTEM} 2>/dev/null; true\n"
    )
    if release is None:
        return script
    return script + (
        'case "$st" in *LoadState=not-found*|*ActiveState=inactive*|*ActiveState=failed*) '
        + release_script(run_id, release).strip()
        + f"; echo '{MARK} released';; esac; true\n"
    )


def parse_released(output: str) -> bool:
    """Did the cancel step release the lock (the timer was gone)?"""
    return f"{MARK} released" in output


def parse_cancel(output: str) -> tuple[bool, str | None]:
    """`cancel_timer_script`'s answer: is the timer gone, and the host's current system."""
    state, _, rest = output.partition(f"{MARK} current")
    return timer_gone(state), parse_store_path(rest.splitlines())


def parse_lock_lost(output: str) -> str | None:
    """`arm_timer_script` found the lock taken by another run: who holds it now (else None)."""
    first, _, rest = output.strip().partition("\n")
    if first.strip() != "lock-lost":
        return None
    holder = parse_owner(rest)
    return holder.describe() if holder is not None else "nobody (the lock was removed)"


def timer_gone(show_output: str) -> bool:
    """After a cancel: the timer is not loaded any more (or at least not waiting)."""
    fields = dict(line.split("=", 1) for line in show_output.splitlines() if "=" in line)
    if fields.get("LoadState") == "not-found":
        return True
    return fields.get("ActiveState") in ("inactive", "failed")


def timer_elapsed(show_output: str) -> bool:
    """The timer fired: a transient timer stays loaded as `active (elapsed)` afterwards."""
    fields = dict(line.split("=", 1) for line in show_output.splitlines() if "=" in line)
    return fields.get("SubState") == "elapsed"


SWITCH_LOCK = "/run/nixos/switch-to-configuration.lock"
RESTORE_TRIES = 5
SWITCH_WAIT = 300  # seconds a restore waits for a switch that is still running


def restore_command(previous: str) -> str:
    """Put `previous` back so that what runs and what boots agree: wait (bounded) for a switch
    that is still running (switch-to-configuration holds a non-blocking flock on
    /run/nixos/switch-to-configuration.lock and exits 11, EAGAIN, "Could not acquire lock",
    for a second one: switch-to-configuration-ng's main.rs), then set the profile and switch,
    trying again while another switch holds the lock."""
    return _restore(quote(previous))


def _restore(previous: str) -> str:
    """`restore_command` for `previous` given as a shell word (quoted path, or `"$1"`)."""
    return (
        f"i=0; while [ $i -lt {RESTORE_TRIES} ]; do i=$((i+1)); "
        f"flock -w {SWITCH_WAIT} {SWITCH_LOCK} true 2>/dev/null; "
        f"nix-env -p {SYSTEM_PROFILE} --set {previous} && "
        f"{previous}/bin/switch-to-configuration switch; rc=$?; "
        '[ "$rc" -eq 11 ] || exit "$rc"; sleep 2; done; exit 11'
    )


# The timer's command: the restore reads the previous system from its first argument, so that
# the lock step can arm it with the system it has just read (`acquire_script(arm=...)`).
TIMER_RESTORE = _restore('"$1"')


def rollback_now_script(run_id: str, previous: str) -> str:
    """Roll back at once: cancel the timer, then restore `previous` (as the timer would) in a
    transient unit, so that it finishes even if the connection drops."""
    unit = timer_unit(run_id)
    return (
        f"systemctl stop {quote(unit + '.timer')} 2>/dev/null; "
        f"systemd-run --wait --collect --quiet --unit={quote(unit + '-now')} "
        f'--setenv=PATH="$PATH" -- /bin/sh -c {quote(restore_command(previous))}\n'
    )


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def reboot_check_script() -> str:
    """The boot links of the booted and the running system, to tell whether a reboot is
    needed (the kernel, initrd or modules changed)."""
    lines = []
    for link in ("kernel", "initrd", "kernel-modules"):
        lines.append(
            f"echo '{MARK} {link}'; readlink -e /run/booted-system/{link} 2>/dev/null; "
            f"echo; readlink -e {CURRENT_SYSTEM}/{link} 2>/dev/null; true"
        )
    return "\n".join(lines) + "\n"


def parse_reboot_check(output: str) -> tuple[str, ...]:
    """The links that differ between the booted and the running system."""
    sections = split_sections(output, MARK)
    reasons = []
    for link in ("kernel", "initrd", "kernel-modules"):
        lines = [line.strip() for line in sections.get(link, [])]
        booted = lines[0] if lines else ""
        running = lines[2] if len(lines) > 2 else ""
        if booted != running:
            reasons.append(link)
    return tuple(reasons)


def reboot_script(run_id: str) -> str:
    """The boot id now, then a reboot two seconds later from a transient timer (so that this
    command returns before the connection goes)."""
    return (
        f"cat {BOOT_ID}; systemd-run --on-active=2 --collect --quiet "
        f"--unit={quote('rebuild-reboot-' + run_id)} -- systemctl reboot >/dev/null\n"
    )


def boot_state_script() -> str:
    """After a reboot: the boot id and what the host booted."""
    return f"cat {BOOT_ID} 2>/dev/null; echo; readlink -f /run/booted-system 2>/dev/null; true\n"


def generations_script() -> str:
    return f"nix-env -p {SYSTEM_PROFILE} --list-generations 2>&1; true\n"


def parse_generations(output: str) -> tuple[list[int], int | None]:
    """`nix-env --list-generations`: the numbers, and the current one."""
    numbers: list[int] = []
    current = None
    for line in output.splitlines():
        words = line.split()
        if words and words[0].isdigit():
            numbers.append(int(words[0]))
            if "(current)" in line:
                current = int(words[0])
    return numbers, current


def generation_path_script(number: int) -> str:
    return f"readlink -f {SYSTEM_PROFILE}-{int(number)}-link 2>/dev/null; true\n"
