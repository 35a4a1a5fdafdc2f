"""Admitting a device at the operator's command (`mesh admit DEVICE`), the way in for a device
someone can look at; a headless one is better joined with a token (`mesh admit --token`).

- The device (`mesh node --pair`, with no admission yet) makes its key, publishes a pending
  record `{device, key}` (retained at `<root>/pending/<device>`) and logs its key's
  fingerprint, runs nothing, and waits.
- The operator's `mesh admit DEVICE` reads that record, prints the same fingerprint (to compare
  with the device's log), and publishes the admission (`<root>/admissions/<device>`) and a
  welcome for the device (`<root>/pending/<device>/welcome`): the mesh's identity and that
  admission.
- The device takes the first welcome whose admission is of its own key and signed by the
  identity's operator key (it trusts the first such mesh it is welcomed to), keeps both, and
  joins as an admitted device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import keys, trust, wire
from mesh.errors import MeshError, TrustError, WireError
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.trust import MeshIdentity, Rights, TrustStore

log = logging.getLogger(__name__)

PENDING_WAIT_S = 10.0  # how long `mesh admit DEVICE` waits for the device's pending record


@dataclass(frozen=True, slots=True)
class Pending:
    KIND: ClassVar[str] = "pending"
    MAX_BYTES: ClassVar[int] = 1024
    device: str
    key: bytes

    def __post_init__(self) -> None:
        wire.check_name("device", self.device)


@dataclass(frozen=True, slots=True)
class Welcome:
    KIND: ClassVar[str] = "welcome"
    MAX_BYTES: ClassVar[int] = 8192
    identity: bytes
    admission: bytes


async def wait_for_admission(broker: BrokerAddress, device: str, key: Ed25519PrivateKey,
                             root: str = "mesh") -> tuple[MeshIdentity, bytes]:
    """The device's side: announce it is pending, and wait for its welcome."""
    public = keys.public_bytes(key)
    welcomes: asyncio.Queue[bytes] = asyncio.Queue()
    pending = f"{root}/pending/{device}"

    def on_message(message: Message) -> None:
        if message.topic == f"{pending}/welcome":  # (amqtt 0.12 sends others' retained too)
            welcomes.put_nowait(bytes(message.payload))

    async with Connection(broker, f"{root}-pairing-{device}", on_message=on_message) as conn:
        await conn.subscribe(f"{pending}/welcome")
        await conn.publish(pending, wire.encode(Pending(device, public)), retain=True)
        log.warning("device %s waits to be admitted: run `mesh admit %s` where the mesh was "
                    "created, and check that it shows key %s", device, device,
                    keys.fingerprint(public))
        while True:
            data = await welcomes.get()
            try:
                identity, admission = _check_welcome(data, device, public, root)
            except MeshError as exc:
                log.warning("a welcome for %s was refused: %s", device, exc)
                continue
            await conn.publish(pending, b"", retain=True)
            await conn.publish(f"{pending}/welcome", b"", retain=True)
            log.info("device %s was admitted to mesh %s", device, identity.id)
            return identity, admission


def _check_welcome(data: bytes, device: str, public: bytes,
                   root: str) -> tuple[MeshIdentity, bytes]:
    welcome = wire.decode(Welcome, data)
    identity = wire.decode(MeshIdentity, welcome.identity)
    admission = TrustStore(identity, root).admit(device, welcome.admission,
                                                 int(time.time() * 1000))
    if admission.key != public:
        raise TrustError(f"the admission is of another key ({keys.fingerprint(admission.key)})")
    return identity, welcome.admission


async def admit(broker: BrokerAddress, operator: Ed25519PrivateKey, identity: MeshIdentity,
                device: str, rights: Rights, *, root: str = "mesh") -> str:
    """The operator's side: admit the pending `device`; returns its key's fingerprint."""
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
                            "`mesh node --pair`)") from None
        try:
            request = wire.decode(Pending, data)
        except WireError as exc:
            raise MeshError(f"the pending record of {device!r} is not valid: {exc}") from None
        if request.device != device:
            raise MeshError(f"the pending record at {pending} is of {request.device!r}")
        now = int(time.time() * 1000)
        admission = trust.admission(operator, identity, device, request.key, rights,
                                    now_ms=now, root=root)
        await conn.publish(f"{root}/admissions/{device}", admission, retain=True)
        welcome = Welcome(wire.encode(identity), admission)
        await conn.publish(f"{pending}/welcome", wire.encode(welcome), retain=True)
    return keys.fingerprint(request.key)
