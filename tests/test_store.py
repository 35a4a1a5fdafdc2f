"""What a device keeps on disk, and what a node gives back to a broker: pure, no broker."""

from __future__ import annotations

from pathlib import Path

from mesh import chunks, wire
from mesh.store import StateStore

SHA = "ab" * 32


def snapshot(app: str, seq: int) -> wire.Snapshot:
    memory = wire.MemoryImage(65536, 4096, ((0, 1),), b"\1" * 4096, codec="raw")
    return wire.Snapshot(app=app, module=SHA, memory=memory, globals=(), host=wire.HostState(),
                         epoch=2, seq=seq, taken_ms=0)


def test_the_store_keeps_specs_and_checkpoints_and_forgets_them(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_spec(wire.AppSpec(app="counter", module=SHA))
    store.save_checkpoint(snapshot("counter", 3))
    store.save_checkpoint(snapshot("counter", 4))  # the newest replaces the older
    assert list(store.specs()) == ["counter"]
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


def test_a_node_adopts_only_the_blobs_a_broker_lacks() -> None:
    held, fresh = chunks.Retained(), chunks.Retained()
    held.whole("a", b"old head a")
    held.chunk("a", "0", b"old chunk")
    held.whole("b", b"head b")
    held.chunk("b", "2", b"chunk b")
    fresh.whole("a", b"new head a")
    fresh.adopt(held)
    assert fresh.head("a") == b"new head a"
    assert fresh.parts("a") == {}
    assert (fresh.head("b"), dict(fresh.parts("b"))) == (b"head b", {2: b"chunk b"})
