"""Before the prompt, per host: build the new system once (the one evaluation of the deploy),
copy it to the host, and ask the host what switching to it will change (`rebuild.preview`).
Copying changes nothing that runs; a declined deploy leaves only store paths for the garbage
collector."""

from __future__ import annotations

import os
import threading
import time

from rebuild import hostops, nixos, preview, process
from rebuild.console import Console
from rebuild.errors import BuildFailed, Declined, RebuildError
from rebuild.hostrun import NIX_EVAL_TIMEOUT, HostRun, child_env, expected_system
from rebuild.inventory import Loaded
from rebuild.remote import RemoteResult

BUILD_TIMEOUT = 3600
COPY_TIMEOUT = 3600
PREVIEW_TIMEOUT = 180
PREVIEWED = ("switch", "test", "boot", "dry-activate")


def wanted(hr: HostRun) -> bool:
    """The preview needs the system built here (not on the host or a builder)."""
    return hr.action in PREVIEWED and hr.target.settings.build_host == ""


def builds_here(hr: HostRun) -> bool:
    """nixos-rebuild will build the host's toplevel on this machine (`nix build`)."""
    return hr.action in (*PREVIEWED, "build") and hr.target.settings.build_host == ""


def expected_unbuilt(loaded: Loaded, hr: HostRun, flake: str) -> str:
    """Without the preview, the store path the deploy must end on, building nothing:
    `nix build --dry-run --json` evaluates the toplevel as nixos-rebuild's own `nix build`
    will (src/libcmd/installable-flake.cc `toDerivedPaths`), so Nix's evaluation cache answers
    that build and the deploy costs one evaluation; its JSON names the out path of an
    input-addressed derivation (src/libstore/derived-path.cc). `nix eval ...outPath` would cost
    a second one: `nix eval` always evaluates (src/nix/eval.cc, `forceValue`) and caches only
    the string it printed, which no build reads (src/libexpr/eval-cache.cc). A Nix whose answer
    has no out path gets the `nix eval`."""
    extra = nixos.evaluation_args(hr.target.settings.extra_args)
    argv = nixos.nix_dry_build_argv(loaded.nix_program, flake, hr.target.attr, extra)
    done = process.run(argv, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
                       timeout=NIX_EVAL_TIMEOUT)  # fmt: skip
    path = nixos.parse_dry_build(done.stdout) if done.ok else None
    return path if path is not None else expected_system(loaded, hr.target, flake)


Ran = tuple[process.Completed, list[str]]


def _stream(hr: HostRun, argv: list[str], console: Console, cancel: threading.Event,
            env: dict[str, str] | None, timeout: float) -> Ran:  # fmt: skip
    """Run a step with its output shown under the host's name, stopped by Ctrl-C."""
    stdout: list[str] = []
    done = process.stream(argv, env=env, on_line=lambda line: console.host_line(hr.name, line),
                          on_stdout=stdout.append, cancel=cancel, timeout=timeout)  # fmt: skip
    if cancel.is_set() or done.returncode == 130:
        raise Declined(f"{hr.name}: aborted (Ctrl-C) before anything changed")
    return done, stdout


def build(hr: HostRun, loaded: Loaded, flake: str, console: Console,
          cancel: threading.Event) -> str:  # fmt: skip
    """`nix build` of the host's system; its store path is what the deploy must end on."""
    began = time.monotonic()
    extra = nixos.evaluation_args(hr.target.settings.extra_args)
    argv = nixos.nix_build_system_argv(loaded.nix_program, flake, hr.target.attr, extra)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # a flake input's git never asks
    done, stdout = _stream(hr, argv, console, cancel, env, BUILD_TIMEOUT)
    hr.timings["build"] = round(time.monotonic() - began, 3)
    paths = [line.strip() for line in stdout if line.strip().startswith("/")]
    if not done.ok or not paths:
        tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise BuildFailed(f"{hr.name}: cannot build {hr.target.attr}: {tail}")
    return paths[-1]


def copy(hr: HostRun, loaded: Loaded, path: str, console: Console,
         cancel: threading.Event) -> None:  # fmt: skip
    """`nix copy` of the built system to the host, through rebuild's ssh config."""
    began = time.monotonic()
    spec = hr.target.settings
    destination = nixos.target_destination(hr.target)
    argv = nixos.nix_copy_argv(loaded.nix_program, destination, path,
                               substitute=spec.use_substitutes)  # fmt: skip
    done, _ = _stream(hr, argv, console, cancel, child_env(loaded, hr.target), COPY_TIMEOUT)
    hr.timings["copy"] = round(time.monotonic() - began, 3)
    if not done.ok:
        tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit {done.returncode}"
        raise BuildFailed(f"{hr.name}: cannot copy the new system to the host: {tail}")


def ask(hr: HostRun, path: str, arm: str | None = None
        ) -> tuple[preview.Changes, RemoteResult | None]:  # fmt: skip
    """What the switch will change, from the host's own tools (one round trip, as root). With
    `arm` (no prompt follows), the same round trip arms the dead-man timer last: its answer
    comes back too (None: it did not run, or its answer was lost)."""
    script = preview.script(path)
    if arm is not None:
        script += hostops.arm_section(arm)
    try:
        result = hr.run(script, timeout=PREVIEW_TIMEOUT + (hostops.ARM_TIMEOUT if arm else 0))
    except RebuildError as exc:
        return preview.Changes(problems=(f"the host did not answer the preview: {exc}",)), None
    armed = hostops.parse_arm_section(result.stdout)
    shown = result.stdout.partition(f"{hostops.MARK} arm\n")[0]
    return preview.parse(shown, path), RemoteResult(*armed, "") if armed else None
