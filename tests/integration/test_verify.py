"""`invoke verify` against real sshd test hosts: each failure is caught with the right detail."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rebuild.errors import RemoteError
from rebuild.remote import Endpoint, Remote
from testbed import Testbed
from tests.integration.conftest import (
    Deployment,
    config,
    free_port,
    make_deployment,
    netns_or_skip,
)


def on_head(d: Deployment, cfg: dict[str, Any]) -> None:
    """Make `cfg` the flake's HEAD and the system the host runs."""
    d.set_config("vps", cfg)
    d.host.activate(d.tb.build("vps", cfg))


def verify_json(d: Deployment, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    done = d.invoke("verify", "--host", "vps", "--json", timeout=timeout)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def failing(data: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in data["checks"] if not c["ok"]}


class TestHealthy:
    def test_healthy_host_passes(self, deployment: Deployment) -> None:
        """A host running HEAD's system with everything up passes every check (exit 0)."""
        d = deployment
        on_head(d, config("v1", d.web_port))
        code, data = verify_json(d)
        assert code == 0, data
        assert data["ok"] is True and data["host"] == "vps"
        assert data["current_system"] == data["expected_system"]
        names = [c["name"] for c in data["checks"]]
        assert names[:4] == ["ssh", "current-system", "system-state", "failed-units"]
        assert (
            f"port {d.web_port}" in names and f"http http://{d.host.address}:{d.web_port}/" in names
        )

    def test_human_output(self, deployment: Deployment) -> None:
        """Without --json every check is a line with ok/FAIL and its detail."""
        d = deployment
        on_head(d, config("v1", d.web_port))
        done = d.invoke("verify", "--host", "vps")
        assert done.returncode == 0
        assert "verification: PASS" in done.stdout
        assert "ok   unit web.service: active (running)" in done.stdout


class TestFailures:
    def test_drift_names_both_systems(self, deployment: Deployment) -> None:
        """A host on another system than HEAD is drift, naming both store paths (exit 6)."""
        d = deployment  # runs v0, HEAD is v1
        code, data = verify_json(d)
        assert code == 6
        detail = failing(data)["current-system"]
        assert d.host.current_system() in detail
        assert d.expected("vps", config("v1", d.web_port)) in detail

    def test_failed_unit(self, deployment: Deployment) -> None:
        """A failed unit degrades the system; both checks fail naming the unit."""
        d = deployment
        on_head(d, config("v1", d.web_port, units={"backup.service": {"fail": True}}))
        code, data = verify_json(d)
        assert code == 6
        bad = failing(data)
        assert "degraded" in bad["system-state"] and "backup.service" in bad["system-state"]
        assert bad["failed-units"] == "backup.service"

    def test_inactive_listed_unit(self, testbed: Testbed) -> None:
        """A unit the inventory lists that is not running fails as inactive."""
        d = make_deployment(testbed, extra_units=["worker.service"], settle_timeout=1)
        on_head(d, config("v1", d.web_port, units={"worker.service": {"inactive": True}}))
        code, data = verify_json(d)
        assert code == 6
        assert failing(data) == {"unit worker.service": "inactive (dead)"}

    def test_closed_port(self, testbed: Testbed) -> None:
        """A port nobody listens on fails as not listening."""
        closed = free_port()
        d = make_deployment(testbed, extra_ports=[closed], settle_timeout=1)
        on_head(d, config("v1", d.web_port))
        code, data = verify_json(d)
        assert code == 6
        assert failing(data) == {f"port {closed}": "not listening"}

    def test_url_answering_500(self, deployment: Deployment) -> None:
        """A URL answering 500 where 200 is expected fails with both codes."""
        d = deployment
        on_head(
            d,
            config(
                "v1", d.web_port, units={"web.service": {"port": d.web_port, "http_status": 500}}
            ),
        )
        code, data = verify_json(d)
        assert code == 6
        assert failing(data) == {
            f"http http://{d.host.address}:{d.web_port}/": "answered 500, expected 200"
        }

    def test_failing_command_shows_its_output(self, testbed: Testbed) -> None:
        """An operator command exiting non-zero fails with its exit code and last lines."""
        d = make_deployment(
            testbed,
            commands={"secrets decrypted": "echo 'no /run/secrets/example'; exit 3"},
            settle_timeout=1,
        )
        on_head(d, config("v1", d.web_port))
        code, data = verify_json(d)
        assert code == 6
        assert failing(data) == {"command secrets decrypted": "exit 3: no /run/secrets/example"}

    def test_wrong_host_key_refused_and_nothing_ran(self, testbed: Testbed) -> None:
        """A changed host key is refused (exit 3) before any command runs on the host."""
        marker = testbed.root / "marker"
        d = make_deployment(testbed, commands={"marker": f"touch {marker}"})
        on_head(d, config("v1", d.web_port))
        other = testbed.root / "other"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True
        )
        kind, key = other.with_suffix(".pub").read_text().split()[:2]
        name = testbed.known_hosts.read_text().split()[0]
        testbed.known_hosts.write_text(f"{name} {kind} {key}\n")
        done = d.invoke("verify", "--host", "vps")
        assert done.returncode == 3
        assert "HOST KEY CHANGED" in done.stderr
        assert not marker.exists()

    def test_unknown_host_exit_2(self, deployment: Deployment) -> None:
        """An unknown host name is a usage error (exit 2)."""
        done = deployment.invoke("verify", "--host", "nope")
        assert done.returncode == 2 and "unknown host" in done.stderr


class TestHostGoesAway:
    def test_host_lost_mid_verification_fails_in_bounded_time(self, testbed: Testbed) -> None:
        """A host whose link dies during verification fails within the command timeout."""
        netns_or_skip()
        started_marker = testbed.root / "slow-check-started"
        d = make_deployment(
            testbed,
            netns=True,
            commands={"slow": f"touch {started_marker}; sleep 4"},
            command_timeout=5,
            settle_timeout=1,
        )
        on_head(d, config("v1", d.web_port))
        started_marker.unlink(missing_ok=True)  # the deploy's own verification touched it
        proc = subprocess.Popen(
            d.argv("verify", "--host", "vps", "--json"), env=d.env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not started_marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert started_marker.exists(), "verification never reached the slow check"
            d.host.cut_link()  # the host vanishes while its facts script runs
            cut_at = time.monotonic()
            out, err = proc.communicate(timeout=120)
            after_cut = time.monotonic() - cut_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            d.host.restore_link()
        assert proc.returncode == 6, err
        data = json.loads(out.strip().splitlines()[-1])
        assert data["ok"] is False
        assert data["checks"][0]["name"] == "ssh" and not data["checks"][0]["ok"]
        # bounded by the facts script's own timeout, counted from the script's start (before
        # the cut): 15 s + the longest check's own (the 10 s HTTP check; the checks run side
        # by side), and a margin for a busy CPU
        assert after_cut < 30, after_cut


@pytest.mark.parametrize("action", ["boot"])
def test_rebuild_boot_checks_the_profile(deployment: Deployment, action: str) -> None:
    """After `--action boot` the profile points at the new system; the running one is unchanged."""
    d = deployment
    before = d.host.current_system()
    done = d.invoke("rebuild", "--host", "vps", "--yes", "--action", action)
    assert done.returncode == 0, done.stdout + done.stderr
    want = d.expected("vps", config("v1", d.web_port))
    assert d.host.profile_system() == want and d.host.current_system() == before
    record = d.records()[-1]
    assert [c["name"] for c in record["checks"]] == ["ssh", "system-profile"]


def test_standalone_verify_compares_with_head_not_the_working_tree(deployment: Deployment) -> None:
    """An uncommitted change does not move the expected system: verify judges against HEAD."""
    d = deployment
    head = config("v1", d.web_port)
    on_head(d, head)
    (d.flake / "hosts" / "vps.json").write_text(json.dumps(config("v9-uncommitted", d.web_port)))
    code, data = verify_json(d)
    assert code == 0, data
    assert data["expected_system"] == d.expected("vps", head)


def endpoint_of(d: Deployment) -> Endpoint:
    """rebuild's own connection settings for the deployment's host."""
    return Endpoint(name="vps", address=d.host.address, port=d.host.port, user=d.host.user,
                    known_hosts=d.tb.known_hosts, identity_file=d.tb.client_key,
                    connect_timeout=5)  # fmt: skip


def test_a_remote_command_without_exit_status_is_an_error(deployment: Deployment) -> None:
    """A command whose channel closes without an exit status (here its shell is killed; on a
    timeout Invoke's timer closes the channel the same way) is an error, never a short result
    parsed as facts."""
    d = deployment
    endpoint = endpoint_of(d)
    with Remote(endpoint) as remote:
        assert remote.run("echo fine").stdout == "fine\n"
        with pytest.raises(RemoteError, match="without an exit status"):
            remote.run("echo partial; kill -9 $$")


def test_a_privileged_and_a_plain_script_share_one_command_as_root(
    deployment: Deployment,
) -> None:
    """Without sudo (root logs in) both parts run, each with its own output and exit status."""
    d = deployment
    endpoint = endpoint_of(d)
    with Remote(endpoint) as remote:
        first, second = remote.run_pair("echo one; cat; exit 4", "echo two; exit 0")
    assert (first.exited, first.stdout) == (4, "one\n")
    assert (second.exited, second.stdout) == (0, "two\n")


def test_the_two_parts_of_a_pair_run_side_by_side(deployment: Deployment, tmp_path: Path) -> None:
    """The plain part runs while the privileged one does: the first waits for a file that only
    the second creates (run one after the other, the first would give up after 5 s)."""
    d = deployment
    flag = tmp_path / "plain-started"
    first = (
        f"i=0; while [ ! -e {flag} ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; "
        f"[ -e {flag} ] && echo saw; exit 4"
    )
    with Remote(endpoint_of(d)) as remote:
        first_result, second = remote.run_pair(first, f"touch {flag}; echo two; exit 3")
    assert (first_result.exited, first_result.stdout) == (4, "saw\n")
    assert (second.exited, second.stdout) == (3, "two\n")


def test_a_pair_without_a_temporary_file_runs_one_part_after_the_other(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A host whose `mktemp` fails (a full or read-only /tmp) still gets both parts, in turn."""
    d = deployment
    called = tmp_path / "mktemp-called"
    shim = d.host.bin_dir / "mktemp"
    shim.write_text(f"#!/bin/sh\ntouch {called}\necho 'mktemp: No space left' >&2\nexit 1\n")
    shim.chmod(0o755)
    try:
        with Remote(endpoint_of(d)) as remote:
            first, second = remote.run_pair("echo one; cat; exit 4", "echo two; exit 3")
    finally:
        shim.unlink()
    assert called.exists()
    assert (first.exited, first.stdout) == (4, "one\n")
    assert (second.exited, second.stdout) == (3, "two\n")


def test_each_command_finds_its_channel_already_open(deployment: Deployment) -> None:
    """A command on a connection that has run one before does not wait for a channel to open
    (one round trip less each): it takes the one opened while the previous command ran."""
    d = deployment
    endpoint = endpoint_of(d)
    with Remote(endpoint) as remote:
        assert remote.run("echo one").stdout == "one\n"
        deadline = time.monotonic() + 10
        while not remote.conn._spares[0].ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        transport = remote.conn.transport
        opened_by: list[str] = []
        original = transport.open_session

        def open_session(*args: object, **kwargs: object) -> object:
            opened_by.append(threading.current_thread().name)
            return original(*args, **kwargs)

        transport.open_session = open_session
        assert remote.run("echo two").stdout == "two\n"
        assert remote.run("echo three").stdout == "three\n"
    # the commands' own threads opened nothing; each opened the next one's ahead
    assert opened_by == ["rebuild-spare-channel", "rebuild-spare-channel"]


def test_the_connection_sends_at_once_and_acks_at_once(deployment: Deployment) -> None:
    """rebuild's SSH connection runs with Nagle off and prompt ACKs: paramiko's own socket
    has neither, and its handshake and each connection's first channel wait out the peer's
    40 ms delayed ACK (benchmarks/README, #17)."""
    import socket

    d = deployment
    with Remote(endpoint_of(d)) as remote:
        assert remote.run("echo one").stdout == "one\n"
        sock = remote.conn.transport.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert type(sock).__name__ == "_PromptSocket"


def test_a_closed_port_is_named_as_paramiko_names_it(deployment: Deployment) -> None:
    """Refused on every address: one line, the port and the address, as before rebuild opened
    its own socket."""
    endpoint = Endpoint(name="vps", address="127.0.0.1", port=free_port(), user="root",
                        known_hosts=deployment.tb.known_hosts, connect_timeout=5)  # fmt: skip
    with pytest.raises(RemoteError) as caught:
        Remote(endpoint).open()
    assert str(caught.value) == (
        f"cannot reach vps ([127.0.0.1]:{endpoint.port}): [Errno None] Unable to connect to "
        f"port {endpoint.port} on 127.0.0.1"
    )
