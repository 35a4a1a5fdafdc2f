"""Linear memory as a compact image: non-zero blocks only, compressed with zstd.

Untouched pages of a wasm memory are zero, so a 64 MiB memory with 1 MiB in use costs about
1 MiB. Pure code over buffers: `capture` reads any buffer (the runtime hands in a view of the live
memory, so nothing is copied first) and `restore_into` writes one back exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import zstandard

from mesh.errors import SnapshotError
from mesh.wire import MemoryImage

Buffer = bytes | bytearray | memoryview

BLOCK_SIZE = 4096
_CHUNK = 1 << 20  # scanned at a time; a multiple of every block size we use
_ZEROS = bytes(_CHUNK)
_LEVEL = 1
_SAMPLE = 32 * 1024
_SAMPLE_ABOVE = 1 << 20  # smaller images are compressed without asking


def nonzero_runs(memory: Buffer, block_size: int = BLOCK_SIZE) -> list[tuple[int, int]]:
    """(first block, block count) of each run of blocks that hold a non-zero byte."""
    view = memoryview(memory).cast("B")
    size = len(view)
    scratch = bytearray(min(_CHUNK, size))
    runs: list[tuple[int, int]] = []
    start = -1
    for chunk in range(0, size, _CHUNK):
        length = min(_CHUNK, size - chunk)
        scratch[:length] = view[chunk:chunk + length]
        if scratch.startswith(_ZEROS[:length]):
            flags: list[bool] = [False] * -(-length // block_size)
        else:
            flags = [not scratch.startswith(_ZEROS[:min(block_size, length - offset)], offset)
                     for offset in range(0, length, block_size)]
        first_block = chunk // block_size
        for i, nonzero in enumerate(flags):
            if nonzero and start < 0:
                start = first_block + i
            elif not nonzero and start >= 0:
                runs.append((start, first_block + i - start))
                start = -1
    if start >= 0:
        runs.append((start, -(-size // block_size) - start))
    return runs


def capture(memory: Buffer, block_size: int = BLOCK_SIZE) -> MemoryImage:
    """The image of `memory`: its size, where its non-zero runs are, and their bytes.

    The bytes are zstd-compressed unless samples of them do not compress (random or already
    compressed data), where compressing would cost time and save nothing.
    """
    image, pieces = capture_pieces(memory, block_size)
    return dataclasses.replace(image, data=b"".join(pieces))


def capture_pieces(memory: Buffer,
                   block_size: int = BLOCK_SIZE) -> tuple[MemoryImage, list[Buffer]]:
    """`capture` with the data left in pieces, in order (the image's own `data` is empty).

    Raw pieces are views of `memory` itself: they are valid only while it stays unchanged.
    """
    view = memoryview(memory).cast("B")
    runs = nonzero_runs(view, block_size)
    pieces: list[Buffer] = [view[first * block_size:(first + count) * block_size]
                            for first, count in runs]
    if not _compressible(pieces):
        return MemoryImage(len(view), block_size, tuple(runs), b"", codec="raw"), pieces
    compressor = zstandard.ZstdCompressor(level=_LEVEL).compressobj()
    packed: list[Buffer] = [compressor.compress(piece) for piece in pieces]
    packed.append(compressor.flush())
    return MemoryImage(len(view), block_size, tuple(runs), b""), packed


def _compressible(pieces: list[Buffer]) -> bool:
    """Whether zstd saves at least a tenth on samples from the start, middle and end."""
    total = sum(len(piece) for piece in pieces)
    if total < _SAMPLE_ABOVE:
        return True
    data = memoryview(pieces[0] if len(pieces) == 1 else b"".join(pieces[:1] + pieces[-1:]))
    samples = [data[at:at + _SAMPLE] for at in (0, len(data) // 2, max(0, len(data) - _SAMPLE))]
    raw = sum(len(sample) for sample in samples)
    packed = sum(len(zstandard.ZstdCompressor(level=_LEVEL).compress(sample))
                 for sample in samples)
    return packed < 0.9 * raw


def _run_spans(image: MemoryImage, max_size: int,
               held: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each run, after checking that the image is well formed."""
    size, block = image.size, image.block_size
    if size > max_size:
        raise SnapshotError(f"memory of {size} bytes exceeds the limit of {max_size}")
    if block <= 0 or block & (block - 1) or _CHUNK % block:
        raise SnapshotError(f"invalid block size {block}")
    spans = []
    end = 0
    for first, count in image.runs:
        if first < end or count <= 0 or (first + count - 1) * block >= size:
            raise SnapshotError("memory image runs overlap, are empty or lie outside memory")
        end = first + count
        spans.append((first * block, min(count * block, size - first * block)))
    needed = sum(length for _, length in spans)
    held = len(image.data) if held is None else held
    if image.codec == "raw" and held != needed:
        raise SnapshotError(f"memory image holds {held} bytes, its runs need {needed}")
    return spans


def check(image: MemoryImage, max_size: int, pieces: Sequence[Buffer] | None = None) -> None:
    """Raise SnapshotError unless the image's layout is valid (its data is checked on restore)."""
    _run_spans(image, max_size, None if pieces is None else sum(len(p) for p in pieces))


def restore_into(image: MemoryImage, memory: Buffer, max_size: int,
                 pieces: Sequence[Buffer] | None = None) -> None:
    """Make `memory` (writable, exactly `image.size` bytes) equal to the captured memory.

    The image's bytes are its `data`, or `pieces` (in order) when they travelled apart from it.
    Raises SnapshotError; if that happens after writing began, `memory` is left half-written.
    """
    pieces = [image.data] if pieces is None else pieces
    spans = _run_spans(image, max_size, sum(len(piece) for piece in pieces))
    view = memoryview(memory).cast("B")
    if len(view) != image.size:
        raise SnapshotError(f"memory image is {image.size} bytes, the target {len(view)}")
    at = 0
    for offset, length in [*spans, (image.size, 0)]:
        _zero(view[at:offset])
        at = offset + length
    needed = sum(length for _, length in spans)
    if image.codec == "raw":
        _copy_raw(pieces, view, spans)
        return
    try:
        with zstandard.ZstdDecompressor().stream_reader(b"".join(pieces)) as reader:
            done = 0
            for offset, length in spans:
                done += _read_exactly(reader, view[offset:offset + length])
            if reader.read(1):
                raise SnapshotError(f"memory image holds more bytes than its runs need "
                                    f"({needed})")
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"memory image does not decompress: {exc}") from None
    if done != needed:
        raise SnapshotError(f"memory image holds {done} bytes, its runs need {needed}")


def _copy_raw(pieces: Sequence[Buffer], view: memoryview,
              spans: list[tuple[int, int]]) -> None:
    """Copy the bytes of `pieces`, in order, into the spans of `view` (lengths match)."""
    sources = iter(pieces)
    source = memoryview(b"")
    for offset, length in spans:
        at, end = offset, offset + length
        while at < end:
            if not source:
                source = memoryview(next(sources)).cast("B")
            step = min(end - at, len(source))
            view[at:at + step] = source[:step]
            source, at = source[step:], at + step


def _zero(view: memoryview) -> None:
    for at in range(0, len(view), _CHUNK):
        length = min(_CHUNK, len(view) - at)
        view[at:at + length] = _ZEROS[:length]


def _read_exactly(reader: zstandard.ZstdDecompressionReader, target: memoryview) -> int:
    done = 0
    while done < len(target):
        got = reader.readinto(target[done:])
        if not got:
            break
        done += got
    return done
