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

Pure functions, no IO, no dependencies beyond the standard library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Sequence

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


# --------------------------------------------------------------------------- SSH wire


class _Reader:
    """Reads SSH wire-format fields (RFC 4251 section 5)."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def uint32(self) -> int:
        if self._pos + 4 > len(self._data):
            raise KeyFormatError(f"{self._what} is truncated")
        (value,) = struct.unpack_from(">I", self._data, self._pos)
        self._pos += 4
        return int(value)

    def string(self) -> bytes:
        length = self.uint32()
        if self._pos + length > len(self._data):
            raise KeyFormatError(f"{self._what} is truncated")
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _ed25519_key_from_blob(blob: bytes, what: str) -> bytes:
    reader = _Reader(blob, what)
    keytype = reader.string()
    if keytype != ED25519.encode():
        raise KeyFormatError(
            f"{what} is a {keytype.decode('ascii', 'replace')} key; only ssh-ed25519 keys can be "
            "converted to age"
        )
    key = reader.string()
    if len(key) != 32 or not reader.at_end():
        raise KeyFormatError(f"{what} has a malformed ssh-ed25519 key blob")
    return key


def parse_public_key_line(pubkey: str) -> tuple[str, bytes]:
    """Parse one OpenSSH public key line into ``(key type, wire blob)``.

    Accepts the ``authorized_keys``/``.pub`` form ``TYPE BASE64 [comment]`` and the
    ``known_hosts``/``ssh-keyscan`` form ``HOSTS TYPE BASE64 [comment]``.  Blank lines
    and ``#`` comment lines are ignored; exactly one key line must remain.
    """
    lines = [
        line.strip()
        for line in pubkey.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(lines) != 1:
        what = "no public key line" if not lines else f"{len(lines)} public key lines"
        raise KeyFormatError(f"expected exactly one OpenSSH public key line, got {what}")
    fields = lines[0].split()
    # ssh-to-age: lines starting with "ssh-" are authorized_keys, others known_hosts.
    if len(fields) >= 2 and not fields[0].startswith("ssh-") and _looks_like_keytype(fields[1]):
        fields = fields[1:]
    if len(fields) < 2 or not _looks_like_keytype(fields[0]):
        raise KeyFormatError(
            "not an OpenSSH public key line (expected 'ssh-ed25519 AAAA... [comment]')"
        )
    keytype, b64 = fields[0], fields[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{keytype} public key has invalid base64 data") from None
    embedded = _Reader(blob, f"{keytype} public key").string()
    if embedded != keytype.encode():
        raise KeyFormatError(
            f"public key line says {keytype} but its data is a "
            f"{embedded.decode('ascii', 'replace')} key"
        )
    return keytype, blob


def _looks_like_keytype(field: str) -> bool:
    return field.startswith(("ssh-", "ecdsa-", "sk-"))


# --------------------------------------------------------------------------- conversions


def _ed25519_to_montgomery(key: bytes) -> bytes:
    """Map an encoded Ed25519 point to its X25519 u-coordinate (little-endian)."""
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
    keytype, blob = parse_public_key_line(pubkey)
    if keytype != ED25519:
        raise KeyFormatError(f"{keytype} keys cannot be converted to age; need an ssh-ed25519 key")
    key = _ed25519_key_from_blob(blob, "public key")
    return bech32_encode(AGE_RECIPIENT_HRP, _ed25519_to_montgomery(key))


_PEM_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_PEM_END = "-----END OPENSSH PRIVATE KEY-----"
_MAGIC = b"openssh-key-v1\x00"


def _openssh_private_ed25519_seed(private_key_pem: str) -> bytes:
    text = private_key_pem.strip()
    if not text.startswith(_PEM_BEGIN) or _PEM_END not in text:
        if "BEGIN" in text and "PRIVATE KEY" in text:
            raise KeyFormatError(
                "private key is not in OpenSSH format (convert a copy with 'ssh-keygen -p -f FILE')"
            )
        raise KeyFormatError(f"not an OpenSSH private key (expected '{_PEM_BEGIN}')")
    body = text[len(_PEM_BEGIN) : text.index(_PEM_END)]
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("OpenSSH private key has invalid base64 data") from None
    if not data.startswith(_MAGIC):
        raise KeyFormatError("OpenSSH private key lacks the openssh-key-v1 header")
    what = "OpenSSH private key"
    reader = _Reader(data[len(_MAGIC) :], what)
    cipher = reader.string()
    reader.string()  # kdfname
    reader.string()  # kdfoptions
    if cipher != b"none":
        raise KeyFormatError(
            f"OpenSSH private key is passphrase-encrypted ({cipher.decode('ascii', 'replace')}); "
            "remove the passphrase from a copy with 'ssh-keygen -p -N \"\" -f COPY'"
        )
    if reader.uint32() != 1:
        raise KeyFormatError("OpenSSH private key file must hold exactly one key")
    public = _ed25519_key_from_blob(reader.string(), what)
    private = _Reader(reader.string(), what)
    if not reader.at_end():
        raise KeyFormatError(f"{what} has trailing data")
    if private.uint32() != private.uint32():
        raise KeyFormatError(f"{what} is corrupt (check bytes differ)")
    keytype = private.string()
    if keytype != ED25519.encode():
        raise KeyFormatError(f"{what} holds a {keytype.decode('ascii', 'replace')} key")
    pub_again = private.string()
    secret = private.string()
    private.string()  # comment
    padding = private.rest()
    if padding != bytes(range(1, len(padding) + 1)):
        raise KeyFormatError(f"{what} is corrupt (bad padding)")
    if len(secret) != 64 or pub_again != public or secret[32:] != public:
        raise KeyFormatError(f"{what} has inconsistent ssh-ed25519 key material")
    return secret[:32]


def ssh_ed25519_private_to_age_identity(private_key_pem: str) -> str:
    """Convert an unencrypted OpenSSH Ed25519 private key to its ``AGE-SECRET-KEY-1...``.

    Identical to ``ssh-to-age -private-key < key``.  Raises :class:`KeyFormatError`
    for encrypted keys, other key types and malformed input.
    """
    seed = _openssh_private_ed25519_seed(private_key_pem)
    scalar = hashlib.sha512(seed).digest()[:32]
    return bech32_encode(AGE_IDENTITY_HRP, scalar).upper()


def fingerprint_sha256(pubkey: str) -> str:
    """``SHA256:<base64, no padding>`` of the key blob, as ``ssh-keygen -lf`` prints."""
    _, blob = parse_public_key_line(pubkey)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")
