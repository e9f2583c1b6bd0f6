"""The inventory: frozen, strictly validated models and `load(path)`, the only place that reads it.

Every value that reaches an argv list, NIX_SSHOPTS or a remote shell is checked here, so an
address or a name that could carry shell syntax never gets further than validation.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from rebuild.errors import ConfigError
from rebuild.results import Result

DEFAULT_INVENTORY = "inventory.toml"
ENV_INVENTORY = "REBUILD_INVENTORY"
ENV_NIXOS_REBUILD = "REBUILD_NIXOS_REBUILD"
ENV_NIX = "REBUILD_NIX"
# The only REBUILD_* variables that may be set: which inventory, which programs. Every safety
# setting comes from the committed inventory, so that nothing changes one without a git diff.
ENV_ALLOWED = (ENV_INVENTORY, ENV_NIXOS_REBUILD, ENV_NIX)
# What rebuild itself sets for the operator's hooks (a hook may run rebuild again).
ENV_FOR_HOOKS = (
    "REBUILD_RUN_ID", "REBUILD_HOST", "REBUILD_RESULT", "REBUILD_EXIT_CODE", "REBUILD_COMMIT",
    "REBUILD_OPERATOR",
)  # fmt: skip

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]{0,127}$")
_OUTPUT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}$")
_UNIT_RE = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9:_.@\\-]{0,250}"
    r"\.(service|socket|target|timer|mount|automount|path|slice|scope|device|swap)$"
)
_PATH_RE = re.compile(r"^[^\s'\"\\;&|$`<>(){}*?!#]+$")
_MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_URL_RE = re.compile(r"^https?://[^\s'\"\\`]+$")
_EXTRA_ARG_RE = re.compile(r"^[^\x00-\x1f]+$")
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MAX_INVENTORY_BYTES = 1 << 20

ACTIONS = ("switch", "boot", "test", "dry-activate", "build")
Action = Literal["switch", "boot", "test", "dry-activate", "build"]


def _check(pattern: re.Pattern[str], what: str) -> Any:
    def validate(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"{value!r} is not a valid {what}")
        return value

    return AfterValidator(validate)


def _address(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
        scope = getattr(ip, "scope_id", None)
        if scope is not None and not _SCOPE_RE.match(scope):
            raise ValueError(
                f"{value!r}: an IPv6 scope id must be an interface name (letters, digits, "
                "'.', '_', '-')"
            )
    except ValueError as exc:
        if "scope id" in str(exc):
            raise
        if not _DNS_RE.match(value):
            raise ValueError(
                f"{value!r} is not an IP address or DNS name (letters, digits, '-', '.')"
            ) from None
    return value


def _no_bool(value: Any) -> Any:
    """A number must be written as one: TOML `true` or `"22"` is refused, not read as 1 or 22."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    if isinstance(value, str):
        raise ValueError("must be a number, not a string (drop the quotes)")
    return value


_LOCAL_NAMES = ("localhost", "localhost.localdomain", "127.0.0.1", "::1", "ip6-localhost")


def _build_host(value: str) -> str:
    """`""` (build here), `"target"`, or `user@host`, `user@host:port`, `user@[v6addr]:port`."""
    if value in ("", "target"):
        return value
    user, _, rest = value.rpartition("@")
    bad = f'{value!r} is not "", "target" or user@host[:port]'
    if not user or not _USER_RE.match(user) or not rest:
        raise ValueError(bad)
    port = ""
    if rest.startswith("["):
        host, close, port = rest[1:].partition("]")
        if not close or (port and not port.startswith(":")):
            raise ValueError(bad)
        port = port[1:]
        ipaddress.IPv6Address(host)
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host = rest
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(bad)
    _address(host)
    if host.lower().rstrip(".") in _LOCAL_NAMES or host.startswith("127."):
        raise ValueError(
            f"{value!r} names this machine: nixos-rebuild would ssh to it; "
            'use build_host = "" to build locally'
        )
    return value


Name = Annotated[str, _check(_NAME_RE, "name (letters, digits, '-', '_')")]
User = Annotated[str, _check(_USER_RE, "user name")]
Address = Annotated[str, AfterValidator(_address)]
Attr = Annotated[str, _check(_ATTR_RE, "flake attribute name")]
Unit = Annotated[str, _check(_UNIT_RE, "systemd unit name (e.g. sshd.service)")]
SafePath = Annotated[str, _check(_PATH_RE, "path (no spaces, quotes or shell characters)")]
Port = Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=65535)]
Seconds = Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=86400)]
Url = Annotated[str, _check(_URL_RE, "http(s) URL")]
ExtraArg = Annotated[str, _check(_EXTRA_ARG_RE, "argument (no control characters)")]

# nixos-rebuild flags that rebuild sets itself: in extra_args one would win over rebuild's own
# (nixos-rebuild takes the last value), so the gates, the evaluation, the lock and verification
# would cover one thing while another is deployed.
OWNED_FLAGS = (
    "--flake", "--target-host", "--build-host", "--sudo", "--use-remote-sudo",
    "--ask-sudo-password", "--elevate", "--ask-elevate-password", "-S", "--rollback",
    "--store-path", "--file", "-f", "--attr", "-A", "--no-reexec", "--fast", "--profile-name",
    "-p", "--specialisation", "-c", "--install-bootloader",
)  # fmt: skip


def _extra_args(args: tuple[str, ...]) -> tuple[str, ...]:
    for i, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise ValueError(
                f"{arg!r}: rebuild sets {flag} itself (the gates, evaluation and verification "
                "must cover what is deployed); remove it from extra_args"
            )
        if arg == "-I" and i + 1 < len(args) and args[i + 1].startswith("nixos-config="):
            raise ValueError("'-I nixos-config=...' redefines what is deployed; remove it")
        if arg.startswith("-Inixos-config=") or arg.startswith("nixos-config="):
            raise ValueError(f"{arg!r} redefines what is deployed; remove it from extra_args")
    return args


ExtraArgs = Annotated[tuple[ExtraArg, ...], AfterValidator(_extra_args)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Operator(_Strict):
    """One machine allowed to deploy."""

    name: Name
    machine_id: Annotated[str, _check(_MACHINE_ID_RE, "machine-id (32 lowercase hex digits)")]
    hostname: Annotated[str, AfterValidator(_address)] | None = None


class HttpCheck(_Strict):
    """A URL fetched on the host that must answer with `status`."""

    url: Url
    status: Annotated[int, BeforeValidator(_no_bool), Field(ge=100, le=599)] = 200


class CommandCheck(_Strict):
    """An operator-written POSIX sh command run on the host; exit 0 passes."""

    name: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[^\x00-\x1f]+$")]
    run: Annotated[str, Field(min_length=1, max_length=4096)]


def _result_name(value: str) -> str:
    names = [str(r) for r in Result]
    if value not in names:
        raise ValueError(f"{value!r} is not a result name (one of: {', '.join(names)})")
    return value


class Hook(_Strict):
    """`[[hooks]]`: the operator's own sh command, run locally (`sh -c`) after each host's run
    of `invoke rebuild` whose result is in `on` (omitted: every result)."""

    on: tuple[Annotated[str, AfterValidator(_result_name)], ...] | None = None
    run: Annotated[str, Field(min_length=1, max_length=4096)]


class VerifySpec(_Strict):
    """What verification checks on the host after a switch or test."""

    units: tuple[Unit, ...] = ()
    ports: tuple[Port, ...] = ()
    settle_timeout: Annotated[float, BeforeValidator(_no_bool), Field(ge=0, le=3600)] = 60
    command_timeout: Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=3600)] = 30
    http: tuple[HttpCheck, ...] = ()
    commands: tuple[CommandCheck, ...] = ()


class HostSettings(_Strict):
    """Every per-host key; also the shape of `[defaults]` (where every key is optional)."""

    address: Address
    port: Port = 22
    user: User = "root"
    attr: Attr | None = None
    identity_file: SafePath | None = None
    sudo: StrictBool = False
    build_host: Annotated[str, AfterValidator(_build_host)] = ""
    action: Action = "switch"
    tags: tuple[Name, ...] = ()
    rollback_timeout: Seconds = 90
    reboot_timeout: Seconds = 300
    extra_args: ExtraArgs = ()
    use_substitutes: StrictBool = True
    image_variant: Annotated[str, _check(_NAME_RE, "image variant")] = "linode"
    image_output: Annotated[str, _check(_OUTPUT_RE, "flake output path")] | None = None
    sops_path_regex: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    verify: VerifySpec = VerifySpec()

    @model_validator(mode="after")
    def _timer_outlasts_checks(self) -> HostSettings:
        if 0 < self.rollback_timeout <= self.verify.settle_timeout:
            raise ValueError(
                f"rollback_timeout ({self.rollback_timeout}) must be longer than "
                f"verify.settle_timeout ({self.verify.settle_timeout:g}), or the dead-man timer "
                "fires while checks still run; raise it or set 0 to turn the timer off"
            )
        return self


class Defaults(_Strict):
    """`[defaults]`: any host key, applied to every host that does not set it."""

    address: Address | None = None
    port: Port | None = None
    user: User | None = None
    identity_file: SafePath | None = None
    sudo: StrictBool | None = None
    build_host: Annotated[str, AfterValidator(_build_host)] | None = None
    action: Action | None = None
    tags: tuple[Name, ...] | None = None
    rollback_timeout: Seconds | None = None
    reboot_timeout: Seconds | None = None
    extra_args: ExtraArgs | None = None
    use_substitutes: StrictBool | None = None
    image_variant: Annotated[str, _check(_NAME_RE, "image variant")] | None = None
    verify: VerifySpec | None = None


def _default_audit_log() -> str:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "rebuild" / "audit.jsonl")


class Inventory(BaseModel):
    """The whole inventory file. Nothing in it can be set from the environment: an environment
    variable must not move a safety setting (the allowlist, known_hosts, a host, its checks)
    without a diff in git. (A plain model: pydantic-settings, with every source but this file
    turned off, did the same and cost each command 80 ms to import.)"""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    flake: Annotated[str, Field(min_length=1, pattern=r"^[^\s'\"\\;&|$`<>]+$")] = "."
    known_hosts: SafePath = "~/.ssh/known_hosts"
    audit_log: Annotated[str, Field(min_length=1)] = Field(default_factory=_default_audit_log)
    nixos_rebuild: SafePath = "nixos-rebuild"
    nixos_rebuild_flavour: Literal["ng", "classic"] = "ng"
    nix: SafePath = "nix"
    connect_timeout: Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=300)] = 10
    lock_stale_after: Annotated[int, BeforeValidator(_no_bool), Field(ge=60)] = 3600
    confirm_count_above: Annotated[int, BeforeValidator(_no_bool), Field(ge=1)] = 3
    operators: tuple[Operator, ...] = ()
    defaults: Defaults = Defaults()
    hosts: dict[Name, HostSettings] = Field(default_factory=dict)
    hooks: tuple[Hook, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = data.get("defaults")
        hosts = data.get("hosts")
        if isinstance(hosts, dict):
            seen: dict[str, str] = {}
            for name in hosts:
                twin = seen.setdefault(str(name).lower(), str(name))
                if twin != name:
                    raise ValueError(
                        f"hosts {twin!r} and {name!r} differ only in case; host names are "
                        "case-insensitive (DNS, ssh and known_hosts fold case): rename one"
                    )
        if not isinstance(defaults, dict) or not isinstance(hosts, dict):
            return data
        known = set(HostSettings.model_fields) & set(Defaults.model_fields)
        merged = {}
        inherited = {k: v for k, v in defaults.items() if k in known}
        for name, host in hosts.items():
            # deep: a host's [hosts.X.verify] ports keep the [defaults.verify] units
            merged[name] = _deep_merge(inherited, host) if isinstance(host, dict) else host
        return {**data, "hosts": merged}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Target:
    """One host of the inventory, with its name and the resolved flake attribute."""

    name: str
    settings: HostSettings

    @property
    def attr(self) -> str:
        return self.settings.attr or self.name

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def destination(self) -> str:
        return f"{self.settings.user}@{self.settings.address}"

    @property
    def sops_path_regex(self) -> str:
        return self.settings.sops_path_regex or rf"secrets/{self.name}/[^/]+\.(yaml|json|env|ini)$"


@dataclass(frozen=True)
class Loaded:
    """A validated inventory and where it came from; paths are resolved against its folder."""

    path: Path
    inventory: Inventory
    nixos_rebuild: str | None = None  # $REBUILD_NIXOS_REBUILD, else the inventory's
    nix: str | None = None  # $REBUILD_NIX, else the inventory's

    @property
    def nixos_rebuild_program(self) -> str:
        return self.nixos_rebuild or self.inventory.nixos_rebuild

    @property
    def nix_program(self) -> str:
        return self.nix or self.inventory.nix

    @property
    def flake(self) -> str:
        """The flake reference for nix: an absolute path for a local flake, else the URL."""
        flake = self.inventory.flake
        if is_flake_url(flake):
            return flake
        return str((self.path.parent / Path(flake).expanduser()).resolve())

    @property
    def flake_dir(self) -> Path | None:
        """The local flake's folder, in any spelling (`.`, a path, `path:`, `git+file:`,
        `file:`), so that the git gate applies to it; None for a remote flake."""
        flake = self.inventory.flake
        if not is_flake_url(flake):
            return Path(self.flake)
        local = local_flake_path(flake)
        if local is None:
            return None
        return (self.path.parent / local).resolve()

    @property
    def known_hosts(self) -> Path:
        return self.path.parent / Path(self.inventory.known_hosts).expanduser()

    @property
    def audit_log(self) -> Path:
        return self.path.parent / Path(self.inventory.audit_log).expanduser()

    def identity_file(self, target: Target) -> Path | None:
        ident = target.settings.identity_file
        return None if ident is None else self.path.parent / Path(ident).expanduser()

    def targets(self) -> list[Target]:
        return [Target(name, spec) for name, spec in self.inventory.hosts.items()]

    def target(self, name: str) -> Target:
        spec = self.inventory.hosts.get(name)
        if spec is None:
            known = ", ".join(self.inventory.hosts) or "none"
            raise ConfigError(
                f"{self.path}: unknown host {name!r} (hosts: {known}); "
                "check the name with `invoke hosts`"
            )
        return Target(name, spec)

    def select(
        self, names: list[str] | None = None, tags: list[str] | None = None, every: bool = False
    ) -> list[Target]:
        """Hosts by name, by tag (union) or all, in inventory order; none selected is an error."""
        if every:
            chosen = self.targets()
        else:
            wanted = {self.target(n).name for n in names or []}
            for tag in tags or []:
                tagged = {t.name for t in self.targets() if tag in t.settings.tags}
                if not tagged:
                    raise ConfigError(f"{self.path}: no host has the tag {tag!r}")
                wanted |= tagged
            chosen = [t for t in self.targets() if t.name in wanted]
        if not chosen:
            raise ConfigError("no host selected: give --host NAME, --tag TAG or --all")
        return chosen


def local_flake_path(flake: str) -> Path | None:
    """The folder of a flake URL that names this machine's file system (`path:/x`,
    `git+file:///x`, `file:///x`, with any `?query` or `#fragment`), else None."""
    match = re.match(r"^(?:path|git\+file|file|tarball\+file|sourcehut\+file):(.*)$", flake)
    if match is None:
        return None
    rest = re.split(r"[?#]", match.group(1), maxsplit=1)[0]
    if rest.startswith("//"):  # file://host/path: only the local host (empty) is local
        host, _, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            return None
        rest = "/" + path
    dir_match = re.search(r"[?&]dir=([^&#]+)", flake)
    folder = Path(rest or ".")
    return folder / dir_match.group(1) if dir_match else folder


def is_flake_url(flake: str) -> bool:
    """`github:o/r`, `git+https://...`, `path:/x` are URLs; `.`, `../x`, `/x` are local paths."""
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", flake))


def inventory_path(explicit: str | None) -> Path:
    """--inventory, else $REBUILD_INVENTORY, else ./inventory.toml."""
    return Path(explicit or os.environ.get(ENV_INVENTORY) or DEFAULT_INVENTORY).expanduser()


def _loc(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith(("function-after", "function-before")) or item in (
            "constrained-str",
            "str",
            "int",
            "float",
            "bool",
            "literal",
        ):
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "(top level)"


def format_validation_error(path: Path, error: ValidationError) -> str:
    """One line per problem: file, key path, what is wrong."""
    lines = []
    for err in error.errors(include_url=False):
        where = _loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/reference/index.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        given = err.get("input")
        if err["type"] not in ("extra_forbidden", "missing") and isinstance(
            given, str | int | float | bool
        ):
            msg = f"{msg} (got {given!r})" if repr(given) not in msg else msg
        lines.append(f"{path}: {where}: {msg}")
    return "\n".join(lines)


def parse(path: Path, text: str) -> Inventory:
    """Validate inventory text; every problem raises ConfigError naming the file and key path."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        inventory = Inventory(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    problems = [f"{path}: {problem}" for problem in flavour_problems(inventory)]
    if problems:
        raise ConfigError("\n".join(problems))
    return inventory


def flavour_problems(inventory: Inventory) -> list[str]:
    """Settings the inventory's nixos-rebuild flavour cannot carry out safely, as "key path:
    why" lines. Classic nixos-rebuild copies a build host's result to a different target by
    running `nix-copy-closure --to TARGET` on the build host (nixos-rebuild.sh, copyToTarget),
    with that host's own ssh: rebuild's ssh config (the target's alias, port, key and pinned
    host key) never applies there, so the copy fails, or trusts a key rebuild never checked."""
    if inventory.nixos_rebuild_flavour != "classic":
        return []
    return [
        f'hosts.{name}.build_host: {spec.build_host!r} needs nixos_rebuild_flavour = "ng": '
        "classic nixos-rebuild copies the system from the build host to the target with the "
        "build host's own ssh, which reads none of rebuild's host-key settings; use "
        'build_host = "" (build here) or "target", or nixos-rebuild-ng'
        for name, spec in inventory.hosts.items()
        if spec.build_host not in ("", "target")
    ]


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse any REBUILD_* variable but the few that choose the inventory and the programs."""
    for name in sorted(environ):
        if name.startswith("REBUILD_") and name not in ENV_ALLOWED + ENV_FOR_HOOKS:
            raise ConfigError(
                f"environment variable {name} is not allowed: settings come from the committed "
                f"inventory only (the environment may set {', '.join(ENV_ALLOWED)}); unset it "
                "and change the inventory instead"
            )


def read_text(path: Path) -> str:
    """The inventory's text: a regular file of at most 1 MiB (a FIFO or a device would hang or
    never end), UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no inventory here; run from the repository root or pass --inventory PATH"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the inventory: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: the inventory must be a regular file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_INVENTORY_BYTES + 1)
    if len(data) > MAX_INVENTORY_BYTES:
        raise ConfigError(f"{path}: the inventory is larger than 1 MiB; is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the inventory is not UTF-8 text ({exc.reason})") from None


def load(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Loaded:
    """Read and validate the inventory at --inventory, $REBUILD_INVENTORY or ./inventory.toml."""
    env = os.environ if environ is None else environ
    check_environment(env)
    path = inventory_path(explicit)
    loaded = Loaded(
        path.resolve(),
        parse(path, read_text(path)),
        nixos_rebuild=env.get(ENV_NIXOS_REBUILD) or None,
        nix=env.get(ENV_NIX) or None,
    )
    for target in loaded.targets():
        ident = loaded.identity_file(target)
        if ident is not None and not ident.is_file():
            raise ConfigError(
                f"{loaded.path}: hosts.{target.name}.identity_file: {ident} does not exist; "
                "fix the path, or create the key (ssh-keygen -t ed25519 -f PATH)"
            )
    return loaded
