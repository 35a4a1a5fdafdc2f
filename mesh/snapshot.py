"""Linear memory as a compact image: non-zero blocks only, compressed with zstd.

Untouched pages of a wasm memory are zero, so a 64 MiB memory with 1 MiB in use costs about
1 MiB. Pure code over bytes: the runtime hands in a copy of memory and writes back what
`expand` yields.
"""

from __future__ import annotations

import zstandard

from mesh.errors import SnapshotError
from mesh.wire import MemoryImage

BLOCK_SIZE = 4096
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_LEVEL = 1


def nonzero_runs(memory: bytes, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(first block, block count) of each run of blocks that hold a non-zero byte."""
    zero = _ZERO_BLOCK if block_size == BLOCK_SIZE else bytes(block_size)
    runs: list[tuple[int, int]] = []
    start = -1
    blocks = -(-len(memory) // block_size)
    for block in range(blocks):
        offset = block * block_size
        is_zero = memory.startswith(zero[:len(memory) - offset], offset)
        if not is_zero and start < 0:
            start = block
        elif is_zero and start >= 0:
            runs.append((start, block - start))
            start = -1
    if start >= 0:
        runs.append((start, blocks - start))
    return runs


def capture(memory: bytes, block_size: int = BLOCK_SIZE) -> MemoryImage:
    """The image of `memory`: its size, where its non-zero runs are, and their bytes."""
    runs = nonzero_runs(memory, block_size)
    view = memoryview(memory)
    compressor = zstandard.ZstdCompressor(level=_LEVEL)
    pieces = [view[first * block_size:(first + count) * block_size] for first, count in runs]
    data = compressor.compress(b"".join(pieces))
    return MemoryImage(len(memory), block_size, tuple(runs), data)


def expand(image: MemoryImage, max_size: int) -> list[tuple[int, memoryview]]:
    """(offset, bytes) of each non-zero run; everything else is zero. Raises SnapshotError."""
    size, block = image.size, image.block_size
    if size > max_size:
        raise SnapshotError(f"memory of {size} bytes exceeds the limit of {max_size}")
    if block <= 0 or block & (block - 1):
        raise SnapshotError(f"invalid block size {block}")
    end = 0
    for first, count in image.runs:
        if first < end or count <= 0 or (first + count - 1) * block >= size:
            raise SnapshotError("memory image runs overlap, are empty or lie outside memory")
        end = first + count
    expected = sum(min(count * block, size - first * block) for first, count in image.runs)
    raw = _decompress(image.data, expected)
    if len(raw) != expected:
        raise SnapshotError(f"memory image holds {len(raw)} bytes, its runs need {expected}")
    view = memoryview(raw)
    pieces = []
    at = 0
    for first, count in image.runs:
        length = min(count * block, size - first * block)
        pieces.append((first * block, view[at:at + length]))
        at += length
    return pieces


def _decompress(data: bytes, expected: int) -> bytearray:
    """Decompress at most `expected + 1` bytes: a frame header cannot make us allocate more."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while len(out) <= expected:
                piece = reader.read(expected + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"memory image does not decompress: {exc}") from None
    return out
