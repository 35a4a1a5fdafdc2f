"""Large blobs (modules, snapshots) as a manifest plus numbered chunks, and their reassembly.

MQTT brokers cap packet sizes (Mosquitto 2.1 defaults `max_packet_size` to 2,000,000 bytes), so
anything larger travels in pieces. Pure code: no I/O.
"""

from __future__ import annotations

import hashlib

from mesh.errors import WireError
from mesh.wire import Chunk, Manifest

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
