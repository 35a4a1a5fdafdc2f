"""Admitting a device at the operator's command (`mesh admit DEVICE`), the way in for a device
someone can look at; a headless one is better joined with a token (`mesh admit --token`).

- The device (`mesh node --pair`, with no admission yet) makes its key, publishes a pending
  record `{device, key, box}` (retained at `<root>/pending/<device>`) and logs its key's
  fingerprint, runs nothing, and waits.
- The operator's `mesh admit DEVICE` reads that record, prints the same fingerprint (to compare
  with the device's log), and publishes the admission (`<root>/admissions/<device>`), the
  mesh's data keys sealed to the device's box key (`<root>/keys/<device>`, `mesh.privacy`), and
  a welcome for the device (`<root>/pending/<device>/welcome`): the mesh's identity, that
  admission and those keys.
- The device takes the first welcome whose admission is of its own key and signed by the
  identity's operator key (it trusts the first such mesh it is welcomed to), keeps all three,
  and joins as an admitted device.

`mesh revoke DEVICE` (`revoke`) publishes the revocation, makes a new data key and grants it to
every device still admitted: what is checkpointed from then on, the revoked device cannot read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.client import topic_matches_sub

from mesh import keys, privacy, trust, wire
from mesh.errors import MeshError, TrustError
from mesh.home import OperatorHome
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.privacy import Keyring
from mesh.trust import MeshIdentity, Rights, TrustStore

log = logging.getLogger(__name__)

PENDING_WAIT_S = 10.0  # how long `mesh admit DEVICE` waits for the device's pending record


@dataclass(frozen=True, slots=True)
class Pending:
    KIND: ClassVar[str] = "pending"
    MAX_BYTES: ClassVar[int] = 1024
    device: str
    key: bytes
    box: bytes = b""

    def __post_init__(self) -> None:
        wire.check_name("device", self.device)


@dataclass(frozen=True, slots=True)
class Welcome:
    KIND: ClassVar[str] = "welcome"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    identity: bytes
    admission: bytes
    grant: bytes = b""  # the mesh's data keys for the device, as at `<root>/keys/<device>`


async def wait_for_admission(broker: BrokerAddress, device: str, key: Ed25519PrivateKey,
                             root: str = "mesh") -> tuple[MeshIdentity, bytes, Keyring]:
    """The device's side: announce it is pending, and wait for its welcome."""
    public = keys.public_bytes(key)
    welcomes: asyncio.Queue[bytes] = asyncio.Queue()
    pending = f"{root}/pending/{device}"

    def on_message(message: Message) -> None:
        if message.topic == f"{pending}/welcome":  # (amqtt 0.12 sends others' retained too)
            welcomes.put_nowait(bytes(message.payload))

    async with Connection(broker, f"{root}-pairing-{device}", on_message=on_message) as conn:
        await conn.subscribe(f"{pending}/welcome")
        request = Pending(device, public, privacy.box_public(key))
        await conn.publish(pending, trust.seal(key, device, pending, wire.encode(request)),
                           retain=True)
        log.warning("device %s waits to be admitted: run `mesh admit %s` where the mesh was "
                    "created, and check that it shows key %s", device, device,
                    keys.fingerprint(public))
        while True:
            data = await welcomes.get()
            try:
                identity, admission, keyring = _check_welcome(data, device, key, root)
            except MeshError as exc:
                log.warning("a welcome for %s was refused: %s", device, exc)
                continue
            await conn.publish(pending, b"", retain=True)
            await conn.publish(f"{pending}/welcome", b"", retain=True)
            log.info("device %s was admitted to mesh %s", device, identity.id)
            return identity, admission, keyring


def _check_welcome(data: bytes, device: str, key: Ed25519PrivateKey,
                   root: str) -> tuple[MeshIdentity, bytes, Keyring]:
    welcome = wire.decode(Welcome, data)
    identity = wire.decode(MeshIdentity, welcome.identity)
    store = TrustStore(identity, root)
    now = int(time.time() * 1000)
    admission = store.admit(device, welcome.admission, now)
    if admission.key != keys.public_bytes(key):
        raise TrustError(f"the admission is of another key ({keys.fingerprint(admission.key)})")
    sealed = store.open(f"{root}/keys/{device}", welcome.grant, now)
    if sealed.signer != trust.OPERATOR:
        raise TrustError(f"data keys granted by {sealed.signer!r}, not the operator")
    grant = wire.decode(privacy.Grant, sealed.body)
    return identity, welcome.admission, privacy.open_grant(grant, identity.id, device, key)


async def waiting(broker: BrokerAddress, root: str = "mesh") -> list[Pending]:
    """The devices waiting to be admitted, as their pending records on the broker say."""
    records = await _retained(broker, root, f"{root}/pending/+")
    found = []
    for topic, data in sorted(records.items()):
        try:
            found.append(pending_record(topic, data))
        except MeshError as exc:
            log.warning("%s: not a pending record: %s", topic, exc)
    return found


def pending_record(topic: str, data: bytes) -> Pending:
    """The pending record published at `topic`, signed with the key it names (so that no one
    else can put their box key, to which the mesh's data keys would be sealed, in it)."""
    sealed = trust.unseal(data)
    request = wire.decode(Pending, sealed.body)
    if topic.rsplit("/", 1)[-1] != request.device:
        raise MeshError(f"the pending record at {topic} is of {request.device!r}")
    trust.verify(sealed, topic, request.key, request.device)
    return request


async def _retained(broker: BrokerAddress, root: str, *filters: str) -> dict[str, bytes]:
    """The retained messages at `filters`, by topic."""
    records: dict[str, bytes] = {}
    marker = f"{root}/operator/{time.monotonic_ns()}"
    back = asyncio.Event()

    def on_message(message: Message) -> None:
        if message.topic == marker:
            back.set()
        elif message.payload and any(topic_matches_sub(f, message.topic) for f in filters):
            records[message.topic] = bytes(message.payload)

    async with Connection(broker, f"{root}-operator-{time.monotonic_ns()}",
                          on_message=on_message) as conn:
        await conn.subscribe(*filters, marker)
        await conn.publish(marker, b"1")  # retained messages come before it (most brokers)
        async with asyncio.timeout(PENDING_WAIT_S):
            await back.wait()
        await asyncio.sleep(0.5)  # and the rest from a broker that does not keep that order
    return records


async def admit(broker: BrokerAddress, home: OperatorHome, device: str, rights: Rights, *,
                root: str = "mesh") -> str:
    """The operator's side: admit the pending `device`; returns its key's fingerprint."""
    operator, identity, keyring = home.key(), home.identity(), home.keyring()
    records: asyncio.Queue[bytes] = asyncio.Queue()
    pending = f"{root}/pending/{device}"

    def on_message(message: Message) -> None:
        if message.topic == pending:  # (amqtt 0.12 sends others' retained messages too)
            records.put_nowait(bytes(message.payload))

    async with Connection(broker, f"{root}-admit-{device}-{time.monotonic_ns()}",
                          on_message=on_message) as conn:
        await conn.subscribe(pending)
        try:
            async with asyncio.timeout(PENDING_WAIT_S):
                while not (data := await records.get()):
                    pass
        except TimeoutError:
            raise MeshError(f"no device {device!r} waits to be admitted (start it with "
                            "`mesh node` and no token)") from None
        try:
            request = pending_record(pending, data)
        except MeshError as exc:
            raise MeshError(f"the pending record of {device!r} is not valid: {exc}") from None
        now = int(time.time() * 1000)
        admission = trust.admission(operator, identity, device, request.key, rights,
                                    now_ms=now, root=root, box=request.box)
        granted = grant(operator, identity, keyring, device, request.box, root=root)
        await conn.publish(f"{root}/admissions/{device}", admission, retain=True)
        await conn.publish(f"{root}/keys/{device}", granted, retain=True)
        welcome = Welcome(wire.encode(identity), admission, granted)
        await conn.publish(f"{pending}/welcome", wire.encode(welcome), retain=True)
    return keys.fingerprint(request.key)


def grant(operator: Ed25519PrivateKey, identity: MeshIdentity, keyring: Keyring, device: str,
          box: bytes, *, root: str = "mesh") -> bytes:
    """The mesh's data keys for `device` (whose box key is `box`), signed for
    `<root>/keys/<device>`."""
    record = privacy.grant(keyring, identity.id, device, box)
    return trust.seal(operator, trust.OPERATOR, f"{root}/keys/{device}", wire.encode(record),
                      issued_ms=int(time.time() * 1000))


async def revoke(broker: BrokerAddress, home: OperatorHome, device: str, *,
                 root: str = "mesh") -> tuple[int, list[str]]:
    """Make a new data key, grant it to every device admitted but `device`, then revoke
    `device` (so that whatever its apps checkpoint after they move is sealed with the new
    key); returns the key's generation and the devices granted it."""
    keyring = home.rotate()
    granted = await grant_all(broker, home, root=root, but=device)
    revocation = trust.revocation(home.key(), home.identity(), device,
                                  now_ms=int(time.time() * 1000), root=root)
    async with Connection(broker, f"{root}-revoke-{time.monotonic_ns()}") as conn:
        await conn.publish(f"{root}/revoked/{device}", revocation, retain=True)
    return keyring.newest, granted


async def grant_all(broker: BrokerAddress, home: OperatorHome, *, root: str = "mesh",
                    but: str = "") -> list[str]:
    """Grant the mesh's data keys to every device admitted (and not revoked) but `but`;
    returns those devices."""
    operator, identity, keyring = home.key(), home.identity(), home.keyring()
    records = await _retained(broker, root, f"{root}/admissions/+", f"{root}/revoked/+")
    by_kind: dict[str, dict[str, bytes]] = {"admissions": {}, "revoked": {}}
    for topic, data in records.items():
        kind, name = topic.rsplit("/", 2)[1:]
        by_kind[kind][name] = data
    store = TrustStore(identity, root)
    revoked = {but}
    for name, data in by_kind["revoked"].items():
        try:
            store.revoke(name, data)
            revoked.add(name)
        except MeshError as exc:
            log.warning("the revocation of %s is not valid (%s): ignored", name, exc)
    now = int(time.time() * 1000)
    granted = []
    async with Connection(broker, f"{root}-grant-{time.monotonic_ns()}") as conn:
        for name, data in sorted(by_kind["admissions"].items()):
            if name in revoked:
                continue
            try:
                admission = store.admit(name, data, now)
                record = grant(operator, identity, keyring, name, admission.box, root=root)
            except MeshError as exc:
                log.warning("no data keys for %s: %s", name, exc)
                continue
            await conn.publish(f"{root}/keys/{name}", record, retain=True)
            granted.append(name)
    return granted
