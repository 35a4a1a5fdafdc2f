"""TLS for the broker a device hosts in a secure mesh.

- The mesh's broker CA is an ECDSA P-256 key derived from the mesh's first data key (HKDF, like
  the broker password, `privacy.broker_password`), so every admitted device, and the operator,
  holds the same CA without anyone handing a certificate around, and a device admitted with a
  join token has it too. Its certificate is made the same way everywhere, to the byte
  (fixed fields, deterministic ECDSA), so each holder's copy is every other's.
- The device that hosts a broker issues itself a server certificate at each start: a fresh
  P-256 key, its node id (`<id>.local`), `localhost` and its addresses as names, signed by the
  CA. Plain MQTT tools verify it as they would any server (`--cafile ca.pem`).
- The mesh's own clients check the chain only, not the name: the CA's key is held by every
  member, so the name adds nothing, and a device's address can change under its certificate.

P-256 and not Ed25519 (the mesh's signing keys): every TLS stack a sensor may have speaks it.
All of it is the `cryptography` package's and the standard `ssl` module's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import privacy
from mesh.privacy import Keyring

PORT = 8883  # MQTT over TLS, as IANA has it; a device takes the next free one if it is in use
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Fixed bounds, not "now": a board that boots with its clock wrong must not refuse its mesh;
# the CA rotates with the mesh's keys, not with the calendar.
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


@dataclass(frozen=True, slots=True)
class ServerCert:
    """What a broker's TLS listener is configured with (PEM text)."""

    certificate: str  # the server's, then the CA's
    key: str

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write both into `directory` (the key readable by its owner only); their paths."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        certificate, key = directory / "server.crt", directory / "server.key"
        certificate.write_text(self.certificate)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.key)
        return certificate, key


TlsListener = tuple[int, ServerCert]  # a broker's TLS listener: its port, its certificate


@dataclass(frozen=True, slots=True)
class MeshCA:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def of(cls, keyring: Keyring) -> MeshCA:
        return _authority(privacy.first_key(keyring))

    @property
    def pem(self) -> str:
        """The CA certificate, for clients to trust (`--cafile`)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, node_id: str, addresses: Iterable[str]) -> ServerCert:
        """A server certificate for the broker `node_id` hosts, reached at `addresses`."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(f"{node_id}.local"),
                                         x509.DNSName("localhost")]
        names += [x509.IPAddress(ipaddress.ip_address(a))
                  for a in dict.fromkeys([*addresses, "127.0.0.1"])]
        ca_key_id = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_AFTER)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_key_id), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return ServerCert(
            certificate.public_bytes(serialization.Encoding.PEM).decode() + self.pem,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def client_context(ca: str) -> ssl.SSLContext:
    """A client's TLS context that trusts `ca` (PEM) alone and checks the chain, not the
    server's name (see the module's docstring)."""
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = False
    return context


@cache
def _authority(first_key: bytes) -> MeshCA:
    seed = HKDF(algorithm=hashes.SHA256(), length=48, salt=None,
                info=b"liquid-mesh/1 broker CA").derive(first_key)
    key = ec.derive_private_key(int.from_bytes(seed) % (_P256_ORDER - 1) + 1, ec.SECP256R1())
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "liquid-mesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"broker CA {key_id.digest[:8].hex()}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(key_id.digest[:16]) >> 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(key_id, critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)  # the same bytes everywhere
    )
    return MeshCA(key, certificate)
