"""What the Invoke tasks call: each function returns an exit code or raises RebuildError."""

from __future__ import annotations

from rebuild import audit, deploy, identity
from rebuild.console import Console
from rebuild.errors import ConfigError
from rebuild.inventory import ACTIONS, Loaded, load


def loaded_inventory(path: str | None) -> Loaded:
    return load(path)


def check_action(action: str | None) -> None:
    if action is not None and action not in ACTIONS:
        raise ConfigError(f"unknown --action {action!r}; use one of: {', '.join(ACTIONS)}")


def rebuild(inventory: str | None, hosts: list[str], tags: list[str], opts: deploy.Options) -> int:
    check_action(opts.action)
    if opts.batch is not None and opts.batch < 1:
        raise ConfigError("--batch must be 1 or more")
    if opts.jobs < 1:
        raise ConfigError("--jobs must be 1 or more")
    if opts.max_fail < 0:
        raise ConfigError("--max-fail must be 0 or more")
    loaded = load(inventory)
    targets = loaded.select(hosts, tags, opts.every)
    console = Console(json_mode=opts.json)
    return deploy.rebuild(loaded, targets, opts, console)


def verify(inventory: str | None, host: str, json_mode: bool) -> int:
    loaded = load(inventory)
    target = loaded.target(host)
    return deploy.verify_only(loaded, target, Console(json_mode=json_mode), json_mode=json_mode)


def hosts(inventory: str | None) -> int:
    loaded = load(inventory)
    rows = [("host", "address", "user", "action", "attr", "tags")]
    for t in loaded.targets():
        s = t.settings
        rows.append((t.name, f"{s.address}:{s.port}", s.user, s.action, t.attr,
                     ",".join(s.tags) or "-"))  # fmt: skip
    Console().table(rows)
    return 0


def operator(inventory: str | None, name: str | None) -> int:
    console = Console()
    me = identity.current()
    console.say(f"hostname:   {me.hostname}")
    console.say(f"machine-id: {me.machine_id or '(unreadable: /etc/machine-id is missing)'}")
    authorized = None
    try:
        loaded = load(inventory)
        authorized = identity.authorize(me, loaded.inventory.operators)
    except ConfigError:
        loaded = None
    if authorized is not None:
        where = loaded.path if loaded else ""
        console.say(f"authorized: yes, as operator {authorized.name!r} in {where}")
    else:
        where = loaded.path if loaded else "inventory.toml"
        console.say(f"authorized: no; add these lines to {where} (reviewed and committed):")
    console.say()
    console.say(me.operator_lines(name or me.hostname).removesuffix("\n"))
    return 0


def history(inventory: str | None, host: str | None, json_mode: bool, limit: int) -> int:
    loaded = load(inventory)
    if host is not None:
        loaded.target(host)
    records, skipped = audit.read(loaded.audit_log, host)
    if limit > 0:
        records = records[-limit:]
    console = Console(json_mode=json_mode)
    if skipped:
        console.notice(f"warning: {loaded.audit_log}: {skipped} unreadable line(s) skipped")
    if json_mode:
        for record in records:
            console.json(record)
        return 0
    if not records:
        console.say(f"no audit records in {loaded.audit_log}")
        return 0
    for line in audit.iter_summary(records):
        console.say(line)
    return 0


def status(inventory: str | None, hosts: list[str], tags: list[str], every: bool,
           json_mode: bool) -> int:  # fmt: skip
    """`invoke status`: no selection means every host."""
    from rebuild import status as fleet_status

    loaded = load(inventory)
    targets = loaded.select(hosts, tags, every or not (hosts or tags))
    return fleet_status.run(loaded, targets, Console(json_mode=json_mode), json_mode=json_mode)
