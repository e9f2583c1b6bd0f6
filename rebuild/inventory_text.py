"""The text of inventory.toml as `invoke init` writes it and `invoke add-host` edits it (pure).

`render` writes a commented inventory: every key of the reference, optional ones commented out
with their default or an example, so that an operator sees what can be set without leaving the
file. `host_block` is one host's part of it (also what `add-host` appends). `fill_host` sets keys
inside an existing host table (the address `init` left to fill in), keeping every other line,
comment and the order. A host whose address is still to fill in carries a placeholder that the
inventory's own validation refuses, so nothing deploys it by mistake; `validate` checks a file
strictly but lets such hosts wait (they are reported, not hidden).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rebuild import inventory
from rebuild.errors import ConfigError
from rebuild.identity import Identity

PENDING_PREFIX = "FILL IN:"
# RFC 5737 TEST-NET-1: stands in for addresses still to fill in, only while validating the rest.
STAND_IN_ADDRESS = "192.0.2.1"
COMMENT_COLUMN = 40


@dataclass(frozen=True)
class KeyDoc:
    """One key as the generated file shows it: a TOML value (default or example), a comment."""

    key: str
    value: str
    comment: str


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII stays as it is)."""
    return json.dumps(value, ensure_ascii=False)


_ADDRESS_COMMENT = "IP address or DNS name"
TOP_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("flake", '"."', "the NixOS flake: a path relative to this file, or a flake URL"),
    KeyDoc("known_hosts", '"known_hosts"',
           "host keys are checked strictly against this file only; default ~/.ssh/known_hosts"),
    KeyDoc("audit_log", '"~/.local/state/rebuild/audit.jsonl"',
           "the audit trail; default $XDG_STATE_HOME/rebuild/audit.jsonl"),
    KeyDoc("nixos_rebuild", '"nixos-rebuild"',
           "the nixos-rebuild program ($REBUILD_NIXOS_REBUILD overrides it)"),
    KeyDoc("nixos_rebuild_flavour", '"ng"',
           'nixos-rebuild-ng (NixOS 25.11+), or "classic" (the bash one, 25.05 and older)'),
    KeyDoc("nix", '"nix"', "the nix program ($REBUILD_NIX overrides it)"),
    KeyDoc("connect_timeout", "10", "seconds to reach a host over SSH"),
    KeyDoc("lock_stale_after", "3600", "seconds after which --break-lock may break a host lock"),
    KeyDoc("confirm_count_above", "3",
           "above this many hosts (and with --all) the prompt wants the host count typed"),
)  # fmt: skip
TOP_TABLES = ("operators", "hooks", "defaults", "hosts")
HOOK_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("on", '["rolled_back", "verify_failed", "error"]',
           "the audit results that run it; default: every result"),
    KeyDoc("run", '"curl -fsS -d @- https://chat.example/hook"',
           "sh -c on this machine; the host's audit record on stdin"),
)  # fmt: skip

OPERATOR_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("name", '"work-laptop"', "who this is, in the audit and the host lock"),
    KeyDoc("machine_id", '"0123456789abcdef0123456789abcdef"', "/etc/machine-id of that machine"),
    KeyDoc("hostname", '"laptop"', "optional: its short hostname must match too"),
)

# Every key of a host, in the order the file shows them ("NAME" is the host's name).
HOST_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("address", '"203.0.113.10"', _ADDRESS_COMMENT),
    KeyDoc("port", "22", "SSH port"),
    KeyDoc("user", '"root"', "SSH user: root, or a user with sudo = true"),
    KeyDoc("attr", '"NAME"', "nixosConfigurations.<attr>; default: the host's name"),
    KeyDoc("identity_file", '"~/.ssh/id_ed25519"',
           "SSH private key; default: the ssh-agent and ~/.ssh's keys"),
    KeyDoc("sudo", "false", "activate through sudo (password: invoke secret set --host NAME)"),
    KeyDoc("build_host", '""',
           'build here (""), on the host ("target"), or "user@builder[:port]"'),
    KeyDoc("action", '"switch"', "the default action: switch, boot, test, dry-activate, build"),
    KeyDoc("tags", '["prod"]', "labels for invoke rebuild --tag TAG; default: none"),
    KeyDoc("reboot_timeout", "300", "with --reboot: seconds the host may take to come back"),
    KeyDoc("rollback_timeout", "90",
           "dead-man timer in seconds (longer than verify.settle_timeout); 0: off"),
    KeyDoc("extra_args", '["--show-trace"]', "appended to nixos-rebuild's command; default: none"),
    KeyDoc("use_substitutes", "true", "the host fetches what it can from binary caches"),
    KeyDoc("image_variant", '"linode"', "invoke image: nixos-rebuild build-image --image-variant"),
    KeyDoc("image_output", '"packages.x86_64-linux.NAME-image"',
           "invoke image builds this flake output instead"),
    KeyDoc("sops_path_regex", "'secrets/NAME/[^/]+\\.(yaml|json|env|ini)$'",
           "invoke enroll: the host's secret files (this is the default)"),
)  # fmt: skip
HOST_ONLY = ("attr", "image_output", "sops_path_regex")  # not in [defaults]
VERIFY_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("units", '["sshd.service"]', "units that must be active; default: none"),
    KeyDoc("ports", "[22]", "TCP ports that must listen; default: none"),
    KeyDoc("settle_timeout", "60", "seconds the checks may retry while the system settles"),
    KeyDoc("command_timeout", "30", "seconds each command check may run"),
)
HTTP_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("url", '"http://127.0.0.1/"', "fetched with curl on the host itself"),
    KeyDoc("status", "200", "the status it must answer with"),
)
COMMAND_KEYS: tuple[KeyDoc, ...] = (
    KeyDoc("name", '"secrets decrypted"', "the check's name in the report"),
    KeyDoc("run", '"test -s /run/secrets/example"', "POSIX sh on the host; exit 0 passes"),
)
VERIFY_TABLES = ("http", "commands")


@dataclass(frozen=True)
class NewHost:
    """A host block to write; None means the key is left commented (its default applies), an
    address of None is the placeholder that fails validation until it is filled in."""

    name: str
    address: str | None = None
    port: int | None = None
    user: str | None = None
    attr: str | None = None
    identity_file: str | None = None

    def given(self) -> dict[str, str]:
        """The keys this host sets, as TOML values."""
        values: dict[str, str] = {}
        if self.address is not None:
            values["address"] = toml_string(self.address)
        if self.port is not None:
            values["port"] = str(self.port)
        for key in ("user", "attr", "identity_file"):
            value = getattr(self, key)
            if value is not None:
                values[key] = toml_string(value)
        return values


def placeholder(name: str) -> str:
    """The address `init` writes when none is given: the error it causes says what to do."""
    return f"{PENDING_PREFIX} invoke add-host --host {name} --address ADDR"


def is_pending(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PENDING_PREFIX)


def _line(key: str, value: str, comment: str, *, commented: bool, indent: str = "") -> str:
    head = f"{indent}{'# ' if commented else ''}{key} = {value}"
    if not comment:
        return head
    return f"{head.ljust(COMMENT_COLUMN - 1)} # {comment}"


def _keys(docs: Sequence[KeyDoc], name: str, *, given: Mapping[str, str] | None = None,
          skip: Sequence[str] = ()) -> list[str]:  # fmt: skip
    given = given or {}
    lines = []
    for doc in docs:
        if doc.key in skip:
            continue
        value = given.get(doc.key, doc.value.replace("NAME", name))
        lines.append(_line(doc.key, value, doc.comment.replace("NAME", name),
                           commented=doc.key not in given))  # fmt: skip
    return lines


def _verify_section(prefix: str) -> list[str]:
    """The commented `[<prefix>.verify]` tables: every verification key, with examples."""
    header = f"# [{prefix}.verify]"
    return [
        f"{header.ljust(COMMENT_COLUMN - 1)} # what verification checks after a switch or test",
        *_keys(VERIFY_KEYS, "", skip=()),
        f"# [[{prefix}.verify.http]]".ljust(COMMENT_COLUMN - 1) + " # a URL fetched on the host",
        *_keys(HTTP_KEYS, ""),
        f"# [[{prefix}.verify.commands]]".ljust(COMMENT_COLUMN - 1)
        + " # your own check, run on the host",
        *_keys(COMMAND_KEYS, ""),
    ]


def host_block(host: NewHost) -> str:
    """One host's tables: its keys (those given set, the others commented), then its commented
    verification tables."""
    name = host.name
    given = host.given()
    if host.address is None:
        given["address"] = toml_string(placeholder(name))
    lines = [f"# nixosConfigurations.{host.attr or name}", f"[hosts.{name}]"]
    for doc in HOST_KEYS:
        comment = doc.comment
        if doc.key == "address" and host.address is None:
            comment = "required: fill in (add-host pins its key too)"
        value = given.get(doc.key, doc.value.replace("NAME", name))
        lines.append(_line(doc.key, value, comment.replace("NAME", name),
                           commented=doc.key not in given))  # fmt: skip
    lines += ["", *_verify_section(f"hosts.{name}")]
    return "\n".join(lines) + "\n"


def operator_block(me: Identity, name: str) -> str:
    """This machine's `[[operators]]` entry (`rebuild.identity`'s lines), or a commented example
    when the machine's identity cannot be written (no /etc/machine-id)."""
    intro = [
        "# The operator allowlist: only these machines may deploy; empty means nobody may.",
        "# `invoke operator --name NAME` prints the lines for another machine.",
    ]
    lines = _operator_lines(me, name)
    if lines is None:
        intro.append(
            "# This machine's /etc/machine-id could not be read: add its entry once it has one."
        )
        lines = [_line(d.key, d.value, d.comment, commented=True) for d in OPERATOR_KEYS]
        return "\n".join([*intro, "# [[operators]]", *lines]) + "\n"
    intro.append("# This machine (its /etc/machine-id and hostname):")
    return "\n".join([*intro, *lines]) + "\n"


def _operator_lines(me: Identity, name: str) -> list[str] | None:
    try:
        inventory.Operator(name=name, machine_id=me.machine_id, hostname=me.hostname)
        return me.operator_lines(name).splitlines()
    except ValidationError:
        pass
    try:
        inventory.Operator(name=name, machine_id=me.machine_id)
    except ValidationError:
        return None
    return me.operator_lines(name).splitlines()[:3]


def render(*, flake: str, me: Identity, operator: str, hosts: Sequence[NewHost],
           configurations: Sequence[str]) -> str:  # fmt: skip
    """The whole commented inventory `invoke init` writes."""
    top = {"flake": toml_string(flake), "known_hosts": '"known_hosts"'}
    shown = ", ".join(configurations) or "none"
    parts = [
        "# rebuild's inventory: which hosts exist, who may deploy them, and how to check them.\n"
        "# Written by `invoke init`. Every key is documented in docs/reference/index.md; an\n"
        "# unknown key is an error. Optional keys are commented out with their default or an\n"
        "# example: uncomment what you need. Review this file and commit it: rebuild takes its\n"
        "# safety settings (who may deploy, host keys, checks) from the committed file only.\n"
        f"# The flake's nixosConfigurations: {shown}.\n",
        "\n".join(_keys(TOP_KEYS, "", given=top)) + "\n",
        operator_block(me, operator),
        "# Your own commands, run on this machine after each host's deploy.\n"
        + "# [[hooks]]\n"
        + "\n".join(_keys(HOOK_KEYS, ""))
        + "\n",
        "# Keys applied to every host that does not set them itself (any host key but "
        + ", ".join(HOST_ONLY)
        + ").\n[defaults]\n"
        + "\n".join(_keys(HOST_KEYS, "NAME", skip=HOST_ONLY))
        + "\n\n"
        + "\n".join(_verify_section("defaults"))
        + "\n",
    ]
    if not hosts:
        parts.append("# No host yet: add one with `invoke add-host --host NAME --address ADDR`.\n")
    parts += [host_block(host) for host in hosts]
    return "\n".join(parts)


# --- editing an existing file ------------------------------------------------------------------


def append_host(text: str, block: str) -> str:
    """The file with a host block appended after one blank line; nothing before it changes."""
    if not text:
        return block
    if text.endswith("\n\n"):
        return text + block
    return text + ("\n" if text.endswith("\n") else "\n\n") + block


def _header_re(name: str) -> re.Pattern[str]:
    quoted = re.escape(name)
    return re.compile(
        rf"""^[ \t]*\[[ \t]*hosts[ \t]*\.[ \t]*(?:{quoted}|"{quoted}"|'{quoted}')[ \t]*\]"""
        r"[ \t]*(?:#.*)?$"
    )


_TABLE_RE = re.compile(r"^[ \t]*\[")
_PENDING_LINE = re.compile(
    rf'^[ \t]*address[ \t]*=[ \t]*"{re.escape(PENDING_PREFIX)}[^"\n]*"[ \t]*(#.*)?\r?\n?$'
)
_VALUE = r"""("(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s#]+)"""


def _set_value(line: str, key: str, value: str) -> str | None:
    """`key = old  # c` with the new value; the comment keeps its column when it can."""
    match = re.match(rf"^([ \t]*{re.escape(key)}[ \t]*=[ \t]*){_VALUE}([ \t]*)(#.*)?(\r?\n)?$",
                     line)  # fmt: skip
    if match is None:
        return None
    head, old, gap, comment, end = match.groups()
    if comment:
        width = len(head) + len(old) + len(gap)
        gap = " " * max(1, width - len(head) - len(value))
    return f"{head}{value}{gap if comment else ''}{comment or ''}{end or ''}"


def _uncomment(line: str, key: str, value: str) -> str | None:
    """`# key = example  # c` becomes `key = value  # c`."""
    match = re.match(rf"^([ \t]*)#[ \t]*{re.escape(key)}[ \t]*=[ \t]*{_VALUE}([ \t]*)(#.*)?"
                     r"(\r?\n)?$", line)  # fmt: skip
    if match is None:
        return None
    indent, _old, _gap, comment, end = match.groups()
    head = f"{indent}{key} = {value}"
    if comment:
        head = f"{head.ljust(COMMENT_COLUMN - 1)} {comment}"
    return head + (end or "\n")


def fill_host(text: str, name: str, values: Mapping[str, str]) -> str | None:
    """Set keys (TOML values) in the `[hosts.NAME]` table, keeping every other line: a key that
    is set gets the new value, a commented one is uncommented, a missing one is added after the
    header. None when the file has no such table header (the caller then appends a block)."""
    lines = text.splitlines(keepends=True)
    header = _header_re(name)
    start = next((i for i, line in enumerate(lines) if header.match(line.rstrip("\r\n"))), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if _TABLE_RE.match(lines[i])), len(lines))
    for key, value in values.items():
        body = range(start + 1, end)
        done = False
        for i in body:
            if key == "address" and _PENDING_LINE.match(lines[i]):
                # the line init wrote: the whole line, as it writes a given address
                end_of_line = "\r\n" if lines[i].endswith("\r\n") else "\n"
                lines[i] = _line(key, value, _ADDRESS_COMMENT, commented=False) + end_of_line
                done = True
                break
            new = _set_value(lines[i], key, value)
            if new is not None:
                lines[i] = new
                done = True
                break
        if done:
            continue
        for i in body:
            new = _uncomment(lines[i], key, value)
            if new is not None:
                lines[i] = new
                done = True
                break
        if not done:
            if not lines[start].endswith("\n"):
                lines[start] += "\n"
            lines.insert(start + 1, f"{key} = {value}\n")
            end += 1
    return "".join(lines)


# --- validation --------------------------------------------------------------------------------


def load_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def pending_hosts(data: Mapping[str, Any]) -> tuple[str, ...]:
    """Hosts whose address is still the placeholder `init` wrote."""
    hosts = data.get("hosts")
    if not isinstance(hosts, dict):
        return ()
    return tuple(
        name for name, host in hosts.items()
        if isinstance(host, dict) and is_pending(host.get("address"))
    )  # fmt: skip


def validate(path: Path, text: str) -> tuple[inventory.Inventory, tuple[str, ...]]:
    """Validate inventory text with the strict model. Hosts whose address is still to fill in
    are validated with a stand-in address and returned as pending; any other problem is a
    ConfigError naming the file and key path, as `rebuild.inventory.parse` reports it."""
    data = load_toml(path, text)
    pending = pending_hosts(data)
    if not pending:
        return inventory.parse(path, text), ()
    hosts = {
        name: ({**host, "address": STAND_IN_ADDRESS} if name in pending else host)
        for name, host in data["hosts"].items()
    }
    try:
        return inventory.Inventory(**{**data, "hosts": hosts}), pending
    except ValidationError as exc:
        raise ConfigError(inventory.format_validation_error(path, exc)) from None


# --- inputs ------------------------------------------------------------------------------------


def check_value(adapter: TypeAdapter[Any], value: object, flag: str) -> Any:
    """Validate one flag's value with the inventory's own type; a one-line ConfigError."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        shown = f" (got {value!r})" if repr(value) not in msg else ""
        raise ConfigError(f"{flag}: {msg}{shown}") from None


NAME = TypeAdapter(inventory.Name)
ADDRESS = TypeAdapter(inventory.Address)
PORT = TypeAdapter(inventory.Port)
USER = TypeAdapter(inventory.User)
ATTR = TypeAdapter(inventory.Attr)
SAFE_PATH = TypeAdapter(inventory.SafePath)
FLAKE = TypeAdapter(inventory.Inventory.model_fields["flake"].rebuild_annotation())


def parse_host_arg(value: str) -> tuple[str, str]:
    """`--host NAME=ADDRESS` of `invoke init`, both parts validated as the inventory does."""
    name, sep, address = value.partition("=")
    if not sep or not name or not address:
        raise ConfigError(f"--host {value!r}: want NAME=ADDRESS (e.g. --host vps=203.0.113.10)")
    return (
        check_value(NAME, name.strip(), f"--host {value}: NAME"),
        check_value(ADDRESS, address.strip(), f"--host {value}: ADDRESS"),
    )
