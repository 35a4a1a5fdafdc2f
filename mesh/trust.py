"""Who may steer the mesh: its identity, the devices admitted to it, and signed records.

- A mesh is its operator's Ed25519 key (`MeshIdentity`); its id is that key's fingerprint.
- A device is admitted by an `Admission` the operator signs (device id, its public key, what it
  may do, expiry), or by redeeming a join token: the operator signs a `Voucher` for a one-time
  token key, and the device signs its own id and key with that token key (`TokenClaim`). A
  token binds one device only; a second device presenting it is refused.
- A `Revocation` (signed by the operator) takes a device out for good.
- Every record that steers the mesh travels `Sealed`: its signer's name, the record's bytes,
  and an Ed25519 signature over them and the topic they were published at (so a record cannot
  be replayed under another app's or node's topic). `TrustStore.open` checks one against the
  operator's key and the admissions it holds; whatever fails is a `TrustError` with a one-line
  reason, and changes nothing.

Pure code: the clock is passed in, keys are `cryptography` objects, encoding is `mesh.wire`'s.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import keys, wire
from mesh.errors import NotAdmitted, Revoked, TrustError, WireError

OPERATOR = "operator"  # the signer name of the operator's key
TOKEN_PREFIX = "lmt1."  # a join token's text starts with this
_DOMAIN = b"liquid-mesh/1\0"  # signatures are over this, the topic, a NUL, then the bytes

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    """What a device needs to know of the mesh to check its records: the operator's public key.
    Its id is derived from that key, so it cannot be claimed by another."""

    KIND: ClassVar[str] = "mesh-identity"
    MAX_BYTES: ClassVar[int] = 1024
    operator: bytes
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.operator) != keys.PUBLIC_KEY_BYTES:
            raise WireError(f"an operator key is {keys.PUBLIC_KEY_BYTES} bytes, "
                            f"got {len(self.operator)}")

    @property
    def id(self) -> str:
        return "m" + keys.fingerprint(self.operator)


@dataclass(frozen=True, slots=True)
class Rights:
    """What an admitted device may do."""

    caps: tuple[str, ...] = ()  # the capabilities it may announce (empty: any)
    may_deploy: bool = False  # deploy, stop, migrate and restart apps
    may_host_broker: bool = True
    expires_ms: int = 0  # 0: never


@dataclass(frozen=True, slots=True)
class Admission:
    """The operator's word that `device` holds `key` and may do what `rights` say."""

    KIND: ClassVar[str] = "admission"
    MAX_BYTES: ClassVar[int] = 4096
    mesh: str
    device: str
    key: bytes
    rights: Rights
    issued_ms: int
    box: bytes = b""  # its X25519 key, to seal the mesh's data keys to (`mesh.privacy`)

    def __post_init__(self) -> None:
        wire.check_name("device", self.device)
        if len(self.key) != keys.PUBLIC_KEY_BYTES:
            raise WireError(f"a device key is {keys.PUBLIC_KEY_BYTES} bytes, got {len(self.key)}")


@dataclass(frozen=True, slots=True)
class Voucher:
    """The operator's half of a join token: whoever holds the private half of `key` may admit
    one device with `rights`."""

    KIND: ClassVar[str] = "voucher"
    MAX_BYTES: ClassVar[int] = 4096
    mesh: str
    token: str
    key: bytes
    rights: Rights
    issued_ms: int


@dataclass(frozen=True, slots=True)
class TokenClaim:
    """A device's half: it holds `key` and redeems the token `voucher` (sealed by the operator),
    signed with the token's key."""

    KIND: ClassVar[str] = "token-claim"
    MAX_BYTES: ClassVar[int] = 8192
    voucher: bytes
    device: str
    key: bytes
    box: bytes = b""

    def __post_init__(self) -> None:
        wire.check_name("device", self.device)


@dataclass(frozen=True, slots=True)
class Revocation:
    KIND: ClassVar[str] = "revocation"
    MAX_BYTES: ClassVar[int] = 1024
    mesh: str
    device: str
    revoked_ms: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """`body` (an encoded record) as `signer` signed it for one topic, at `issued_ms` by its
    clock (what a node compares to refuse a replayed older record or a stale command)."""

    KIND: ClassVar[str] = "sealed"
    MAX_BYTES: ClassVar[int] = wire.Snapshot.MAX_BYTES + 4096
    signer: str
    body: bytes
    sig: bytes
    issued_ms: int = 0


def _message(topic: str, body: bytes, issued_ms: int) -> bytes:
    if not 0 <= issued_ms < 1 << 63:
        raise TrustError(f"issued_ms {issued_ms} is out of range")
    return _DOMAIN + topic.encode() + b"\0" + issued_ms.to_bytes(8, "big") + body


def seal(key: Ed25519PrivateKey, signer: str, topic: str, body: bytes, *,
         issued_ms: int = 0) -> bytes:
    """`body` signed by `key` (named `signer`) for publication at `topic`."""
    sig = key.sign(_message(topic, body, issued_ms))
    return wire.encode(Sealed(signer, body, sig, issued_ms))


def unseal(data: bytes) -> Sealed:
    """The envelope, not yet checked (see `TrustStore.open`)."""
    return wire.decode(Sealed, data)


def plain(payload: bytes) -> bytes:
    """The record in `payload`, unwrapped if it is sealed (not checked: for bytes this node
    checked before, or an open mesh, which checks nothing)."""
    try:
        return unseal(payload).body
    except WireError:
        return payload


def verify(sealed: Sealed, topic: str, public: bytes, who: str) -> None:
    """TrustError unless the holder of `public` (`who`) signed `sealed` for `topic`."""
    if not keys.verify(public, sealed.sig, _message(topic, sealed.body, sealed.issued_ms)):
        raise TrustError(f"a record at {topic} not signed by {who}")


def body_of(cls: type[T], sealed: Sealed) -> T:
    return wire.decode(cls, sealed.body)


@dataclass(frozen=True, slots=True)
class Token:
    """A join token's contents (`mesh admit --token`): the mesh to trust, the operator's
    voucher, the token key's private half, to sign the one device that redeems it, and the
    mesh's data keys (`mesh.privacy`): a token is as secret as a device's own state."""

    KIND: ClassVar[str] = "join-token"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    root: str
    identity: bytes
    voucher: bytes
    secret: bytes
    keys: bytes = b""


class TrustStore:
    """The mesh's trust as one node knows it: the operator's key, admissions, revocations, and
    which device redeemed which token. `now_ms` is always passed in."""

    def __init__(self, identity: MeshIdentity, root: str = "mesh") -> None:
        self.identity = identity
        self.root = root
        self.admissions: dict[str, Admission] = {}
        self.revoked: dict[str, int] = {}
        self.tokens: dict[str, str] = {}  # token id -> the device that redeemed it

    # --- topics -----------------------------------------------------------------------------

    def admission_topic(self, device: str) -> str:
        return f"{self.root}/admissions/{device}"

    def revocation_topic(self, device: str) -> str:
        return f"{self.root}/revoked/{device}"

    def voucher_topic(self, token: str) -> str:
        return f"{self.root}/tokens/{token}"

    # --- learning whom to trust -------------------------------------------------------------

    def admit(self, device: str, data: bytes, now_ms: int) -> Admission:
        """Take the admission record published for `device`: signed by the operator, or a
        token redeemed. Raises TrustError if it is not valid now."""
        sealed = unseal(data)
        topic = self.admission_topic(device)
        if sealed.signer == OPERATOR:
            verify(sealed, topic, self.identity.operator, "the operator")
            admission = body_of(Admission, sealed)
        else:
            admission = self._redeemed(sealed, topic)
        if admission.mesh != self.identity.id:
            raise TrustError(f"an admission for mesh {admission.mesh}, not {self.identity.id}")
        if admission.device != device:
            raise TrustError(f"an admission of {admission.device!r} published as {device!r}'s")
        self._usable(admission, now_ms)
        held = self.admissions.get(device)
        if held is not None and held.issued_ms > admission.issued_ms:
            raise TrustError(f"an admission of {device!r} older than the one held (replayed)")
        self.admissions[device] = admission
        return admission

    def _redeemed(self, sealed: Sealed, topic: str) -> Admission:
        """A token redeemed: the operator's voucher, and the device's claim signed with the
        token's key; a token binds one device only."""
        claim = body_of(TokenClaim, sealed)
        voucher_sealed = unseal(claim.voucher)
        prefix = "token:"
        token = sealed.signer.removeprefix(prefix)
        if not sealed.signer.startswith(prefix) or voucher_sealed.signer != OPERATOR:
            raise TrustError(f"an admission signed by {sealed.signer!r}, not the operator")
        verify(voucher_sealed, self.voucher_topic(token), self.identity.operator,
                    "the operator")
        voucher = body_of(Voucher, voucher_sealed)
        if voucher.token != token:
            raise TrustError(f"a claim of token {token!r} with the voucher of {voucher.token!r}")
        verify(sealed, topic, voucher.key, f"token {token}")
        used_by = self.tokens.get(token)
        if used_by is not None and used_by != claim.device:
            raise TrustError(f"join token {token} was used already, by {used_by!r}")
        self.tokens[token] = claim.device
        return Admission(voucher.mesh, claim.device, claim.key, voucher.rights,
                         voucher.issued_ms, claim.box)

    def revoke(self, device: str, data: bytes) -> Revocation:
        sealed = unseal(data)
        verify(sealed, self.revocation_topic(device), self.identity.operator,
                    "the operator")
        if sealed.signer != OPERATOR:
            raise TrustError(f"a revocation signed by {sealed.signer!r}, not the operator")
        revocation = body_of(Revocation, sealed)
        if revocation.mesh != self.identity.id or revocation.device != device:
            raise TrustError(f"a revocation of {revocation.device!r} in mesh {revocation.mesh} "
                             f"published as {device!r}'s")
        self.revoked[device] = revocation.revoked_ms
        return revocation

    # --- checking a record ------------------------------------------------------------------

    def open(self, topic: str, data: bytes, now_ms: int) -> Sealed:
        """A record published at `topic`, if signed by the operator or by a device admitted
        now; else TrustError (Revoked: signed by a device revoked since)."""
        sealed = unseal(data)
        if sealed.signer == OPERATOR:
            verify(sealed, topic, self.identity.operator, "the operator")
            return sealed
        known = self.admissions.get(sealed.signer)
        if known is not None and sealed.signer in self.revoked:
            verify(sealed, topic, known.key, sealed.signer)
            raise Revoked(f"a record at {topic} signed by {sealed.signer!r}, revoked since")
        admission = self.rights_of(sealed.signer, now_ms)
        verify(sealed, topic, admission.key, sealed.signer)
        return sealed

    def may_deploy(self, signer: str, now_ms: int) -> bool:
        """Whether `signer` may steer the mesh's apps (deploy, stop, migrate, restart)."""
        if signer == OPERATOR:
            return True
        try:
            return self.rights_of(signer, now_ms).rights.may_deploy
        except TrustError:
            return False

    def rights_of(self, device: str, now_ms: int) -> Admission:
        """The admission of `device` if it may act now; else TrustError."""
        admission = self.admissions.get(device)
        if admission is None:
            raise NotAdmitted(device, f"{device!r} is not admitted to mesh {self.identity.id}")
        self._usable(admission, now_ms)
        return admission

    def _usable(self, admission: Admission, now_ms: int) -> None:
        if admission.device in self.revoked:
            raise TrustError(f"{admission.device!r} was revoked")
        expires = admission.rights.expires_ms
        if expires and now_ms >= expires:
            raise TrustError(f"the admission of {admission.device!r} expired")


# --- the operator's side ---------------------------------------------------------------------

def admission(operator: Ed25519PrivateKey, identity: MeshIdentity, device: str, key: bytes,
              rights: Rights, *, now_ms: int, root: str = "mesh", box: bytes = b"") -> bytes:
    """An admission of `device` (holding `key`, and `box` to seal data keys to), sealed for
    its topic."""
    record = Admission(identity.id, device, key, rights, now_ms, box)
    return seal(operator, OPERATOR, f"{root}/admissions/{device}", wire.encode(record),
                issued_ms=now_ms)


def revocation(operator: Ed25519PrivateKey, identity: MeshIdentity, device: str, *,
               now_ms: int, root: str = "mesh") -> bytes:
    return seal(operator, OPERATOR, f"{root}/revoked/{device}",
                wire.encode(Revocation(identity.id, device, now_ms)))


def join_token(operator: Ed25519PrivateKey, identity: MeshIdentity, rights: Rights, *,
               now_ms: int, data_keys: bytes, root: str = "mesh") -> str:
    """A one-time join token, as text to put in a device's profile (with the mesh's encoded
    `data_keys`)."""
    secret = keys.generate()
    token = secrets.token_hex(8)
    voucher = Voucher(identity.id, token, keys.public_bytes(secret), rights, now_ms)
    sealed = seal(operator, OPERATOR, f"{root}/tokens/{token}", wire.encode(voucher))
    contents = Token(root, wire.encode(identity), sealed, keys.private_bytes(secret), data_keys)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(wire.encode(contents)).decode().rstrip("=")


# --- the device's side -----------------------------------------------------------------------

def read_token(text: str) -> Token:
    """A join token's contents; TrustError if it is not one."""
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise TrustError(f"a join token starts with {TOKEN_PREFIX!r}")
    body = text.removeprefix(TOKEN_PREFIX)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return wire.decode(Token, raw)
    except (binascii.Error, ValueError, WireError) as exc:
        raise TrustError(f"not a valid join token: {exc}") from None


def redeem(token: Token, device: str, key: Ed25519PrivateKey,
           box: bytes = b"") -> tuple[MeshIdentity, bytes]:
    """The mesh a token is for, and the admission record that redeems it for `device` (to be
    published at `<root>/admissions/<device>`), naming its `box` key."""
    identity = wire.decode(MeshIdentity, token.identity)
    voucher = body_of(Voucher, unseal(token.voucher))
    claim = TokenClaim(token.voucher, device, keys.public_bytes(key), box)
    secret = keys.load_private(token.secret)
    data = seal(secret, f"token:{voucher.token}", f"{token.root}/admissions/{device}",
                wire.encode(claim))
    return identity, data
