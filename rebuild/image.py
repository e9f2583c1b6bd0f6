"""`invoke image`: the host's disk image from the upstream workflow, reported and audited.

The pure parts read what the build printed (the "Done. The disk image can be found in <path>"
line of `nixos-rebuild build-image`, the out path of `nix build --print-out-paths`) and choose
the image file inside a result directory. `build` is the IO shell: the dirty-tree gate, the
streamed build in a per-host folder under the audit log's state directory (so the `result` link,
a GC root that keeps the image, never lands in the flake), the artifact's size and sha256, and
one audit record with `event` `image`.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rebuild import audit, gitstate, identity, nixos, process
from rebuild.console import Console
from rebuild.errors import BuildFailed, ConfigError, Interrupted, RebuildError
from rebuild.inventory import Loaded, Target, load

DONE_PREFIX = "Done. The disk image can be found in "
IMAGE_SUFFIXES = (
    ".img", ".raw", ".qcow2", ".vhd", ".vhdx", ".iso", ".tar.gz", ".img.gz", ".img.zst",
)  # fmt: skip
TAIL_LINES = 10
RESULT_LINK = "result"
HASH_CHUNK = 1 << 20
_OUT_PATH_RE = re.compile(r"^/\S+$")


@dataclass(frozen=True)
class ImageArtifact:
    """A built disk image: where it is, how big, its digest, and what it was built from."""

    host: str
    path: str  # the image file, inside the result's store path
    size: int
    sha256: str
    commit: str | None
    dirty: bool
    store_path: str  # the build's out path (the result)
    command: tuple[str, ...]
    link: str | None = None  # the `result` link (GC root) in rebuild's state folder

    def to_json(self) -> dict[str, object]:
        return {
            "host": self.host,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "commit": self.commit,
            "dirty": self.dirty,
            "store_path": self.store_path,
            "command": list(self.command),
            "link": self.link,
        }


# --- pure parts --------------------------------------------------------------------------------


def parse_done_line(lines: Iterable[str]) -> str | None:
    """The image path from a "Done. The disk image can be found in <path>" line (both on one
    line, as when stderr and stdout are merged; classic prints two spaces after "Done.")."""
    found = None
    for line in lines:
        text = " ".join(line.split())
        if text.startswith(DONE_PREFIX):
            path = text[len(DONE_PREFIX) :].strip()
            found = path or found
    return found


def parse_build_image(stdout: Sequence[str], merged: Sequence[str]) -> str | None:
    """Where `nixos-rebuild build-image` says the image is. Both flavours print the path alone
    on stdout and the words before it on stderr (classic: `echo -n "Done.  The disk image can
    be found in " >&2; echo PATH`, nixos-rebuild.sh; ng: print_result, the prefix on stderr),
    so the last path on stdout wins; a merged "Done. ... in PATH" line is the fallback."""
    for line in reversed(stdout):
        text = line.strip()
        if text.startswith("/"):
            return text
    return parse_done_line(merged)


def parse_out_path(lines: Iterable[str]) -> str | None:
    """The last store path `nix build --print-out-paths` printed (flush left, not a .drv)."""
    found = None
    for line in lines:
        text = line.rstrip()
        if _OUT_PATH_RE.match(text) and not text.endswith(".drv"):
            found = text
    return found


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def choose_image(files: Sequence[tuple[str, int]]) -> str | None:
    """Of (path, size) pairs: the largest file with an image suffix, else the largest file."""
    if not files:
        return None
    images = [f for f in files if is_image_name(Path(f[0]).name)]
    pool = images or list(files)
    return max(pool, key=lambda f: (f[1], f[0]))[0]


def human_size(size: int) -> str:
    """1536 -> "1.5 KiB"; below 1 KiB the bytes."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def tail(text: str, count: int = TAIL_LINES) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-count:])


# --- reading the result ------------------------------------------------------------------------


def regular_files(directory: Path) -> list[tuple[str, int]]:
    """(path, size) of every regular file below `directory`, nix-support/ left out."""
    out: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d != "nix-support")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                out.append((str(path), path.stat().st_size))
    return out


def find_image(result: Path) -> Path | None:
    """The image file of a result: the result itself when it is a file, else the one inside."""
    if result.is_file():
        return result
    if not result.is_dir():
        return None
    chosen = choose_image(regular_files(result))
    return Path(chosen) if chosen else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def locate(lines: Sequence[str], folder: Path, *, build_image: bool,
           stdout: Sequence[str] = ()) -> tuple[Path, Path]:  # fmt: skip
    """(store path, image file) of a finished build, from its output, else its result link."""
    link = folder / RESULT_LINK
    linked = Path(os.path.realpath(link)) if link.is_symlink() else None
    printed = parse_build_image(stdout, lines) if build_image else parse_out_path(lines)
    if printed is not None:
        given = Path(printed) if Path(printed).is_absolute() else folder / printed
        if build_image and given.is_file():
            inside = linked is not None and Path(os.path.realpath(given)).is_relative_to(linked)
            return (linked if inside and linked else given.parent), given
        image = find_image(given)
        if image is not None:
            return given, image
    if linked is not None:
        image = find_image(linked)
        if image is not None:
            return linked, image
    where = printed or (str(linked) if linked else "no result")
    raise BuildFailed(f"the build succeeded but no image file was found in {where}")


# --- the IO shell ------------------------------------------------------------------------------


def image_folder(loaded: Loaded, target: Target) -> Path:
    """Where the build runs and its `result` link lands: <state>/images/<host>/."""
    return loaded.audit_log.parent / "images" / target.name


def command_for(loaded: Loaded, target: Target, folder: Path) -> list[str]:
    output = target.settings.image_output
    if output is not None:
        link = str(folder / RESULT_LINK)
        return nixos.nix_build_argv(loaded.nix_program, loaded.flake, output, out_link=link)
    return nixos.build_image_argv(loaded.nixos_rebuild_program, loaded.flake, target)


def build(loaded: Loaded, target: Target, *, allow_dirty: bool, json_mode: bool,
          console: Console) -> int:  # fmt: skip
    """`invoke image`: gate, build, report, audit; returns the exit code."""
    from rebuild.gates import git_gate  # the same dirty-tree gate as a deploy

    started = time.monotonic()
    me = identity.current()
    operator = identity.authorize(me, loaded.inventory.operators)
    folder = image_folder(loaded, target)
    command = command_for(loaded, target, folder)
    output = target.settings.image_output
    record = audit.Record(
        run_id=audit.new_run_id(),
        host=target.name,
        address=target.address,
        action="build-image",
        flake=loaded.flake,
        attr=target.attr,
        operator={"name": operator.name if operator else "", "hostname": me.hostname,
                  "machine_id": me.machine_id},
        event="image",
        command=list(command),
    )  # fmt: skip
    record.extra["image_variant" if output is None else "image_output"] = (
        target.settings.image_variant if output is None else output
    )
    artifact: ImageArtifact | None = None
    error: RebuildError | None = None
    try:
        state = gitstate.read(loaded.flake_dir) if loaded.flake_dir else None
        record.commit = state.commit if state else None
        record.dirty = bool(state and state.dirty)
        record.overrides.extend(git_gate(state, allow_dirty))
        artifact = run_build(target, command, folder, record, console)
        record.result, record.exit_code = "ok", 0
        record.message = f"image {artifact.path}"
        record.extra.update(
            image_path=artifact.path, image_size=artifact.size, image_sha256=artifact.sha256,
            image_store_path=artifact.store_path, image_link=artifact.link,
        )  # fmt: skip
    except KeyboardInterrupt:
        error = Interrupted("interrupted (Ctrl-C); the image build was stopped")
    except RebuildError as exc:
        error = exc
    except Exception as exc:  # a bug: recorded, then reported by the task as exit 1
        record.message = f"internal error: {type(exc).__name__}: {exc}"
        raise
    finally:
        if error is not None:
            record.result, record.exit_code, record.message = (
                error.result, error.exit_code, str(error),
            )  # fmt: skip
        record.duration_s = round(time.monotonic() - started, 3)
        try:
            audit.append(loaded.audit_log, record)
        except OSError as exc:
            console.error(f"cannot write the audit record to {loaded.audit_log}: {exc}")
    if artifact is None:
        failure = error or RebuildError("the image build ended without an outcome")
        console.error(str(failure))
        if json_mode:
            console.json({"host": target.name, "ok": False, "result": record.result,
                          "exit_code": record.exit_code, "run_id": record.run_id,
                          "error": str(failure), "commit": record.commit, "dirty": record.dirty,
                          "command": list(command)})  # fmt: skip
        return failure.exit_code
    if json_mode:
        console.json({**artifact.to_json(), "ok": True, "result": "ok", "exit_code": 0,
                      "run_id": record.run_id})  # fmt: skip
    else:
        console.say(render(artifact))
    return 0


def run_build(target: Target, command: list[str], folder: Path, record: audit.Record,
              console: Console) -> ImageArtifact:  # fmt: skip
    """Stream the build in `folder`; a failure raises BuildFailed with its last lines."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the image folder {folder}: {exc}") from None
    short = (record.commit or "unknown")[:12] + (" (dirty)" if record.dirty else "")
    console.host_line(target.name, f"building the disk image from commit {short}")
    console.host_line(target.name, f"$ {nixos.render(command)}")
    lines: list[str] = []
    stdout: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        console.host_line(target.name, line)

    done = process.stream(command, cwd=str(folder), on_line=on_line, on_stdout=stdout.append)
    if not done.ok:
        last = tail(done.stderr) or "(no output)"
        raise BuildFailed(
            f"{target.name}: the image build failed ({Path(command[0]).name} exited "
            f"{done.returncode}); its last lines:\n{last}"
        )
    store, image = locate(lines, folder, build_image=target.settings.image_output is None,
                          stdout=stdout)  # fmt: skip
    link = folder / RESULT_LINK
    return ImageArtifact(
        host=target.name,
        path=str(image),
        size=image.stat().st_size,
        sha256=sha256_file(image),
        commit=record.commit,
        dirty=record.dirty,
        store_path=str(store),
        command=tuple(command),
        link=str(link) if link.is_symlink() else None,
    )


def render(artifact: ImageArtifact) -> str:
    """The operator's report of a built image."""
    commit = (artifact.commit or "unknown") + (" (dirty tree)" if artifact.dirty else "")
    rows = [
        ("image", artifact.path),
        ("size", human_size(artifact.size) + ("" if artifact.size < 1024
                                              else f" ({artifact.size} bytes)")),
        ("sha256", artifact.sha256),
        ("commit", commit),
        ("gc root", f"{artifact.link} -> {artifact.store_path}" if artifact.link
         else artifact.store_path),
    ]  # fmt: skip
    return "\n".join(f"[{artifact.host}] {name + ':':8} {value}" for name, value in rows)


def run(inventory: str | None, host: str, *, allow_dirty: bool, json_mode: bool) -> int:
    """What the `image` task calls."""
    loaded = load(inventory)
    target = loaded.target(host)
    return build(loaded, target, allow_dirty=allow_dirty, json_mode=json_mode,
                 console=Console(json_mode=json_mode))  # fmt: skip
