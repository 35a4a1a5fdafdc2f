"""What a device keeps on disk, and what a node takes back after a lost broker: no broker."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mesh import chunks, keys, trust, wire
from mesh.errors import WireError
from mesh.store import StateStore
from mesh.topics import Topics
from mesh.transfer import Inbox

SHA = "ab" * 32


def snapshot(app: str, seq: int) -> wire.Snapshot:
    memory = wire.MemoryImage(65536, 4096, ((0, 1),), b"\1" * 4096, codec="raw")
    return wire.Snapshot(app=app, module=SHA, memory=memory, globals=(), host=wire.HostState(),
                         epoch=2, seq=seq, taken_ms=0)


def test_the_store_keeps_specs_and_checkpoints_and_forgets_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    spec = wire.AppSpec(app="counter", module=SHA)
    store.save_spec("counter", wire.encode(spec))
    signed = trust.seal(keys.generate(), "kitchen", "mesh/apps/ledger/spec",
                        wire.encode(wire.AppSpec(app="ledger", module=SHA)))
    store.save_spec("ledger", signed)  # kept as it came, signature and all
    store.save_checkpoint(snapshot("counter", 3))
    store.save_checkpoint(snapshot("counter", 4))  # the newest replaces the older
    assert store.specs()["counter"] == (spec, wire.encode(spec))
    assert store.specs()["ledger"][1] == signed
    store.forget_spec("ledger")
    assert store.checkpoints()["counter"].seq == 4
    store.forget_checkpoint("counter")
    store.forget_spec("counter")
    store.forget_spec("never-there")
    assert (store.specs(), store.checkpoints()) == ({}, {})


def test_damaged_or_misplaced_files_are_skipped(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_checkpoint(snapshot("counter", 1))
    (tmp_path / "apps" / "garbage.cbor").write_bytes(b"\xff\x00 not cbor")
    (tmp_path / "apps" / "other.cbor").write_bytes(wire.encode(snapshot("counter", 9)))
    assert {app: snap.seq for app, snap in store.checkpoints().items()} == {"counter": 1}


def test_a_node_takes_the_checkpoints_it_held_only_where_they_are_newer() -> None:
    inbox = Inbox(Topics())
    inbox.snapshot("a", None, wire.encode(snapshot("a", 5)))  # the broker's is newer
    inbox.snapshot("b", None, wire.encode(snapshot("b", 1)))  # the broker's is older
    held = chunks.Retained()
    for app, seq in (("a", 3), ("b", 4), ("c", 2)):
        held.whole(f"mesh/apps/{app}/snapshot", wire.encode(snapshot(app, seq)))
    held.chunk("mesh/apps/b/snapshot", 2, b"chunk")
    inbox.adopt(held, {"a": (2, 3), "b": (2, 4), "c": (2, 2)})
    assert {app: inbox.version(app) for app in "abc"} == {"a": (2, 5), "b": (2, 4), "c": (2, 2)}
    assert inbox.retained.parts("mesh/apps/b/snapshot") == {2: b"chunk"}
    checkpoint = inbox.checkpoint("b")
    assert checkpoint is not None
    assert checkpoint.snap.seq == 4


def chunked(app: str, epoch: int, seq: int, fill: int) -> tuple[list[bytes], int, bytes]:
    """A checkpoint whose memory travels as chunks: (chunks, first index, header)."""
    data = bytes([fill]) * 10_000
    first = chunks.SLOT * (seq % 2)
    manifest = chunks.describe([data], 4096, first)
    memory = wire.MemoryImage(65536, 4096, ((0, 3),), b"", external=manifest, codec="raw")
    snap = dataclasses.replace(snapshot(app, seq), epoch=epoch, memory=memory)
    return list(chunks.cut([data], 4096)), first, wire.encode(snap)


def deliver(inbox: Inbox, parts: list[bytes], first: int) -> None:
    """Chunks of app "a"'s checkpoint, at their indices from `first`."""
    for i, part in enumerate(parts):
        inbox.snapshot("a", str(first + i), part)


def test_chunks_of_an_older_copy_leave_the_checkpoint_held_whole() -> None:
    # An older copy given back to the broker (same chunk slot: seq of the same parity) sends
    # its chunks before its header, which is then refused as older: the checkpoint held must
    # still be usable, not a mix of both.
    inbox = Inbox(Topics())
    for epoch, seq, fill in ((3, 4, 7), (2, 2, 9)):
        parts, first, head = chunked("a", epoch, seq, fill)
        deliver(inbox, parts, first)
        if epoch == 3:
            inbox.snapshot("a", None, head)
            held = inbox.checkpoint("a")
            assert held is not None
            assert held.matches()
        else:
            with pytest.raises(WireError, match="older than the one held"):
                inbox.snapshot("a", None, head)
    checkpoint = inbox.checkpoint("a")
    assert checkpoint is not None
    assert checkpoint.snap.version == (3, 4)
    assert checkpoint.matches()


def test_a_header_that_came_before_its_chunks_takes_them_once_they_are_here() -> None:
    # After a reconnect the broker sends retained messages in its own order: the header may
    # come while the indices it names still hold an older checkpoint's chunks.
    inbox = Inbox(Topics())
    old_parts, first, _ = chunked("a", 2, 2, 9)
    deliver(inbox, old_parts, first)
    parts, first, head = chunked("a", 3, 4, 7)
    inbox.snapshot("a", None, head)
    stale = inbox.checkpoint("a")
    assert stale is not None
    assert not stale.matches()
    inbox.incomplete(stale)
    assert inbox.checkpoint("a") is None  # nothing newer here: it waits for its own
    deliver(inbox, parts, first)
    own = inbox.checkpoint("a")
    assert own is not None
    assert own.matches()


def test_a_checkpoint_found_incomplete_after_a_newer_came_leaves_the_newer_one() -> None:
    inbox = Inbox(Topics())
    old_parts, first, _ = chunked("a", 2, 2, 9)
    deliver(inbox, old_parts, first)
    parts, first, head = chunked("a", 3, 4, 7)
    inbox.snapshot("a", None, head)  # put together from the older chunks: its restore fails
    stale = inbox.checkpoint("a")
    assert stale is not None
    deliver(inbox, parts, first)  # meanwhile its own chunks come, then a newer one
    newer_parts, first, newer_head = chunked("a", 3, 5, 5)
    deliver(inbox, newer_parts, first)
    inbox.snapshot("a", None, newer_head)
    inbox.incomplete(stale)
    taken = inbox.checkpoint("a")
    assert taken is not None
    assert taken.snap.version == (3, 5)
    assert taken.matches()
