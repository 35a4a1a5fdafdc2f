"""A node's side of the mesh's trust: what it checks before it acts, and how it signs.

A device joins a secure mesh with a join token (`mesh admit --token`, given as `--token` or
the profile's `token`): on its first start it makes its own key (`<state>/device.key`) and
redeems the token into an admission it keeps (`<state>/admission.cbor`, with the mesh's
identity in `<state>/mesh-identity.cbor`) and publishes, retained, at
`<root>/admissions/<device>`. Every node learns the admissions and revocations published
there (`<root>/revoked/<device>`), and refuses a command that steers the mesh (deploy, stop,
migrate, restart) unless the operator or a device allowed to deploy signed it, for its topic,
within `COMMAND_WINDOW_MS`, and never twice.

An admitted device holds the mesh's data keys (`<state>/data-keys.cbor`, from its token, its
welcome, or a grant at `<root>/keys/<device>`) and seals every checkpoint it publishes with
them; it opens the ones it receives (`mesh.privacy`).

A node with neither a token nor an admission waits to be admitted (`mesh.pairing`), unless it
is told to run an open mesh (`--insecure`), which it says at every start.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import keys, privacy, trust, wire
from mesh.errors import ConfigError, TrustError, WireError
from mesh.privacy import Keyring
from mesh.topics import Topics
from mesh.trust import MeshIdentity, TrustStore

log = logging.getLogger(__name__)

KEYS_FILE = "data-keys.cbor"
COMMAND_WINDOW_MS = 120_000  # a signed command older (or newer) than this is refused
OPEN_MESH_WARNING = ("this node runs an OPEN mesh (--insecure): anyone who can reach its broker "
                     "can deploy, stop, move and read apps. Create a mesh with `mesh init` and "
                     "join devices with `mesh admit --token`.")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Authority:
    """The trust of one node: `secure` once it holds a mesh identity and its admission."""

    def __init__(self, device: str, root: str = "mesh", *, key: Ed25519PrivateKey | None = None,
                 identity: MeshIdentity | None = None, admission: bytes | None = None,
                 keyring: Keyring | None = None) -> None:
        self.device = device
        self.root = root
        self.key = key
        self.admission = admission
        self.trust = TrustStore(identity, root) if identity is not None else None
        self.keyring = keyring or Keyring()
        self._opener = privacy.Opener(self.keyring)
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # command signatures, when
        self._newest: dict[str, int] = {}  # topic -> when the record held there was signed
        self.state_dir: Path | None = None
        self._last_issued = self._reserved = -1
        # The valid admissions and revocations learnt, as published (by topic): a broker that
        # lost its store gets them back (`mesh.recovery`), or records signed by a device gone
        # since could never be checked again.
        self.records: dict[str, bytes] = {}

    @property
    def secure(self) -> bool:
        return self.trust is not None

    @classmethod
    def load(cls, state_dir: Path, device: str, root: str = "mesh",
             token: str | None = None) -> Authority:
        """This device's trust, from its state directory; a `token` not yet redeemed is
        redeemed now. Neither: an open mesh."""
        identity_file = state_dir / "mesh-identity.cbor"
        admission_file = state_dir / "admission.cbor"
        if token and not admission_file.exists():
            key = keys.load_or_create(state_dir / "device.key")
            contents = trust.read_token(token)
            try:
                keyring = Keyring.decode(contents.keys)
            except WireError as exc:
                raise ConfigError(f"this join token carries no data keys of its mesh ({exc}): "
                                  "make a new one with `mesh admit --token`") from None
            identity, admission = trust.redeem(contents, device, key, privacy.box_public(key))
            keep(state_dir, identity, admission, keyring)
            log.info("device %s redeemed its join token for mesh %s", device, identity.id)
        if not admission_file.exists():
            return cls(device, root)
        try:
            identity = wire.decode(MeshIdentity, identity_file.read_bytes())
            admission = admission_file.read_bytes()
        except (OSError, WireError) as exc:
            raise ConfigError(f"{state_dir}: this device's admission is unreadable ({exc}); "
                              "remove admission.cbor and give it a new join token") from None
        if not (state_dir / KEYS_FILE).exists():
            raise ConfigError(f"{state_dir}: this device holds no data keys of mesh "
                              f"{identity.id}; remove admission.cbor and give it a new join "
                              "token (or `mesh admit` it again)")
        authority = cls(device, root, key=keys.load(state_dir / "device.key"),
                        identity=identity, admission=admission,
                        keyring=Keyring.load(state_dir / KEYS_FILE))
        authority.state_dir = state_dir
        authority._last_issued = authority._reserved = _read_issued(state_dir)
        authority.learn_admission(device, admission)  # a token for another mesh fails here
        return authority

    def describe(self) -> str:
        if self.trust is None:
            return "an open mesh"
        return f"mesh {self.trust.identity.id} as an admitted device"

    # --- what the mesh publishes about trust ------------------------------------------------

    def learn_admission(self, device: str, payload: bytes) -> None:
        """An admission record at `<root>/admissions/<device>`; TrustError if not valid."""
        if self.trust is not None and payload:
            self.trust.admit(device, payload, _now_ms())
            self.records[f"{self.root}/admissions/{device}"] = payload

    def learn_revocation(self, device: str, payload: bytes) -> bool:
        """Whether `payload` revokes `device` (TrustError if it is not a valid revocation; an
        open mesh takes none)."""
        if self.trust is None or not payload:
            return False
        self.trust.revoke(device, payload)
        self.records[f"{self.root}/revoked/{device}"] = payload
        return True

    def learn_grant(self, payload: bytes) -> bool:
        """The mesh's data keys, granted to this device by the operator (a new one after a
        revocation); whether there were new ones. TrustError if the grant is not valid."""
        if self.trust is None or self.key is None or not payload:
            return False
        sealed = self.trust.open(f"{self.root}/keys/{self.device}", payload, _now_ms())
        if sealed.signer != trust.OPERATOR:
            raise TrustError(f"a key grant signed by {sealed.signer!r}, not the operator")
        granted = privacy.open_grant(wire.decode(privacy.Grant, sealed.body),
                                     self.trust.identity.id, self.device, self.key)
        if not self.keyring.merge(granted):
            return False
        log.info("device %s holds data keys %s of the mesh", self.device,
                 sorted(self.keyring.keys))
        if self.state_dir is not None:
            try:
                self.keyring.save(self.state_dir / KEYS_FILE)
            except OSError as exc:
                log.warning("cannot keep the mesh's data keys in %s: %s", self.state_dir, exc)
        return True

    # --- checkpoints: signed, and sealed with the mesh's data key ----------------------------

    def seal_checkpoint(self, topic: str) -> CheckpointSeal:
        return CheckpointSeal(self, topic)

    def open_checkpoint(self, topic: str, payload: bytes) -> bytes:
        """A checkpoint header's encoded snapshot, its signature checked (`open_record`) and
        its bytes decrypted; TrustError if it is not the mesh's."""
        return self._reveal(topic, self.open_record(topic, payload))

    def reveal(self, topic: str, payload: bytes) -> bytes:
        """A checkpoint header checked before: its encoded snapshot."""
        return self._reveal(topic, trust.plain(payload))

    def _reveal(self, topic: str, body: bytes) -> bytes:
        if self.trust is None or not body:
            return body
        return self._opener.piece(topic, privacy.HEADER_INDEX, body)

    def app_session(self, app: str) -> str:
        """The MQTT client id of an app's session (`Topics.app_session`): in a secure mesh,
        not one a stranger can guess and take over."""
        secret = privacy.session_secret(self.keyring, app) if self.secure else ""
        return Topics(self.root).app_session(app, secret)

    def open_chunk(self, topic: str, index: int, payload: bytes) -> bytes:
        """A memory chunk's plain bytes; TrustError if it is not sealed with the mesh's key
        for this checkpoint topic and index."""
        if self.trust is None or not payload:
            return payload
        return self._opener.piece(topic, index, payload)

    # --- signing and checking records -------------------------------------------------------

    def sign_record(self, topic: str, body: bytes, *, after_ms: int = -1) -> bytes:
        """A record this node publishes: its own node record, an owner record, or a spec or
        tombstone for a command it checked (signed after `after_ms`, the record it follows,
        whatever this device's clock says)."""
        if self.trust is None or self.key is None:
            return body
        return trust.seal(self.key, self.device, topic, body,
                          issued_ms=self._issue(after_ms))

    def _issue(self, after_ms: int = -1) -> int:
        """A signing time later than every one this device gave before, across restarts too
        (a board without a clock may boot in 1970): the high-water mark is kept on disk, a
        minute ahead at a time."""
        issued = max(_now_ms(), self._last_issued + 1, after_ms + 1)
        self._last_issued = issued
        if issued > self._reserved and self.state_dir is not None:
            self._reserved = issued + 60_000
            _write_issued(self.state_dir, self._reserved)
        return issued

    def open_steering(self, topic: str, payload: bytes) -> tuple[bytes, int]:
        """The body of a spec or tombstone and when it was signed (0 in an open mesh); in a
        secure mesh, TrustError unless the operator or a device allowed to deploy signed it."""
        if self.trust is None:
            return trust.plain(payload), 0
        now = _now_ms()
        sealed = self.trust.open(topic, payload, now)
        if not self.trust.may_deploy(sealed.signer, now):
            raise TrustError(f"a record at {topic} signed by {sealed.signer!r}, who may not "
                             "deploy")
        return sealed.body, sealed.issued_ms

    def open_record(self, topic: str, payload: bytes, signer: str | None = None) -> bytes:
        """The body of a node or owner record (empty stays empty: a Last Will, a clear). In a
        secure mesh, TrustError unless an admitted device signed it: `signer`, if given, and
        then no earlier than the one held at `topic` (its own record, replayed)."""
        if self.trust is None or not payload:
            return trust.plain(payload)
        sealed = self.trust.open(topic, payload, _now_ms())
        if signer is None:  # an owner record: its epoch orders it, not clocks of two devices
            return sealed.body
        if sealed.signer != signer:
            raise TrustError(f"a record at {topic} signed by {sealed.signer!r}, not {signer!r}")
        if sealed.issued_ms < self._newest.get(topic, -1):  # one device's own, in its order
            raise TrustError(f"a record at {topic} older than the one held (replayed)")
        self._newest[topic] = sealed.issued_ms
        return sealed.body

    def check_caps(self, device: str, caps: tuple[str, ...]) -> None:
        """TrustError if `device` announces capabilities its admission does not grant (an
        admission with no caps grants any)."""
        if self.trust is None:
            return
        granted = self.trust.rights_of(device, _now_ms()).rights.caps
        extra = sorted(set(caps) - set(granted)) if granted else []
        if extra:
            raise TrustError(f"{device!r} announces capabilities it was not admitted with: "
                             f"{', '.join(extra)}")

    # --- commands ---------------------------------------------------------------------------

    def sign_command(self, topic: str, body: bytes) -> bytes:
        """A command this node sends (a restart forwarded to the app's owner)."""
        if self.key is None:
            return body
        return trust.seal(self.key, self.device, topic, body, issued_ms=_now_ms())

    def command(self, topic: str, payload: bytes) -> tuple[bytes, str | None]:
        """The command bytes in `payload` and who signed them (None: not signed). A signed
        one must be valid, fresh and new; TrustError otherwise."""
        try:
            envelope = trust.unseal(payload)
        except WireError:
            return payload, None  # a plain command (JSON or CBOR): decoded as one
        if self.trust is None:  # an open mesh checks no one, and counts no one's signature
            return envelope.body, None
        now = _now_ms()
        sealed = self.trust.open(topic, payload, now)
        if abs(now - sealed.issued_ms) > COMMAND_WINDOW_MS:
            raise TrustError(f"a command signed by {sealed.signer} at a time more than "
                             f"{COMMAND_WINDOW_MS // 1000} s from this node's clock")
        if sealed.sig in self._seen:
            raise TrustError(f"a command signed by {sealed.signer} came again (replayed)")
        self._seen[sealed.sig] = now
        while self._seen and next(iter(self._seen.values())) < now - 2 * COMMAND_WINDOW_MS:
            self._seen.popitem(last=False)
        return sealed.body, sealed.signer

    def may_steer(self, signer: str | None) -> bool:
        """Whether a command signed by `signer` (None: unsigned) may change the mesh."""
        if self.trust is None:
            return True
        return signer is not None and self.trust.may_deploy(signer, _now_ms())


class CheckpointSeal:
    """How this node publishes one checkpoint at `topic`: its chunks encrypted with the mesh's
    newest data key, its header encrypted and signed (both as they are in an open mesh)."""

    def __init__(self, authority: Authority, topic: str) -> None:
        self._authority = authority
        self._topic = topic
        self._sealer = (privacy.Sealer(authority.keyring, topic) if authority.secure
                        else None)

    def chunk(self, index: int, data: bytes) -> bytes:
        return data if self._sealer is None else self._sealer.piece(index, data)

    def header(self, body: bytes) -> bytes:
        if self._sealer is not None:
            body = self._sealer.piece(privacy.HEADER_INDEX, body)
        return self._authority.sign_record(self._topic, body)


def _read_issued(state_dir: Path) -> int:
    try:
        return int((state_dir / "issued").read_text())
    except (OSError, ValueError):
        return -1


def _write_issued(state_dir: Path, reserved: int) -> None:
    try:
        (state_dir / "issued").write_text(str(reserved))
    except OSError as exc:
        log.warning("cannot keep the signing high-water mark in %s: %s", state_dir, exc)


def admitted(state_dir: Path) -> bool:
    """Whether this device holds an admission (from a token or `mesh admit`)."""
    return (state_dir / "admission.cbor").exists()


def keep(state_dir: Path, identity: MeshIdentity, admission: bytes, keyring: Keyring) -> None:
    """Keep this device's admission, the identity of the mesh it is admitted to, and the
    mesh's data keys it was given."""
    state_dir.mkdir(parents=True, exist_ok=True)
    keyring.save(state_dir / KEYS_FILE)
    (state_dir / "mesh-identity.cbor").write_bytes(wire.encode(identity))
    (state_dir / "admission.cbor").write_bytes(admission)
