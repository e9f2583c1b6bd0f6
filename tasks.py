"""rebuild's Invoke tasks: parse flags, call the library, map its errors to exit codes.

Imports of the library happen inside the tasks so that `invoke --list` stays fast.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

INVENTORY_HELP = "inventory file (default: $REBUILD_INVENTORY, else ./inventory.toml)"
HOST_HELP = "host name from the inventory"


def _bash() -> None:
    """Invoke defaults to /bin/bash, which NixOS lacks; use whatever bash is on PATH."""
    os.environ.setdefault("INVOKE_RUN_SHELL", shutil.which("bash") or "/bin/sh")


def _usage_errors_exit_2() -> None:
    """Invoke exits 1 on an unknown flag or task, and shows a traceback for a flag value that
    is not a number; rebuild's contract says bad usage is one line and exit 2. This module is
    imported before Invoke parses the task flags, so wrapping that step here covers it."""
    from invoke.exceptions import ParseError
    from invoke.program import Program

    original = Program.parse_tasks
    if getattr(original, "rebuild_wrapped", False):
        return

    def parse_tasks(self: Program) -> None:
        try:
            original(self)
        except ParseError as exc:
            raise Exit(f"error: {exc} (see `invoke --list`, `invoke --help TASK`)", 2) from None
        except ValueError as exc:
            raise Exit(f"error: bad flag value: {exc} (see `invoke --help TASK`)", code=2) from None

    parse_tasks.rebuild_wrapped = True  # type: ignore[attr-defined]
    Program.parse_tasks = parse_tasks  # type: ignore[method-assign]


_usage_errors_exit_2()


def _leave_without_teardown() -> None:
    """Once every task has run, end the process at once: the interpreter's own teardown (freeing
    some 400 modules' objects one by one) costs each command about 50 ms and does nothing a
    finished command needs. Output is flushed and logging shut down first; every task has
    joined its threads and written its audit record by then (tasks never leave work behind)."""
    import contextlib
    import logging
    import sys

    from invoke.program import Program

    original = Program.execute
    if getattr(original, "rebuild_wrapped", False):
        return

    def execute(self: Program) -> None:
        code = 0
        try:
            original(self)
        except Exit as exc:
            if exc.message:
                print(exc.message, file=sys.stderr)
            code = exc.code
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)

    execute.rebuild_wrapped = True  # type: ignore[attr-defined]
    Program.execute = execute  # type: ignore[method-assign]


_leave_without_teardown()


def _ctrl_c_interrupts() -> None:
    """An operator's Ctrl-C must stop rebuild at every moment. A program started with SIGINT
    ignored (a background job of a non-interactive shell: CI runners, scripts with `&`) keeps
    it ignored, and Python then installs no KeyboardInterrupt handler: Ctrl-C and `kill -INT`
    would be lost and the deploy would go on. rebuild takes SIGINT back before any task runs."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_ctrl_c_interrupts()


def _need(host: str) -> None:
    """Tasks about one host require --host (Invoke would otherwise take it positionally)."""
    if not host:
        raise Exit("error: --host NAME is required (see `invoke hosts`)", code=2)


def _guard(json_mode: bool, body: Callable[[], int]) -> None:
    """Run a task body: errors become one line and an exit code, never a traceback."""
    _bash()
    from rebuild import logs
    from rebuild.errors import Declined, RebuildError

    logs.configure(json_output=json_mode)
    try:
        code = body()
    except RebuildError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise Exit("error: aborted (Ctrl-C)", code=Declined.exit_code) from None
    except Exception as exc:
        raise Exit(
            f"error: internal error ({type(exc).__name__}: {exc}); please report it", code=1
        ) from None
    if code:
        raise Exit(code=code)


@task(
    iterable=["host", "tag"],
    auto_shortflags=False,
    help={
        "host": HOST_HELP + " (repeatable)",
        "tag": "every host with this tag (repeatable; union with --host)",
        "all": "every host of the inventory (you type the host count to confirm)",
        "action": "switch|boot|test|dry-activate|build (default: the host's action, else switch)",
        "yes": "do not ask for confirmation (for automation)",
        "dry_run": "run the gates and show the plan; change nothing anywhere",
        "allow_dirty": "deploy from an uncommitted tree (recorded in the audit)",
        "no_verify": "skip verification after activation",
        "no_rollback": "never roll back: no dead-man timer, failed hosts stay on the new system",
        "json": "print one JSON object per host on stdout (logs as JSON on stderr)",
        "batch": "hosts per batch (default: all at once)",
        "canary": "deploy the first host alone, then the rest",
        "max_fail": "stop after a batch that brings the failures past K (default 0)",
        "jobs": "hosts deployed in parallel within a batch (default 8)",
        "break_lock": "break a stale host lock (recorded in the audit)",
        "no_preview": "do not build ahead and show what will change (one nixos-rebuild call)",
        "reboot": "after a verified activation, reboot when the new system needs it (kernel, "
        "initrd, modules; with --action boot always), wait for it, verify again",
        "inventory": INVENTORY_HELP,
    },
)
def rebuild(
    c: Context,
    host: list[str],
    tag: list[str],
    all: bool = False,
    action: str | None = None,
    yes: bool = False,
    dry_run: bool = False,
    allow_dirty: bool = False,
    no_verify: bool = False,
    no_rollback: bool = False,
    json: bool = False,
    batch: int = 0,
    canary: bool = False,
    max_fail: int = 0,
    jobs: int = 8,
    break_lock: bool = False,
    no_preview: bool = False,
    reboot: bool = False,
    inventory: str | None = None,
) -> None:
    """Deploy hosts: gates, build, preview, plan, confirmation, nixos-rebuild, verification,
    rollback, audit.

    Example: invoke rebuild --host vps
    """
    from rebuild import cli, deploy

    opts = deploy.Options(
        action=action, yes=yes, dry_run=dry_run, allow_dirty=allow_dirty, verify=not no_verify,
        rollback=not no_rollback, json=json, batch=batch or None, canary=canary,
        max_fail=max_fail, jobs=jobs, break_lock=break_lock, every=all, preview=not no_preview,
        reboot=reboot,
    )  # fmt: skip
    _guard(json, lambda: cli.rebuild(inventory, host, tag, opts))


@task(
    auto_shortflags=False,
    help={"host": HOST_HELP, "json": "print one JSON object", "inventory": INVENTORY_HELP},
)
def verify(c: Context, host: str = "", json: bool = False, inventory: str | None = None) -> None:
    """Verify a running host: expected system (from HEAD), units, ports, URLs, commands.

    Example: invoke verify --host vps
    """
    from rebuild import cli

    _need(host)
    _guard(json, lambda: cli.verify(inventory, host, json))


@task(
    auto_shortflags=False,
    help={
        "host": HOST_HELP,
        "yes": "do not ask for confirmation",
        "dry_run": "gates and plan only",
        "allow_dirty": "allow an uncommitted tree (recorded in the audit)",
        "no_verify": "skip verification afterwards",
        "json": "print one JSON object on stdout",
        "break_lock": "break a stale host lock (recorded in the audit)",
        "inventory": INVENTORY_HELP,
    },
)
def rollback(
    c: Context,
    host: str = "",
    yes: bool = False,
    dry_run: bool = False,
    allow_dirty: bool = False,
    no_verify: bool = False,
    json: bool = False,
    break_lock: bool = False,
    inventory: str | None = None,
) -> None:
    """Return a host to its previous generation (nixos-rebuild switch --rollback), with gates.

    Example: invoke rollback --host vps
    """
    from rebuild import cli, deploy

    opts = deploy.Options(
        action="switch", yes=yes, dry_run=dry_run, allow_dirty=allow_dirty,
        verify=not no_verify, rollback=False, json=json, break_lock=break_lock,
        rollback_generation=True,
    )  # fmt: skip
    _need(host)
    _guard(json, lambda: cli.rebuild(inventory, [host], [], opts))


@task
def demo(c: Context) -> None:
    """Run the end-to-end demonstration against a throwaway simulated NixOS host.

    Example: invoke demo
    """
    from testbed import demo as demo_module  # the test bed, not the installed tool

    _guard(False, demo_module.run)


@task(auto_shortflags=False, help={"inventory": INVENTORY_HELP})
def hosts(c: Context, inventory: str | None = None) -> None:
    """List the inventory, one host a line (name, address, user, action, attr, tags).

    Example: invoke hosts
    """
    from rebuild import cli

    _guard(False, lambda: cli.hosts(inventory))


@task(
    auto_shortflags=False,
    help={"name": "operator name for the printed lines (default: hostname)",
          "inventory": INVENTORY_HELP},
)  # fmt: skip
def operator(c: Context, name: str | None = None, inventory: str | None = None) -> None:
    """Show this machine's identity and the [[operators]] lines that would authorize it.

    Example: invoke operator --name work-laptop
    """
    from rebuild import cli

    _guard(False, lambda: cli.operator(inventory, name))


@task(
    iterable=["host"],
    auto_shortflags=False,
    help={
        "host": HOST_HELP + " (repeatable)",
        "all": "a wrapper for every host of the inventory",
        "check": "write nothing; exit 1 naming every wrapper that is missing or stale "
                 "(default: every host; for CI)",
        "inventory": INVENTORY_HELP,
    },
)  # fmt: skip
def wrapper(
    c: Context, host: list[str], all: bool = False, check: bool = False,
    inventory: str | None = None,
) -> None:  # fmt: skip
    """Write scripts/rebuild-NAME.sh, the host's deploy script, generated from the inventory.

    Example: invoke wrapper --host vps
    """
    from pathlib import Path

    from rebuild import wrapper as wrappers

    root = Path(__file__).resolve().parent
    _guard(False, lambda: wrappers.run(inventory, host, every=all, check=check, root=root))


@task(
    auto_shortflags=False,
    help={"host": "only this host", "json": "JSON lines", "limit": "last N records (0: all)",
          "inventory": INVENTORY_HELP},
)  # fmt: skip
def history(
    c: Context, host: str | None = None, json: bool = False, limit: int = 0,
    inventory: str | None = None,
) -> None:  # fmt: skip
    """Show the audit trail, oldest first.

    Example: invoke history --host vps --json
    """
    from rebuild import cli

    _guard(json, lambda: cli.history(inventory, host, json, limit))


@task(
    auto_shortflags=False,
    help={
        "host": HOST_HELP,
        "allow_dirty": "build from an uncommitted tree (recorded in the audit)",
        "json": "print one JSON object (path, size, sha256, commit, ...) on stdout",
        "inventory": INVENTORY_HELP,
    },
)
def image(
    c: Context, host: str = "", allow_dirty: bool = False, json: bool = False,
    inventory: str | None = None,
) -> None:  # fmt: skip
    """Build the host's disk image (nixos-rebuild build-image); print path, size and sha256.

    Example: invoke image --host vps
    """
    from rebuild import image as images

    _need(host)
    _guard(json, lambda: images.run(inventory, host, allow_dirty=allow_dirty, json_mode=json))


@task(
    positional=["op"],
    auto_shortflags=False,
    help={
        "op": "set (store or replace the password) or clear (remove it)",
        "host": HOST_HELP,
        "stdin": "set: read the password from one line of standard input instead of asking "
                 "on the terminal (for automation)",
        "inventory": INVENTORY_HELP,
    },
)  # fmt: skip
def secret(
    c: Context, op: str, host: str = "", stdin: bool = False, inventory: str | None = None,
) -> None:  # fmt: skip
    """Keep a host's sudo password in the OS keyring (service rebuild), or remove it.

    set asks twice without echo; rebuild then answers the host's sudo itself, never putting
    the password in an argv, environment, log or audit record.

    Example: invoke secret set --host vps
    """
    if op in ("-h", "--help"):  # Invoke hands `secret --help` to the positional argument
        print(
            "Usage: invoke secret set|clear --host NAME [--stdin] [--inventory PATH]\n\n"
            "Keep a host's sudo password in the OS keyring (service rebuild), or remove it.\n"
            "set asks twice without echo; --stdin reads one line instead (for automation).\n"
            "Example: invoke secret set --host vps"
        )
        return
    from rebuild import sudo_keyring

    _guard(False, lambda: sudo_keyring.run(inventory, op, host, from_stdin=stdin))


@task(
    auto_shortflags=False,
    help={
        "host": HOST_HELP,
        "dry_run": "show the host's recipient and what would change; write and run nothing",
        "inventory": INVENTORY_HELP,
    },
)
def enroll(c: Context, host: str = "", dry_run: bool = False, inventory: str | None = None) -> None:
    """Enroll a host for sops-nix: its age recipient (from its SSH host key) into .sops.yaml.

    Reads /etc/ssh/ssh_host_ed25519_key.pub over SSH (strict host keys), checks it against
    known_hosts, updates .sops.yaml, and runs `sops updatekeys` on the host's secrets.

    Example: invoke enroll --host vps
    """
    from rebuild import enroll as enrollment

    _need(host)
    _guard(False, lambda: enrollment.run(inventory, host, dry_run=dry_run))


@task(
    iterable=["host", "tag"],
    auto_shortflags=False,
    help={
        "host": HOST_HELP + " (repeatable)",
        "tag": "every host with this tag (repeatable; union with --host)",
        "all": "every host of the inventory (the default when no host or tag is given)",
        "json": 'print one JSON object {"hosts": [...]} on stdout',
        "inventory": INVENTORY_HELP,
    },
)
def status(
    c: Context, host: list[str], tag: list[str], all: bool = False, json: bool = False,
    inventory: str | None = None,
) -> None:  # fmt: skip
    """The fleet at a glance: per host, reachable, drift from HEAD, reboot needed, failed units
    and the last deploy (who, when, commit, result). Changes nothing.

    Exit 0 when every host is reachable, on HEAD and without failed units; 6 when one is
    not; 3 when a gate refused (audit log, allowlist, a host key unknown or changed); 5 when
    HEAD does not evaluate.

    Example: invoke status --tag prod
    """
    from rebuild import cli

    _guard(json, lambda: cli.status(inventory, host, tag, all, json))


@task(
    auto_shortflags=False,
    help={"json": "print a JSON list of {name, ok, detail, fix} on stdout",
          "inventory": INVENTORY_HELP},
)  # fmt: skip
def doctor(c: Context, json: bool = False, inventory: str | None = None) -> None:
    """Check this operator machine without touching any host: nixos-rebuild, nix with flakes,
    ssh, keyring, allowlist, known_hosts, identity files, state folder, the flake's tree.

    One line per check (ok, FAIL, warn) with the fix for each problem; exit 0 when nothing
    failed, 3 when something did.

    Example: invoke doctor
    """
    from rebuild import doctor as checks
    from rebuild.console import Console

    _guard(json, lambda: checks.run(inventory, Console(json_mode=json), json_mode=json))


@task(
    iterable=["host"],
    auto_shortflags=False,
    help={
        "host": "NAME=ADDRESS: include the flake's configuration NAME at this address "
                "(repeatable); without it a terminal asks which configurations to include",
        "yes": "include every configuration without asking (addresses not given by --host "
               "are left to fill in)",
        "flake": "the flake, as the inventory's flake key: a path relative to the inventory's "
                 "folder, or a flake URL (default: .)",
        "operator": "this machine's operator name in [[operators]] (default: its hostname)",
        "inventory": "the inventory file to create (default: $REBUILD_INVENTORY, else "
                     "./inventory.toml); an existing one is never overwritten",
    },
)  # fmt: skip
def init(
    c: Context, host: list[str], yes: bool = False, flake: str = ".",
    operator: str | None = None, inventory: str | None = None,
) -> None:  # fmt: skip
    """Write a commented inventory.toml from the flake's nixosConfigurations (never overwrites).

    One host table per configuration picked, this machine's [[operators]] entry, every other
    key commented out with its default. Next: `invoke add-host` for each host.

    Example: invoke init --host vps=203.0.113.10
    """
    from rebuild import onboarding

    opts = onboarding.InitOptions(hosts=tuple(host), yes=yes, flake=flake, operator=operator)
    _guard(False, lambda: onboarding.init(inventory, opts))


@task(
    auto_shortflags=False,
    help={
        "host": "the host's name in the inventory (a new one, or one init left to fill in)",
        "address": "its IP address or DNS name (required unless the inventory has it)",
        "port": "its SSH port (default: 22)",
        "user": "the SSH user (default: root)",
        "attr": "its nixosConfigurations attribute (default: the host's name)",
        "identity_file": "the SSH private key for it (default: the ssh-agent and ~/.ssh)",
        "fingerprint": "SHA256:... of its host key, checked out of band beforehand; pins the "
                       "matching key without asking (for automation)",
        "replace_key": "the host's key changed (a reinstalled host): replace the pinned key "
                       "once the new one is confirmed (recorded in the audit)",
        "inventory": INVENTORY_HELP,
    },
)  # fmt: skip
def add_host(
    c: Context, host: str = "", address: str | None = None, port: str | None = None,
    user: str | None = None, attr: str | None = None, identity_file: str | None = None,
    fingerprint: str | None = None, replace_key: bool = False, inventory: str | None = None,
) -> None:  # fmt: skip
    """Add a host: show its key fingerprints, pin the key after `yes` or a matching --fingerprint.

    Then add its table to the inventory (comments and order kept) and write its wrapper script
    scripts/rebuild-NAME.sh. A changed key needs --replace-key. Nothing is written when refused.

    Example: invoke add-host --host vps --address 203.0.113.10
    """
    from pathlib import Path

    from rebuild import onboarding

    _need(host)
    opts = onboarding.AddHostOptions(
        host=host, address=address, port=port, user=user, attr=attr,
        identity_file=identity_file, fingerprint=fingerprint, replace_key=replace_key,
    )  # fmt: skip
    root = Path(__file__).resolve().parent
    _guard(False, lambda: onboarding.add_host(inventory, opts, root=root))
