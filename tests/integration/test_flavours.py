"""rebuild against both nixos-rebuild flavours (the test bed's ng and classic stand-ins), as a
subprocess, against real sshd hosts.

The matrix: flavour (ng, classic) x deploy user (root; a sudo user without a password; a sudo
user whose password is in the keyring) x where the system is built (here; `build_host =
"target"`; a second simulated host as the builder, on another address and port). Each cell is a
real deploy of a configuration of its own, verified on the host. One test bed serves the whole
matrix (its hosts deploy one cell after another). The sudo users need root (they are created),
the builder a network namespace (this machine's own addresses are refused as builders).

Then what the flavours must get right beyond a plain deploy: the dead-man restore against a
switch that still holds switch-to-configuration's lock, a long activation, `--action build`
before a deploy, an `extra_args` that changes the evaluation, the re-exec guard, an IPv6
loopback host and a key that only an ssh-agent holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import SimHost, Testbed
from testbed.testbed import FAST_KEX
from tests.integration.conftest import (
    Deployment,
    config,
    inventory_text,
    make_deployment,
    netns_or_skip,
)
from tests.integration.test_sudo import PASSWORD, keyring_env, store_password
from tests.support import users as testusers
from tests.support.flock import flock_held

FLAVOURS = ("ng", "classic")
USERS = ("root", "nopasswd", "password")
BUILDS = ("local", "target", "builder")
NO_REEXEC = {"ng": "--no-reexec", "classic": "--fast"}
SUDO_FLAGS = {"ng": ("--sudo",), "classic": ("--use-remote-sudo",)}


def recording(tb: Testbed, flavour: str) -> tuple[Path, Path]:
    """A nixos-rebuild of that flavour that notes each argv (one line, shell-quoted)."""
    wrapper = tb.root / f"recording-{flavour}"
    calls = tb.root / f"calls-{flavour}.log"
    if not wrapper.exists():
        real = tb.nixos_rebuild(flavour)
        wrapper.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
            f'exec {shlex.quote(str(real))} "$@"\n'
        )
        wrapper.chmod(0o755)
    return wrapper, calls


_BASE: dict[Path, str] = {}  # each deployment's inventory as make_deployment wrote it


def flavoured(d: Deployment, flavour: str, *, user: str | None = None, sudo: bool = False,
              build_host: str = "", extra: str = "") -> dict[str, str]:  # fmt: skip
    """Rewrite the deployment's inventory (from its first version) for a flavour, deploy user,
    sudo, build host and extra host keys; the environment that runs that flavour's recording
    nixos-rebuild."""
    base = _BASE.setdefault(d.inventory, d.inventory.read_text())
    old = f'user = "{d.host.user}"'
    assert base.count(old) == 1
    lines = [f'user = "{user or d.host.user}"']
    lines += ["sudo = true"] if sudo else []
    lines += [f'build_host = "{build_host}"'] if build_host else []
    lines += [extra] if extra else []
    text = f'nixos_rebuild_flavour = "{flavour}"\n' + base.replace(old, "\n".join(lines))
    d.inventory.write_text(text)
    wrapper, _calls = recording(d.tb, flavour)
    return {"REBUILD_NIXOS_REBUILD": str(wrapper)}


def calls(d: Deployment, flavour: str) -> list[list[str]]:
    path = recording(d.tb, flavour)[1]
    return [shlex.split(x) for x in path.read_text().splitlines()] if path.exists() else []


def events(tb: Testbed) -> list[dict[str, Any]]:
    path = tb.root / "standins.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# --- the matrix --------------------------------------------------------------------------------


@dataclass
class Matrix:
    d: Deployment
    accounts: dict[str, testusers.TestUser]
    builder: SimHost | None
    keyring_file: Path
    results: dict[str, int]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """One test bed for every cell: the target `vps`, a builder in a network namespace (when
    there are namespaces), the sudo users (as root), a keyring file for the password user."""
    made: dict[str, testusers.TestUser] = {}
    users_ok = testusers.unavailable() is None
    if users_ok:
        testusers.cleanup_stale_users()
        made["nopasswd"] = testusers.create_user("nopasswd")
        made["password"] = testusers.create_user("password", PASSWORD)
    try:
        with Testbed(other_users=users_ok, kex=FAST_KEX) as tb:
            d = make_deployment(tb)
            builder = None
            from testbed import netns_available

            if netns_available() is None:
                builder = tb.add_host("builder", netns=True)
            results: dict[str, int] = {}
            yield Matrix(d, made, builder, tmp_path_factory.mktemp("keyring") / "keyring.json",
                         results)  # fmt: skip
            table = "\n".join(f"  {cell}: exit {code}" for cell, code in sorted(results.items()))
            print(f"\nflavour x user x build exit codes:\n{table}")
    finally:
        problems = [p for user in made.values() for p in testusers.remove_user(user)]
        assert not problems, problems


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("user_kind", USERS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_deploy_matrix(matrix: Matrix, flavour: str, user_kind: str, build: str) -> None:
    """Each flavour deploys as root, as a passwordless sudo user and as a sudo user whose
    password is in the keyring, building here, on the target, or on a separate builder: exit 0
    and the host runs (and boots) the cell's own system; the command line is the flavour's.
    Classic with a separate builder is refused before anything runs (exit 2)."""
    d = matrix.d
    if user_kind != "root" and user_kind not in matrix.accounts:
        pytest.skip(testusers.unavailable() or "no test users")
    if build == "builder" and matrix.builder is None:
        netns_or_skip()
    user = matrix.accounts[user_kind].name if user_kind != "root" else d.host.user
    build_host = {"local": "", "target": "target"}.get(build, "")
    if build == "builder" and matrix.builder is not None:
        build_host = f"{user}@{matrix.builder.address}:{matrix.builder.port}"
        assert matrix.builder.port != d.host.port
    env = flavoured(d, flavour, user=user, sudo=user_kind != "root", build_host=build_host)
    env.update(keyring_env(matrix.keyring_file))
    refused = flavour == "classic" and build == "builder"  # an invalid inventory (exit 2)
    if user_kind == "password" and not refused:
        store_password(d, matrix.keyring_file, PASSWORD)
    label = f"{flavour}-{user_kind}-{build}"
    cfg = config(label, d.web_port)
    d.set_config("vps", cfg)
    before = len(calls(d, flavour))
    seen_before = len(events(d.tb))
    done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
    matrix.results[label] = done.returncode
    if refused:
        assert done.returncode == 2, done.stdout + done.stderr
        assert (
            "hosts.vps.build_host" in done.stderr and 'nixos_rebuild_flavour = "ng"' in done.stderr
        )
        assert len(calls(d, flavour)) == before
        return
    assert done.returncode == 0, done.stdout + done.stderr
    want = d.expected("vps", cfg)
    assert d.host.current_system() == want
    assert d.host.profile_system() == want
    assert PASSWORD not in done.stdout + done.stderr
    argv = calls(d, flavour)[-1]
    assert NO_REEXEC[flavour] in argv
    if user_kind != "root":
        assert all(f in argv for f in SUDO_FLAGS[flavour])
        assert ("--ask-sudo-password" in argv) == (flavour == "ng" and user_kind == "password")
    if build_host:
        assert argv[argv.index("--build-host") + 1].endswith(
            "@rebuild-vps" if build == "target" else "@rebuild-vps-builder"
        )
    if user_kind == "password" and flavour == "classic":
        # the host's own sudo asked through `ssh -t`, answered by rebuild each time
        assert done.stdout.count("(answered by rebuild)") >= 1
    record = d.records()[-1]
    assert record["result"] == "ok" and record["command"][0] == str(recording(d.tb, flavour)[0])
    # every ssh nixos-rebuild (and its nix) started read rebuild's ssh config: NIX_SSHOPTS
    ssh_runs = [e["argv"] for e in events(d.tb)[seen_before:] if e["event"] == "ssh"]
    assert ssh_runs
    for argv in ssh_runs:
        config_file = argv[argv.index("-F") + 1]
        assert Path(config_file).name == "ssh_config.vps", argv


# --- beyond a plain deploy ---------------------------------------------------------------


def lock_held(host: SimHost) -> bool:
    return flock_held(host.root / "run" / "nixos" / "switch-to-configuration.lock")


def journal(host: SimHost, phase: str = "end") -> list[dict[str, Any]]:
    """The host's switch-to-configuration runs: `locked` when one took the lock, `end` with its
    exit code (testbed.sim.activation)."""
    path = host.root / "sim" / "log" / "activations.jsonl"
    runs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in runs if r["phase"] == phase]


def wait_for(what: str, predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class TestDeadManAgainstARunningSwitch:
    def test_the_restore_waits_for_the_switch_then_restores(self, testbed: Testbed) -> None:
        """The link drops while a slow switch holds switch-to-configuration's lock: the timer
        fires, its restore waits on the lock (flock -w) instead of failing with exit 11, then
        restores the previous system after the switch ended; boot default and running system
        agree; rebuild, reconnected, reports the rollback (exit 7)."""
        netns_or_skip()
        d = make_deployment(testbed, netns=True, rollback_timeout=6)
        previous = d.host.current_system()
        cfg = config("slow", d.web_port, activation_seconds=14)
        d.set_config("vps", cfg)
        proc = subprocess.Popen(d.argv("rebuild", "--host", "vps", "--yes"), env=d.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        output: dict[str, str] = {}
        reader = threading.Thread(target=lambda: output.update(zip(("out", "err"),
                                  proc.communicate(), strict=True)), daemon=True)  # fmt: skip
        reader.start()
        new = d.expected("vps", cfg)

        def switching() -> bool:
            locked = [r for r in journal(d.host, "locked") if r["action"] == "switch"]
            return bool(locked) and locked[-1]["system"] == new and lock_held(d.host)

        def restored() -> bool:
            ends = journal(d.host)
            return bool(ends) and ends[-1]["system"] == previous and ends[-2]["system"] == new

        try:
            wait_for("the slow switch to hold the lock", switching, 120)
            d.host.cut_link()
            wait_for("the restore to end", restored, 90)
        finally:
            d.host.restore_link()
        reader.join(timeout=240)
        assert proc.returncode == 7, output
        assert d.host.current_system() == previous == d.host.profile_system()
        runs = journal(d.host)
        switch, restore = runs[-2], runs[-1]
        assert (switch["system"], switch["code"]) == (new, 0)  # the switch itself finished
        assert (restore["system"], restore["code"]) == (previous, 0)
        assert restore["start"] >= switch["end"]  # the restore waited for it
        assert all(r["code"] != 11 for r in runs)  # and never hit the lock
        assert "restored" in output["err"] + output["out"]


class TestLongActivation:
    def test_a_long_chatty_activation_outlasts_the_timer_and_is_verified(
        self, testbed: Testbed
    ) -> None:
        """An activation of 16 s that keeps talking, past the dead-man timer (6 s) and
        nixos-rebuild's ServerAlive interval (15 s): the heartbeat keeps the timer from firing,
        the deploy verifies."""
        d = make_deployment(testbed, rollback_timeout=6)
        cfg = config("long", d.web_port, activation_seconds=16)
        d.set_config("vps", cfg)
        began = time.monotonic()
        done = d.invoke("rebuild", "--host", "vps", "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert time.monotonic() - began >= 16
        assert d.host.current_system() == d.expected("vps", cfg) == d.host.profile_system()
        assert "simulated work left" in done.stdout + done.stderr
        assert not [t for t, sub in d.host.timers().items() if sub == "waiting"]
        assert [r["code"] for r in journal(d.host)][-1] == 0


class TestBuildThenDeploy:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_a_build_leaves_no_result_in_the_flake(self, testbed: Testbed, flavour: str) -> None:
        """`--action build` keeps nixos-rebuild's result link in rebuild's state folder, so the
        deploy after it is not refused as dirty."""
        d = make_deployment(testbed)
        env = flavoured(d, flavour)
        done = d.invoke("rebuild", "--host", "vps", "--yes", "--action", "build", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not (d.flake / "result").exists() and not (d.flake / "result").is_symlink()
        link = d.audit_log.parent / "results" / "vps" / "result"
        assert link.resolve() == Path(d.expected("vps", config("v1", d.web_port)))
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == d.expected("vps", config("v1", d.web_port))


class TestEvaluationArgs:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_an_override_input_is_evaluated_alike_no_false_drift(
        self, testbed: Testbed, tmp_path: Path, flavour: str
    ) -> None:
        """extra_args = ["--override-input", "site", PATH] changes what the configuration
        evaluates to: rebuild's own evaluation gets it too, so the deploy verifies against
        the overridden system (no false drift)."""
        d = make_deployment(testbed)
        site = tmp_path / "site"
        site.mkdir()
        cfg = config("inputs", d.web_port, inputs=["site"])
        d.set_config("vps", cfg)
        extra = f'extra_args = ["--override-input", "site", "{site}"]'
        env = flavoured(d, flavour, extra=extra)
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        plain = d.expected("vps", cfg)
        overridden = d.expected("vps", {**cfg, "input_overrides": {"site": f"path:{site}"}})
        assert plain != overridden
        assert d.host.current_system() == overridden
        assert d.records()[-1]["expected_system"] == overridden
        done = d.invoke("verify", "--host", "vps", "--json", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["ok"] is True


class TestReexecGuard:
    def test_ng_with_sudo_deploys_a_configuration_whose_nixos_rebuild_is_classic(
        self, testbed: Testbed
    ) -> None:
        """The target configuration's own nixos-rebuild is classic, which has no --sudo
        (nixpkgs issue 425637): rebuild's --no-reexec keeps ng judging the flags, nothing is
        re-executed, nothing extra is built, the deploy verifies."""
        if os.geteuid() != 0:
            pytest.skip("needs root: sudo as root needs no password")
        d = make_deployment(testbed)
        cfg = config("classic-inside", d.web_port, nixos_rebuild_flavour="classic")
        d.set_config("vps", cfg)
        env = flavoured(d, "ng", sudo=True)  # root through sudo: no password
        done = d.invoke("rebuild", "--host", "vps", "--yes", **env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == d.expected("vps", cfg)
        argv = calls(d, "ng")[-1]
        assert "--no-reexec" in argv and "--sudo" in argv
        seen = events(testbed)
        assert not [e for e in seen if e["event"] == "reexec"]
        assert not [e for e in seen if e["event"] == "nix" and any(
            a.endswith("config.system.build.nixos-rebuild") for a in e["argv"])]  # fmt: skip
        assert {e["flavour"] for e in seen if e["event"] == "start"} == {"ng"}


def ipv6_loopback() -> str | None:
    """Why there is no IPv6 loopback here, or None."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback: {exc.strerror}"
    return None


class TestAddresses:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_an_ipv6_loopback_host(self, testbed: Testbed, tmp_path: Path, flavour: str) -> None:
        """A host at ::1 (its own port): the ssh config names it unbracketed, both flavours
        deploy and verify it."""
        why = ipv6_loopback()
        if why:
            pytest.skip(why)
        host = testbed.add_host("v6", address="::1")
        cfg = {"units": {"sshd.service": {}}, "label": f"v6-{flavour}"}
        flake = testbed.make_flake(tmp_path / "flake", {"v6": cfg})
        inventory = tmp_path / "inventory.toml"
        text = inventory_text(testbed.root, flake, testbed.known_hosts, testbed.client_key,
                              {"v6": (host, 0, {})})  # fmt: skip
        # the host serves nothing on ::1: units only
        text = text.split("[[hosts.v6.verify.http]]")[0].replace("ports = [0]", "ports = []")
        text = text.replace('units = ["sshd.service", "web.service"]', 'units = ["sshd.service"]')
        inventory.write_text(f'nixos_rebuild_flavour = "{flavour}"\n' + text)
        d = Deployment(testbed, host, flake, inventory, 0, testbed.root / "calls.log")
        wrapper, _ = recording(testbed, flavour)
        done = d.invoke("rebuild", "--host", "v6", "--yes", REBUILD_NIXOS_REBUILD=str(wrapper))
        assert done.returncode == 0, done.stdout + done.stderr
        assert host.current_system() == testbed.store_path("v6", cfg)
        assert "[::1]" in testbed.known_hosts.read_text()
        assert all("-F" in e["argv"] for e in events(testbed) if e["event"] == "ssh")


class TestAgentOnlyKey:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    def test_a_key_held_only_by_ssh_agent(self, testbed: Testbed, flavour: str) -> None:
        """No identity_file: the key is only in an ssh-agent (started and stopped here by PID);
        the generated ssh config names the agent (IdentityAgent), so nixos-rebuild's ssh and
        rebuild's own connection both log in with it."""
        d = make_deployment(testbed)
        kept = [x for x in d.inventory.read_text().splitlines() if "identity_file" not in x]
        d.inventory.write_text("\n".join(kept) + "\n")
        with ssh_agent(testbed) as agent_env:
            env = flavoured(d, flavour)
            done = d.invoke("rebuild", "--host", "vps", "--yes", **env, **agent_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert d.host.current_system() == d.expected("vps", config("v1", d.web_port))
        ssh_runs = [e["argv"] for e in events(testbed) if e["event"] == "ssh"]
        assert ssh_runs and not any("-i" in argv for argv in ssh_runs)


def accepts(path: Path) -> bool:
    """A Unix socket that takes connections."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def ssh_agent(tb: Testbed) -> Iterator[dict[str, str]]:
    """A private ssh-agent holding the test bed's key; killed by its PID afterwards."""
    sock = tb.root / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # the socket file exists from bind(), before listen(): wait until it takes connections
        wait_for("the agent's socket", lambda: accepts(sock), 10)
        env = {"SSH_AUTH_SOCK": str(sock)}
        added = subprocess.run(["ssh-add", str(tb.client_key)], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert added.returncode == 0, added.stderr
        yield env
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
