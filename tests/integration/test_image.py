"""`invoke image` end to end, as a subprocess, against the test bed's nix/nixos-rebuild stand-ins.

No SSH and no allowlist are involved: the inventory here has no [[operators]] and its host's
address is not reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed import Testbed
from testbed.store import image_file_name, image_store_path
from tests.integration.conftest import REPO, git
from tests.integration.interrupts import SIGINT_DISPOSITIONS, Watched, busy_cores, launch
from tests.support import launcher

CONFIG: dict[str, Any] = {"units": {"sshd.service": {}}, "label": "v1"}


@dataclass
class ImageBed:
    """A test bed flake with the host vps, an inventory for it, and the real `invoke`."""

    tb: Testbed
    flake: Path
    inventory: Path
    calls: Path  # every nixos-rebuild invocation is appended here

    @property
    def state(self) -> Path:
        return self.tb.root / "state"

    @property
    def audit_log(self) -> Path:
        return self.state / "audit.jsonl"

    def write_inventory(self, **host: str) -> None:
        lines = [
            f'flake = "{self.flake}"',
            f'audit_log = "{self.audit_log}"',
            "",
            "[hosts.vps]",
            'address = "203.0.113.10"',
            *(f'{key} = "{value}"' for key, value in host.items()),
        ]
        self.inventory.write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.tb.env()}
        env.pop("REBUILD_INVENTORY", None)
        env["REBUILD_NIXOS_REBUILD"] = str(self.tb.root / "recording-nixos-rebuild")
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args,
                "--inventory", str(self.inventory)]  # fmt: skip

    def invoke(self, *args: str) -> subprocess.CompletedProcess[str]:
        return launcher.run(self.argv(*args), env=self.env(), timeout=120)

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def nixos_rebuild_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def expected_image(self, variant: str = "linode", config: dict[str, Any] = CONFIG) -> Path:
        """Where the stand-in puts the image of this variant (what the real tool would print)."""
        out = image_store_path(self.tb.store_dir, "vps", config, variant)
        return Path(out) / image_file_name(variant)


@pytest.fixture
def busy_cpu() -> Iterator[None]:
    """Every core busy while the test runs: an operator's loaded machine."""
    with busy_cores():
        yield


@pytest.fixture
def bed(testbed: Testbed) -> ImageBed:
    flake = testbed.make_flake(testbed.root / "flake", {"vps": CONFIG})
    calls = testbed.root / "nixos-rebuild-calls.log"
    wrapper = testbed.root / "recording-nixos-rebuild"
    real = testbed.env()["REBUILD_NIXOS_REBUILD"]
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{calls}'\nexec '{real}' \"$@\"\n")
    wrapper.chmod(0o755)
    b = ImageBed(testbed, flake, testbed.root / "inventory.toml", calls)
    b.write_inventory()
    return b


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head(repo: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


class TestBuildImage:
    def test_reports_path_size_sha256_and_commit(self, bed: ImageBed) -> None:
        """The linode image is built with build-image; path, size, sha256, commit are right."""
        done = bed.invoke("image", "--host", "vps")
        assert done.returncode == 0, done.stdout + done.stderr
        want = bed.expected_image()
        assert want.is_file()
        assert f"image:   {want}" in done.stdout
        assert f"size:    {want.stat().st_size} bytes" in done.stdout
        assert f"sha256:  {digest(want)}" in done.stdout
        assert f"commit:  {head(bed.flake)}" in done.stdout
        assert "Done. The disk image can be found in" in done.stdout  # the build's own output
        assert bed.nixos_rebuild_calls() == [
            f"build-image --image-variant linode --flake {bed.flake}#vps"
        ]
        link = bed.state / "images" / "vps" / "result"
        assert link.is_symlink() and Path(os.path.realpath(link)) == want.parent
        assert not (bed.flake / "result").exists()
        git(bed.flake, "diff", "--quiet")  # the build left the flake clean

    def test_json_and_audit_record(self, bed: ImageBed) -> None:
        """--json prints one object on stdout; one audit record with event image is written."""
        done = bed.invoke("image", "--host", "vps", "--json")
        assert done.returncode == 0, done.stderr
        [line] = done.stdout.strip().splitlines()
        data = json.loads(line)
        want = bed.expected_image()
        assert data["ok"] is True and data["result"] == "ok" and data["exit_code"] == 0
        assert data["path"] == str(want)
        assert data["size"] == want.stat().st_size
        assert data["sha256"] == digest(want)
        assert data["commit"] == head(bed.flake) and data["dirty"] is False
        assert data["store_path"] == str(want.parent)
        # the build's own words, on stderr (ng's print_result; the path went to stdout)
        assert "[vps] Done. The disk image can be found in" in done.stderr
        [record] = bed.records()
        assert record["event"] == "image" and record["result"] == "ok"
        assert record["exit_code"] == 0 and record["host"] == "vps"
        assert record["commit"] == data["commit"] and record["run_id"] == data["run_id"]
        assert record["image_path"] == str(want) and record["image_sha256"] == digest(want)
        assert record["image_size"] == want.stat().st_size
        assert record["command"][1:] == [
            "build-image", "--image-variant", "linode", "--flake", f"{bed.flake}#vps",
        ]  # fmt: skip
        history = bed.invoke("history", "--host", "vps")
        assert "image" in history.stdout and "ok" in history.stdout

    def test_other_variant(self, bed: ImageBed) -> None:
        """image_variant chooses the variant (qcow2 here)."""
        bed.write_inventory(image_variant="qcow2")
        done = bed.invoke("image", "--host", "vps", "--json")
        assert done.returncode == 0, done.stderr
        want = bed.expected_image("qcow2")
        assert json.loads(done.stdout)["path"] == str(want)
        assert str(want).endswith(".qcow2")

    def test_image_output(self, bed: ImageBed) -> None:
        """image_output: `nix build --print-out-paths` of that flake output instead."""
        bed.write_inventory(image_output="packages.x86_64-linux.vps-image")
        done = bed.invoke("image", "--host", "vps", "--json")
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        want = bed.expected_image()
        assert data["path"] == str(want) and data["sha256"] == digest(want)
        assert data["size"] == want.stat().st_size
        assert data["command"][-1] == f"{bed.flake}#packages.x86_64-linux.vps-image"
        assert "--print-out-paths" in data["command"]
        assert bed.nixos_rebuild_calls() == []
        assert bed.records()[-1]["image_output"] == "packages.x86_64-linux.vps-image"

    def test_image_output_of_a_configuration(self, bed: ImageBed) -> None:
        """image_output may name the configuration's image attribute directly."""
        bed.write_inventory(image_output="nixosConfigurations.vps.config.system.build.images.raw")
        done = bed.invoke("image", "--host", "vps", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["path"] == str(bed.expected_image("raw"))


class TestGatesAndFailures:
    def test_dirty_tree_refused_without_a_build(self, bed: ImageBed) -> None:
        """An uncommitted change refuses (3), names the file, builds nothing, is audited."""
        (bed.flake / "notes.txt").write_text("wip\n")
        done = bed.invoke("image", "--host", "vps")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "notes.txt" in done.stderr and "--allow-dirty" in done.stderr
        assert bed.nixos_rebuild_calls() == []
        assert not bed.expected_image().exists()
        [record] = bed.records()
        assert record["event"] == "image" and record["result"] == "refused"
        assert record["exit_code"] == 3 and record["dirty"] is True

    def test_allow_dirty_builds_and_is_recorded(self, bed: ImageBed) -> None:
        """--allow-dirty builds and records the override and the dirty tree."""
        (bed.flake / "notes.txt").write_text("wip\n")
        done = bed.invoke("image", "--host", "vps", "--allow-dirty", "--json")
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["dirty"] is True and data["commit"] == head(bed.flake)
        record = bed.records()[-1]
        assert record["overrides"] == ["allow-dirty"] and record["dirty"] is True

    def test_build_failure_exit_5_with_last_lines(self, bed: ImageBed) -> None:
        """A failing build exits 5 with the build's last lines; the audit says build_failed."""
        cfg = {**CONFIG, "build_fail": True}
        bed.tb.write_config(bed.flake, "vps", cfg)
        done = bed.invoke("image", "--host", "vps")
        assert done.returncode == 5, done.stdout + done.stderr
        assert "the image build failed" in done.stderr
        assert "simulated build failure" in done.stderr
        assert "Traceback" not in done.stderr
        assert not bed.expected_image(config=cfg).exists()
        [record] = bed.records()
        assert record["event"] == "image" and record["result"] == "build_failed"
        assert record["exit_code"] == 5 and "simulated build failure" in record["message"]

    def test_build_failure_json(self, bed: ImageBed) -> None:
        """--json on failure still prints one object, ok false, exit 5."""
        bed.tb.write_config(bed.flake, "vps", {**CONFIG, "build_fail": True})
        done = bed.invoke("image", "--host", "vps", "--json")
        assert done.returncode == 5
        data = json.loads(done.stdout)
        assert data["ok"] is False and data["result"] == "build_failed"
        assert data["exit_code"] == 5

    def test_unknown_variant_fails_the_build(self, bed: ImageBed) -> None:
        """A variant the configuration does not offer is nixos-rebuild's error, exit 5."""
        bed.write_inventory(image_variant="nope")
        done = bed.invoke("image", "--host", "vps")
        assert done.returncode == 5
        # nixos-rebuild-ng's own message (services.py, _validate_image_variant)
        assert "please specify one of the following supported image variants" in done.stderr
        assert "- linode" in done.stderr

    @pytest.mark.usefixtures("busy_cpu")
    @pytest.mark.parametrize("sigint", SIGINT_DISPOSITIONS)
    def test_ctrl_c_stops_the_build(self, bed: ImageBed, sigint: str) -> None:
        """Ctrl-C during the build stops it: exit 130, no traceback of rebuild, audited; on a
        busy machine, and when rebuild was started with SIGINT ignored."""
        bed.tb.write_config(bed.flake, "vps", {**CONFIG, "build_seconds": 60})
        run = Watched(launch(bed.argv("image", "--host", "vps"), sigint), bed.env())
        try:
            run.wait_for("[vps] building '", timeout=90)  # the phase: the image is building
            started = time.monotonic()
            run.proc.send_signal(signal.SIGINT)
            code, out, err = run.finish(timeout=60)
        finally:
            run.kill()
        assert code == 130, out + err
        assert time.monotonic() - started < 20  # stopped, not waited for
        assert "interrupted" in err and "Traceback" not in err
        [record] = bed.records()
        assert record["event"] == "image" and record["result"] == "interrupted"

    def test_unknown_host(self, bed: ImageBed) -> None:
        """An unknown host is a usage error (2), no build, no traceback."""
        done = bed.invoke("image", "--host", "nope")
        assert done.returncode == 2 and "unknown host 'nope'" in done.stderr
        assert "Traceback" not in done.stderr
        assert bed.nixos_rebuild_calls() == []
