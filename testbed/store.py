"""The simulated Nix store and the simulated flake evaluation.

The store is a real directory; a "system" store path is a directory holding
``bin/switch-to-configuration`` (a script that activates the configuration on whichever
simulated host runs it), ``nixos-version`` and ``rebuild-sim.json`` (attribute + configuration).
Store paths are content-addressed: a hash of the attribute name and the canonical JSON of the
configuration.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NIXOS_VERSION = "25.05"
NIXOS_VERSION_LONG = "25.05.20250601.0b4defa (Warbler)"
SIM_JSON = "rebuild-sim.json"
_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
DEFAULT_IMAGE_VARIANTS = ("amazon", "iso", "linode", "qcow2", "raw")

# where the `testbed` package lives, for scripts that must import it with any interpreter
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class SimError(Exception):
    """An error the simulated tools report as ``error: <message>`` (exit 1)."""


def nix_base32(data: bytes) -> str:
    """Nix's base-32 encoding (the alphabet without e, o, t, u)."""
    length = (len(data) * 8 - 1) // 5 + 1
    out = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(_NIX32[c & 0x1F])
    return "".join(out)


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _hash32(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(("rebuild-testbed", *parts)).encode()).digest()
    return nix_base32(digest[:20])


def system_name(attr: str) -> str:
    return f"nixos-system-{attr}-{NIXOS_VERSION}"


def system_store_path(store_dir: Path | str, attr: str, config: Mapping[str, Any]) -> str:
    """The toplevel out path `nix eval` prints for ``attr`` with ``config``."""
    return f"{store_dir}/{_hash32('out', attr, canonical_json(config))}-{system_name(attr)}"


def system_drv_path(store_dir: Path | str, attr: str, config: Mapping[str, Any]) -> str:
    return f"{store_dir}/{_hash32('drv', attr, canonical_json(config))}-{system_name(attr)}.drv"


def image_file_name(variant: str) -> str:
    ext = {"iso": "iso", "qcow2": "qcow2", "amazon": "vhd"}.get(variant, "img")
    return f"nixos-image-{variant}-{NIXOS_VERSION}-x86_64-linux.{ext}"


def image_store_path(
    store_dir: Path | str, attr: str, config: Mapping[str, Any], variant: str
) -> str:
    digest = _hash32("image", attr, variant, canonical_json(config))
    return f"{store_dir}/{digest}-nixos-image-{variant}-{NIXOS_VERSION}-x86_64-linux"


def image_drv_path(
    store_dir: Path | str, attr: str, config: Mapping[str, Any], variant: str
) -> str:
    digest = _hash32("image-drv", attr, variant, canonical_json(config))
    return f"{store_dir}/{digest}-nixos-image-{variant}-{NIXOS_VERSION}-x86_64-linux.drv"


def script_header(python: str) -> str:
    """First lines of every Python script the test bed writes (shims, stand-ins, activation)."""
    return f"#!{python} -IS\nimport sys\nsys.path.insert(0, {PACKAGE_PARENT!r})\n"


def _make_read_only(path: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        base = Path(dirpath)
        for name in filenames:
            p = base / name
            if p.is_symlink():  # a link into another store path: its target is not ours
                continue
            mode = p.stat().st_mode
            p.chmod(0o555 if mode & stat.S_IXUSR else 0o444)
        for name in dirnames:
            if not (base / name).is_symlink():
                (base / name).chmod(0o555)
    path.chmod(0o555)


def make_writable(path: Path) -> None:
    """Undo the store's read-only modes below ``path`` so that it can be deleted."""
    if not path.exists() or path.is_symlink():
        return
    with contextlib.suppress(OSError):
        path.chmod(0o755)
    for dirpath, dirnames, _filenames in os.walk(path):
        for name in dirnames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.chmod(0o755)


def remove_tree(path: Path) -> None:
    """Delete a directory tree that may contain read-only store paths."""
    if not path.exists() and not path.is_symlink():
        return
    make_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def _install(store_dir: Path, final: Path, fill: Any) -> None:
    """Create ``final`` atomically (build in a temp dir, rename); no-op if it exists."""
    if final.exists():
        return
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = store_dir / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        fill(tmp)
        _make_read_only(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
    finally:
        remove_tree(tmp)


# --------------------------------------------------------------------------- closures
#
# A system's closure, so that the host's `nix store diff-closures` and `nix path-info -S` have
# something real to read (testbed/README.md, "The simulated systems"):
# - `packages` of the configuration ({"openssl": "3.0.13"}): one store path per package,
#   `<hash>-openssl-3.0.13`, the same for every system that has that version;
# - the boot files, as a NixOS toplevel links them: `kernel` -> `<hash>-linux-V/bzImage`,
#   `initrd` -> `<hash>-initrd-linux-V/initrd`, `kernel-modules` -> `<hash>-kernel-modules`
#   (which refers to `<hash>-linux-V-modules`); V is the configuration's `kernel` (default
#   DEFAULT_KERNEL), and the configuration's `initrd` / `kernel_modules` values (anything)
#   change only the initrd / the modules.
# Sizes: a package's (and the kernel's and its modules') NAR size is made up from its name and
# version (between 64 KiB and 8 MiB), written in its `nix-support/nar-size`; every other path's
# is the size of its files. The
# references are what Nix's database would hold: the toplevel refers to all of these.

DEFAULT_KERNEL = "6.6.63"
BOOT_LINKS = ("kernel", "initrd", "kernel-modules")
NAR_SIZE_FILE = "nix-support/nar-size"


def package_path(store_dir: Path | str, name: str, version: str) -> str:
    full = f"{name}-{version}" if version else name
    return f"{store_dir}/{_hash32('package', full)}-{full}"


def _packages(config: Mapping[str, Any]) -> dict[str, str]:
    packages = config.get("packages") or {}
    if not isinstance(packages, Mapping):
        raise SimError("packages must be an object of name: version")
    return {str(name): str(version) for name, version in packages.items()}


def package_nar_size(name: str, version: str) -> int:
    """A made-up but stable NAR size (a multiple of 8, as NAR sizes are)."""
    digest = hashlib.sha256(f"{name}-{version}".encode()).digest()
    return (64 * 1024 + int.from_bytes(digest[:4], "big") % (8 * 1024 * 1024 - 64 * 1024)) // 8 * 8


def boot_paths(store_dir: Path | str, config: Mapping[str, Any]) -> dict[str, str]:
    """The store paths of the boot files: linux, linux-modules, initrd, kernel-modules."""
    kernel = str(config.get("kernel") or DEFAULT_KERNEL)
    initrd = canonical_json(config.get("initrd"))
    modules = canonical_json(config.get("kernel_modules"))
    return {
        "linux": f"{store_dir}/{_hash32('linux', kernel)}-linux-{kernel}",
        "linux-modules": f"{store_dir}/{_hash32('linux-modules', kernel)}-linux-{kernel}-modules",
        "initrd": f"{store_dir}/{_hash32('initrd', kernel, initrd)}-initrd-linux-{kernel}",
        "kernel-modules": f"{store_dir}/{_hash32('kernel-modules', kernel, modules)}"
        "-kernel-modules",
    }


def system_references(store_dir: Path | str, config: Mapping[str, Any]) -> list[str]:
    """The store paths a system toplevel refers to (besides itself)."""
    refs = [package_path(store_dir, n, v) for n, v in _packages(config).items()]
    return sorted({*refs, *boot_paths(store_dir, config).values()})


def _build_closure(store_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Make the packages and boot files of a system; the toplevel's boot links' targets."""
    kernel = str(config.get("kernel") or DEFAULT_KERNEL)
    for name, version in _packages(config).items():

        def fill_package(tmp: Path, name: str = name, version: str = version) -> None:
            (tmp / "nix-support").mkdir()
            (tmp / NAR_SIZE_FILE).write_text(f"{package_nar_size(name, version)}\n")
            (tmp / "share").mkdir()
            (tmp / "share" / f"{name}.txt").write_text(f"{name} {version}\n", encoding="utf-8")

        _install(store_dir, Path(package_path(store_dir, name, version)), fill_package)
    paths = boot_paths(store_dir, config)

    def fill_linux(tmp: Path) -> None:
        (tmp / "bzImage").write_text(f"Linux {kernel}\n", encoding="utf-8")
        (tmp / "nix-support").mkdir()
        (tmp / NAR_SIZE_FILE).write_text(f"{package_nar_size('linux', kernel)}\n")

    def fill_linux_modules(tmp: Path) -> None:
        (tmp / "nix-support").mkdir()
        (tmp / NAR_SIZE_FILE).write_text(f"{package_nar_size('linux-modules', kernel)}\n")
        (tmp / "lib" / "modules" / kernel).mkdir(parents=True)
        (tmp / "lib" / "modules" / kernel / "modules.dep").write_text("", encoding="utf-8")

    def fill_initrd(tmp: Path) -> None:
        (tmp / "initrd").write_text(
            f"initrd for Linux {kernel} {canonical_json(config.get('initrd'))}\n",
            encoding="utf-8",
        )

    def fill_kernel_modules(tmp: Path) -> None:
        (tmp / "lib").symlink_to(f"{paths['linux-modules']}/lib")
        (tmp / "modules.json").write_text(
            canonical_json(config.get("kernel_modules")) + "\n", encoding="utf-8"
        )

    _install(store_dir, Path(paths["linux"]), fill_linux)
    _install(store_dir, Path(paths["linux-modules"]), fill_linux_modules)
    _install(store_dir, Path(paths["initrd"]), fill_initrd)
    _install(store_dir, Path(paths["kernel-modules"]), fill_kernel_modules)
    return {
        "kernel": f"{paths['linux']}/bzImage",
        "initrd": f"{paths['initrd']}/initrd",
        "kernel-modules": paths["kernel-modules"],
    }


def nar_size(path: Path) -> int:
    """The NAR size the host's Nix reports for a path of the test bed's store."""
    declared = path / NAR_SIZE_FILE
    if declared.is_file():
        with contextlib.suppress(ValueError, OSError):
            return int(declared.read_text(encoding="utf-8").strip())
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            entry = Path(dirpath) / name
            info = entry.lstat()
            total += 120 + len(name)  # a NAR entry's framing
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
            elif stat.S_ISLNK(info.st_mode):
                total += len(str(entry.readlink()))
    return (total + 7) // 8 * 8


def references(path: Path) -> list[str]:
    """What Nix's database would list as the references of a path of the test bed's store."""
    sim = path / SIM_JSON
    if sim.is_file():
        _attr, config = load_system(path)
        return system_references(path.parent, config)
    lib = path / "lib"
    if path.name.endswith("-kernel-modules") and lib.is_symlink():
        return [str(lib.readlink().parent)]
    return []


def closure(path: Path) -> list[Path]:
    """The path and everything it refers to, recursively (Nix's computeFSClosure)."""
    seen: dict[str, Path] = {}
    todo = [path]
    while todo:
        item = todo.pop()
        if str(item) in seen:
            continue
        seen[str(item)] = item
        todo.extend(Path(ref) for ref in references(item))
    return [seen[key] for key in sorted(seen)]


# A test bed system's bin/switch-to-configuration (testbed.sim.activation.stc_main): the
# client of the host's simulator, given this script's path first. The host is $SIM_ROOT, else
# the marker of a folder on PATH (what nixos-rebuild-ng's `env -i PATH=...` keeps); without
# either the client runs the Python shim, which looks further.
STC_SCRIPT = """#!/bin/sh
if [ -z "${{SIM_ROOT-}}" ]; then
  IFS=:
  for d in $PATH; do
    if [ -r "$d/.sim-root" ]; then read -r SIM_ROOT <"$d/.sim-root" && export SIM_ROOT; break; fi
  done
  unset IFS
fi
exec {client} "$0" "$@"
"""


def build_system(
    store_dir: Path, attr: str, config: Mapping[str, Any], python: str | None = None
) -> str:
    """Materialise the system store path for ``attr``/``config`` (idempotent), with its
    packages and boot files."""
    out = Path(system_store_path(store_dir, attr, config))
    interpreter = python or sys.executable
    boot = _build_closure(store_dir, config)

    def fill(tmp: Path) -> None:
        for link, target in boot.items():
            (tmp / link).symlink_to(target)
        (tmp / "bin").mkdir()
        stc = tmp / "bin" / "switch-to-configuration"
        client = store_dir.parent / "hostbin" / "switch-to-configuration"
        if client.exists():  # a test bed's store: run in the host's simulator (no Python start)
            stc.write_text(STC_SCRIPT.format(client=shlex.quote(str(client))), encoding="utf-8")
        else:
            stc.write_text(
                script_header(interpreter)
                + "from testbed.sim.activation import stc_main\n"
                + "sys.exit(stc_main(__file__, sys.argv[1:]))\n",
                encoding="utf-8",
            )
        stc.chmod(0o755)
        (tmp / "nixos-version").write_text(NIXOS_VERSION_LONG + "\n", encoding="utf-8")
        (tmp / SIM_JSON).write_text(
            json.dumps({"attr": attr, "config": config}, indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )

    _install(store_dir, out, fill)
    return str(out)


def build_image(store_dir: Path, attr: str, config: Mapping[str, Any], variant: str) -> str:
    out = Path(image_store_path(store_dir, attr, config, variant))

    def fill(tmp: Path) -> None:
        (tmp / image_file_name(variant)).write_bytes(
            b"REBUILD-TESTBED-DISK-IMAGE\n"
            + canonical_json({"attr": attr, "variant": variant, "config": config}).encode()
            + b"\n"
        )
        (tmp / "nix-support").mkdir()
        (tmp / "nix-support" / "hydra-build-products").write_text(
            f"file {variant} {out}/{image_file_name(variant)}\n", encoding="utf-8"
        )

    _install(store_dir, out, fill)
    return str(out)


def load_system(store_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(attr, config) of a system store path built by the test bed."""
    data = json.loads((Path(store_path) / SIM_JSON).read_text(encoding="utf-8"))
    return str(data["attr"]), dict(data["config"])


# --------------------------------------------------------------------------- flakes


@dataclass
class Flake:
    """A local flake as the simulated ``nix`` sees it."""

    directory: Path
    git_root: Path | None  # None: `path:` semantics (every file counts)
    url: str  # how nix names it in messages: git+file:///x or path:/x
    rev: str | None = None  # `?rev=<commit>`: that commit's files, not the working tree
    # What git answered, asked once per command: Nix fetches a git flake once per command (its
    # tracked files, dirty or at a rev, copied to the store: src/libfetchers/git.cc) and
    # evaluates every attribute from that copy, so one command sees one state of the tree.
    _answers: dict[tuple[str, ...], str] = field(default_factory=dict, repr=False, compare=False)

    def _git(self, *args: str) -> str:
        if self.git_root is None:
            raise SimError(f"'{self.directory}' is not a git repository")
        if args in self._answers:
            return self._answers[args]
        result = subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", str(self.git_root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise SimError(
                f"git {' '.join(args)} failed in '{self.git_root}': {result.stderr.strip()}"
            )
        self._answers[args] = result.stdout
        return result.stdout

    def _rel(self, relpath: str) -> str:
        if self.git_root is None:
            raise SimError(f"'{self.directory}' is not a git repository")
        return (self.directory / relpath).relative_to(self.git_root).as_posix()

    def _tracked(self, relpath: str) -> bool:
        if self.git_root is None:
            return True
        if self.rev is not None:
            names = self._git("ls-tree", "--name-only", self.rev, "--", self._rel(relpath))
            return bool(names.strip())
        rel = (self.directory / relpath).relative_to(self.git_root).as_posix()
        return bool(self._git("ls-files", "--", rel).strip())

    def check(self) -> None:
        if not (self.directory / "flake.nix").is_file() or not self._tracked("flake.nix"):
            raise SimError(f"path '{self.directory}/flake.nix' does not exist")

    def dirty(self) -> bool:
        if self.git_root is None or self.rev is not None:
            return False
        return bool(self._git("status", "--porcelain", "--untracked-files=no").strip())

    def attrs(self) -> list[str]:
        hosts = self.directory / "hosts"
        if not hosts.is_dir():
            return []
        if self.git_root is None:
            names = [p.name for p in hosts.iterdir() if p.is_file()]
        elif self.rev is not None:
            listing = self._git("ls-tree", "--name-only", self.rev, "--", self._rel("hosts") + "/")
            names = [Path(line).name for line in listing.splitlines()]
        else:
            rel = hosts.relative_to(self.git_root).as_posix()
            names = [Path(line).name for line in self._git("ls-files", "--", rel).splitlines()]
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def config(self, attr: str) -> dict[str, Any] | None:
        """The configuration of nixosConfigurations.<attr>, None when there is none."""
        if attr not in self.attrs():
            return None
        path = self.directory / "hosts" / f"{attr}.json"
        try:
            if self.rev is not None:
                text = self._git("show", f"{self.rev}:{self._rel(f'hosts/{attr}.json')}")
            else:
                text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, ValueError) as exc:
            raise SimError(f"while evaluating nixosConfigurations.{attr}: {exc}") from exc
        if not isinstance(data, dict):
            raise SimError(f"value of nixosConfigurations.{attr} is not an attribute set")
        if data.get("eval_error"):
            raise SimError(str(data["eval_error"]))
        return data


def resolve_flake(ref: str, cwd: Path | None = None) -> Flake:
    """Resolve a flake reference (``.``, a path, ``path:...``, ``git+file://...``)."""
    base = cwd or Path.cwd()
    force_path = False
    raw, _, query = ref.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    rev = params.get("rev") or None
    if rev is not None and not re.fullmatch(r"[0-9a-f]{7,40}", rev):
        raise SimError(f"flake reference '{ref}' has an invalid rev")
    if raw.startswith("path:"):
        raw = raw[len("path:") :]
        force_path = True
    elif raw.startswith("git+file://"):
        raw = raw[len("git+file://") :]
    elif raw.startswith("file://"):
        raw = raw[len("file://") :]
    elif re.match(r"^[a-z][a-z0-9+]*:", raw) and not raw.startswith("/"):
        raise SimError(
            f"cannot fetch flake '{ref}': the test bed only evaluates local flakes "
            "(a path, path:..., git+file://...)"
        )
    directory = (base / raw).resolve() if raw else base.resolve()
    if not directory.is_dir():
        raise SimError(f"path '{directory}' does not exist")
    git_root: Path | None = None
    if not force_path:
        probe = directory
        for _ in range(64):
            if (probe / ".git").exists():
                git_root = probe
                break
            if probe.parent == probe:
                break
            probe = probe.parent
    url = f"git+file://{directory}" if git_root is not None else f"path:{directory}"
    if rev is not None and git_root is None:
        raise SimError(f"flake '{ref}': a rev needs a git repository")
    return Flake(directory=directory, git_root=git_root, url=url, rev=rev)


def split_attr_path(text: str) -> list[str]:
    """Split ``a."b.c".d`` into ['a', 'b.c', 'd']."""
    parts: list[str] = []
    current = ""
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    return [p for p in parts if p != ""] if text else []
