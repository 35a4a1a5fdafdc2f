"""App memory only the mesh's devices can read: its data keys, and checkpoints sealed with them.

- The mesh's data keys (`Keyring`) are AES-256-GCM keys numbered by generation. The operator
  makes the first with the mesh (`mesh init`) and a new one at every `mesh revoke`; a device
  keeps the ones it was given in `<state>/data-keys.cbor`.
- A device gets them in its join token, or in a `Grant` the operator publishes (signed) at
  `<root>/keys/<device>`: sealed to the device's X25519 key (`box_key`, derived from its
  Ed25519 key and named in its admission) with a one-off X25519 key, HKDF-SHA256 and AES-GCM.
- A checkpoint's header and memory chunks are encrypted with a key derived (HKDF) from the
  newest data key and a random salt of the checkpoint's own. Each piece travels as
  `MAGIC | generation | salt | AES-GCM ciphertext`: it can be opened as it arrives, before its
  header. The nonce is the chunk's index (the header's: all ones) and the associated data the
  checkpoint's topic, so no piece opens at another index or under another app (a chunk of an
  older checkpoint of the same app, at the same index, does: the sha256 its header names
  refuses it).

Pure code over `cryptography`; no hand-written cryptography.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh import keys, wire
from mesh.errors import ConfigError, TrustError, WireError
from mesh.snapshot import Buffer

MAGIC = b"LMe1"
KEY_BYTES = 32
SALT_BYTES = 16
HEADER_INDEX = (1 << 96) - 1  # the nonce of a checkpoint's header; chunks use their index
_PREFIX = len(MAGIC) + 4 + SALT_BYTES
_TAG = 16


class MissingKey(TrustError):
    """Sealed with a data key this device was not given (yet)."""


@dataclass(frozen=True, slots=True)
class DataKey:
    generation: int
    key: bytes


@dataclass(frozen=True, slots=True)
class DataKeys:
    KIND: ClassVar[str] = "data-keys"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    keys: tuple[DataKey, ...]

    def __post_init__(self) -> None:
        for key in self.keys:
            if len(key.key) != KEY_BYTES or not 0 < key.generation < 1 << 32:
                raise WireError(f"data key {key.generation} is not a {KEY_BYTES}-byte key "
                                "of a generation from 1")


@dataclass(frozen=True, slots=True)
class Grant:
    """The mesh's data keys (`generations`), sealed to one device's box key."""

    KIND: ClassVar[str] = "key-grant"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    mesh: str
    device: str
    generations: tuple[int, ...]
    ephemeral: bytes
    box: bytes


class Keyring:
    """Data keys by generation; the newest seals, any opens."""

    def __init__(self, data_keys: Mapping[int, bytes] | None = None) -> None:
        self.keys: dict[int, bytes] = dict(data_keys or {})

    @classmethod
    def new(cls) -> Keyring:
        return cls({1: AESGCM.generate_key(bit_length=256)})

    def rotated(self) -> Keyring:
        """These keys and a new newest one (after a revocation)."""
        return Keyring({**self.keys, self.newest + 1: AESGCM.generate_key(bit_length=256)})

    @property
    def newest(self) -> int:
        return max(self.keys, default=0)

    def key(self, generation: int) -> bytes:
        try:
            return self.keys[generation]
        except KeyError:
            raise MissingKey(f"sealed with data key {generation}, which this device was not "
                             f"given (it holds {sorted(self.keys) or 'none'})") from None

    def merge(self, other: Keyring) -> bool:
        """Take the keys of `other` this one lacks; whether there were any."""
        new = {gen: key for gen, key in other.keys.items() if gen not in self.keys}
        self.keys.update(new)
        return bool(new)

    def encode(self) -> bytes:
        return wire.encode(DataKeys(tuple(DataKey(g, k) for g, k in sorted(self.keys.items()))))

    @classmethod
    def decode(cls, data: bytes) -> Keyring:
        """Keys as `encode` wrote them; WireError if there are none."""
        keyring = cls({key.generation: key.key for key in wire.decode(DataKeys, data).keys})
        if not keyring.keys:
            raise WireError("no data keys")
        return keyring

    def save(self, path: Path) -> None:
        """Write the keys to `path`, readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(self.encode())
        temp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            return cls.decode(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the data keys: {exc.strerror or exc}") \
                from None
        except WireError as exc:
            raise ConfigError(f"{path}: not data keys ({exc})") from None


def _derive(secret: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(secret)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


# --- checkpoints -------------------------------------------------------------------------------


class Sealer:
    """Encrypts the pieces of one checkpoint published at `topic`."""

    def __init__(self, keyring: Keyring, topic: str) -> None:
        generation = keyring.newest
        salt = os.urandom(SALT_BYTES)
        self._aead = AESGCM(_derive(keyring.key(generation), salt, b"liquid-mesh/1 memory"))
        self._prefix = MAGIC + generation.to_bytes(4, "big") + salt
        self._topic = topic.encode()

    def piece(self, index: int, data: Buffer) -> bytes:
        """Chunk `index` (or the header, at HEADER_INDEX), sealed."""
        return self._prefix + self._aead.encrypt(_nonce(index), data, self._topic)


def generation_of(piece: bytes) -> int:
    """The data key a sealed piece names (0: not sealed)."""
    if len(piece) < _PREFIX or piece[:len(MAGIC)] != MAGIC:
        return 0
    return int.from_bytes(piece[len(MAGIC):len(MAGIC) + 4], "big")


class Opener:
    """Opens the pieces of checkpoints with the keys of a keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def piece(self, topic: str, index: int, data: bytes) -> bytes:
        """The plain bytes of a piece sealed for chunk `index` of the checkpoint at `topic`;
        TrustError if it is not one (not sealed, tampered with, or moved)."""
        if len(data) < _PREFIX + _TAG or data[:len(MAGIC)] != MAGIC:
            raise TrustError(f"a checkpoint piece at {topic} that is not encrypted")
        generation = generation_of(data)
        aead = AESGCM(_derive(self.keyring.key(generation), data[_PREFIX - SALT_BYTES:_PREFIX],
                              b"liquid-mesh/1 memory"))
        try:
            return aead.decrypt(_nonce(index), memoryview(data)[_PREFIX:], topic.encode())
        except InvalidTag:
            raise TrustError(f"a checkpoint piece at {topic} does not decrypt (tampered with, "
                             "or sealed for another place)") from None


def first_key(keyring: Keyring) -> bytes:
    """The mesh's first data key: what the broker's account and CA, and apps' session ids,
    derive from (`mesh.accounts`, `mesh.tls`), so that they stay the same through a revoke."""
    return keyring.key(min(keyring.keys, default=1))


def session_secret(keyring: Keyring, app: str) -> str:
    """What an app's MQTT session id carries in a secure mesh, so that only a device holding
    the mesh's first data key can take the session (and the inputs queued for it): 16 hex
    digits of HKDF-SHA256 of that key and the app's name."""
    return _derive(first_key(keyring), None,
                   f"liquid-mesh/1 app session\0{app}".encode())[:8].hex()


def broker_password(keyring: Keyring) -> str:
    """The password of the mesh's account on the broker a device hosts (`mesh.accounts`): 32
    hex digits of HKDF-SHA256 of the mesh's first data key, like the session secret, so that a
    device that missed a revoke can still reach the broker, to be granted the newest key."""
    return _derive(first_key(keyring), None, b"liquid-mesh/1 broker password")[:16].hex()


# --- handing the keys to a device ------------------------------------------------------------


def box_key(device_key: Ed25519PrivateKey) -> X25519PrivateKey:
    """A device's X25519 key, derived from its Ed25519 key (one key file to keep)."""
    seed = _derive(keys.private_bytes(device_key), None, b"liquid-mesh/1 box key")
    return X25519PrivateKey.from_private_bytes(seed)


def box_public(device_key: Ed25519PrivateKey) -> bytes:
    return box_key(device_key).public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)


def _grant_key(shared: bytes, mesh: str, device: str) -> bytes:
    return _derive(shared, None, f"liquid-mesh/1 grant\0{mesh}\0{device}".encode())


def grant(keyring: Keyring, mesh: str, device: str, box: bytes) -> Grant:
    """`keyring` sealed for `device`, whose box key is `box`."""
    if len(box) != 32:
        raise TrustError(f"{device!r} has no box key to grant it the mesh's data keys")
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(box))
    sealed = AESGCM(_grant_key(shared, mesh, device)).encrypt(_nonce(0), keyring.encode(), None)
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
    return Grant(mesh, device, tuple(sorted(keyring.keys)), public, sealed)


def open_grant(record: Grant, mesh: str, device: str, device_key: Ed25519PrivateKey) -> Keyring:
    """The keys a grant for this device holds; TrustError if it is not one."""
    if record.mesh != mesh or record.device != device:
        raise TrustError(f"a key grant for {record.device!r} of mesh {record.mesh}, not "
                         f"{device!r} of {mesh}")
    try:
        shared = box_key(device_key).exchange(X25519PublicKey.from_public_bytes(record.ephemeral))
        plain = AESGCM(_grant_key(shared, mesh, device)).decrypt(_nonce(0), record.box, None)
    except (InvalidTag, ValueError):
        raise TrustError(f"a key grant for {device!r} that does not open with its key") \
            from None
    return Keyring.decode(plain)
