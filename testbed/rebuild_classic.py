"""The classic ``nixos-rebuild`` stand-in: the bash script of NixOS 24.11 and older.

Imitates ``pkgs/by-name/ni/nixos-rebuild/nixos-rebuild.sh`` (nixpkgs) step by step, for flake
builds against a ``--target-host`` (what rebuild runs): its hand-written option loop (an
unknown option is ``$0: unknown option `X'``, exit 1: classic has no ``--sudo``,
``--ask-sudo-password``, ``--no-reexec``, ``--store-path``, ``--diff``, ``--elevate``; nixpkgs
issue 425637 is that message after a re-exec), ``set -e`` (a failing command ends the script
with its own exit code), the re-exec into the target configuration's
``config.system.build.nixos-rebuild`` for switch/boot/test unless ``--fast``, ``$SSHOPTS``
(``$NIX_SSHOPTS`` plus its own ControlMaster options) split on whitespace as bash's unquoted
``ssh $SSHOPTS`` does, ``ssh -t`` for the commands that may need sudo (``targetHostSudoCmd``:
the host's sudo then prompts on the terminal, ``[sudo] password for USER: ``), ``nix build``
leaving ``./result`` only for a ``build`` with neither ``--target-host`` nor ``--build-host``,
a ``--build-host`` building with ``nix-store -r DRV`` over ssh and, when it is not the target,
copying to the target *from the build host* (its own ssh, not ``$NIX_SSHOPTS``), the activation
through ``systemd-run ... --wait`` (checked first with ``systemd-run ... true``), "warning:
error(s) occurred while switching to the new configuration" (exit 1) when it fails, and
``build-image``'s ``echo -n "Done.  The disk image can be found in " >&2; echo PATH``. Builds
and evaluations happen in-process (the test bed's :func:`testbed.standins.evaluate`); the
ssh commands are real. testbed/README.md lists each behaviour with its source.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testbed.standins import (
    FLAKE_FLAGS,
    NIXOS_REBUILD_ATTR,
    PROFILE,
    REEXEC_ENV,
    SWITCH_PREFIX,
    _build_one,
    _installable,
    _link_result,
    counted_evaluate,
    evaluate,
    note_event,
    run_ssh,
    split_sshopts,
    ssh_store,
)
from testbed.store import SimError

ACTIONS = (
    "switch", "boot", "test", "build", "edit", "repl", "dry-build", "dry-run", "dry-activate",
    "build-vm", "build-vm-with-bootloader", "build-image", "list-generations",
)  # fmt: skip
# the option groups of the script's `case` (each: where its words go)
EXTRA_BUILD_0 = (
    "--accept-flake-config", "--quiet", "--print-build-logs", "-L", "--no-build-output", "-Q",
    "--show-trace", "--refresh", "--impure", "--offline", "--no-net",
)  # fmt: skip
EXTRA_AND_COPY_0 = ("--keep-going", "-k", "--keep-failed", "-K", "--fallback", "--repair")
VERBOSE = ("--verbose", "-v", "-vv", "-vvv", "-vvvv", "-vvvvv")
LOCK_0 = (
    "--recreate-lock-file", "--no-update-lock-file", "--no-write-lock-file", "--no-registries",
    "--commit-lock-file",
)  # fmt: skip
FLAKE_RE = re.compile(r"^(.*)#([^#\"]*)$")


class Exit(Exception):
    """The script ends with this code (``exit N``, or ``set -e`` after a failing command)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Options:
    """The script's variables after its option loop."""

    action: str = ""
    fast: bool = False
    rollback: bool = False
    upgrade: bool = False
    profile: str = PROFILE
    specialisation: str = ""
    image_variant: str = ""
    build_host: str = ""
    target_host: str = ""
    remote_sudo: bool = False
    no_ssh_tty: bool = False
    verbose: bool = False
    no_flake: bool = False
    building_attribute: bool = True
    install_bootloader: str = ""
    flake: str = ""
    copy_flags: list[str] = field(default_factory=list)
    extra_build_flags: list[str] = field(default_factory=list)
    lock_flags: list[str] = field(default_factory=list)


def show_syntax() -> Exit:
    """``showSyntax``: ``exec man nixos-rebuild`` (no manual page here: man-db's answer)."""
    log("No manual entry for nixos-rebuild")
    return Exit(16)


def parse(argv: list[str], program: str) -> Options:
    o = Options()
    args = list(argv)

    def take(flag: str, *, required: bool = False, quote: str = "'") -> str:
        if not args or (required and not args[0]):
            if required:
                end = "’" if quote == "‘" else "'"
                log(f"{program}: {quote}{flag}{end} requires an argument")
                raise Exit(1)
            raise Exit(1)  # `shift 1` past the end fails under set -e
        return args.pop(0)

    while args:
        i = args.pop(0)
        if i == "--help":
            raise show_syntax()
        if i in ACTIONS:
            if i == "dry-run":
                i = "dry-build"
            if i == "list-generations":
                o.fast = True
            if o.action:
                raise show_syntax()
            o.action = i
        elif i in ("--file", "-f", "--attr", "-A"):
            take(i, required=True)
            o.building_attribute = False
        elif i == "--install-grub":
            log(f"{program}: --install-grub deprecated, use --install-bootloader instead")
            o.install_bootloader = "1"
        elif i == "--install-bootloader":
            o.install_bootloader = "1"
        elif i == "--no-build-nix":
            pass
        elif i == "--rollback":
            o.rollback = True
        elif i in ("--upgrade", "--upgrade-all"):
            o.upgrade = True
        elif i in ("--use-substitutes", "--substitute-on-destination", "-s"):
            o.copy_flags.append("-s")
        elif i in ("-I", "--builders"):
            o.extra_build_flags += [i, take(i)]
        elif i in ("--max-jobs", "-j", "--cores", "--log-format"):
            value = take(i)
            o.extra_build_flags += [i, value]
            o.copy_flags += [i, value]
        elif i in EXTRA_BUILD_0 or (i.startswith("-j") and i != "-j"):
            o.extra_build_flags.append(i)
        elif i in EXTRA_AND_COPY_0:
            o.extra_build_flags.append(i)
            o.copy_flags.append(i)
        elif i in VERBOSE:
            o.verbose = True
            o.extra_build_flags.append(i)
            o.copy_flags.append(i)
        elif i == "--option":
            j, k = take(i), take(i)
            o.extra_build_flags += [i, j, k]
            o.copy_flags += [i, j, k]
        elif i == "--fast":
            o.fast = True
        elif i in ("--profile-name", "-p"):
            name = take("--profile-name", required=True, quote="‘")
            if name != "system":
                o.profile = f"/nix/var/nix/profiles/system-profiles/{name}"
        elif i in ("--specialisation", "-c"):
            o.specialisation = take("--specialisation", required=True, quote="‘")
        elif i == "--image-variant":
            o.image_variant = take("--image-variant", required=True, quote="‘")
        elif i == "--build-host":
            o.build_host = take(i)
        elif i == "--target-host":
            o.target_host = take(i)
        elif i == "--use-remote-sudo":
            o.remote_sudo = True
        elif i == "--no-ssh-tty":
            o.no_ssh_tty = True
        elif i == "--flake":
            o.flake = take(i)
        elif i == "--no-flake":
            o.no_flake = True
        elif i in LOCK_0:
            o.lock_flags.append(i)
        elif i == "--update-input":
            o.lock_flags += [i, take(i)]
        elif i == "--override-input":
            j, k = take(i), take(i)
            o.lock_flags += [i, j, k]
        elif i == "--json":
            pass
        else:
            log(f"{program}: unknown option `{i}'")
            raise Exit(1)
    return o


def _overrides(flags: list[str]) -> list[tuple[str, str]]:
    """The ``--override-input NAME REF`` pairs among nix's flags."""
    return [
        (flags[n + 1], flags[n + 2])
        for n, word in enumerate(flags)
        if word == "--override-input" and n + 2 < len(flags)
    ]


class Classic:
    """One run of the script."""

    def __init__(self, o: Options, argv: list[str], store: Path, program: str) -> None:
        self.o = o
        self.argv = argv
        self.store = store
        self.program = program
        self.tmp = Path(tempfile.mkdtemp(prefix="nixos-rebuild."))
        if len(str(self.tmp)) >= 60:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = Path(tempfile.mkdtemp(prefix="nixos-rebuild.", dir="/tmp"))
        control = f"-o ControlMaster=auto -o ControlPath={self.tmp}/ssh-%n -o ControlPersist=60"
        self.sshopts = f"{os.environ.get('NIX_SSHOPTS', '')} {control}"

    def cleanup(self) -> None:
        """``trap cleanup EXIT``: close the ssh masters, remove the temporary folder."""
        for ctrl in self.tmp.glob("ssh-*"):
            subprocess.run(["ssh", "-o", f"ControlPath={ctrl}", "-O", "exit", "dummyhost"],
                           capture_output=True, timeout=30, check=False)  # fmt: skip
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- commands --------------------------------------------------------------------------

    def run_cmd(self, argv: list[str]) -> None:
        if self.o.verbose:
            log("$ " + " ".join(argv))

    def _ssh(self, host: str, words: list[str], *, sudo: bool, tty: bool,
             capture: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        opts = split_sshopts(self.sshopts + (" -t" if tty else ""), "words")
        argv = ["ssh", *opts, host, *(["sudo"] if sudo else []), *words]
        self.run_cmd(argv)
        return run_ssh(argv, capture=capture, inherit_stdin=True)

    def target_cmd(
        self,
        words: list[str],
        *,
        sudo: bool = False,
        tty: bool = False,
        capture: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``targetHostCmd`` (``targetHostSudoCmd`` with ``sudo``/``tty``)."""
        if not self.o.target_host:
            log("error: the rebuild test bed cannot run commands on the local machine")
            raise Exit(1)
        done = self._ssh(self.o.target_host, words, sudo=sudo, tty=tty, capture=capture)
        if check and done.returncode != 0:
            raise Exit(done.returncode)
        return done

    def target_sudo_cmd(self, words: list[str], *, check: bool = True) -> int:
        """``targetHostSudoCmd``: ``ssh -t`` (unless --no-ssh-tty), sudo with
        --use-remote-sudo."""
        done = self.target_cmd(words, sudo=self.o.remote_sudo, tty=not self.o.no_ssh_tty,
                               check=check)  # fmt: skip
        return done.returncode

    def build_host_cmd(self, words: list[str], *, capture: bool = False) -> str:
        done = self._ssh(self.o.build_host, words, sudo=False, tty=False, capture=capture)
        if done.returncode != 0:
            raise Exit(done.returncode)
        return done.stdout or "" if capture else ""

    def nix_copy(self, argv: list[str], host: str, paths: list[str], *, write: bool) -> None:
        """``NIX_SSHOPTS=$SSHOPTS nix-copy-closure ...`` / ``nix copy ... ssh://HOST`` here:
        Nix of that time splits NIX_SSHOPTS on whitespace."""
        self.run_cmd(argv)
        note_event(event="nix", argv=argv)
        try:
            ssh_store(host, split_sshopts(self.sshopts, "words"), paths, write=write)
        except SimError as exc:
            log(f"error: {exc}")
            raise Exit(1) from None

    def nix_build(self, installable: str, flags: list[str], out_link: str | None) -> str:
        """``nix build INSTALLABLE [--out-link L]`` here (default link ./result), then the
        path the link points at (``readlink -f``)."""
        argv = ["nix", *FLAKE_FLAGS, "build", installable, *flags]
        argv += ["--out-link", out_link] if out_link else []
        self.run_cmd(argv)
        note_event(event="nix", argv=argv)
        dry = "--dry-run" in flags
        try:
            result = counted_evaluate("nixos-rebuild-classic", "build", installable,
                                      self.store, _overrides(flags))  # fmt: skip
            out = _build_one(result, self.store, dry_run=dry)
        except SimError as exc:
            log(f"error: {exc}")
            raise Exit(1) from None
        if dry:
            return str(Path(out_link or "result").absolute())
        _link_result(out, out_link or "result")
        return out

    def nix_flake_build(self, attr: str, flags: list[str]) -> str:
        """``nixFlakeBuild``."""
        o = self.o
        if not o.build_host and not o.target_host and o.action not in (
            "switch", "boot", "test", "dry-activate"
        ):  # fmt: skip
            return self.nix_build(attr, flags, None)
        if not o.build_host:
            return self.nix_build(attr, flags, f"{self.tmp}/result")
        eval_args: list[str] = []
        build_args: list[str] = []
        rest = list(flags)
        while rest:
            i = rest.pop(0)
            if i in LOCK_0:
                eval_args.append(i)
            elif i == "--update-input":
                eval_args += [i, rest.pop(0)]
            elif i == "--override-input":
                eval_args += [i, rest.pop(0), rest.pop(0)]
            elif i != "--impure":
                build_args.append(i)
        argv = ["nix", *FLAKE_FLAGS, "eval", "--raw", f"{attr}.drvPath", *eval_args,
                *o.extra_build_flags]  # fmt: skip
        self.run_cmd(argv)
        note_event(event="nix", argv=argv)
        overrides = _overrides(eval_args)
        try:
            result = counted_evaluate("nixos-rebuild-classic", "eval", attr, self.store,
                                      overrides, shown=f"{attr}.drvPath")  # fmt: skip
            drv = str(evaluate(_installable(f"{attr}.drvPath"), self.store, overrides).value)
            if not result.config.get("build_fail"):
                _build_one(result, self.store, dry_run=False)  # one shared store (README)
        except SimError as exc:
            log(f"error: {exc}")
            raise Exit(1) from None
        if not Path(drv).exists():
            log("nix eval failed")
            raise Exit(1)
        copy = ["nix", *FLAKE_FLAGS, "copy", *o.copy_flags, "--derivation", "--to",
                f"ssh://{o.build_host}", drv]  # fmt: skip
        self.nix_copy(copy, o.build_host, [drv], write=True)
        out = self.build_host_cmd(["nix-store", "-r", drv, *build_args], capture=True)
        return out.strip().splitlines()[-1] if out.strip() else ""

    def copy_to_target(self, path: str) -> None:
        """``copyToTarget``."""
        o = self.o
        if o.target_host == o.build_host:
            return
        if not o.target_host:
            argv = ["nix-copy-closure", *o.copy_flags, "--from", o.build_host, path]
            self.nix_copy(argv, o.build_host, [path], write=False)
        elif not o.build_host:
            argv = ["nix-copy-closure", *o.copy_flags, "--to", o.target_host, path]
            self.nix_copy(argv, o.target_host, [path], write=True)
        else:
            self.build_host_cmd(["nix-copy-closure", *o.copy_flags, "--to", o.target_host, path])

    # --- the script's body -----------------------------------------------------------------

    def run(self) -> int:
        o = self.o
        can_run = o.action in ("switch", "boot", "test")
        if not o.building_attribute and o.flake:
            log("error: '--flake' cannot be used with '--file' or '--attr'")
            raise Exit(1)
        if not o.flake:
            log("error: the rebuild test bed only simulates flake builds; pass --flake REF#ATTR")
            raise Exit(1)
        flake, flake_attr = o.flake, ""
        match = FLAKE_RE.match(flake)
        if match:
            flake, flake_attr = match.group(1), match.group(2)
        if not flake_attr:
            out = self.target_cmd(["cat", "/proc/sys/kernel/hostname"], capture=True).stdout
            flake_attr = f'nixosConfigurations."{out.strip() or "default"}"'
        else:
            flake_attr = f'nixosConfigurations."{flake_attr}"'
        if o.specialisation and o.action not in ("switch", "test"):
            log("error: ‘--specialisation’ can only be used with ‘switch’ and ‘test’")
            raise Exit(1)
        if not os.environ.get(REEXEC_ENV) and can_run and not o.fast:
            link = f"{self.tmp}/nixos-rebuild"
            self.nix_build(f"{flake}#{flake_attr}.{NIXOS_REBUILD_ATTR}",
                           [*o.extra_build_flags, *o.lock_flags], link)  # fmt: skip
            new = f"{os.path.realpath(link)}/bin/nixos-rebuild"
            self.cleanup()
            note_event(event="reexec", into=new)
            self.run_cmd(["exec", new, *self.argv])
            os.execve(new, [new, *self.argv], {**os.environ, REEXEC_ENV: "1"})  # noqa: S606
        if o.action in ("edit", "repl", "list-generations", "build-vm",
                        "build-vm-with-bootloader"):  # fmt: skip
            log(f"error: nixos-rebuild {o.action} is not simulated by the rebuild test bed")
            raise Exit(1)
        if o.action == "dry-build":
            o.extra_build_flags.append("--dry-run")
        flags = [*o.extra_build_flags, *o.lock_flags]
        toplevel = f"{flake}#{flake_attr}.config.system.build.toplevel"
        image_name = ""
        if not o.rollback:
            log("building the system configuration...")
            if o.action in ("switch", "boot"):
                path = self.nix_flake_build(toplevel, flags)
                self.copy_to_target(path)
                self.target_sudo_cmd(["nix-env", "-p", o.profile, "--set", path])
            elif o.action in ("test", "build", "dry-build", "dry-activate"):
                path = self.nix_flake_build(toplevel, flags)
            elif o.action == "build-image":
                images = f"{flake}#{flake_attr}.config.system.build.images"
                try:
                    variants = list(
                        counted_evaluate("nixos-rebuild-classic", "eval", images, self.store).value
                    )
                except SimError as exc:
                    log(f"error: {exc}")
                    raise Exit(1) from None
                if o.image_variant not in variants:
                    log("Please specify one of the following supported image variants via "
                        "--image-variant:\n")  # fmt: skip
                    print("\n".join(sorted(variants)), flush=True)
                    raise Exit(1)
                file_path = f"{images}.{o.image_variant}.passthru.filePath"
                image_name = str(
                    counted_evaluate("nixos-rebuild-classic", "eval", file_path, self.store).value
                )
                path = self.nix_flake_build(f"{images}.{o.image_variant}", flags)
            else:
                raise show_syntax()
            if o.action not in ("switch", "boot") and o.action != "dry-build":
                self.copy_to_target(path)
        elif o.action in ("switch", "boot"):
            self.target_sudo_cmd(["nix-env", "--rollback", "-p", o.profile])
            path = o.profile
        elif o.action in ("test", "build"):
            listing = self.target_cmd(["nix-env", "-p", o.profile, "--list-generations"],
                                      capture=True).stdout  # fmt: skip
            number, previous = "", ""
            for line in listing.splitlines():  # sed -n '/current/ {g; p;}; s/ *\([0-9]*\).*/\1/; h'
                if "current" in line:
                    number = previous
                    break
                previous = re.sub(r"^ *([0-9]*).*", r"\1", line)
            path = f"{o.profile}-{number}-link"
        else:
            raise show_syntax()
        if o.action in ("switch", "boot", "test", "dry-activate"):
            cmd = [*SWITCH_PREFIX]
            cmd[cmd.index("NIXOS_INSTALL_BOOTLOADER")] = (
                f"NIXOS_INSTALL_BOOTLOADER={o.install_bootloader}"
            )
            if os.environ.get("NIXOS_SWITCH_USE_DIRTY_ENV"):
                log("warning: skipping systemd-run since NIXOS_SWITCH_USE_DIRTY_ENV is set. This "
                    "environment variable will be ignored in the future")  # fmt: skip
                cmd = ["env", f"NIXOS_INSTALL_BOOTLOADER={o.install_bootloader}"]
            elif self.target_sudo_cmd([*cmd, "true"], check=False) != 0:
                cmd = ["env", "-i", f"LOCALE_ARCHIVE={os.environ.get('LOCALE_ARCHIVE', '')}",
                       f"NIXOS_INSTALL_BOOTLOADER={o.install_bootloader}"]  # fmt: skip
            stc = f"{path}/bin/switch-to-configuration"
            if o.specialisation:
                stc = f"{path}/specialisation/{o.specialisation}/bin/switch-to-configuration"
            if self.target_sudo_cmd([*cmd, stc, o.action], check=False) != 0:
                log("warning: error(s) occurred while switching to the new configuration")
                raise Exit(1)
        if o.action == "build-image":
            print("Done.  The disk image can be found in ", end="", file=sys.stderr, flush=True)
            print(f"{path}/{image_name}", flush=True)
        return 0


def classic_main(argv: list[str], store: Path, program: str) -> int:
    """Run the classic script's logic; its exit code."""
    try:
        options = parse(argv, program)
        if not options.action:
            raise show_syntax()
    except Exit as exc:
        return exc.code
    run = Classic(options, argv, store, program)
    try:
        return run.run()
    except Exit as exc:
        return exc.code
    finally:
        run.cleanup()
