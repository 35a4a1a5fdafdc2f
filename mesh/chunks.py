"""Large blobs (modules, snapshot memory) as a manifest plus raw numbered chunks.

MQTT brokers cap packet sizes (Mosquitto 2.1 defaults `max_packet_size` to 2,000,000 bytes), so
anything larger travels in pieces: chunk `i` is published raw at `<base>/<i>`, and the message at
`<base>` itself says what they make up (a `Manifest`, or a snapshot header holding one). Chunks
carry no framing, so nothing is copied to wrap them; the manifest's sha256 tells a complete
blob from a mix of old and new chunks. Pure code: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence

from mesh.errors import WireError
from mesh.snapshot import Buffer
from mesh.wire import Manifest, decode

DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNKS = 4096
# Checkpoints alternate between two ranges of chunk indices, so that a node that dies while
# writing one leaves the previous checkpoint, which the retained header still names, intact.
SLOT = MAX_CHUNKS // 2


def describe(pieces: Sequence[Buffer], chunk_size: int = DEFAULT_CHUNK_SIZE,
             first: int = 0) -> Manifest:
    """The manifest of the blob made of `pieces`, cut into chunks from index `first`."""
    size = sum(len(piece) for piece in pieces)
    return Manifest(_sha256(pieces), size, chunk_size, -(-size // chunk_size), first=first)


def cut(pieces: Sequence[Buffer], chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
    """The blob made of `pieces`, in chunks of `chunk_size` bytes, each copied when asked for."""
    parts: list[memoryview] = []
    held = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            step = min(len(view), chunk_size - held)
            parts.append(view[:step])
            view, held = view[step:], held + step
            if held == chunk_size:
                yield b"".join(parts)
                parts, held = [], 0
    if parts:
        yield b"".join(parts)


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE,
          first: int = 0) -> tuple[Manifest, list[bytes]]:
    """Cut `data` into chunks of `chunk_size` bytes, to be published at indices from `first`."""
    return describe([data], chunk_size, first), list(cut([data], chunk_size))


def join(manifest: Manifest, parts: Mapping[int, bytes], max_size: int) -> bytes | None:
    """The blob, once every chunk is here and they hash right; None while some are missing.

    A chunk of the wrong size, or chunks that do not hash to the manifest's sha256 (an older
    blob's chunk not yet replaced), also give None: the right ones may still be on their way.
    """
    pieces = collect(manifest, parts, max_size)
    return b"".join(pieces) if pieces is not None and matches(manifest, pieces) else None


def collect(manifest: Manifest, parts: Mapping[int, bytes],
            max_size: int) -> list[bytes] | None:
    """The blob's chunks in order once each is here with the right size, else None.

    Whether they are the right ones is `matches`: that hashes them all, so callers may run it
    off the event loop.
    """
    if manifest.size > max_size:
        raise WireError(f"blob of {manifest.size} bytes exceeds the limit of {max_size}")
    if manifest.first + manifest.count > MAX_CHUNKS:
        raise WireError(f"chunks up to index {manifest.first + manifest.count} exceed the "
                        f"limit of {MAX_CHUNKS}")
    pieces = []
    for index in range(manifest.count):
        piece = parts.get(manifest.first + index)
        expected = min(manifest.chunk_size, manifest.size - index * manifest.chunk_size)
        if piece is None or len(piece) != expected:
            return None
        pieces.append(piece)
    return pieces


def matches(manifest: Manifest, pieces: Sequence[Buffer]) -> bool:
    """Whether the pieces hash to the manifest's sha256."""
    return _sha256(pieces) == manifest.sha256


def _sha256(pieces: Sequence[Buffer]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def is_manifest(payload: bytes) -> Manifest | None:
    """The manifest this payload holds, or None when it is something else."""
    if len(payload) > Manifest.MAX_BYTES:
        return None
    try:
        return decode(Manifest, payload)
    except WireError:
        return None


def index_of(index: str) -> int:
    """The chunk index a topic level names; WireError if it names none."""
    if not (index.isascii() and index.isdigit()) or int(index) >= MAX_CHUNKS:
        raise WireError(f"chunk index {index!r} is not a number below {MAX_CHUNKS}")
    return int(index)


class Retained:
    """What was last published at a base topic and at its chunk topics `base/<i>`.

    Messages are only kept as they arrive (retained chunks come in any order, before or after
    what describes them); callers put blobs together when they need one. Nodes see every
    checkpoint of every app but need one only when they take an app over.
    """

    def __init__(self) -> None:
        self._heads: dict[str, bytes] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}

    def whole(self, base: str, payload: bytes) -> None:
        """A message at the base topic; empty means cleared."""
        if payload:
            self._heads[base] = payload
        else:
            self._heads.pop(base, None)
            self._chunks.pop(base, None)

    def chunk(self, base: str, index: int, payload: bytes) -> None:
        """A message at `base/<index>` (see `index_of`)."""
        parts = self._chunks.setdefault(base, {})
        if payload:
            parts[index] = payload
        else:
            parts.pop(index, None)

    def head(self, base: str) -> bytes | None:
        return self._heads.get(base)

    def copy_from(self, other: Retained, base: str) -> None:
        """Hold what `other` holds at `base` instead of what this store held there."""
        self.whole(base, b"")
        if (head := other._heads.get(base)) is not None:
            self._heads[base] = head
        self._chunks[base] = dict(other._chunks.get(base, {}))

    def parts(self, base: str) -> Mapping[int, bytes]:
        return self._chunks.get(base, {})

    def size(self, base: str) -> int:
        """Bytes held at `base` and its chunks."""
        return len(self._heads.get(base, b"")) + sum(map(len, self.parts(base).values()))

    def trim(self, base: str, keep: range) -> None:
        """Forget the chunks at `base` whose index is not in `keep`."""
        parts = self._chunks.get(base)
        if parts:
            self._chunks[base] = {i: part for i, part in parts.items() if i in keep}
