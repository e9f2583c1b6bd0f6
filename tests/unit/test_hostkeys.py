"""rebuild.hostkeys, the pure parts: fingerprints as ssh-keygen prints them, known_hosts lines as
ssh writes them, the new / known / changed decision, and removing a host's old lines."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from paramiko.hostkeys import HostKeys

from rebuild import hostkeys
from rebuild.hostkeys import HostKey, KeyStatus


def keygen(tmp_path: Path, keytype: str, name: str) -> tuple[HostKey, str]:
    """A real key from ssh-keygen, and the fingerprint `ssh-keygen -lf` prints for it."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", keytype, "-N", "", "-f", str(path)], check=True)
    kind, b64 = path.with_suffix(".pub").read_text().split()[:2]
    listed = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], check=True,
                            capture_output=True, text=True).stdout.split()  # fmt: skip
    key = HostKey(keytype=kind, blob=base64.b64decode(b64), bits=int(listed[0]))
    return key, listed[1]


def fake(keytype: str, tag: bytes) -> HostKey:
    return HostKey(keytype=keytype, blob=keytype.encode() + tag, bits=256)


class TestFingerprint:
    @pytest.mark.parametrize("keytype", ["ed25519", "ecdsa", "rsa"])
    def test_same_as_ssh_keygen(self, tmp_path: Path, keytype: str) -> None:
        """The fingerprint and the type shown are ssh-keygen -lf's, for every key family."""
        key, printed = keygen(tmp_path, keytype, f"key_{keytype}")
        assert key.fingerprint == printed
        assert key.describe().startswith(f"{key.bits} {printed} (")
        assert key.family == {"ed25519": "ED25519", "ecdsa": "ECDSA", "rsa": "RSA"}[keytype]

    def test_parse_accepts_the_sha256_form(self) -> None:
        """A pasted fingerprint is normalised (spaces and base64 padding dropped)."""
        value = "SHA256:" + "A" * 43
        assert hostkeys.parse_fingerprint(f"  {value}= ") == value

    @pytest.mark.parametrize(
        "bad",
        ["", "SHA256:short", "sha256:" + "A" * 43, "A" * 43, "SHA256:" + "A" * 42 + "!",
         "MD5:" + ":".join(["aa"] * 16)],
    )  # fmt: skip
    def test_parse_refuses_anything_else(self, bad: str) -> None:
        """Anything but SHA256: and 43 base64 characters is refused, MD5 with a hint."""
        with pytest.raises(ValueError, match="not a SHA256 fingerprint") as err:
            hostkeys.parse_fingerprint(bad)
        if bad.startswith("MD5"):
            assert "MD5" in str(err.value)


class TestKnownHostsLines:
    def test_port_22_is_the_bare_address(self) -> None:
        """Port 22 is filed under the address, any other port as [address]:port (as ssh)."""
        assert hostkeys.key_name("203.0.113.10", 22) == "203.0.113.10"
        assert hostkeys.key_name("203.0.113.10", 2222) == "[203.0.113.10]:2222"
        assert hostkeys.key_name("2001:db8::1", 2222) == "[2001:db8::1]:2222"

    def test_line_format(self, tmp_path: Path) -> None:
        """`name type base64`, the line ssh-keyscan prints, which paramiko reads back."""
        key, _ = keygen(tmp_path, "ed25519", "k")
        line = hostkeys.known_hosts_line("[127.0.0.1]:2222", key)
        pub = (tmp_path / "k.pub").read_text().split()
        assert line == f"[127.0.0.1]:2222 {pub[0]} {pub[1]}"
        path = tmp_path / "known_hosts"
        path.write_text(line + "\n")
        keys = HostKeys(str(path))
        assert hostkeys.known_keys(keys, "[127.0.0.1]:2222") == (key,)
        assert hostkeys.known_keys(keys, "127.0.0.1") == ()

    def test_with_keys_ends_the_file_with_a_newline(self) -> None:
        """Appending to a file without a final newline does not glue two lines together."""
        key = fake("ssh-ed25519", b"1")
        text = hostkeys.with_keys("# mine\nother ssh-ed25519 AAAA", "h", [key])
        assert text.splitlines() == ["# mine", "other ssh-ed25519 AAAA",
                                     hostkeys.known_hosts_line("h", key)]  # fmt: skip

    def test_without_host_removes_only_that_host(self) -> None:
        """Plain, multi-name and hashed lines of the host go; comments, markers and other
        hosts stay (like ssh-keygen -R)."""
        name = "[203.0.113.10]:2222"
        hashed = HostKeys.hash_host(name)
        text = (
            "# pinned by hand\n"
            f"{name} ssh-ed25519 AAAA1\n"
            f"web,{name} ssh-rsa AAAA2\n"
            f"{hashed} ecdsa-sha2-nistp256 AAAA3\n"
            "203.0.113.10 ssh-ed25519 AAAA4\n"
            f"@revoked {name} ssh-ed25519 AAAA5\n"
            "[203.0.113.10]:22222 ssh-ed25519 AAAA6\n"
        )
        kept, removed = hostkeys.without_host(text, name)
        assert removed == 3
        assert kept == (
            "# pinned by hand\n"
            "203.0.113.10 ssh-ed25519 AAAA4\n"
            f"@revoked {name} ssh-ed25519 AAAA5\n"
            "[203.0.113.10]:22222 ssh-ed25519 AAAA6\n"
        )


class TestCompare:
    ED1, ED2 = fake("ssh-ed25519", b"1"), fake("ssh-ed25519", b"2")
    RSA1, RSA2 = fake("ssh-rsa", b"1"), fake("ssh-rsa", b"2")
    EC1 = fake("ecdsa-sha2-nistp256", b"1")
    EC384 = fake("ecdsa-sha2-nistp384", b"9")

    @pytest.mark.parametrize(
        ("offered", "known", "status"),
        [
            ((ED1,), (), KeyStatus.NEW),
            ((ED1, RSA1), (ED1,), KeyStatus.KNOWN),
            ((ED1, RSA1), (RSA1,), KeyStatus.KNOWN),
            ((ED2,), (ED1,), KeyStatus.CHANGED),
            ((ED1, RSA2), (ED1, RSA1), KeyStatus.CHANGED),  # one family differs: suspicious
            ((ED1,), (RSA1,), KeyStatus.CHANGED),  # nothing offered is known: ssh refuses
            ((EC384,), (EC1,), KeyStatus.CHANGED),  # another curve is another ECDSA key
        ],
    )
    def test_table(
        self, offered: tuple[HostKey, ...], known: tuple[HostKey, ...], status: KeyStatus
    ) -> None:
        """Per key family, as ssh decides: one match and no difference is known."""
        assert hostkeys.compare(offered, known) is status

    def test_matching(self) -> None:
        """--fingerprint picks the offered key it names, or none."""
        assert hostkeys.matching((self.ED1, self.RSA1), self.RSA1.fingerprint) == self.RSA1
        assert hostkeys.matching((self.ED1,), self.RSA1.fingerprint) is None
