"""`invoke init` and `invoke add-host`: from an existing NixOS flake to a first safe deploy.

`init` asks nix for the flake's `nixosConfigurations` (one `nix eval --json ... --apply
builtins.attrNames`), writes a commented inventory.toml with this machine's `[[operators]]`
entry and one host table per configuration picked, and never overwrites an inventory.

`add-host` reads the host's keys over one SSH handshake per key family (nothing is trusted on
first use), shows their fingerprints, and pins them in the inventory's known_hosts only after a
typed `yes` or a `--fingerprint` given up front that matches; then it adds the host's table to
the inventory (keeping every other line) and writes its wrapper script. A key that changed needs
`--replace-key`, which the audit records. Nothing is written when anything is refused.

Both validate what they write with the inventory's strict model before replacing a file (a
temporary file renamed into place) and leave one audit record (`event` `init` / `add-host`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rebuild import audit, hostkeys, identity, inventory, nixos, process, wrapper
from rebuild.console import Console, stdin_is_terminal
from rebuild.errors import ConfigError, Declined, GateRefused, RebuildError
from rebuild.hostkeys import HostKey, KeyStatus
from rebuild.inventory import Inventory, Target
from rebuild.inventory_text import (
    ADDRESS,
    ATTR,
    FLAKE,
    NAME,
    PORT,
    SAFE_PATH,
    USER,
    NewHost,
    append_host,
    check_value,
    fill_host,
    host_block,
    is_pending,
    load_toml,
    parse_host_arg,
    render,
    validate,
)
from rebuild.remote import known_host_keys

ENV_NIX = "REBUILD_NIX"
NIX_LIST_TIMEOUT = 300
HOST_KEY_FILE = "/etc/ssh/ssh_host_ed25519_key.pub"
ASK_ATTEMPTS = 3


# --- the flake's configurations ----------------------------------------------------------------


def list_argv(nix: str, flake: str) -> list[str]:
    """The one nix call: the names of the flake's nixosConfigurations, as a JSON list."""
    return [nix, *nixos.EXPERIMENTAL, "eval", "--json", f"{flake}#nixosConfigurations",
            "--apply", "builtins.attrNames"]  # fmt: skip


def parse_names(stdout: str) -> list[str]:
    """`nix eval --json` of `builtins.attrNames`: a JSON list of strings (sorted by nix)."""
    try:
        names = json.loads(stdout)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"nix eval did not print a JSON list of names: {stdout.strip()[:200]!r}")
    return list(names)


def flake_ref(folder: Path, flake: str) -> str:
    """The flake as nix takes it: an absolute path for a local flake, else the URL."""
    if inventory.is_flake_url(flake):
        return flake
    return str((folder / Path(flake).expanduser()).resolve())


def list_configurations(nix: str, flake: str, folder: Path) -> list[str]:
    done = process.run(list_argv(nix, flake), cwd=str(folder), timeout=NIX_LIST_TIMEOUT)
    if not done.ok:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise ConfigError(
            f"cannot list the nixosConfigurations of {flake}: {tail or f'exit {done.returncode}'}"
        )
    return parse_names(done.stdout)


def usable_names(configurations: Sequence[str]) -> tuple[list[str], list[str]]:
    """Configurations that can be inventory hosts as they are named, and the others."""
    usable, skipped = [], []
    for name in configurations:
        try:
            NAME.validate_python(name)
            ATTR.validate_python(name)
        except ValueError:
            skipped.append(name)
        else:
            usable.append(name)
    return usable, skipped


def parse_selection(answer: str, names: Sequence[str]) -> list[str]:
    """The answer to "which configurations": numbers or names, `all` (or nothing), `none`."""
    words = answer.replace(",", " ").split()
    if not words or words == ["all"]:
        return list(names)
    if words == ["none"]:
        return []
    picked: set[str] = set()
    for word in words:
        if word.isdigit() and 1 <= int(word) <= len(names):
            picked.add(names[int(word) - 1])
        elif word in names:
            picked.add(word)
        else:
            raise ValueError(f"{word!r} is neither a number from 1 to {len(names)} nor a name")
    return [n for n in names if n in picked]


# --- writing files -----------------------------------------------------------------------------


def _temp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.rebuild-{os.getpid()}")


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Replace a file by a temporary file renamed into place (its mode kept, links followed)."""
    real = path.resolve() if path.is_symlink() else path
    tmp = _temp_for(real)
    try:
        real.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keep = real.stat().st_mode & 0o777 if real.exists() else mode
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.chmod(keep)
        tmp.replace(real)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def checked_temp(path: Path, text: str) -> Path:
    """Write `text` next to `path` and check that file as every task will read it: the strict
    model, and `rebuild.inventory.load` once no host waits for its address."""
    tmp = _temp_for(path)
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        _, pending = validate(path, tmp.read_text(encoding="utf-8"))
        if not pending:
            inventory.load(str(tmp))
    except ConfigError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(str(exc).replace(str(tmp.resolve()), str(path)).replace(
            str(tmp), str(path))) from None  # fmt: skip
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return tmp


def _shown(path: Path) -> str:
    """A path as the operator typed it: relative to the current folder when it is below it."""
    with contextlib.suppress(ValueError, OSError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


# --- audit ---------------------------------------------------------------------------------------


def _operator(inv: Inventory | None, me: identity.Identity) -> dict[str, str]:
    who = identity.authorize(me, inv.operators) if inv is not None else None
    return {"name": who.name if who else "", "hostname": me.hostname, "machine_id": me.machine_id}


def _finish(record: audit.Record, log: Path, started: float, console: Console) -> None:
    record.duration_s = round(time.monotonic() - started, 3)
    try:
        audit.append(log, record)
    except OSError as exc:
        console.notice(f"warning: cannot write the audit record to {log}: {exc}")


def _audited(record: audit.Record, log: Callable[[], Path], started: float, console: Console,
             body: Callable[[], int]) -> int:  # fmt: skip
    try:
        code = body()
    except RebuildError as exc:
        record.result, record.exit_code, record.message = exc.result, exc.exit_code, str(exc)
        _finish(record, log(), started, console)
        raise
    except KeyboardInterrupt:
        record.result, record.exit_code = Declined.result, Declined.exit_code
        record.message = "aborted (Ctrl-C)"
        _finish(record, log(), started, console)
        raise
    record.result, record.exit_code = "ok", code
    _finish(record, log(), started, console)
    return code


def _audit_log(folder: Path, inv: Inventory | None) -> Path:
    return folder / Path((inv or Inventory()).audit_log).expanduser()


# --- invoke init ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitOptions:
    """The flags of `invoke init`."""

    hosts: tuple[str, ...] = ()  # NAME=ADDRESS
    yes: bool = False
    flake: str = "."
    operator: str | None = None


def init(inventory_arg: str | None, opts: InitOptions, console: Console | None = None) -> int:
    """`invoke init`; returns the exit code."""
    console = console or Console()
    started = time.monotonic()
    path = inventory.inventory_path(inventory_arg)
    if path.exists() or path.is_symlink():
        raise ConfigError(
            f"{path} exists already and init never overwrites it; add hosts to it with "
            "`invoke add-host --host NAME --address ADDR`"
        )
    given: dict[str, str] = {}
    for value in opts.hosts:
        name, address = parse_host_arg(value)
        if name in given:
            raise ConfigError(f"--host {name}=...: {name} is given twice")
        given[name] = address
    try:
        flake = FLAKE.validate_python(opts.flake)
    except ValueError:
        raise ConfigError(
            f"--flake {opts.flake!r}: want a path or flake URL without spaces, quotes or shell "
            "characters"
        ) from None
    me = identity.current()
    operator = check_value(
        NAME,
        opts.operator or me.hostname,
        "--operator" if opts.operator else "--operator (default: hostname)",
    )
    folder = path.absolute().parent
    if not folder.is_dir():
        raise ConfigError(f"{path}: the folder {folder} does not exist")
    nix = os.environ.get(ENV_NIX) or "nix"
    ref = flake_ref(folder, flake)
    record = audit.Record(
        run_id=audit.new_run_id(), host="", address="", action="init", flake=ref, attr="",
        operator=_operator(None, me), event="init",
    )  # fmt: skip
    record.extra["inventory"] = str(path.absolute())
    written: list[Inventory] = []

    def body() -> int:
        configurations = list_configurations(nix, ref, folder)
        record.extra["configurations"] = configurations
        usable, skipped = usable_names(configurations)
        if not configurations:
            raise ConfigError(
                f"the flake {ref} has no nixosConfigurations; add one, commit it, run init again"
            )
        unknown = [n for n in given if n not in usable]
        if unknown:
            raise ConfigError(
                f"--host {unknown[0]}=...: the flake has no nixosConfigurations.{unknown[0]} "
                f"(it has: {', '.join(configurations)})"
            )
        console.say(f"the flake {ref} has {len(configurations)} NixOS configuration(s): "
                    + ", ".join(configurations))  # fmt: skip
        for name in skipped:
            console.notice(
                f"note: nixosConfigurations.{name} cannot be an inventory host as "
                "it is named (letters, digits, '-', '_'); add it by hand with attr"
            )
        chosen = _choose(usable, given, opts.yes, console)
        hosts = [NewHost(name=n, address=given.get(n)) for n in chosen]
        text = render(flake=flake, me=me, operator=operator, hosts=hosts,
                      configurations=configurations)  # fmt: skip
        inv, pending = validate(path, text)
        tmp = checked_temp(path, text)
        try:
            os.link(tmp, path)  # fails if an inventory appeared meanwhile: never overwrite
        except FileExistsError:
            raise ConfigError(f"{path} exists already and init never overwrites it") from None
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        written.append(inv)
        record.operator = _operator(inv, me)
        record.extra.update(hosts=chosen, pending=list(pending))
        _init_report(path, inv, chosen, pending, operator, console)
        return 0

    return _audited(record, lambda: _audit_log(folder, written[0] if written else None),
                    started, console, body)  # fmt: skip


def _choose(usable: list[str], given: Mapping[str, str], yes: bool, console: Console) -> list[str]:
    if yes:
        return usable
    if given:
        return [n for n in usable if n in given]
    if not usable:
        return []
    if not stdin_is_terminal():
        raise GateRefused(
            "no terminal to ask which configurations to include; pass --host NAME=ADDRESS "
            "(repeatable), or --yes for all of them (addresses left to fill in)"
        )
    for i, name in enumerate(usable, 1):
        console.say(f"  {i}. {name}")
    for _attempt in range(ASK_ATTEMPTS):
        answer = console.ask(
            "Which configurations become hosts? Numbers or names, 'all' or 'none' [all]: "
        )
        try:
            return parse_selection(answer, usable)
        except ValueError as exc:
            console.say(f"  {exc}")
    raise ConfigError("no valid answer; run init again, or pass --host NAME=ADDRESS or --yes")


def _init_report(path: Path, inv: Inventory, chosen: Sequence[str], pending: Sequence[str],
                 operator: str, console: Console) -> None:  # fmt: skip
    who = f'this machine as operator "{operator}"' if inv.operators else "no operator yet"
    console.say(f"wrote {path}: {len(chosen)} host(s) ({', '.join(chosen) or 'none'}), {who}")
    if not inv.operators:
        console.notice(
            "warning: this machine has no /etc/machine-id, so the allowlist is empty and nobody "
            "may deploy; create it (systemd-machine-id-setup) and add the entry `invoke operator` "
            "prints"
        )
    console.say("next:")
    step = 1
    for name in chosen:
        how = "--address ADDR " if name in pending else ""
        console.say(f"  {step}. check {name}'s host key out of band and pin it: "
                    f"invoke add-host --host {name} {how}".rstrip())  # fmt: skip
        step += 1
    if not chosen:
        console.say(f"  {step}. add a host: invoke add-host --host NAME --address ADDR")
        step += 1
    shown = _shown(path)
    console.say(f"  {step}. review and commit {shown}, known_hosts and scripts/")
    first = chosen[0] if chosen else "NAME"
    console.say(f"  {step + 1}. invoke rebuild --host {first} --dry-run")
    if pending:
        console.say(
            f"until then, {shown} is invalid on purpose: "
            + ", ".join(f"hosts.{n}.address" for n in pending)
            + " must be filled in"
        )


# --- invoke add-host -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AddHostOptions:
    """The flags of `invoke add-host` (None: not given)."""

    host: str
    address: str | None = None
    port: str | int | None = None
    user: str | None = None
    attr: str | None = None
    identity_file: str | None = None
    fingerprint: str | None = None
    replace_key: bool = False


@dataclass(frozen=True)
class HostInput:
    """add-host's flags, each validated like the inventory validates that key."""

    name: str
    address: str | None
    port: int | None
    user: str | None
    attr: str | None
    identity_file: str | None
    fingerprint: str | None
    replace_key: bool

    @classmethod
    def parse(cls, opts: AddHostOptions) -> HostInput:
        name = check_value(NAME, opts.host, "--host")
        port: int | None = None
        if opts.port is not None and opts.port != "":
            raw = opts.port
            if isinstance(raw, str):
                if not raw.strip().isdigit():
                    raise ConfigError(f"--port: {raw!r} is not a port number (1 to 65535)")
                raw = int(raw)
            port = check_value(PORT, raw, "--port")
        fingerprint = None
        if opts.fingerprint:
            try:
                fingerprint = hostkeys.parse_fingerprint(opts.fingerprint)
            except ValueError as exc:
                raise ConfigError(f"--fingerprint: {exc}") from None

        def opt(adapter: Any, value: str | None, flag: str) -> str | None:
            return None if not value else str(check_value(adapter, value, flag))

        return cls(
            name=name,
            address=opt(ADDRESS, opts.address, "--address"),
            port=port,
            user=opt(USER, opts.user, "--user"),
            attr=opt(ATTR, opts.attr, "--attr"),
            identity_file=opt(SAFE_PATH, opts.identity_file, "--identity-file"),
            fingerprint=fingerprint,
            replace_key=opts.replace_key,
        )

    def new_host(self) -> NewHost:
        return NewHost(name=self.name, address=self.address, port=self.port, user=self.user,
                       attr=self.attr, identity_file=self.identity_file)  # fmt: skip


def add_host(
    inventory_arg: str | None, opts: AddHostOptions, *, root: Path, console: Console | None = None
) -> int:
    """`invoke add-host`; `root` is the repository whose scripts/ gets the wrapper."""
    console = console or Console()
    started = time.monotonic()
    given = HostInput.parse(opts)
    path = inventory.inventory_path(inventory_arg)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no inventory here; create one with `invoke init`, or pass --inventory PATH"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the inventory: {exc}") from None
    inv, pending = validate(path, text)
    if not pending:
        inventory.load(str(path))  # every check a task makes on it (the environment too)
    folder = path.absolute().parent
    me = identity.current()
    record = audit.Record(
        run_id=audit.new_run_id(), host=given.name, address=given.address or "",
        action="add-host", flake=flake_ref(folder, inv.flake), attr=given.attr or given.name,
        operator=_operator(inv, me), event="add-host",
    )  # fmt: skip
    if given.replace_key:
        record.overrides.append("replace-key")
    job = _AddHost(path, folder, text, inv, given, root, record, console)
    return _audited(record, lambda: _audit_log(folder, inv), started, console, job.run)


@dataclass
class _AddHost:
    path: Path
    folder: Path
    text: str
    inv: Inventory
    given: HostInput
    root: Path
    record: audit.Record
    console: Console

    def run(self) -> int:
        name = self.given.name
        new_text = self._new_text()
        new_inv, _pending = validate(self.path, new_text)
        target = Target(name, new_inv.hosts[name])
        settings = target.settings
        self.record.address, self.record.attr = settings.address, target.attr
        if new_text != self.text:
            self._check_identity_file(settings.identity_file)
            self._check_attr(new_inv, target.attr)
        known_hosts = self.folder / Path(new_inv.known_hosts).expanduser()
        new_known = self._keys(
            known_hosts, settings.address, settings.port, new_inv.connect_timeout
        )
        wrapper_path, wrapper_text = self._wrapper(target)

        if new_text == self.text and new_known is None and wrapper_path is None:
            self.console.say(
                f"{name}: nothing to do: it is in {_shown(self.path)}, its key is pinned in "
                f"{_shown(known_hosts)}, its wrapper is up to date"
            )
            self.record.extra["changed"] = []
            return 0
        changed: list[str] = []
        tmp = checked_temp(self.path, new_text) if new_text != self.text else None
        try:
            if new_known is not None:
                write_atomic(known_hosts, new_known)
                changed.append(_shown(known_hosts))
            if tmp is not None:
                tmp.replace(self.path.resolve() if self.path.is_symlink() else self.path)
                changed.append(_shown(self.path))
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if wrapper_path is not None:
            wrapper.write(wrapper_path, wrapper_text)
            changed.append(_shown(wrapper_path))
        self.record.extra["changed"] = changed
        self._report(target, new_inv, changed)
        return 0

    # -- the inventory

    def _new_text(self) -> str:
        """The inventory with the host in it. A new host gets its table appended; in a table
        that exists, a flag fills in a key the table does not set (or the address init left to
        fill in), and never changes one it sets."""
        g, name, path = self.given, self.given.name, self.path
        data = load_toml(path, self.text)
        hosts = data.get("hosts")
        raw = hosts.get(name) if isinstance(hosts, dict) else None
        host = g.new_host()
        wanted = host.given()
        if raw is None:
            if g.address is None:
                raise ConfigError(f"--address ADDR is required: {name} is a new host")
            new = append_host(self.text, host_block(host))
            _check_edit(path, self.text, new, name, wanted)
            return new
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: hosts.{name} is not a table; fix it by hand")
        pending = is_pending(raw.get("address"))
        if pending and g.address is None:
            raise ConfigError(f"--address ADDR is required: hosts.{name} has no address yet")
        values: dict[str, str] = {}
        conflicts: list[str] = []
        for key, value in wanted.items():
            want = load_toml(path, f"v = {value}")["v"]
            if key not in raw or (key == "address" and pending):
                values[key] = value
            elif raw[key] != want:
                flag = "--" + key.replace("_", "-")
                conflicts.append(f"{flag} {want} (it has {key} = {raw[key]!r})")
        if conflicts:
            raise ConfigError(
                f"{path}: hosts.{name} exists already with other settings: "
                f"{'; '.join(conflicts)}; add-host never changes a key a host sets: change it "
                f"in {path} by hand (reviewed), then run add-host again"
            )
        if not values:
            return self.text
        filled = fill_host(self.text, name, values)
        if filled is None:
            raise ConfigError(
                f"{path}: no [hosts.{name}] table header to edit (an inline or dotted table?); "
                "set its keys by hand, then run add-host again"
            )
        _check_edit(path, self.text, filled, name, values)
        return filled

    def _check_identity_file(self, identity_file: str | None) -> None:
        if identity_file is None:
            return
        key = self.folder / Path(identity_file).expanduser()
        if not key.is_file():
            raise ConfigError(
                f"--identity-file: {key} does not exist; create the key (ssh-keygen -t ed25519 "
                "-f PATH) or fix the path"
            )

    def _check_attr(self, inv: Inventory, attr: str) -> None:
        """The flake must have the configuration; a flake nix cannot list is only a warning."""
        nix = os.environ.get(ENV_NIX) or inv.nix
        ref = flake_ref(self.folder, inv.flake)
        try:
            names = list_configurations(nix, ref, self.folder)
        except ConfigError as exc:
            self.console.notice(f"warning: nixosConfigurations.{attr} not checked: {exc}")
            return
        if attr not in names:
            raise ConfigError(
                f"the flake {ref} has no nixosConfigurations.{attr} (it has: "
                f"{', '.join(names) or 'none'}); pass --attr NAME"
            )

    # -- the host's keys

    def _keys(self, known_hosts: Path, address: str, port: int, timeout: float) -> str | None:
        """The new known_hosts text, or None when the host's key is pinned already."""
        name, g, console = self.given.name, self.given, self.console
        key_name = hostkeys.key_name(address, port)
        try:
            offered = hostkeys.scan(address, port, timeout=timeout)
        except hostkeys.ScanError as exc:
            raise GateRefused(f"{name}: {exc}; nothing was written") from None
        keys, _skipped = known_host_keys(known_hosts)
        known = hostkeys.known_keys(keys, key_name)
        status = hostkeys.compare(offered, known)
        self.record.extra.update(
            offered=[k.fingerprint for k in offered], key_status=status.value,
            known_hosts=str(known_hosts),
        )  # fmt: skip
        console.say(f"{name} ({key_name}) offers these host keys:")
        for key in offered:
            console.say(f"  {key.describe()}")
        if status is KeyStatus.KNOWN:
            if g.fingerprint is not None and hostkeys.matching(offered, g.fingerprint) is None:
                raise _mismatch(name, g.fingerprint, offered)
            if g.replace_key:
                console.say(f"{name}: --replace-key: nothing to replace")
            console.say(f"{name}: its key is pinned in {_shown(known_hosts)} already")
            return None
        if status is KeyStatus.CHANGED:
            old = ", ".join(k.describe() for k in known)
            new = ", ".join(k.describe() for k in offered)
            self.record.extra["previous_keys"] = [k.fingerprint for k in known]
            if not g.replace_key:
                raise GateRefused(
                    f"HOST KEY CHANGED for {name} ({key_name}): {_shown(known_hosts)} has {old}, "
                    f"the host now offers {new}; this may be an attack or a reinstalled host. "
                    f"Check the new fingerprint out of band (the provider's console: ssh-keygen "
                    f"-lf {HOST_KEY_FILE}), then run again with --replace-key; nothing was "
                    "written"
                )
            console.say(f"{name}: the host key CHANGED: {_shown(known_hosts)} has {old}; "
                        "--replace-key replaces it once you confirm the new one")  # fmt: skip
        pinned = self._confirm(offered, key_name, known_hosts)
        self.record.extra["pinned"] = [k.fingerprint for k in pinned]
        try:
            base = known_hosts.read_text(encoding="utf-8") if known_hosts.exists() else ""
        except (OSError, UnicodeDecodeError) as exc:
            raise GateRefused(f"cannot read known_hosts {known_hosts}: {exc}") from None
        if status is KeyStatus.CHANGED:
            base, removed = hostkeys.without_host(base, key_name)
            self.record.extra["replaced_lines"] = removed
        return hostkeys.with_keys(base, key_name, pinned)

    def _confirm(self, offered: Sequence[HostKey], key_name: str,
                 known_hosts: Path) -> tuple[HostKey, ...]:  # fmt: skip
        """The keys the operator vouched for: the one matching --fingerprint, or every offered
        key after a typed `yes`."""
        name, wanted, console = self.given.name, self.given.fingerprint, self.console
        if wanted is not None:
            key = hostkeys.matching(offered, wanted)
            if key is None:
                raise _mismatch(name, wanted, offered)
            console.say(f"{name}: {wanted} matches its {key.family} key")
            return (key,)
        if not stdin_is_terminal():
            raise GateRefused(
                f"{name}: no terminal to confirm the fingerprint; pass --fingerprint SHA256:... "
                "after checking it out of band"
            )
        console.say(
            "Compare them with what the host itself shows, read out of band (the provider's "
            f"console, not SSH): ssh-keygen -lf {HOST_KEY_FILE}"
        )
        answer = console.ask(f"Type yes if they match, to pin them for {key_name} in "
                             f"{_shown(known_hosts)}: ")  # fmt: skip
        if answer.strip().lower() != "yes":
            raise Declined(f"{name}: not confirmed (no `yes` typed); nothing was written")
        return tuple(offered)

    # -- the wrapper and the report

    def _wrapper(self, target: Target) -> tuple[Path | None, str]:
        """The wrapper to write (None: up to date, or it cannot be made here) and its text."""
        try:
            rel = wrapper.relative_inventory(self.root, self.path)
            text = wrapper.render(rel, target)
        except ConfigError as exc:
            self.console.notice(f"note: no wrapper script: {exc}")
            return None, ""
        path = wrapper.script_path(self.root, target.name)
        return (path if wrapper.problem(path, text) is not None else None), text

    def _report(self, target: Target, inv: Inventory, changed: Sequence[str]) -> None:
        name, console = target.name, self.console
        console.say(f"{name}: wrote " + ", ".join(changed))
        console.say(f"next: review and commit them (git add {' '.join(changed)}), then:")
        console.say(f"  invoke rebuild --host {name} --dry-run")
        console.say(f"  (secrets with sops-nix: invoke enroll --host {name} first)")
        if identity.authorize(identity.current(), inv.operators) is None:
            console.notice(
                "note: this machine is not in the inventory's [[operators]], so deploys from it "
                "are refused; `invoke operator` prints the lines that would authorize it"
            )


def _mismatch(name: str, wanted: str, offered: Sequence[HostKey]) -> GateRefused:
    shown = ", ".join(k.describe() for k in offered)
    return GateRefused(
        f"{name}: FINGERPRINT MISMATCH: you gave {wanted}, the host offers {shown}; this may be "
        "an attack, or the wrong host or key file; nothing was written"
    )


def _check_edit(path: Path, old_text: str, new_text: str, name: str,
                values: Mapping[str, str]) -> None:  # fmt: skip
    """The edit changed exactly the host's given keys and nothing else (any layout where the
    text edit would do more or less is refused, never written)."""
    old, new = load_toml(path, old_text), load_toml(path, new_text)
    want = {key: load_toml(path, f"v = {value}")["v"] for key, value in values.items()}
    old_hosts = dict(old.get("hosts") or {})
    new_hosts = dict(new.get("hosts") or {})
    old_entry = old_hosts.pop(name, None) or {}
    new_entry = new_hosts.pop(name, None)
    same_rest = {**old, "hosts": old_hosts} == {**new, "hosts": new_hosts}
    if not same_rest or not isinstance(old_entry, dict) or new_entry != {**old_entry, **want}:
        raise ConfigError(
            f"{path}: cannot add hosts.{name} to this file without touching other lines (an "
            f"unusual layout, such as an inline hosts table); add [hosts.{name}] with its "
            "address by hand, then run add-host again"
        )
