"""Derive age keys from SSH Ed25519 host keys, exactly as ssh-to-age does.

sops-nix decrypts on the host with the host's SSH Ed25519 key converted to an age
(X25519) key.  Enrolling a host therefore needs the age *recipient* derived from the
host's public SSH key; tests (and operators recovering a host) also want the matching
age *identity* derived from the private key.  Both conversions follow Mic92/ssh-to-age
(``convert.go``):

* public:  Ed25519 point (x, y)  ->  Montgomery u = (1 + y) / (1 - y) mod 2^255-19,
  32 bytes little-endian, bech32 (BIP-173, not bech32m) with HRP ``age``;
* private: ``sha512(seed)[:32]``, bech32 with HRP ``AGE-SECRET-KEY-``, upper-cased.
  Like ssh-to-age the scalar is emitted *unclamped*; age clamps it when it uses the
  identity (RFC 7748), so ``age-keygen -y`` and decryption work either way and the
  text is byte-for-byte what ``ssh-to-age -private-key`` prints.

Pure functions, no IO.  The OpenSSH key formats are read by ``cryptography``
(``load_ssh_public_key``/``load_ssh_private_key``) and paramiko (``PublicBlob``); the
Edwards-to-Montgomery map and bech32 (a few lines each) have no library API there.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)
from paramiko import PublicBlob

__all__ = [
    "Bech32Error",
    "KeyFormatError",
    "age_recipient_bytes",
    "bech32_decode",
    "bech32_encode",
    "fingerprint_sha256",
    "parse_public_key_line",
    "ssh_ed25519_private_to_age_identity",
    "ssh_ed25519_to_age_recipient",
]

ED25519 = "ssh-ed25519"
AGE_RECIPIENT_HRP = "age"
AGE_IDENTITY_HRP = "AGE-SECRET-KEY-"

# Curve25519 / edwards25519 field and curve constants (RFC 7748, RFC 8032).
_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P


class KeyFormatError(ValueError):
    """An SSH key could not be used: wrong type, malformed, or encrypted."""


class Bech32Error(ValueError):
    """A string is not valid bech32 (BIP-173)."""


# --------------------------------------------------------------------------- bech32

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_MAX_LEN = 90  # BIP-173 overall length limit (age identities are 74 characters)


def _polymod(values: Sequence[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ value
        for i, gen in enumerate(_GENERATOR):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Sequence[int], frombits: int, tobits: int, *, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        if value < 0 or value >> frombits:
            raise Bech32Error(f"bech32: value {value} does not fit in {frombits} bits")
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits:
        raise Bech32Error("bech32: excess padding")
    elif (acc << (tobits - bits)) & maxv:
        raise Bech32Error("bech32: non-zero padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Encode ``data`` as BIP-173 bech32 with human-readable part ``hrp``.

    The result is lowercase, or uppercase when ``hrp`` is uppercase (as age's and
    ssh-to-age's encoder do).  Mixed-case or non-printable HRPs are rejected.
    """
    if not hrp:
        raise Bech32Error("bech32: empty human-readable part")
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise Bech32Error(f"bech32: invalid character in human-readable part {hrp!r}")
    if hrp.lower() != hrp and hrp.upper() != hrp:
        raise Bech32Error(f"bech32: mixed-case human-readable part {hrp!r}")
    upper = hrp.upper() == hrp and hrp.lower() != hrp
    low_hrp = hrp.lower()
    values = _convert_bits(data, 8, 5, pad=True)
    if len(low_hrp) + 1 + len(values) + 6 > _MAX_LEN:
        raise Bech32Error(f"bech32: result longer than {_MAX_LEN} characters")
    polymod = _polymod([*_hrp_expand(low_hrp), *values, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    text = low_hrp + "1" + "".join(_CHARSET[v] for v in values + checksum)
    return text.upper() if upper else text


def bech32_decode(text: str) -> tuple[str, bytes]:
    """Decode a BIP-173 bech32 string into ``(hrp, data)``.

    The HRP is returned in the case of the input.  Raises :class:`Bech32Error`.
    """
    if len(text) > _MAX_LEN:
        raise Bech32Error(f"bech32: longer than {_MAX_LEN} characters")
    if any(not 33 <= ord(c) <= 126 for c in text):
        raise Bech32Error("bech32: invalid character")
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("bech32: mixed case")
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise Bech32Error("bech32: separator '1' missing or misplaced")
    hrp = text[:pos]
    lower = text.lower()
    try:
        values = [_CHARSET.index(c) for c in lower[pos + 1 :]]
    except ValueError:
        raise Bech32Error("bech32: invalid character in data part") from None
    if _polymod([*_hrp_expand(hrp.lower()), *values]) != 1:
        raise Bech32Error("bech32: invalid checksum")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, pad=False))


def age_recipient_bytes(recipient: str) -> bytes:
    """Return the 32-byte X25519 public key of an ``age1...`` recipient.

    Raises :class:`KeyFormatError` if ``recipient`` is not a native age X25519
    recipient (lowercase bech32, HRP ``age``, 32 bytes).
    """
    try:
        hrp, data = bech32_decode(recipient)
    except Bech32Error as exc:
        raise KeyFormatError(f"not an age recipient ({exc}): {recipient!r}") from None
    if hrp != AGE_RECIPIENT_HRP or len(data) != 32:
        raise KeyFormatError(f"not an age X25519 recipient (age1... of 32 bytes): {recipient!r}")
    return data


# --------------------------------------------------------------------------- SSH keys


def _key_line(pubkey: str) -> str:
    """The one key line of ``pubkey`` as ``TYPE BASE64 [comment]``.

    Accepts the ``authorized_keys``/``.pub`` form and the ``known_hosts``/``ssh-keyscan``
    form ``HOSTS TYPE BASE64 [comment]``.  Blank lines and ``#`` comment lines are ignored.
    """
    lines = [line.split() for line in pubkey.splitlines() if line.strip()]
    lines = [fields for fields in lines if not fields[0].startswith("#")]
    if len(lines) != 1:
        what = "no public key line" if not lines else f"{len(lines)} public key lines"
        raise KeyFormatError(f"expected exactly one OpenSSH public key line, got {what}")
    fields = lines[0]
    # ssh-to-age: lines starting with "ssh-" are authorized_keys, others known_hosts.
    if len(fields) >= 2 and not fields[0].startswith("ssh-") and _looks_like_keytype(fields[1]):
        fields = fields[1:]
    if len(fields) < 2 or not _looks_like_keytype(fields[0]):
        raise KeyFormatError(
            "not an OpenSSH public key line (expected 'ssh-ed25519 AAAA... [comment]')"
        )
    return " ".join(fields)


def _looks_like_keytype(field: str) -> bool:
    return field.startswith(("ssh-", "ecdsa-", "sk-"))


def parse_public_key_line(pubkey: str) -> tuple[str, bytes]:
    """Parse one OpenSSH public key line (see :func:`_key_line`) into ``(key type, wire blob)``.

    Any key type: only the base64 data and the type it embeds are checked (paramiko's
    ``PublicBlob``), which is all a fingerprint or a known_hosts comparison needs.
    """
    line = _key_line(pubkey)
    try:
        blob = PublicBlob.from_string(line)
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError included
        raise KeyFormatError(f"not a valid OpenSSH public key ({exc})") from None
    return str(blob.key_type), bytes(blob.key_blob)


def fingerprint_sha256(pubkey: str) -> str:
    """``SHA256:<base64, no padding>`` of the key blob, as ``ssh-keygen -lf`` prints."""
    _, blob = parse_public_key_line(pubkey)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# --------------------------------------------------------------------------- conversions


def _ed25519_to_montgomery(key: bytes) -> bytes:
    """Map an encoded Ed25519 point to its X25519 u-coordinate (little-endian).

    cryptography has no public Edwards-to-Montgomery map and does not check that a raw
    Ed25519 public key is a curve point, so both stay here (filippo.io/edwards25519's
    ``SetBytes`` + ``BytesMontgomery``, as ssh-to-age uses).
    """
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    y %= _P  # non-canonical encodings are accepted, as filippo.io/edwards25519 does
    # Decompression check (RFC 8032 5.1.3): x^2 = (y^2 - 1) / (d y^2 + 1) must be a square.
    yy = y * y % _P
    xx = (yy - 1) * pow(_D * yy + 1, _P - 2, _P) % _P
    if xx and pow(xx, (_P - 1) // 2, _P) != 1:
        raise KeyFormatError("ssh-ed25519 public key is not a valid curve point")
    u = (1 + y) * pow((1 - y) % _P, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def ssh_ed25519_to_age_recipient(pubkey: str) -> str:
    """Convert an OpenSSH ``ssh-ed25519`` public key line to its ``age1...`` recipient.

    Identical to ``ssh-to-age < key.pub``.  Raises :class:`KeyFormatError` for other
    key types and malformed input.
    """
    line = _key_line(pubkey)
    keytype = line.split()[0]
    if keytype != ED25519:
        raise KeyFormatError(f"{keytype} keys cannot be converted to age; need an ssh-ed25519 key")
    try:
        key = load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"malformed ssh-ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):  # pragma: no cover - the type was checked above
        raise KeyFormatError(f"{keytype} public key data is not an Ed25519 key")
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return bech32_encode(AGE_RECIPIENT_HRP, _ed25519_to_montgomery(raw))


def ssh_ed25519_private_to_age_identity(private_key_pem: str) -> str:
    """Convert an unencrypted OpenSSH Ed25519 private key to its ``AGE-SECRET-KEY-1...``.

    Identical to ``ssh-to-age -private-key < key``: ``sha512(seed)[:32]``, unclamped.
    Raises :class:`KeyFormatError` for encrypted keys, other key types and malformed input.
    """
    try:
        key = load_ssh_private_key(private_key_pem.encode(), password=None)
    except TypeError:  # cryptography: "Key is password-protected, but password was not provided."
        raise KeyFormatError(
            "OpenSSH private key is passphrase-encrypted; remove the passphrase from a copy "
            "with 'ssh-keygen -p -N \"\" -f COPY'"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        hint = (
            ""
            if "OPENSSH PRIVATE KEY" in private_key_pem
            else " (convert a copy with 'ssh-keygen -p -f COPY')"
        )
        raise KeyFormatError(f"not a usable OpenSSH private key: {exc}{hint}") from None
    if not isinstance(key, Ed25519PrivateKey):
        public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        raise KeyFormatError(
            f"OpenSSH private key holds a {public.split()[0].decode()} key; only ssh-ed25519 "
            "keys can be converted to age"
        )
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return bech32_encode(AGE_IDENTITY_HRP, hashlib.sha512(seed).digest()[:32]).upper()
