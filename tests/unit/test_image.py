"""`invoke image`'s pure core: what the build printed, which file is the image, the argv."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rebuild import image
from rebuild.errors import BuildFailed
from rebuild.inventory import HostSettings, Inventory, Loaded, Target

STORE = "/nix/store/0hivxdjkwprp2krvvndfcchx9zzavcf7-nixos-image-linode-25.05-x86_64-linux"

# What `nixos-rebuild build-image --image-variant linode --flake .#vps` prints (merged output).
BUILD_IMAGE_OUTPUT = [
    "Building image variant 'linode'...",
    "this derivation will be built:",
    "  /nix/store/bhjqffdhq0bap6502q948x2p1i1imzxp-nixos-image-linode-25.05-x86_64-linux.drv",
    "building '/nix/store/bhjq...-nixos-image-linode-25.05-x86_64-linux.drv'...",
    f"Done. The disk image can be found in {STORE}/nixos-image-linode-25.05-x86_64-linux.img.gz",
]


@pytest.fixture(autouse=True)
def _no_rebuild_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's own REBUILD_* variables must not change the commands built here."""
    for name in list(os.environ):
        if name.upper().startswith("REBUILD_"):
            monkeypatch.delenv(name)


def target(**settings: object) -> Target:
    return Target("vps", HostSettings.model_validate({"address": "203.0.113.10", **settings}))


def loaded(tmp_path: Path, **top: object) -> Loaded:
    inv = Inventory.model_validate({"audit_log": str(tmp_path / "state" / "audit.jsonl"), **top})
    return Loaded(tmp_path / "inventory.toml", inv)


class TestParseDoneLine:
    def test_build_image_output(self) -> None:
        """The path after "Done. The disk image can be found in" is the image file."""
        assert image.parse_done_line(BUILD_IMAGE_OUTPUT) == (
            f"{STORE}/nixos-image-linode-25.05-x86_64-linux.img.gz"
        )

    def test_prefixed_or_padded_line(self) -> None:
        """Whitespace around the line does not matter; the last Done line wins."""
        lines = ["Done. The disk image can be found in /a/x.img", "  Done. The disk image can be "
                 "found in /b/y.img  "]  # fmt: skip
        assert image.parse_done_line(lines) == "/b/y.img"

    def test_no_done_line(self) -> None:
        """A build that never said Done yields None."""
        assert image.parse_done_line(["error: builder failed", ""]) is None


IMG = "/nix/store/0c6kzph7l0dcbyqhn35ndhjyzjv4nl8q-nixos-image-linode-25.05/nixos.img.gz"


class TestBuildImageOutputShapes:
    def test_classic_prefix_on_stderr_path_on_stdout(self) -> None:
        """Classic nixos-rebuild.sh: `echo -n "Done.  The disk image can be found in " >&2;
        echo PATH`: read separately, the prefix is a stderr line of its own, the path the last
        stdout line."""
        merged = ["building the system configuration...", "Done.  The disk image can be found in ",
                  IMG]  # fmt: skip
        assert image.parse_build_image([IMG], merged) == IMG

    def test_ng_prefix_on_stderr_path_on_stdout(self) -> None:
        """nixos-rebuild-ng: print_result puts "Done. The disk image can be found in" on stderr
        and the path alone on stdout."""
        merged = ["Building image...", "Done. The disk image can be found in", IMG]
        assert image.parse_build_image(["", IMG], merged) == IMG

    def test_one_merged_line_with_two_spaces(self) -> None:
        """Both on one line (stdout and stderr merged, classic's two spaces): still read."""
        assert image.parse_build_image([], [f"Done.  The disk image can be found in {IMG}"]) == IMG

    def test_nothing_printed(self) -> None:
        """No path anywhere: None (the result link is the next fallback)."""
        assert (
            image.parse_build_image(["warning: x"], ["Done. The disk image can be found in"])
            is None
        )


class TestParseOutPath:
    def test_print_out_paths(self) -> None:
        """`nix build --print-out-paths` prints the store path flush left on stdout."""
        lines = [
            "this derivation will be built:",
            "  /nix/store/abc-image.drv",
            "building '/nix/store/abc-image.drv'...",
            STORE,
        ]
        assert image.parse_out_path(lines) == STORE

    def test_derivations_and_indented_paths_are_not_outputs(self) -> None:
        """A .drv path, or an indented path in nix's progress, is not the out path."""
        assert image.parse_out_path(["/nix/store/abc-image.drv", f"  {STORE}"]) is None

    def test_messages_are_not_paths(self) -> None:
        """Lines with spaces (messages) are skipped."""
        assert image.parse_out_path(["/nix/store/x is not valid", "warning: dirty"]) is None


class TestChooseImage:
    def test_image_suffix_beats_a_larger_file(self) -> None:
        """A file named like an image wins over a bigger file that is not one."""
        files = [("/r/log.txt", 900), ("/r/disk.img.gz", 100)]
        assert image.choose_image(files) == "/r/disk.img.gz"

    def test_largest_of_the_images(self) -> None:
        """Among image files, the largest."""
        files = [("/r/a.qcow2", 10), ("/r/b.raw", 20), ("/r/c.iso", 5)]
        assert image.choose_image(files) == "/r/b.raw"

    def test_largest_file_without_a_known_suffix(self) -> None:
        """No known suffix: the largest regular file."""
        assert image.choose_image([("/r/a", 1), ("/r/b", 3), ("/r/c", 2)]) == "/r/b"

    def test_empty(self) -> None:
        """Nothing to choose from: None."""
        assert image.choose_image([]) is None

    @pytest.mark.parametrize(
        "name",
        ["x.img", "x.raw", "x.qcow2", "x.vhd", "x.vhdx", "x.iso", "x.tar.gz", "x.img.gz",
         "x.img.zst", "X.IMG"],
    )  # fmt: skip
    def test_image_suffixes(self, name: str) -> None:
        """Every image-like suffix is recognised, in any case."""
        assert image.is_image_name(name)

    @pytest.mark.parametrize("name", ["hydra-build-products", "x.json", "x.gz", "x.zst"])
    def test_not_images(self, name: str) -> None:
        """Other names are not images."""
        assert not image.is_image_name(name)


class TestFindImage:
    def test_result_directory(self, tmp_path: Path) -> None:
        """In a result directory the image file is found; nix-support/ is left out."""
        (tmp_path / "nix-support").mkdir()
        (tmp_path / "nix-support" / "hydra-build-products").write_text("x" * 5000)
        (tmp_path / "nixos-image-linode.img.gz").write_bytes(b"disk")
        assert image.find_image(tmp_path) == tmp_path / "nixos-image-linode.img.gz"

    def test_nested_directory(self, tmp_path: Path) -> None:
        """An image in a sub-folder (iso/ of an installer) is found."""
        (tmp_path / "iso").mkdir()
        (tmp_path / "iso" / "nixos.iso").write_bytes(b"iso")
        assert image.find_image(tmp_path) == tmp_path / "iso" / "nixos.iso"

    def test_result_is_the_file(self, tmp_path: Path) -> None:
        """An output that is itself a file is the image."""
        path = tmp_path / "vps.raw"
        path.write_bytes(b"raw")
        assert image.find_image(path) == path

    def test_missing_or_empty(self, tmp_path: Path) -> None:
        """No file, no image."""
        assert image.find_image(tmp_path / "nope") is None
        assert image.find_image(tmp_path) is None


class TestLocate:
    def test_done_line_and_result_link(self, tmp_path: Path) -> None:
        """build-image: the Done line names the file; the store path is the result's target."""
        out = tmp_path / "store" / "abc-nixos-image-linode"
        out.mkdir(parents=True)
        (out / "disk.img.gz").write_bytes(b"disk")
        folder = tmp_path / "images" / "vps"
        folder.mkdir(parents=True)
        (folder / "result").symlink_to(out)
        lines = [f"Done. The disk image can be found in {out}/disk.img.gz"]
        assert image.locate(lines, folder, build_image=True) == (out, out / "disk.img.gz")

    def test_out_path_of_nix_build(self, tmp_path: Path) -> None:
        """nix build: the printed out path is the store path, the image is inside."""
        out = tmp_path / "abc-vps-image"
        out.mkdir()
        (out / "vps.qcow2").write_bytes(b"q")
        assert image.locate([str(out)], tmp_path, build_image=False) == (out, out / "vps.qcow2")

    def test_falls_back_to_the_result_link(self, tmp_path: Path) -> None:
        """Nothing recognisable printed: the result link is read."""
        out = tmp_path / "abc-image"
        out.mkdir()
        (out / "disk.raw").write_bytes(b"r")
        (tmp_path / "result").symlink_to(out)
        assert image.locate(["building..."], tmp_path, build_image=True) == (
            out, out / "disk.raw",
        )  # fmt: skip

    def test_no_image_is_a_build_failure(self, tmp_path: Path) -> None:
        """A build that produced no file fails with exit 5."""
        with pytest.raises(BuildFailed) as err:
            image.locate([], tmp_path, build_image=True)
        assert err.value.exit_code == 5


class TestCommand:
    def test_build_image_by_default(self, tmp_path: Path) -> None:
        """Without image_output: nixos-rebuild build-image with the host's variant."""
        ld = loaded(tmp_path, flake="/srv/infra", nixos_rebuild="/opt/nixos-rebuild")
        folder = image.image_folder(ld, target())
        assert image.command_for(ld, target(), folder) == [
            "/opt/nixos-rebuild", "build-image", "--image-variant", "linode",
            "--flake", "/srv/infra#vps",
        ]  # fmt: skip

    def test_image_output(self, tmp_path: Path) -> None:
        """With image_output: nix build of that output, its result link in the host's folder."""
        ld = loaded(tmp_path, flake="/srv/infra")
        host = target(image_output="packages.x86_64-linux.vps-image")
        folder = image.image_folder(ld, host)
        assert folder == tmp_path / "state" / "images" / "vps"
        assert image.command_for(ld, host, folder) == [
            "nix", "--extra-experimental-features", "nix-command flakes", "build",
            "--print-out-paths", "--out-link", f"{folder}/result",
            "/srv/infra#packages.x86_64-linux.vps-image",
        ]  # fmt: skip


class TestReport:
    def test_sha256_file(self, tmp_path: Path) -> None:
        """The digest is the file's sha256, read in chunks."""
        path = tmp_path / "disk.img"
        data = b"x" * (image.HASH_CHUNK * 2 + 7)
        path.write_bytes(data)
        assert image.sha256_file(path) == hashlib.sha256(data).hexdigest()

    @pytest.mark.parametrize(
        ("size", "shown"),
        [(0, "0 bytes"), (1023, "1023 bytes"), (1536, "1.5 KiB"), (5 * 1024**2, "5.0 MiB"),
         (3 * 1024**3, "3.0 GiB"), (2048 * 1024**3, "2048.0 GiB")],
    )  # fmt: skip
    def test_human_size(self, size: int, shown: str) -> None:
        """Sizes read like a person would say them."""
        assert image.human_size(size) == shown

    def test_render_and_json(self) -> None:
        """The report names path, size, sha256, commit and the GC root; JSON has every field."""
        art = image.ImageArtifact(
            host="vps", path=f"{STORE}/disk.img.gz", size=2048, sha256="ab" * 32,
            commit="c" * 40, dirty=True, store_path=STORE, command=("nr", "build-image"),
            link="/state/images/vps/result",
        )  # fmt: skip
        text = image.render(art)
        assert f"image:   {STORE}/disk.img.gz" in text
        assert "2.0 KiB (2048 bytes)" in text and "ab" * 32 in text
        assert "c" * 40 + " (dirty tree)" in text
        assert f"/state/images/vps/result -> {STORE}" in text
        assert set(art.to_json()) == {"host", "path", "size", "sha256", "commit", "dirty",
                                      "store_path", "command", "link"}  # fmt: skip

    def test_tail_keeps_the_last_lines(self) -> None:
        """A failure shows the last 10 non-blank lines."""
        text = "\n".join(f"line {i}" for i in range(30)) + "\n\n"
        assert image.tail(text).splitlines() == [f"line {i}" for i in range(20, 30)]
