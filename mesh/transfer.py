"""Modules and checkpoints over MQTT: both halves of the chunk protocol.

A blob that fits a packet is one retained message at its topic. A larger one goes as raw chunks,
retained at `<topic>/<i>`, and then a header at `<topic>` that describes them (a chunk manifest
for a module; a checkpoint header whose memory names its chunks by their sha256). Retained
chunks arrive in any order, before or after their header; `Inbox` keeps them as they come and
puts a blob together only when one is needed. Free of wasm: the CLI uses it too.

In a secure mesh a checkpoint's header and chunks travel encrypted, its header signed too
(`Sealing`, which `mesh.authority.Authority` is); the Inbox keeps chunks opened, and seals
them again to publish them once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mesh import chunks, privacy, trust, wire
from mesh.errors import MeshError, Revoked, TrustError, WireError
from mesh.mqtt import Connection
from mesh.privacy import MissingKey
from mesh.snapshot import Buffer
from mesh.topics import Topics

MAX_PACKET = 1_900_000  # under Mosquitto's default max_packet_size of 2,000,000
CHUNK_WINDOW = 8  # chunks published but not yet acknowledged
MAX_MODULE_BYTES = 64 << 20
MAX_SNAPSHOT_BYTES = 1 << 30
STALE_S = 30.0  # pieces of a checkpoint of no known app are dropped after this long unchanged


class CheckpointSeal(Protocol):
    def chunk(self, index: int, data: bytes) -> bytes: ...
    def header(self, body: bytes) -> bytes: ...


class Sealing(Protocol):
    """How checkpoints are sealed and opened (`Authority`; `PLAIN` in an open mesh)."""

    def seal_checkpoint(self, topic: str) -> CheckpointSeal: ...
    def open_checkpoint(self, topic: str, payload: bytes) -> bytes: ...
    def reveal(self, topic: str, payload: bytes) -> bytes: ...
    def open_chunk(self, topic: str, index: int, payload: bytes) -> bytes: ...


class _Plain:
    """Checkpoints as they are: unsigned, unencrypted."""

    def chunk(self, index: int, data: bytes) -> bytes:
        return data

    def header(self, body: bytes) -> bytes:
        return body

    def seal_checkpoint(self, topic: str) -> CheckpointSeal:
        return self

    def open_checkpoint(self, topic: str, payload: bytes) -> bytes:
        return trust.plain(payload)

    def reveal(self, topic: str, payload: bytes) -> bytes:
        return trust.plain(payload)

    def open_chunk(self, topic: str, index: int, payload: bytes) -> bytes:
        return payload


PLAIN = _Plain()  # both a Sealing and the CheckpointSeal it gives


def snapshot_of(sealing: Sealing, topic: str, head: bytes) -> wire.Snapshot:
    """The checkpoint a header (checked before) holds."""
    return wire.decode(wire.Snapshot, sealing.reveal(topic, head))


# --- sending -----------------------------------------------------------------------------------


async def publish_blob(conn: Connection, topic: str, data: bytes) -> None:
    """Publish retained at `topic`; larger than a packet: raw chunks at `topic/<i>` first, then
    a manifest at `topic`."""
    if len(data) <= MAX_PACKET:
        await conn.publish(topic, data, retain=True)
        return
    manifest, parts = await asyncio.to_thread(chunks.split, data, MAX_PACKET)  # hashing
    await _publish_parts(conn, topic, parts, 0, PLAIN)
    await conn.publish(topic, wire.encode(manifest), retain=True)


async def publish_module(conn: Connection, topics: Topics, wasm: bytes) -> str:
    """Put a module in the store (retained, chunked if large); returns its sha256."""
    sha256 = hashlib.sha256(wasm).hexdigest()
    await publish_blob(conn, topics.module(sha256), wasm)
    return sha256


async def publish_snapshot(conn: Connection, topic: str, snap: wire.Snapshot,
                           pieces: Sequence[Buffer] | None = None,
                           sealing: Sealing = PLAIN) -> None:
    """Publish a checkpoint retained, its memory bytes being `pieces` if given (else its
    `data`); large memory goes as raw chunks before the header (that names the chunks'
    sha256). `sealing` encrypts the chunks and header, and signs the header."""
    pieces = [snap.memory.data] if pieces is None else pieces
    seal = sealing.seal_checkpoint(topic)
    if sum(len(piece) for piece in pieces) <= MAX_PACKET - 64 * 1024:
        data = b"".join(pieces)
        external = None
    else:
        # Hashed on another thread while the chunks go out: the header, sent last, names it.
        first = chunks.SLOT * (snap.seq % 2)
        hashing = asyncio.ensure_future(
            asyncio.to_thread(chunks.describe, pieces, MAX_PACKET, first))
        try:
            await _publish_parts(conn, topic, chunks.cut(pieces, MAX_PACKET), first, seal)
        finally:
            while not hashing.done():  # `pieces` may be views of app memory: see it read out
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(hashing)
        external = hashing.result()
        data = b""
    snap = dataclasses.replace(snap, memory=dataclasses.replace(snap.memory, data=data,
                                                                external=external))
    await conn.publish(topic, seal.header(wire.encode(snap)), retain=True)


async def _publish_parts(conn: Connection, topic: str, parts: Iterable[bytes],
                         first: int, seal: CheckpointSeal) -> None:
    """Publish chunks at `topic/<first + i>` (`seal`ed), a few unacknowledged at a time: each
    is copied (`parts` may be lazy) only shortly before it goes out."""
    sending: set[asyncio.Task[None]] = set()
    try:
        for index, part in enumerate(parts):
            if len(sending) >= CHUNK_WINDOW:
                done, sending = await asyncio.wait(sending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            sending.add(asyncio.create_task(conn.publish(
                f"{topic}/{first + index}", seal.chunk(first + index, part), retain=True)))
        for task in sending:
            await task
    finally:
        for task in sending:
            task.cancel()
        await asyncio.gather(*sending, return_exceptions=True)


async def republish(conn: Connection, held: chunks.Retained, topic: str,
                    sealing: Sealing = PLAIN) -> None:
    """Publish the checkpoint `held` has at `topic` again (retained): its chunks (sealed
    again), then its header as it came. Nothing if its chunks are not all there."""
    head = held.head(topic)
    if head is None:
        return
    external = snapshot_of(sealing, topic, head).memory.external
    if external is not None:
        parts = held.parts(topic)
        wanted = range(external.first, external.first + external.count)
        if any(index not in parts for index in wanted):
            return
        await _publish_parts(conn, topic, (parts[index] for index in wanted), external.first,
                             sealing.seal_checkpoint(topic))
    await conn.publish(topic, head, retain=True)


# --- receiving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """An app's newest checkpoint as this node holds it."""

    head: bytes  # the retained message it was decoded from
    snap: wire.Snapshot
    pieces: list[bytes] | None = None  # its memory bytes, when they came as chunks

    def matches(self) -> bool:
        """Whether the chunks are this checkpoint's own (they hash right); takes a while."""
        external = self.snap.memory.external
        if external is None:
            return True
        return self.pieces is not None and chunks.matches(external, self.pieces)


class Inbox:
    """The checkpoints and modules a node has received, kept as they came.

    Whoever waits for one (`waker`) is woken when a piece of it arrives.
    """

    def __init__(self, topics: Topics, sealing: Sealing = PLAIN) -> None:
        """`sealing`: opens (and checks) headers and chunks as they come."""
        self.topics = topics
        self.sealing = sealing
        self.retained = chunks.Retained()
        self._decoded: dict[str, Checkpoint | bytes] = {}  # or the head of an unusable one
        self._waking: dict[str, asyncio.Event] = {}
        self._modules: dict[str, asyncio.Future[bytes]] = {}
        self._touched: dict[str, float] = {}  # app -> when a piece of its checkpoint came
        self._versions: dict[str, tuple[int, int]] = {}  # app -> (epoch, seq) of the one held
        self._module_of: dict[str, str] = {}  # app -> the module of the one held
        # Apps whose newest checkpoint this node cannot open: the data key it is sealed with.
        self._unreadable: dict[str, int] = {}
        self.locked = False  # pieces were refused for a data key this node lacks (`reopen`)

    def snapshot(self, app: str, index: str | None, payload: bytes) -> None:
        """A message at an app's checkpoint topic (`index` None) or at one of its chunks."""
        topic = self.topics.app(app, "snapshot")
        self._touched[app] = time.monotonic()  # (pruned when stale, even if refused below)
        try:
            if index is None:
                snap = self._check_head(app, payload)
                self.retained.whole(topic, payload)
                self._decoded.pop(app, None)
                if snap is not None:  # put together now, if all its chunks are here
                    self._decoded[app] = payload  # (unusable, if its manifest is refused)
                    self._decoded[app] = self._put_together(payload, snap) or payload
            else:
                number = chunks.index_of(index)
                try:
                    plain = self.sealing.open_chunk(topic, number, payload)
                except MissingKey:
                    self.locked = True
                    raise
                self.retained.chunk(topic, number, plain)
                # A checkpoint put together keeps its chunks until a newer header comes:
                # chunks of a copy older than it may land on the same indices before their
                # header is refused. (One still waiting for chunks is put together again.)
                if not isinstance(self._decoded.get(app), Checkpoint):
                    self._decoded.pop(app, None)
        finally:
            self.wake(app)

    def version(self, app: str) -> tuple[int, int] | None:
        """(epoch, seq) of the newest checkpoint of `app` this node has seen, if any."""
        return self._versions.get(app)

    def module_of(self, app: str) -> str | None:
        """The module of the newest checkpoint of `app` this node has seen, if any."""
        return self._module_of.get(app) if app in self._versions else None

    def unreadable(self, app: str) -> bool:
        """The newest checkpoint of `app` is one this node cannot open (a data key it lacks;
        signed by a device revoked since): never restore an older one, nor start fresh."""
        return app in self._unreadable

    def versions(self) -> dict[str, tuple[int, int]]:
        return dict(self._versions)

    def adopt(self, held: chunks.Retained, versions: Mapping[str, tuple[int, int]]) -> None:
        """Take the checkpoints in `held` (what this node had before it lost a broker) that are
        newer than the ones here."""
        for app, version in versions.items():
            mine = self._versions.get(app)
            if mine is None or mine < version:
                topic = self.topics.app(app, "snapshot")
                self.retained.copy_from(held, topic)
                self._versions[app] = version
                self._decoded.pop(app, None)
                self._touched[app] = time.monotonic()

    def _check_head(self, app: str, payload: bytes) -> wire.Snapshot | None:
        """Only a valid checkpoint of `app`, no older than the one held, replaces that one (an
        empty payload clears it: the app was stopped); returns it decoded. Raises WireError
        otherwise."""
        topic = self.topics.app(app, "snapshot")
        if not payload:
            self._unreadable.pop(app, None)
            self._versions.pop(app, None)
            return None
        if payload == self.retained.head(topic) and app not in self._unreadable:
            return snapshot_of(self.sealing, topic, payload)  # the one held, sent again
        try:
            snap = wire.decode(wire.Snapshot, self.sealing.open_checkpoint(topic, payload))
        except (MissingKey, Revoked) as exc:
            self._unreadable[app] = privacy.generation_of(trust.plain(payload))
            self.locked = self.locked or isinstance(exc, MissingKey)
            raise
        if snap.app != app:
            raise WireError(f"a checkpoint of {snap.app!r} published as {app!r}'s")
        if app in self._unreadable and \
                privacy.generation_of(trust.plain(payload)) < self._unreadable[app]:
            raise WireError(f"checkpoint {snap.version} of {app} is sealed with an older data "
                            "key than one this node could not open (replayed)")
        held = self._versions.get(app)
        if held is not None and snap.version < held:
            raise WireError(f"checkpoint {snap.version} of {app} is older than the one held, "
                            f"{held}")
        self._versions[app] = snap.version
        self._module_of[app] = snap.module
        self._unreadable.pop(app, None)
        return snap

    def prune(self, specs: Mapping[str, wire.AppSpec], now: float) -> int:
        """Drop pieces that cannot be a checkpoint the mesh needs, and return how many bytes:
        those of an app with no spec once unchanged for STALE_S (garbage sent to made-up
        topics), and an app's chunks beyond what its memory can fill."""
        dropped = 0
        for app, touched in list(self._touched.items()):
            topic = self.topics.app(app, "snapshot")
            spec = specs.get(app)
            if spec is None:
                if now - touched >= STALE_S:
                    dropped += self.retained.size(topic)
                    self.retained.whole(topic, b"")
                    self._decoded.pop(app, None)
                    self._versions.pop(app, None)
                    del self._touched[app]
                continue
            before = self.retained.size(topic)
            if before > 2 * (spec.memory_limit + MAX_PACKET):  # both slots full, and more
                self.retained.trim(topic, self._named_chunks(app))
                self._decoded.pop(app, None)
                dropped += before - self.retained.size(topic)
        return dropped

    def _named_chunks(self, app: str) -> range:
        """The chunk indices the app's checkpoint header names (none if it names none)."""
        topic = self.topics.app(app, "snapshot")
        head = self.retained.head(topic)
        try:
            external = snapshot_of(self.sealing, topic, head).memory.external if head else None
        except (WireError, TrustError):
            external = None
        return range(external.first, external.first + external.count) if external else range(0)

    def waker(self, key: str) -> asyncio.Event:
        return self._waking.setdefault(key, asyncio.Event())

    def wake(self, key: str) -> None:
        """Wake whoever waits for news of `key` (an app's checkpoint, a handover)."""
        waker = self._waking.get(key)
        if waker:
            waker.set()

    def arriving(self, app: str) -> bool:
        """A checkpoint header is here but not all of its chunks yet."""
        return (self.retained.head(self.topics.app(app, "snapshot")) is not None
                and self.checkpoint(app) is None)

    def checkpoint(self, app: str) -> Checkpoint | None:
        """The newest checkpoint of `app` on the broker, once all its chunks have arrived.

        Whether they are its own (and not some of an older one) is `Checkpoint.matches`.
        Raises WireError if its header is not a checkpoint.
        """
        cached = self._decoded.get(app)  # until a piece of a newer one comes
        if cached is not None:
            return cached if isinstance(cached, Checkpoint) else None
        topic = self.topics.app(app, "snapshot")
        head = self.retained.head(topic)
        if head is None:
            return None
        checkpoint = self._put_together(head, snapshot_of(self.sealing, topic, head))
        if checkpoint is not None:
            self._decoded[app] = checkpoint
        return checkpoint

    def _put_together(self, head: bytes, snap: wire.Snapshot) -> Checkpoint | None:
        """The checkpoint `snap`, with the chunks held at the indices it names (None if some
        are missing)."""
        external = snap.memory.external
        if external is None:
            return Checkpoint(head, snap)
        # Its memory is in chunks, restored straight from them.
        parts = self.retained.parts(self.topics.app(snap.app, "snapshot"))
        pieces = chunks.collect(external, parts, MAX_SNAPSHOT_BYTES)
        return None if pieces is None else Checkpoint(head, snap, pieces)

    def incomplete(self, checkpoint: Checkpoint) -> None:
        """`checkpoint`'s chunks turned out not to be its own: take the ones here now if they
        are others (its own may have come since it was put together), else wait for them."""
        app = checkpoint.snap.app
        if self.retained.head(self.topics.app(app, "snapshot")) != checkpoint.head:
            self.wake(app)  # a newer one came meanwhile: it is the one to take
            return
        again = self._put_together(checkpoint.head, checkpoint.snap)
        fresh = again is not None and any(
            new is not old for new, old in zip(again.pieces or (), checkpoint.pieces or (),
                                               strict=False))
        self._decoded[app] = again if again is not None and fresh else checkpoint.head
        self.wake(app)

    def snapshot_parts(self, app: str) -> list[str]:
        """The chunk topics of an app's checkpoint that this node has seen."""
        topic = self.topics.app(app, "snapshot")
        return [f"{topic}/{index}" for index in self.retained.parts(topic)]

    # --- modules --------------------------------------------------------------------------------

    def module(self, sha256: str, index: str | None, payload: bytes) -> None:
        """A message at a module's topic or at one of its chunks."""
        topic = self.topics.module(sha256)
        if index is None:
            self.retained.whole(topic, payload)
        else:
            self.retained.chunk(topic, chunks.index_of(index), payload)
        waiter = self._modules.get(sha256)
        head = self.retained.head(topic)
        if waiter is None or waiter.done() or head is None:
            return
        try:
            manifest = chunks.is_manifest(head)
            blob = head if manifest is None else chunks.join(
                manifest, self.retained.parts(topic), MAX_MODULE_BYTES)
        except WireError as exc:
            waiter.set_exception(MeshError(f"module {sha256[:12]}: {exc}"))
            return
        if blob is None:
            return
        if hashlib.sha256(blob).hexdigest() != sha256:
            waiter.set_exception(MeshError(f"module {sha256[:12]} does not match its hash"))
        else:
            waiter.set_result(blob)

    async def fetch_module(self, conn: Connection, sha256: str, wait: float) -> bytes:
        """The module with this hash from the broker's store, within `wait` seconds."""
        topic = self.topics.module(sha256)
        waiter = self._modules.get(sha256)
        if waiter is None:
            waiter = self._modules[sha256] = asyncio.get_running_loop().create_future()
            await conn.subscribe(topic, f"{topic}/+")
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(waiter)
        except TimeoutError:
            raise MeshError(f"module {sha256[:12]} is not in the module store ({topic})") \
                from None
        finally:
            if waiter.done():
                self._modules.pop(sha256, None)
                await conn.unsubscribe(topic, f"{topic}/+")
                self.retained.whole(topic, b"")  # kept on disk now, not in memory
