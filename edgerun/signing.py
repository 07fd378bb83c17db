"""Signed tasks (PROTOCOL.md, "Signing"): keys, signing and verification.

A public key is written as one line of base64 (the 32 raw Ed25519 bytes), so
it fits a file, an environment variable or the kernel command line; a PEM
public key is accepted too. Private keys are PEM (PKCS#8). Verification is the
pure `edgerun.ed25519`; signing and key generation import `cryptography`,
which only the scheduler's side installs.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from . import ed25519
from .errors import ConfigError
from .protocol import signing_bytes

_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # Ed25519 SubjectPublicKeyInfo


def _b64(text: str) -> bytes:
    return base64.b64decode(text.strip(), validate=True)


def parse_public_key(text: str) -> bytes:
    """32 raw bytes from base64 or a PEM public key; ValueError otherwise."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN PUBLIC KEY-----"):
            body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
            der = _b64(body)
            if len(der) != 44 or not der.startswith(_SPKI_PREFIX):
                raise ValueError("not an Ed25519 public key")
            return der[len(_SPKI_PREFIX):]
        raw = _b64(text)
    except binascii.Error:
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return raw


def load_public_key(value: str) -> bytes:
    """The key itself (base64 or PEM) or the path of a file holding it; ConfigError otherwise.

    The key is tried first: base64 may begin with `/`, so no prefix tells a path apart.
    """
    try:
        return parse_public_key(value)
    except ValueError as exc:
        problem = str(exc)
    if os.path.isfile(value):
        try:
            with open(value, encoding="ascii", errors="replace") as fh:
                return parse_public_key(fh.read())
        except OSError as exc:
            raise ConfigError(f"cannot read public key {value}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"bad public key in {value}: {exc}") from None
    raise ConfigError(f"bad public key {value[:60]!r}: {problem}, and no such file")


class Verifier:
    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def check(self, message: dict[str, Any]) -> str | None:
        """Why `message`'s `sig` is not acceptable, or None when it is valid."""
        sig = message.get("sig")
        if sig is None:
            return "the message is not signed, and this agent accepts only signed tasks"
        if not isinstance(sig, str):
            return "`sig` must be a base64 string"
        try:
            raw = _b64(sig)
        except (binascii.Error, ValueError):
            return "`sig` is not valid base64"
        if not ed25519.verify(self.public_key, signing_bytes(message), raw):
            return "the signature does not match the message and the agent's public key"
        return None


def generate_keypair() -> tuple[bytes, str]:
    """(private key PEM, public key base64 line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return pem, base64.b64encode(raw).decode()


class Signer:
    """Signs tasks and cancels with a PEM Ed25519 private key."""

    def __init__(self, private_pem: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(private_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"bad private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("the private key is not an Ed25519 key")
        self._key = key

    @classmethod
    def from_file(cls, path: str) -> Signer:
        try:
            with open(path, "rb") as fh:
                return cls(fh.read())
        except OSError as exc:
            raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None

    def sign(self, message: dict[str, Any]) -> dict[str, Any]:
        """`message` with its `sig` set."""
        unsigned = {k: v for k, v in message.items() if k != "sig"}
        sig = self._key.sign(signing_bytes(unsigned))
        return {**unsigned, "sig": base64.b64encode(sig).decode()}
