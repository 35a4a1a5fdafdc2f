"""Memory images: exact round trips, compact for sparse memory, and refusal of bad images."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from mesh import snapshot, wire
from mesh.errors import SnapshotError, WireError

PAGE = 65536


def rebuild(image: wire.MemoryImage) -> bytes:
    memory = bytearray(b"\xff" * image.size)  # restoring must also clear what is not in runs
    snapshot.restore_into(image, memory, max_size=image.size)
    return bytes(memory)


writes = st.lists(st.tuples(st.integers(0, 8 * PAGE - 1), st.binary(min_size=1, max_size=300)),
                  max_size=20)


@given(st.integers(1, 8), writes)
def test_capture_then_expand_gives_the_same_memory(pages: int,
                                                   writes: list[tuple[int, bytes]]) -> None:
    memory = bytearray(pages * PAGE)
    for position, data in writes:
        offset = position % len(memory)
        memory[offset:offset + len(data)] = data[:len(memory) - offset]
    image = snapshot.capture(bytes(memory))
    assert rebuild(image) == memory
    assert all(count > 0 for _, count in image.runs)


def test_blocks_are_found_exactly() -> None:
    memory = bytearray(10 * snapshot.BLOCK_SIZE)
    memory[0] = 1
    memory[3 * snapshot.BLOCK_SIZE + 5] = 2
    memory[4 * snapshot.BLOCK_SIZE] = 3
    memory[-1] = 4
    assert snapshot.nonzero_runs(bytes(memory)) == [(0, 1), (3, 2), (9, 1)]
    assert snapshot.nonzero_runs(bytes(memory[:-100])) == [(0, 1), (3, 2)]


def test_untouched_memory_costs_almost_nothing() -> None:
    memory = bytearray(64 << 20)
    memory[(32 << 20):(33 << 20)] = bytes(range(256)) * 4096
    image = snapshot.capture(bytes(memory))
    assert image.runs == (((32 << 20) // snapshot.BLOCK_SIZE, 256),)
    assert len(image.data) < 64 * 1024


def good_image() -> wire.MemoryImage:
    memory = bytearray(4 * PAGE)
    memory[100:200] = b"a" * 100
    memory[3 * PAGE:3 * PAGE + 10] = b"b" * 10
    return snapshot.capture(bytes(memory))


@pytest.mark.parametrize(("change", "message"), [
    ({"runs": ((0, 1), (0, 1))}, "overlap"),
    ({"runs": ((1000, 1),)}, "outside memory"),
    ({"runs": ((0, 0),)}, "overlap, are empty"),
    ({"block_size": 3000}, "invalid block size"),
    ({"data": b"garbage"}, "does not decompress"),
    ({"size": 1 << 40}, "exceeds the limit"),
])
def test_bad_images_are_refused(change: dict[str, Any], message: str) -> None:
    image = dataclasses.replace(good_image(), **change)
    with pytest.raises(SnapshotError, match=message):
        restore(image)


def restore(image: wire.MemoryImage) -> None:
    snapshot.restore_into(image, bytearray(min(image.size, 64 << 20)), max_size=64 << 20)


def test_a_decompression_bomb_is_cut_off() -> None:
    image = good_image()
    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    with pytest.raises(SnapshotError, match="holds more bytes than its runs need"):
        restore(dataclasses.replace(image, data=bomb))
    short = zstandard.ZstdCompressor().compress(b"a" * 10)
    with pytest.raises(SnapshotError, match="holds 10 bytes"):
        restore(dataclasses.replace(image, data=short))


@given(st.binary(max_size=2000))
def test_random_image_data_raises_only_snapshot_error(data: bytes) -> None:
    image = dataclasses.replace(good_image(), data=data)
    with pytest.raises(SnapshotError):
        restore(image)


def test_data_that_does_not_compress_is_stored_raw() -> None:
    noise = bytearray(random.Random(7).randbytes(3 << 20)) + bytearray(1 << 20)
    image = snapshot.capture(bytes(noise))
    assert image.codec == "raw"
    assert len(image.data) == 3 << 20
    assert rebuild(image) == noise
    text = bytearray((b"liquid mesh " * 400_000)[:4 << 20])
    assert snapshot.capture(bytes(text)).codec == "zstd"
    with pytest.raises(SnapshotError, match="its runs need"):
        restore(dataclasses.replace(image, data=image.data[:-1]))
    with pytest.raises(WireError, match="unknown memory codec 'lz4'"):
        dataclasses.replace(image, codec="lz4")


@pytest.mark.parametrize("fill", ["noise", "text"])
@given(cuts=st.lists(st.integers(0, 5 << 20), max_size=6))
def test_an_image_restores_from_its_bytes_in_any_pieces(fill: str, cuts: list[int]) -> None:
    """Chunked snapshots restore straight from their chunks, wherever the cuts fall."""
    rng = random.Random(fill)
    body = rng.randbytes(2 << 20) if fill == "noise" else b"liquid mesh " * 180_000
    memory = bytearray(6 << 20)
    memory[4096:4096 + len(body)] = body
    memory[5 << 20:(5 << 20) + 9] = b"far apart"
    image, pieces = snapshot.capture_pieces(memory)
    assert image.data == b""
    assert image.codec == ("raw" if fill == "noise" else "zstd")
    data = b"".join(pieces)
    assert snapshot.capture(memory).data == data
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    cut_up = [data[a:b] for a, b in itertools.pairwise(bounds)]
    target = bytearray(b"\xff" * len(memory))
    snapshot.restore_into(image, target, len(memory), cut_up)
    assert target == memory
    with pytest.raises(SnapshotError):
        snapshot.restore_into(image, target, len(memory), [data[:-1]])
