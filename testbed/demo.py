"""`invoke demo`: the real tool against a throwaway simulated NixOS host, end to end."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from rebuild import identity
from rebuild.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _inventory(
    host_port: int, web_port: int, flake: Path, tb_root: Path, key: Path, known_hosts: Path
) -> str:
    me = identity.current()
    return f"""\
flake = "{flake}"
known_hosts = "{known_hosts}"
audit_log = "{tb_root / "audit.jsonl"}"

[[operators]]
name = "demo-operator"
machine_id = "{me.machine_id}"

[hosts.demo]
address = "127.0.0.1"
port = {host_port}
user = "{getpass.getuser()}"
identity_file = "{key}"
rollback_timeout = 30
tags = ["demo"]

[hosts.demo.verify]
units = ["sshd.service", "web.service"]
ports = [{web_port}]
settle_timeout = 5
[[hosts.demo.verify.http]]
url = "http://127.0.0.1:{web_port}/"
status = 200
"""


def _step(title: str, why: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}")
    print(f"   {why}\n", flush=True)


def _invoke(args: list[str], inventory: Path, env: dict[str, str]) -> int:
    argv = [
        sys.executable,
        "-m",
        "invoke",
        "--search-root",
        str(REPO),
        *args,
        "--inventory",
        str(inventory),
    ]
    print("$ invoke " + " ".join(args), flush=True)
    return subprocess.run(argv, env=env, check=False, timeout=300).returncode


def _commit(flake: Path, message: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.invalid",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.invalid",
    }
    subprocess.run(["git", "-C", str(flake), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(flake), "commit", "-qm", message], check=True, env=env)


def run() -> int:
    """Start a simulated host, show a good deploy, a bad one rolled back, a refusal; clean up."""
    if not Path("/usr/sbin/sshd").exists() and shutil.which("sshd") is None:
        raise ConfigError(
            "the demo needs OpenSSH's sshd: install the Debian package openssh-server "
            "(sudo apt-get install openssh-server)"
        )
    if not identity.current().machine_id:
        raise ConfigError(
            "this machine has no /etc/machine-id, which rebuild uses to authorize operators; "
            "create one with `sudo systemd-machine-id-setup`"
        )
    from testbed import Testbed

    started = time.monotonic()
    results: list[tuple[str, int, int]] = []
    with Testbed() as tb:
        web_port = _free_port()
        host = tb.add_host("demo")
        # web.service restarts when it changes (stopIfChanged = false, as nginx's module has
        # it); v1 bumps openssl: the preview shows both before the prompt
        web = {"port": web_port, "stop_if_changed": False}
        packages = {"openssl": "3.0.13", "nginx": "1.24.0"}
        old = {"units": {"sshd.service": {}, "web.service": web}, "label": "v0",
               "packages": packages}  # fmt: skip
        good = {"units": {"sshd.service": {}, "web.service": web}, "label": "v1",
                "packages": {**packages, "openssl": "3.0.14"}}  # fmt: skip
        broken = {
            "units": {"sshd.service": {}, "web.service": web, "backup.service": {"fail": True}},
            "label": "v2",
            "packages": good["packages"],
        }
        flake = tb.make_flake(tb.root / "flake", {"demo": good})
        host.activate(tb.build("demo", old))
        inventory = tb.root / "inventory.toml"
        inventory.write_text(
            _inventory(host.port, web_port, flake, tb.root, tb.client_key, tb.known_hosts),
            encoding="utf-8",
        )
        env = {**os.environ, **tb.env()}
        env.pop("REBUILD_INVENTORY", None)
        print(f"simulated NixOS host 'demo': sshd on 127.0.0.1:{host.port}, running {old['label']}")

        _step(
            "1. a good deploy",
            "gates pass; the new system is built, copied and previewed on the host (openssl "
            "3.0.13 → 3.0.14, web.service restarts) in the plan; nixos-rebuild switches the "
            "host, verification is green and the dead-man timer is cancelled.",
        )
        results.append(
            ("good deploy", 0, _invoke(["rebuild", "--host", "demo", "--yes"], inventory, env))
        )

        _step(
            "2. a bad deploy caught",
            "the new configuration leaves backup.service failed: verification sees the "
            "degraded system and rebuild rolls the host back at once (exit 7).",
        )
        (flake / "hosts" / "demo.json").write_text(_json(broken), encoding="utf-8")
        _commit(flake, "demo: add a broken backup service")
        results.append(
            (
                "bad deploy rolled back",
                7,
                _invoke(["rebuild", "--host", "demo", "--yes"], inventory, env),
            )
        )
        print(f"   the host runs {host.current_system()} again (v1)")

        _step(
            "3. a refusal",
            "an uncommitted change in the flake: the dirty-tree gate refuses before "
            "anything runs on the host (exit 3).",
        )
        (flake / "hosts" / "demo.json").write_text(_json(good), encoding="utf-8")
        results.append(
            (
                "dirty tree refused",
                3,
                _invoke(["rebuild", "--host", "demo", "--yes"], inventory, env),
            )
        )

        _step("4. the audit trail", "every run, refusals included, is one JSON line.")
        _invoke(["history"], inventory, env)
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s; the simulated host is gone.")
    ok = True
    for title, want, got in results:
        mark = "ok" if want == got else "UNEXPECTED"
        ok = ok and want == got
        print(f"  {mark:10} {title}: exit {got} (expected {want})")
    return 0 if ok else 1


def _json(data: object) -> str:

    return json.dumps(data, indent=2, sort_keys=True) + "\n"
