"""Tests for rebuild.agekey: SSH Ed25519 -> age conversion, bech32, fingerprints."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from rebuild.agekey import (
    Bech32Error,
    KeyFormatError,
    age_recipient_bytes,
    bech32_decode,
    bech32_encode,
    fingerprint_sha256,
    parse_public_key_line,
    ssh_ed25519_private_to_age_identity,
    ssh_ed25519_to_age_recipient,
)

# --------------------------------------------------------------------------- vectors
# Published by Mic92/ssh-to-age (https://github.com/Mic92/ssh-to-age):
#   cmd/ssh-to-age/test-assets/id_ed25519{,.pub} and test-assets/keyscan.txt hold the
#   keys; README.md shows what ssh-to-age prints for them
#   ("ssh-to-age -i $HOME/.ssh/id_ed25519.pub" -> age17044m9...,
#    "ssh-to-age -private-key -i $HOME/.ssh/id_ed25519" -> AGE-SECRET-KEY-1K3VN4N...,
#    "ssh-keyscan eve.thalheim.io eva.thalheim.io | ssh-to-age" -> age1hjm3..., age1v8zjc...).
# The private key is a public test fixture of that repository, not a secret.
MIC92_PUB = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOHz+U0YtjINc54dZiJNclfmEFifF7RXCFlNlTbuZBji "
    "joerg@turingmachine\n"
)
MIC92_PRIVATE = """\
-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACDh8/lNGLYyDXOeHWYiTXJX5hBYnxe0VwhZTZU27mQY4gAAAJjpEFzo6RBc
6AAAAAtzc2gtZWQyNTUxOQAAACDh8/lNGLYyDXOeHWYiTXJX5hBYnxe0VwhZTZU27mQY4g
AAAEDsBo0iLkC2U9CS5XgSo7zS/nQvjxaPfhfFCR+BshxoL+Hz+U0YtjINc54dZiJNclfm
EFifF7RXCFlNlTbuZBjiAAAAE2pvZXJnQHR1cmluZ21hY2hpbmUBAg==
-----END OPENSSH PRIVATE KEY-----
"""
MIC92_RECIPIENT = "age17044m9wgakla6pzftf4srtl3h5mcsr85jysgt5fg23zpnta8sfdqhzn452"
MIC92_IDENTITY = "AGE-SECRET-KEY-1K3VN4N03PTHJWSJSCCMQCN33RY5FSKQPJ4KRRTG3JMQUYE0TUSEQEDH6V8"
# `ssh-keygen -lf` of MIC92_PUB.
MIC92_FINGERPRINT = "SHA256:wEPu5zkkhaJZhOM5BFhVJnRbJC7OEuRKz/lt2XCrN8I"

MIC92_KEYSCAN = [
    (
        "eve.thalheim.io ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIF/KPU3Z5LSjbBI6hrq25wCcseq2UpqSzUFZRr+ux6LM",
        "age1hjm3aujg9e79f5yth8a2cejzdjg5n9vnu96l05p70uvfpeltnpms7yy3pp",
    ),
    (
        "eva.thalheim.io ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIIL2vjdqpppuCn7yPdF2muINriAG7zBWrsELKpPWkhn5",
        "age1v8zjc47jmlqwefyu66s0d4ke98qr4vnuj3cpvs4z9npfdw833dxqwjrhzv",
    ),
]
# pinpox/pgp2ssh README.md: "gpg --export-ssh-key ... | ssh-to-age" output.
PGP2SSH_PUB = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYvKXGcG4a19tTT0Rycbn+D0r/YlKltLJ9dY2gR/Fjx "
    "openpgp:0x47C9F3FF"
)
PGP2SSH_RECIPIENT = "age18s8m9hvlrwvltgys4lafyyqe356ntc7e06t4kd2nccqm5amsaa2s878mju"


def test_mic92_public_key_vector() -> None:
    assert ssh_ed25519_to_age_recipient(MIC92_PUB) == MIC92_RECIPIENT


def test_mic92_private_key_vector() -> None:
    # ssh-to-age emits sha512(seed)[:32] unclamped; the README shows exactly that text.
    assert ssh_ed25519_private_to_age_identity(MIC92_PRIVATE) == MIC92_IDENTITY


@pytest.mark.parametrize(("line", "recipient"), MIC92_KEYSCAN)
def test_mic92_keyscan_vectors(line: str, recipient: str) -> None:
    # known_hosts / ssh-keyscan form: "HOST ssh-ed25519 AAAA..."
    assert ssh_ed25519_to_age_recipient(line) == recipient


def test_pgp2ssh_vector() -> None:
    assert ssh_ed25519_to_age_recipient(PGP2SSH_PUB) == PGP2SSH_RECIPIENT


def test_keyscan_comment_lines_are_ignored() -> None:
    text = "# eve.thalheim.io:22 SSH-2.0-OpenSSH_9.8\n" + MIC92_KEYSCAN[0][0] + "\n\n"
    assert ssh_ed25519_to_age_recipient(text) == MIC92_KEYSCAN[0][1]


def test_fingerprint_vector() -> None:
    assert fingerprint_sha256(MIC92_PUB) == MIC92_FINGERPRINT


def test_recipient_decodes_to_32_bytes() -> None:
    assert len(age_recipient_bytes(MIC92_RECIPIENT)) == 32
    with pytest.raises(KeyFormatError):
        age_recipient_bytes(MIC92_IDENTITY)
    with pytest.raises(KeyFormatError):
        age_recipient_bytes(MIC92_RECIPIENT[:-1] + "q")


# --------------------------------------------------------------------------- bech32
# BIP-173 (https://github.com/bitcoin/bips/blob/master/bip-0173.mediawiki) test vectors.
BIP173_VALID = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "11qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqc8247j",
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    "?1ezyfcl",
]
BIP173_INVALID = [
    "\x201nwldj5",  # HRP character out of range
    "\x7f1axkwrx",  # HRP character out of range
    "\x801eym55h",  # HRP character out of range
    # overall max length exceeded
    "an84characterslonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1569pvx",
    "pzry9x0s0muk",  # no separator character
    "1pzry9x0s0muk",  # empty HRP
    "x1b4n0q5v",  # invalid data character
    "li1dgmt3",  # too short checksum
    "de1lg7wt\xff",  # invalid character in checksum
    "A1G7SGD8",  # checksum calculated with uppercase form of HRP
    "10a06t8",  # empty HRP
    "1qzzfhee",  # empty HRP
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e2w",  # bad checksum
    "Split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",  # mixed case
]


@pytest.mark.parametrize("text", BIP173_VALID)
def test_bech32_valid_vectors_round_trip(text: str) -> None:
    hrp, data = bech32_decode(text)
    assert hrp == text[: text.rfind("1")]
    assert bech32_encode(hrp, data) == text


@pytest.mark.parametrize("text", BIP173_INVALID)
def test_bech32_invalid_vectors(text: str) -> None:
    with pytest.raises(Bech32Error):
        bech32_decode(text)


def test_bech32_known_data() -> None:
    # BIP-173 vector: the data part is every 5-bit value 0..31 in order.
    _, data = bech32_decode("abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw")
    assert data == bytes.fromhex("00443214c74254b635cf84653a56d7c675be77df")


def test_bech32_is_not_bech32m() -> None:
    # The same payload in bech32m has another checksum; age uses BIP-173 bech32.
    payload = age_recipient_bytes(MIC92_RECIPIENT)
    assert bech32_encode("age", payload) == MIC92_RECIPIENT


def test_bech32_encode_rejects_bad_hrp() -> None:
    for hrp in ("", "Age", "a b"):
        with pytest.raises(Bech32Error):
            bech32_encode(hrp, b"\x00")
    with pytest.raises(Bech32Error):
        bech32_encode("age", bytes(60))  # longer than 90 characters


def test_identity_is_uppercase_bech32() -> None:
    hrp, scalar = bech32_decode(MIC92_IDENTITY)
    assert hrp == "AGE-SECRET-KEY-"
    assert len(scalar) == 32


# --------------------------------------------------------------------------- errors


def _blob(*fields: bytes) -> str:
    out = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    return base64.b64encode(out).decode()


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\n# only a comment\n",
        "ssh-ed25519",
        "not a key",
        "ssh-ed25519 !!!notbase64",
        "ssh-ed25519 " + _blob(b"ssh-ed25519", b"\x01" * 31),  # short key
        "ssh-ed25519 " + _blob(b"ssh-ed25519", b"\x01" * 32, b"extra"),  # trailing data
        "ssh-ed25519 " + _blob(b"ssh-ed"),  # truncated
        "ssh-rsa " + _blob(b"ssh-ed25519", b"\x01" * 32),  # type mismatch
        "ecdsa-sha2-nistp256 " + _blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" * 65),
        "ssh-rsa " + _blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 128),
        MIC92_PUB + MIC92_PUB,  # two keys
    ],
)
def test_public_key_rejected(line: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        ssh_ed25519_to_age_recipient(line)
    assert "\n" not in str(info.value)


def test_public_key_not_on_curve_rejected() -> None:
    # y = 2: (y^2 - 1) / (d y^2 + 1) is not a square mod 2^255-19, so no point exists.
    bad = (2).to_bytes(32, "little")
    with pytest.raises(KeyFormatError, match="curve point"):
        ssh_ed25519_to_age_recipient("ssh-ed25519 " + _blob(b"ssh-ed25519", bad))


def test_non_ed25519_message_names_the_type() -> None:
    line = "ecdsa-sha2-nistp256 " + _blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x04" * 65)
    with pytest.raises(KeyFormatError, match="ecdsa-sha2-nistp256"):
        ssh_ed25519_to_age_recipient(line)
    # ... while fingerprints work for any key type
    assert fingerprint_sha256(line).startswith("SHA256:")
    assert parse_public_key_line(line)[0] == "ecdsa-sha2-nistp256"


def _mangle(change: Callable[[bytes], bytes]) -> str:
    body = "".join(MIC92_PRIVATE.strip().splitlines()[1:-1])
    raw = change(base64.b64decode(body))
    encoded = base64.b64encode(raw).decode()
    lines = [encoded[i : i + 70] for i in range(0, len(encoded), 70)]
    return "\n".join(["-----BEGIN OPENSSH PRIVATE KEY-----", *lines,
                      "-----END OPENSSH PRIVATE KEY-----", ""])  # fmt: skip


def _flip_check(raw: bytes) -> bytes:
    # The private section starts with two equal uint32 check values; make them differ.
    marker = bytes.fromhex("e9105ce8e9105ce8")
    index = raw.index(marker)
    return raw[:index] + bytes.fromhex("e9105ce8e9105ce9") + raw[index + 8 :]


def test_mangle_identity_is_a_no_op() -> None:
    assert ssh_ed25519_private_to_age_identity(_mangle(lambda raw: raw)) == MIC92_IDENTITY


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n!!!\n-----END OPENSSH PRIVATE KEY-----\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\naGVsbG8=\n-----END OPENSSH PRIVATE KEY-----\n",
        _mangle(lambda raw: raw[:-1] + b"\x07"),  # bad padding
        _mangle(lambda raw: raw.replace(b"\x6e\x6f\x6e\x65", b"aes2", 1)),  # cipher != none
        _mangle(lambda raw: raw[:-40]),  # truncated
        _mangle(_flip_check),
    ],
)
def test_private_key_rejected(text: str) -> None:
    with pytest.raises(KeyFormatError) as info:
        ssh_ed25519_private_to_age_identity(text)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- real tools

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("ssh-keygen", "age", "age-keygen")),
    reason="needs ssh-keygen, age and age-keygen",
)


def _run(*argv: str | Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, check=True, timeout=60
    ).stdout


def _keygen(tmp_path: Path, name: str, *extra: str) -> Path:
    key = tmp_path / name
    _run("ssh-keygen", "-q", "-C", f"{name}@test", "-f", key, *extra)
    return key


@needs_tools
@pytest.mark.parametrize("round_", range(3))
def test_round_trip_with_real_age(tmp_path: Path, round_: int) -> None:
    key = _keygen(tmp_path, f"k{round_}", "-t", "ed25519", "-N", "")
    recipient = ssh_ed25519_to_age_recipient((tmp_path / f"k{round_}.pub").read_text())
    identity = ssh_ed25519_private_to_age_identity(key.read_text())
    identity_file = tmp_path / "identity.txt"
    identity_file.write_text(identity + "\n")
    identity_file.chmod(0o600)

    # age-keygen -y derives the recipient from our identity: both conversions agree.
    assert _run("age-keygen", "-y", identity_file).decode().strip() == recipient

    plaintext = b"sops data key for the vps\n"
    ciphertext = tmp_path / "ct.age"
    _run("age", "-r", recipient, "-o", ciphertext, stdin=plaintext)
    assert _run("age", "-d", "-i", identity_file, ciphertext) == plaintext


@needs_tools
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    for name, keytype in (("ed", "ed25519"), ("ec", "ecdsa")):
        _keygen(tmp_path, name, "-t", keytype, "-N", "")
        pub = tmp_path / f"{name}.pub"
        expected = _run("ssh-keygen", "-lf", pub).decode().split()[1]
        assert fingerprint_sha256(pub.read_text()) == expected


@needs_tools
def test_encrypted_private_key_is_rejected_clearly(tmp_path: Path) -> None:
    key = _keygen(tmp_path, "enc", "-t", "ed25519", "-N", "correct horse")
    with pytest.raises(KeyFormatError, match="passphrase") as info:
        ssh_ed25519_private_to_age_identity(key.read_text())
    assert "ssh-keygen -p" in str(info.value)


@needs_tools
def test_non_ed25519_keys_are_rejected(tmp_path: Path) -> None:
    key = _keygen(tmp_path, "ec", "-t", "ecdsa", "-N", "")
    with pytest.raises(KeyFormatError, match="ecdsa"):
        ssh_ed25519_to_age_recipient((tmp_path / "ec.pub").read_text())
    with pytest.raises(KeyFormatError, match="ecdsa"):
        ssh_ed25519_private_to_age_identity(key.read_text())


@needs_tools
def test_public_key_from_private_matches_pub_file(tmp_path: Path) -> None:
    key = _keygen(tmp_path, "k", "-t", "ed25519", "-N", "")
    derived_pub = _run("ssh-keygen", "-y", "-f", key).decode()
    assert ssh_ed25519_to_age_recipient(derived_pub) == ssh_ed25519_to_age_recipient(
        (tmp_path / "k.pub").read_text()
    )
