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

    Chunks may arrive before their manifest (retained messages come in any order); a few are
    kept until it does. Pure: the node feeds it messages and gets back finished blobs.
    """

    def __init__(self, max_size: int, max_early: int = 64) -> None:
        self.max_size = max_size
        self.max_early = max_early
        self._assemblers: dict[str, Assembler] = {}
        self._early: dict[str, dict[int, Chunk]] = {}

    def whole(self, base: str, payload: bytes) -> bytes | None:
        """A message at the base topic: the blob itself, or None if chunks must follow."""
        manifest = is_manifest(payload)
        if manifest is None:
            self._assemblers.pop(base, None)
            return payload
        assembler = Assembler(manifest, self.max_size)
        self._assemblers[base] = assembler
        blob = None
        for chunk in self._early.pop(base, {}).values():
            if chunk.sha256 == manifest.sha256:
                blob = assembler.add(chunk)
        return self._finish(base, blob)

    def chunk(self, base: str, payload: bytes) -> bytes | None:
        """A message at `base/<i>`: the blob once this was its last missing chunk."""
        chunk = decode(Chunk, payload)
        assembler = self._assemblers.get(base)
        if assembler is None or assembler.manifest.sha256 != chunk.sha256:
            early = self._early.setdefault(base, {})
            if len(early) < self.max_early:
                early[chunk.index] = chunk
            return None
        return self._finish(base, assembler.add(chunk))

    def _finish(self, base: str, blob: bytes | None) -> bytes | None:
        if blob is not None:
            self._assemblers.pop(base, None)
        return blob
