"""The wire format: every type round-trips; anything else is one WireError with a reason."""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import chunks, wire
from mesh.errors import WireError

names = st.from_regex(wire.NAME_RE, fullmatch=True)
hashes = st.from_regex(wire.SHA256_RE, fullmatch=True)
texts = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**40)
filters = st.from_regex(r"[a-z]{1,8}(/([a-z]{1,8}|\+))*(/#)?", fullmatch=True)
labels = st.dictionaries(texts, texts, max_size=4)

specs = st.builds(wire.AppSpec, app=names, module=hashes,
                  requires=st.tuples(texts), prefers=labels,
                  pin=st.none() | names, tick_ms=st.just(0) | st.integers(10, 2**40),
                  checkpoint_ms=counts,
                  checkpoint_every=counts,
                  memory_limit=st.integers(min_value=65536, max_value=2**32),
                  timeout_ms=st.integers(min_value=1, max_value=60_000),
                  subscriptions=st.lists(filters, max_size=3).map(tuple),
                  signature=st.none() | st.binary(max_size=64))
images = st.builds(wire.MemoryImage, size=counts, block_size=st.just(4096),
                   runs=st.lists(st.tuples(counts, counts), max_size=5).map(tuple),
                   data=st.binary(max_size=100))
global_values = st.builds(wire.GlobalValue, name=texts, type=st.sampled_from(["i32", "i64"]),
                          value=st.integers(min_value=-(2**63), max_value=2**63 - 1))
objects = st.one_of(
    st.builds(wire.NodeRecord, id=names, caps=st.lists(texts, max_size=3).map(tuple),
              labels=labels, apps=st.lists(names, max_size=3).map(tuple),
              broker=st.none() | texts, load=st.floats(0, 100), started_ms=counts),
    specs,
    st.builds(wire.OwnerRecord, node=names, epoch=counts),
    st.builds(wire.Snapshot, app=names, module=hashes, memory=images,
              globals=st.lists(global_values, max_size=3).map(tuple),
              host=st.builds(wire.HostState, initialized=st.booleans(), delivered=counts,
                             published=counts, ticks=counts, next_tick_ms=st.none() | counts),
              epoch=counts, seq=counts, taken_ms=counts,
              applied=st.lists(st.integers(1, 65535), max_size=5).map(tuple)),
    st.builds(wire.Command, op=st.just("migrate"), id=names, app=names, to=names),
    st.builds(wire.Command, op=st.just("deploy"), id=st.none() | names, spec=specs),
    st.builds(wire.Command, op=st.just("send"), app=names, payload=st.binary(max_size=50),
              topic=st.none() | st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})*", fullmatch=True)),
    st.builds(wire.Reply, id=names, ok=st.booleans(), error=st.none() | texts,
              result=st.none() | st.lists(st.dictionaries(texts, texts | counts, max_size=3),
                                          max_size=3)),
    st.builds(wire.Event, event=names, ts_ms=counts, node=st.none() | names,
              app=st.none() | names, reason=st.none() | texts,
              detail=st.dictionaries(texts, st.none() | texts | counts, max_size=3)),
)


@given(objects)
def test_every_wire_object_round_trips_through_cbor(obj: Any) -> None:
    data = wire.encode(obj)
    assert wire.decode(type(obj), data) == obj
    assert wire.decode_any(data) == obj


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    for cls in (wire.NodeRecord, wire.AppSpec, wire.OwnerRecord, wire.Snapshot, wire.Command,
                wire.Event, wire.Reply, wire.Manifest):
        with contextlib.suppress(WireError):
            wire.decode(cls, data)
    with contextlib.suppress(WireError):
        wire.decode_command(data)


@given(objects, st.data())
def test_corrupted_encodings_raise_only_wire_error(obj: Any, data: st.DataObject) -> None:
    raw = bytearray(wire.encode(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(WireError):
            wire.decode(type(obj), candidate)


def test_a_command_from_mosquitto_pub_decodes_as_json() -> None:
    command, is_json = wire.decode_command(
        b'{"op":"migrate","app":"counter","to":"kitchen","id":"r1"}')
    assert is_json
    assert command == wire.Command(op="migrate", app="counter", to="kitchen", id="r1")
    send, _ = wire.decode_command(b' {"op":"send","app":"counter","payload":"hi"}')
    assert send.payload == b"hi"
    back, _ = wire.decode_command(wire.encode_json(send))
    assert back == send


@pytest.mark.parametrize(("data", "message"), [
    (b'{"op":"explode","app":"x"}', "unknown op 'explode'"),
    (b'{"op":"migrate","app":"x"}', "needs 'to'"),
    (b'{"op":"stop","app":7}', "cmd.app: expected str, got int"),
    (b'{"op":"stop","app":"bad name!"}', "not a valid name"),
    (b'{"op":"stop","app":"x","v":99}', "wire version 99 is newer"),
    (b'{"op":"stop"', "malformed JSON"),
    (b'[1,2]', "expected a map"),
    (b'{"op":"deploy","spec":{"app":"a","module":"zz"}}', "64 lowercase hex"),
    (b'{"op":"stop","app":"x",' + b'"p":' + b"[" * 5000 + b"]" * 5000 + b"}",
     "malformed JSON"),
    (b'{"op":"deploy","spec":{"app":"a"}}', "missing field 'module'"),
    (b'{"op":"send","app":"a","topic":"x/#","payload":"hi"}', "not a valid sub-topic"),
    (b'{"op":"deploy","spec":{"app":"a","module":"' + b"0" * 64 + b'","tick_ms":1}}',
     "tick_ms must be 0"),
    (b'{"op":"deploy","spec":{"app":"a","module":"' + b"0" * 64 + b'","timeout_ms":99999999}}',
     "timeout_ms must be from 1 to 60000"),
    (b'{"op":"deploy","spec":{"app":"a","module":"' + b"0" * 64 +
     b'","subscriptions":["a/#/b"]}}', "not a valid MQTT topic filter"),
])
def test_bad_commands_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode_command(data)


def test_limits_on_size_depth_and_types() -> None:
    with pytest.raises(WireError, match="exceeds the limit"):
        wire.decode(wire.OwnerRecord, b"\xa0" * 5000)
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(WireError, match="malformed CBOR"):
        wire.decode(wire.Event, cbor2.dumps({"v": 1, "kind": "event", "event": "x",
                                             "ts_ms": 1, "detail": {"a": deep}}))
    tagged = cbor2.dumps({"v": 1, "kind": "owner", "node": "n",
                          "epoch": cbor2.CBORTag(1, 1700000000)})
    with pytest.raises(WireError, match=r"owner\.epoch: expected int, got datetime"):
        wire.decode(wire.OwnerRecord, tagged)
    duplicate = b"\xa3\x61v\x01\x64node\x61a\x64node\x61b"
    with pytest.raises(WireError, match="malformed CBOR"):
        wire.decode(wire.OwnerRecord, duplicate)
    with pytest.raises(WireError, match="integer out of range"):
        wire.decode(wire.OwnerRecord, cbor2.dumps({"v": 1, "node": "n", "epoch": 2**70}))
    with pytest.raises(WireError, match="expected a owner, got a 'node'"):
        wire.decode(wire.OwnerRecord, cbor2.dumps({"v": 1, "kind": "node", "node": "n",
                                                   "epoch": 1}))
    with pytest.raises(WireError, match="epoch must be from 0 to"):
        wire.decode(wire.OwnerRecord, cbor2.dumps({"v": 1, "node": "n", "epoch": -1}))
    for past in (wire.MAX_EPOCH, 2**64 - 1):  # nothing could continue from it: refused
        with pytest.raises(WireError, match="epoch must be from 0 to"):
            wire.decode(wire.OwnerRecord, cbor2.dumps({"v": 1, "node": "n", "epoch": past}))


def test_decode_any_refuses_unknown_kinds() -> None:
    with pytest.raises(WireError, match="unknown or missing kind 'banana'"):
        wire.decode_any(cbor2.dumps({"v": 1, "kind": "banana"}))


def test_json_encoding_of_replies_is_plain_json() -> None:
    reply = wire.Reply(id="r1", ok=True, result=[{"app": "counter", "epoch": 3}])
    assert json.loads(wire.encode_json(reply)) == {
        "v": 1, "kind": "reply", "id": "r1", "ok": True, "error": None,
        "result": [{"app": "counter", "epoch": 3}]}


@given(st.binary(max_size=10_000), st.integers(1, 3000), st.randoms())
def test_chunks_join_in_any_order(data: bytes, size: int, rng: random.Random) -> None:
    manifest, parts = chunks.split(data, size)
    assert wire.decode(wire.Manifest, wire.encode(manifest)) == manifest
    order = list(enumerate(parts))
    rng.shuffle(order)
    received: dict[int, bytes] = {}
    for index, part in order[:-1]:
        received[index] = part
        assert chunks.join(manifest, received, len(data)) is None
    received.update(order[-1:])
    assert chunks.join(manifest, received, len(data)) == data


def test_chunks_that_do_not_belong_are_not_joined() -> None:
    manifest, parts = chunks.split(b"x" * 100, 30)
    _, old = chunks.split(b"o" * 100, 30)
    with pytest.raises(WireError, match="exceeds the limit"):
        chunks.join(manifest, dict(enumerate(parts)), max_size=99)
    assert chunks.join(manifest, {**dict(enumerate(parts)), 1: old[1]}, 100) is None
    assert chunks.join(manifest, {**dict(enumerate(parts)), 3: b"xx"}, 100) is None
    with pytest.raises(WireError, match="count 9 does not match"):
        wire.Manifest(manifest.sha256, 100, 30, 9)


def test_retained_keeps_heads_and_chunks_as_they_come() -> None:
    retained = chunks.Retained()
    manifest, parts = chunks.split(bytes(range(95)), 10)
    for index, part in enumerate(parts):
        retained.chunk("b", index, part)
    retained.whole("b", wire.encode(manifest))
    head = retained.head("b")
    assert head is not None
    assert chunks.is_manifest(head) == manifest
    assert chunks.join(manifest, retained.parts("b"), 1000) == bytes(range(95))
    retained.whole("b", b"")
    assert retained.head("b") is None
    assert retained.parts("b") == {}
    assert chunks.index_of("12") == 12
    with pytest.raises(WireError, match="chunk index 'x' is not a number"):
        chunks.index_of("x")
    with pytest.raises(WireError, match="not a number below 4096"):
        chunks.index_of("99999")


@given(st.lists(st.binary(max_size=700), max_size=8), st.integers(1, 500))
def test_chunks_cut_from_pieces_match_chunks_of_the_whole(pieces: list[bytes],
                                                           size: int) -> None:
    """Snapshot memory is cut into chunks straight from its pieces, never joined first."""
    whole = b"".join(pieces)
    manifest, parts = chunks.split(whole, size, first=7)
    assert chunks.describe(pieces, size, first=7) == manifest
    assert list(chunks.cut(pieces, size)) == parts
    held = {7 + index: part for index, part in enumerate(parts)}
    collected = chunks.collect(manifest, held, len(whole))
    assert collected == parts
    assert chunks.matches(manifest, collected)
    if parts and parts[0].strip(b"\0"):
        stale = {**held, 7: bytes(len(parts[0]))}
        stale_parts = chunks.collect(manifest, stale, len(whole))
        assert stale_parts is not None
        assert not chunks.matches(manifest, stale_parts)
