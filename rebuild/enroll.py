"""`invoke enroll --host NAME`: enroll a host for sops-nix secrets.

The host's SSH Ed25519 host key is read over SSH (strict host keys), checked against the
inventory's known_hosts, and converted to the host's age recipient exactly as ssh-to-age does
(`agekey`); `.sops.yaml` of the flake gets the recipient and the creation rule of the host's
secrets (`sopsfile`, which keeps comments and order); then `sops updatekeys` re-encrypts the
secret files whose governing rule now includes the host (or the exact commands are printed).
The next `invoke rebuild` makes the secrets available on the host.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rebuild import agekey, audit, identity, process, sopsfile
from rebuild.console import Console
from rebuild.errors import ConfigError, GateRefused, RebuildError, RemoteError
from rebuild.gates import host_key_gate, operator_gate
from rebuild.hostrun import endpoint_for
from rebuild.inventory import Loaded, Target, load
from rebuild.remote import Endpoint, Remote, known_host_keys

HOST_KEY_PATH = "/etc/ssh/ssh_host_ed25519_key.pub"
SOPS_CONFIG = ".sops.yaml"
SOPS_TIMEOUT = 120
MAX_SCAN_BYTES = 4 * 1024 * 1024
# what sops writes into every file it encrypts (YAML, JSON or binary, dotenv, INI)
_SOPS_MARKER = re.compile(r'(?m)^sops:|"sops"\s*:|^sops_mac=|^\[sops\]')


@dataclass(frozen=True)
class HostKey:
    """The host's ed25519 public key as read from the host, and what it converts to."""

    line: str
    fingerprint: str
    recipient: str


def read_host_key(endpoint: Endpoint) -> str:
    """The host's /etc/ssh/ssh_host_ed25519_key.pub, over a strictly verified connection."""
    with Remote(endpoint) as remote:
        result = remote.run(f"cat {HOST_KEY_PATH}", timeout=30, privileged=False)
    if not result.ok or not result.stdout.strip():
        why = (result.stderr or result.stdout).strip()[-300:] or f"exit {result.exited}"
        raise RemoteError(f"{endpoint.name}: cannot read {HOST_KEY_PATH}: {why}")
    return result.stdout.strip()


def check_against_known_hosts(endpoint: Endpoint, line: str) -> HostKey:
    """The key read from the host must be the ssh-ed25519 key known_hosts has for it."""
    name = endpoint.name
    try:
        keytype, blob = agekey.parse_public_key_line(line)
        if keytype != agekey.ED25519:
            raise agekey.KeyFormatError(f"it is a {keytype} key, not ssh-ed25519")
        fingerprint = agekey.fingerprint_sha256(line)
        recipient = agekey.ssh_ed25519_to_age_recipient(line)
    except agekey.KeyFormatError as exc:
        raise GateRefused(
            f"{name}: {HOST_KEY_PATH} is not a usable ssh-ed25519 key: {exc}"
        ) from None
    keys, _ = known_host_keys(endpoint.known_hosts)
    known = keys.lookup(endpoint.key_name)
    port = f"-p {endpoint.port} " if endpoint.port != 22 else ""
    scan = f"ssh-keyscan -t ed25519 {port}"
    if known is None or agekey.ED25519 not in known:
        raise GateRefused(
            f"{name}: {endpoint.known_hosts} has no ssh-ed25519 key for {endpoint.key_name}, so "
            f"the key the host shows ({fingerprint}) cannot be checked; verify it out of band "
            f"(provider console: ssh-keygen -lf {HOST_KEY_PATH}), then add it: "
            f"{scan}{endpoint.address} >> {endpoint.known_hosts}"
        )
    expected = known[agekey.ED25519]
    if expected.asbytes() != blob:
        known_line = f"{agekey.ED25519} {expected.get_base64()}"
        raise GateRefused(
            f"{name}: the host's {HOST_KEY_PATH} ({fingerprint}) is not the ssh-ed25519 key "
            f"known_hosts has for {endpoint.key_name} ({agekey.fingerprint_sha256(known_line)}); "
            "nothing was enrolled. Find out why (another sshd host key? a tampered file?) "
            "before trusting this host with secrets"
        )
    return HostKey(line=line, fingerprint=fingerprint, recipient=recipient)


def looks_encrypted(path: Path) -> bool:
    """A file sops encrypted (it carries sops metadata); plain files are not re-keyed."""
    try:
        with path.open("rb") as handle:
            head = handle.read(MAX_SCAN_BYTES)
    except OSError:
        return False
    return bool(_SOPS_MARKER.search(head.decode("utf-8", "replace")))


def secret_files(root: Path) -> list[str]:
    """sops-encrypted files below the flake (repo-relative, sorted); hidden folders skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in sorted(filenames):
            path = base / name
            if name == SOPS_CONFIG or path.is_symlink():
                continue
            if looks_encrypted(path):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def affected_files(text: str, rules: tuple[str, ...], files: list[str]) -> list[str]:
    """The files whose governing creation rule (the first that matches) includes the host."""
    governing = sopsfile.governing_rules(text, files)
    return [path for path, rule in governing.items() if rule is not None and rule in rules]


def updatekeys_commands(flake_dir: Path, files: list[str]) -> list[str]:
    return [
        f"(cd {shlex.quote(str(flake_dir))} && {shlex.join(sopsfile.sops_updatekeys_argv(f))})"
        for f in files
    ]


def run_sops(flake_dir: Path, files: list[str], console: Console) -> list[str]:
    """`sops updatekeys --yes FILE` for each file; returns the failures (one line each)."""
    failures: list[str] = []
    for path in files:
        argv = sopsfile.sops_updatekeys_argv(path)
        done = process.run(argv, cwd=str(flake_dir), timeout=SOPS_TIMEOUT)
        if done.ok:
            console.say(f"  {shlex.join(argv)}: ok")
        else:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
            failures.append(f"{path}: {tail or f'exit {done.returncode}'}")
            console.say(f"  {shlex.join(argv)}: FAILED ({tail or done.returncode})")
    return failures


def _record(loaded: Loaded, target: Target, started: float) -> audit.Record:
    me = identity.current()
    operator = identity.authorize(me, loaded.inventory.operators)
    return audit.Record(
        run_id=audit.new_run_id(),
        host=target.name,
        address=target.address,
        action="enroll",
        flake=loaded.flake,
        attr=target.attr,
        operator={
            "name": operator.name if operator else "",
            "hostname": me.hostname,
            "machine_id": me.machine_id,
        },
        event="enroll",
        duration_s=round(time.monotonic() - started, 3),
    )


def run(inventory: str | None, host: str, *, dry_run: bool = False) -> int:
    """`invoke enroll --host NAME`; returns the exit code."""
    started = time.monotonic()
    loaded = load(inventory)
    target = loaded.target(host)
    record = _record(loaded, target, started)
    console = Console()
    try:
        code = _enroll(loaded, target, record, console, dry_run=dry_run)
    except RebuildError as exc:
        record.result, record.exit_code, record.message = exc.result, exc.exit_code, str(exc)
        _append(loaded, record, started, console)
        raise
    if not dry_run:
        _append(loaded, record, started, console)
    return code


def _append(loaded: Loaded, record: audit.Record, started: float, console: Console) -> None:
    record.duration_s = round(time.monotonic() - started, 3)
    try:
        audit.append(loaded.audit_log, record)
    except OSError as exc:
        console.notice(f"warning: cannot write the audit record to {loaded.audit_log}: {exc}")


def _enroll(
    loaded: Loaded, target: Target, record: audit.Record, console: Console, *, dry_run: bool
) -> int:
    name = target.name
    flake_dir = loaded.flake_dir
    if flake_dir is None:
        raise ConfigError(
            f"{loaded.path}: flake is a URL ({loaded.flake}); enroll edits {SOPS_CONFIG} in a "
            "local checkout: point flake at it (a path), or pass --inventory of one"
        )
    audit.check_writable(loaded.audit_log)
    operator_gate(loaded, identity.current())
    endpoint = endpoint_for(loaded, target)
    host_key_gate([endpoint])
    key = check_against_known_hosts(endpoint, read_host_key(endpoint))
    console.say(
        f"{name}: host key {key.fingerprint} ({HOST_KEY_PATH}) matches {endpoint.known_hosts}"
    )
    console.say(f"{name}: age recipient {key.recipient}")
    record.extra.update(fingerprint=key.fingerprint, recipient=key.recipient)

    sops_path = flake_dir / SOPS_CONFIG
    try:
        text = sops_path.read_text(encoding="utf-8") if sops_path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {sops_path}: {exc}") from None
    regex = target.sops_path_regex
    try:
        result = sopsfile.enroll(text, name, key.recipient, regex)
    except sopsfile.SopsFileError as exc:
        raise ConfigError(f"{sops_path}: {exc}") from None
    files = affected_files(result.text, result.rules, secret_files(flake_dir))
    record.extra.update(previous_recipient=result.previous_recipient, sops_files=files)

    verb = "would be" if dry_run else "was"
    if result.previous_recipient is not None:
        console.say(
            f"{name}: the host key changed (a reinstalled host?): the old recipient "
            f"{result.previous_recipient} {verb} replaced by {key.recipient} everywhere in "
            f"{sops_path}"
        )
    if not result.changed:
        console.say(f"{sops_path}: unchanged ({name} is already in the rule for {regex!r})")
    elif not text:
        console.say(f"{sops_path}: {'would be created' if dry_run else 'created'} with {name}'s "
                    f"key and a creation rule for {regex!r}")  # fmt: skip
    else:
        console.say(f"{sops_path}: {name}'s key {verb} added "
                    f"(&{sopsfile.anchor_for_host(name)}) to the "
                    f"creation rule for {regex!r}; comments and order kept")  # fmt: skip
    if dry_run:
        if files:
            console.say("would re-encrypt for the host: " + ", ".join(files))
        console.say("--dry-run: nothing was written or run")
        record.result, record.exit_code = "ok", 0
        return 0
    if result.changed:
        _write(sops_path, result.text)

    commands = updatekeys_commands(flake_dir, files)
    if not files:
        console.say(
            f"no encrypted secret file is governed by the host's rule yet; create them with "
            f"`sops <file>` at paths matching {regex!r} (in {flake_dir})"
        )
    elif not result.changed:
        console.say("if these secrets were not re-encrypted for the host yet, run:")
        for command in commands:
            console.say(f"  {command}")
    elif shutil.which("sops") is None:
        console.say("sops is not on PATH; re-encrypt the host's secrets with:")
        for command in commands:
            console.say(f"  {command}")
    else:
        console.say(f"re-encrypting {len(files)} secret file(s) for {name} (sops updatekeys):")
        failures = run_sops(flake_dir, files, console)
        if failures:
            record.extra["sops_failures"] = failures
            raise ConfigError(
                f"sops updatekeys failed for {', '.join(f.split(':')[0] for f in failures)} "
                f"({failures[0]}); {SOPS_CONFIG} is updated; fix it (can this machine decrypt "
                "them?) and run the printed commands again"
            )
    console.say(
        f"next: commit {SOPS_CONFIG} and the secrets, then run `invoke rebuild --host {name}`"
    )
    if target.settings.verify.commands:
        checks = ", ".join(c.name for c in target.settings.verify.commands)
        console.say(f"      its verify.commands ({checks}) prove the secrets arrived")
    else:
        console.say(
            f"      add a check that proves the secrets arrived, e.g. [[hosts.{name}.verify."
            'commands]] name = "secrets decrypted", run = "test -s /run/secrets/<name>"'
        )
    record.result, record.exit_code = "ok", 0
    return 0


def _write(path: Path, text: str) -> None:
    """Replace the file atomically, keeping its mode."""
    tmp = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc}") from None
