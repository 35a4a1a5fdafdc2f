"""Large blobs (modules, snapshots) as a manifest plus numbered chunks, and their reassembly.

MQTT brokers cap packet sizes (Mosquitto 2.1 defaults `max_packet_size` to 2,000,000 bytes), so
anything larger travels in pieces. Pure code: no I/O.
"""

from __future__ import annotations

import hashlib

from mesh.errors import WireError
from mesh.wire import Chunk, Manifest, decode

DEFAULT_CHUNK_SIZE = 1 << 20


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Manifest, list[Chunk]]:
    """Cut `data` into chunks of `chunk_size` bytes, described by a manifest."""
    digest = hashlib.sha256(data).hexdigest()
    chunks = [Chunk(digest, i, data[offset:offset + chunk_size])
              for i, offset in enumerate(range(0, len(data), chunk_size))]
    return Manifest(digest, len(data), chunk_size, len(chunks)), chunks


class Assembler:
    """Collects the chunks of one manifest in any order; yields the blob once it is whole."""

    def __init__(self, manifest: Manifest, max_size: int) -> None:
        if manifest.size > max_size:
            raise WireError(f"blob of {manifest.size} bytes exceeds the limit of {max_size}")
        self.manifest = manifest
        self._parts: dict[int, bytes] = {}

    @property
    def missing(self) -> int:
        return self.manifest.count - len(self._parts)

    def add(self, chunk: Chunk) -> bytes | None:
        """Take one chunk; returns the whole blob when this was the last one missing."""
        m = self.manifest
        if chunk.sha256 != m.sha256:
            raise WireError(f"chunk belongs to blob {chunk.sha256[:12]}, not {m.sha256[:12]}")
        if chunk.index >= m.count:
            raise WireError(f"chunk index {chunk.index} out of range (0..{m.count - 1})")
        expected = min(m.chunk_size, m.size - chunk.index * m.chunk_size)
        if len(chunk.data) != expected:
            raise WireError(f"chunk {chunk.index} has {len(chunk.data)} bytes, "
                            f"expected {expected}")
        self._parts[chunk.index] = chunk.data
        if self.missing:
            return None
        blob = b"".join(self._parts[i] for i in range(m.count))
        if hashlib.sha256(blob).hexdigest() != m.sha256:
            self._parts.clear()
            raise WireError(f"reassembled blob does not match its sha256 {m.sha256[:12]}")
        return blob


def is_manifest(payload: bytes) -> Manifest | None:
    """The manifest this payload holds, or None when it is a whole blob."""
    if len(payload) > Manifest.MAX_BYTES:
        return None
    try:
        return decode(Manifest, payload)
    except WireError:
        return None


class BlobCollector:
    """Blobs published at a base topic, whole or as a manifest there plus chunks at `base/<i>`.

    Messages are only kept as they arrive (retained chunks come in any order, before or after
    their manifest); a blob is put together, checked against its hash and cached when someone
    asks for it. Nodes see every checkpoint of every app but need one only when they take an
    app over, so this keeps the common path cheap. Pure: the node feeds it messages.
    """

    def __init__(self, max_size: int, max_chunks: int = 4096) -> None:
        self.max_size = max_size
        self.max_chunks = max_chunks
        self._heads: dict[str, bytes] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._done: dict[str, tuple[bytes, bytes]] = {}  # base -> (head, blob)

    def whole(self, base: str, payload: bytes) -> None:
        """A message at the base topic: a whole blob, a manifest, or empty (cleared)."""
        if payload:
            self._heads[base] = payload
        else:
            self._heads.pop(base, None)
            self._chunks.pop(base, None)
        self._done.pop(base, None)

    def chunk(self, base: str, index: str, payload: bytes) -> None:
        """A message at `base/<index>`."""
        if not index.isdigit() or int(index) >= self.max_chunks:
            raise WireError(f"chunk index {index!r} is not a number below {self.max_chunks}")
        parts = self._chunks.setdefault(base, {})
        if payload:
            parts[int(index)] = payload
        else:
            parts.pop(int(index), None)

    def ready(self, base: str) -> bool:
        """Whether everything the blob at `base` needs has arrived (cheap, nothing decoded)."""
        head = self._heads.get(base)
        if head is None:
            return False
        manifest = is_manifest(head)
        return manifest is None or len(self._chunks.get(base, {})) >= manifest.count

    def get(self, base: str) -> bytes | None:
        """The blob at `base`, put together and checked; None if it is not all here."""
        head = self._heads.get(base)
        if head is None:
            return None
        done = self._done.get(base)
        if done is not None and done[0] is head:
            return done[1]
        manifest = is_manifest(head)
        blob = head if manifest is None else self._assemble(base, manifest)
        if blob is not None:
            self._done[base] = (head, blob)
        return blob

    def _assemble(self, base: str, manifest: Manifest) -> bytes | None:
        assembler = Assembler(manifest, self.max_size)
        blob = None
        for raw in self._chunks.get(base, {}).values():
            chunk = decode(Chunk, raw)
            if chunk.sha256 == manifest.sha256:
                blob = assembler.add(chunk) or blob
        return blob
