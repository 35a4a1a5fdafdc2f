"""The operator's side of a mesh on disk: its key and identity (`mesh init`), found again by
every command that needs the mesh's authority.

The directory is `--home`, else `$MESH_HOME`, else `~/.config/liquid-mesh`:
- `operator.key`: the operator's Ed25519 private key (mode 0600): whoever holds it owns the mesh;
- `mesh.cbor`: the mesh's identity (the operator's public key, and a name), what devices trust;
- `data-keys.cbor`: the mesh's data keys (mode 0600), that app memory is encrypted with
  (`mesh.privacy`); a new one is made at every `mesh revoke`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import keys, trust, wire
from mesh.errors import ConfigError, WireError
from mesh.privacy import Keyring
from mesh.trust import MeshIdentity, Rights


def default_home() -> Path:
    if "MESH_HOME" in os.environ:
        return Path(os.environ["MESH_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "liquid-mesh"


class OperatorHome:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_home()
        self.key_file = self.path / "operator.key"
        self.identity_file = self.path / "mesh.cbor"
        self.keys_file = self.path / "data-keys.cbor"

    def exists(self) -> bool:
        return self.key_file.exists()

    def init(self, name: str = "") -> MeshIdentity:
        """Create the mesh: a new operator key and identity (never over an existing one)."""
        if self.exists():
            raise ConfigError(f"{self.path} already holds a mesh ({self.identity().id}); "
                              "use another --home to create another")
        key = keys.generate()
        keys.save(self.key_file, key)
        identity = MeshIdentity(keys.public_bytes(key), name)
        self.identity_file.write_bytes(wire.encode(identity))
        Keyring.new().save(self.keys_file)
        return identity

    def keyring(self) -> Keyring:
        """The mesh's data keys (made now for a mesh created before they were)."""
        self.key()
        if not self.keys_file.exists():
            Keyring.new().save(self.keys_file)
        return Keyring.load(self.keys_file)

    def join_token(self, rights: Rights, *, root: str = "mesh") -> str:
        """A one-time join token for a device with `rights` (`mesh.trust.join_token`)."""
        return trust.join_token(self.key(), self.identity(), rights,
                                now_ms=int(time.time() * 1000),
                                data_keys=self.keyring().encode(), root=root)

    def rotate(self) -> Keyring:
        """A new newest data key, kept with the others."""
        keyring = self.keyring().rotated()
        keyring.save(self.keys_file)
        return keyring

    def key(self) -> Ed25519PrivateKey:
        if not self.exists():
            raise ConfigError(f"no mesh at {self.path}: run `mesh init` first (or give "
                              "--home / $MESH_HOME)")
        return keys.load(self.key_file)

    def identity(self) -> MeshIdentity:
        try:
            identity = wire.decode(MeshIdentity, self.identity_file.read_bytes())
        except OSError:
            raise ConfigError(f"no mesh at {self.path}: run `mesh init` first") from None
        except WireError as exc:
            raise ConfigError(f"{self.identity_file}: {exc}") from None
        if identity.operator != keys.public_bytes(self.key()):
            raise ConfigError(f"{self.identity_file} does not match {self.key_file}")
        return identity
