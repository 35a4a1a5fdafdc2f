"""Who may use the broker a device hosts in a secure mesh.

- The mesh's devices and its operator: user `mesh`, with a password only a holder of the mesh's
  data keys can derive (`privacy.broker_password`). Everything under the mesh's root.
- Without credentials: a device waiting to be admitted, which announces itself and waits for
  its welcome under `<root>/pending/`, and nothing else. A stranger on the LAN reads no app's
  inputs or outputs, and publishes none.

Mosquitto gets a password file (its own PBKDF2-SHA512 format) and an ACL file; the embedded
broker checks the same with two plugins (`mesh.broker`). The password goes only over TLS
checked against the mesh's CA (every broker a device hosts offers it: `mesh.tls`), or to a
broker on this machine.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from mesh import privacy
from mesh.authority import KEYS_FILE
from mesh.mqtt import BrokerAddress
from mesh.privacy import Keyring
from mesh.tls import MeshCA

USER = "mesh"
MESH, PENDING = "mesh", "pending"  # what a client may do, by who it is
_MOSQUITTO_ITERATIONS = 101  # what `mosquitto_passwd` writes ($7$: PBKDF2-SHA512)


@dataclass(frozen=True, slots=True)
class Accounts:
    root: str
    password: str
    # The mesh's broker CA, which the TLS of a broker the mesh hosts is checked against.
    authority: MeshCA | None = None

    @classmethod
    def of(cls, keyring: Keyring, root: str) -> Accounts:
        return cls(root, privacy.broker_password(keyring), MeshCA.of(keyring))

    @classmethod
    def of_device(cls, state_dir: Path, root: str) -> Accounts | None:
        """A device's, if it is admitted to a secure mesh (it holds the mesh's data keys)."""
        path = state_dir / KEYS_FILE
        return cls.of(Keyring.load(path), root) if path.exists() else None

    def sign_in(self, broker: BrokerAddress) -> BrokerAddress:
        """The address with the mesh's account on it, unless it names an account of its own.
        The password goes only where no one else reads it: over TLS checked against the
        mesh's CA (to a broker that announces TLS, or one given as `mqtts://`), or to this
        machine. Anywhere else the address stays without it, and such a broker, if it is one
        a device of the mesh hosts, refuses the client (or keeps it to `<root>/pending/`)."""
        if broker.username is not None or self.authority is None:
            return broker
        if broker.tls_port is not None and not broker.tls:
            broker = replace(broker, port=broker.tls_port, tls=True)
        if broker.tls and broker.ca is None:
            broker = replace(broker, ca=self.authority.pem)
        if broker.ca == self.authority.pem or (not broker.tls and _loopback(broker.host)):
            return replace(broker, username=USER, password=self.password)
        return broker

    def role(self, username: str | None, password: str | None) -> str | None:
        """MESH, PENDING (no credentials), or None: refused."""
        if username is None:
            return PENDING
        return MESH if username == USER and password == self.password else None

    def permits(self, role: str | None, topic: str) -> bool:
        """Whether a client of this role may publish to, receive from or subscribe to `topic`
        (a topic filter, for a subscribe)."""
        if role == MESH:
            return True
        return role == PENDING and topic.startswith(f"{self.root}/pending/")

    def mosquitto(self, directory: Path) -> str:
        """Write Mosquitto's password and ACL files into `directory`; the configuration lines
        that use them."""
        salt = os.urandom(12)
        digest = PBKDF2HMAC(algorithm=hashes.SHA512(), length=64, salt=salt,
                            iterations=_MOSQUITTO_ITERATIONS).derive(self.password.encode())
        passwords, acl = directory / "passwords", directory / "acl"
        _write_private(passwords, f"{USER}:$7${_MOSQUITTO_ITERATIONS}$"
                       f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n")
        # Lines before the first `user` are for clients without credentials.
        _write_private(acl, f"topic readwrite {self.root}/pending/#\n\n"
                       f"user {USER}\ntopic readwrite {self.root}/#\n")
        return f"password_file {passwords}\nacl_file {acl}\n"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
