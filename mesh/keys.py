"""Ed25519 key pairs on disk: the operator's, and each device's own.

A private key lives in one PEM file (PKCS#8, unencrypted, mode 0600) that only its owner reads;
public keys travel as their 32 raw bytes. All cryptography is the `cryptography` package's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.errors import ConfigError, TrustError

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    """A short, stable name for a public key: 16 hex digits of its sha256."""
    return hashlib.sha256(public).hexdigest()[:16]


def load_public(public: bytes) -> Ed25519PublicKey:
    if len(public) != PUBLIC_KEY_BYTES:
        raise TrustError(f"a public key is {PUBLIC_KEY_BYTES} bytes, got {len(public)}")
    return Ed25519PublicKey.from_public_bytes(public)


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (for a join token, which hands one over)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def load_private(raw: bytes) -> Ed25519PrivateKey:
    if len(raw) != PUBLIC_KEY_BYTES:
        raise TrustError(f"a private key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is the holder of `public`'s over `message`."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        load_public(public).verify(signature, message)
    except (InvalidSignature, TrustError, ValueError):
        return False
    return True


def save(path: Path, key: Ed25519PrivateKey) -> None:
    """Write `key` to `path`, readable by its owner only (never over an existing file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def load(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the key: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key")
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, made there on first use."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            save(path, generate())
    return load(path)
