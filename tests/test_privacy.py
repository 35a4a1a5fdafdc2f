"""App memory sealed with the mesh's data keys (mesh.privacy): pure, no broker."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import keys, privacy, trust, wire
from mesh.authority import Authority
from mesh.errors import ConfigError, TrustError, WireError
from mesh.privacy import HEADER_INDEX, Keyring, MissingKey, Opener, Sealer
from mesh.topics import Topics
from mesh.transfer import Inbox
from mesh.trust import MeshIdentity, Rights

TOPIC = "mesh/apps/counter/snapshot"
KEYS = Keyring.new()
DEVICE = keys.generate()


def test_a_sealed_piece_opens_only_at_its_own_index_and_topic() -> None:
    sealer = Sealer(KEYS, TOPIC)
    opener = Opener(KEYS)
    chunk, header = sealer.piece(3, b"app memory"), sealer.piece(HEADER_INDEX, b"header")
    assert b"app memory" not in chunk
    assert opener.piece(TOPIC, 3, chunk) == b"app memory"
    assert opener.piece(TOPIC, HEADER_INDEX, header) == b"header"
    for topic, index in ((TOPIC, 4), ("mesh/apps/other/snapshot", 3), (TOPIC, HEADER_INDEX)):
        with pytest.raises(TrustError, match="does not decrypt"):
            opener.piece(topic, index, chunk)
    with pytest.raises(TrustError, match="not encrypted"):
        opener.piece(TOPIC, 3, b"app memory, as it is")


@given(st.integers(0, 200), st.integers(0, 255))
def test_a_tampered_piece_never_opens(position: int, flip: int) -> None:
    chunk = bytearray(Sealer(KEYS, TOPIC).piece(0, bytes(range(100))))
    chunk[position % len(chunk)] ^= flip or 1
    with pytest.raises(TrustError):
        Opener(KEYS).piece(TOPIC, 0, bytes(chunk))


def test_the_newest_key_seals_and_older_ones_still_open() -> None:
    old = Sealer(KEYS, TOPIC).piece(0, b"before the revocation")
    rotated = KEYS.rotated()
    assert rotated.newest == KEYS.newest + 1
    new = Sealer(rotated, TOPIC).piece(0, b"after it")
    assert Opener(rotated).piece(TOPIC, 0, old) == b"before the revocation"
    with pytest.raises(MissingKey, match=f"data key {rotated.newest}, which this device was "
                                          "not given"):
        Opener(KEYS).piece(TOPIC, 0, new)  # a revoked device, which kept the old keys


def test_a_grant_opens_only_with_the_devices_key() -> None:
    record = privacy.grant(KEYS, "mesh1", "kitchen", privacy.box_public(DEVICE))
    record = wire.decode(privacy.Grant, wire.encode(record))
    assert KEYS.keys[1] not in wire.encode(record)
    assert privacy.open_grant(record, "mesh1", "kitchen", DEVICE).keys == KEYS.keys
    with pytest.raises(TrustError, match="does not open with its key"):
        privacy.open_grant(record, "mesh1", "kitchen", keys.generate())
    with pytest.raises(TrustError, match="a key grant for 'kitchen'"):
        privacy.open_grant(record, "mesh1", "hall", DEVICE)
    with pytest.raises(TrustError, match="has no box key"):
        privacy.grant(KEYS, "mesh1", "old-device", b"")


def test_a_keyring_merges_and_keeps_its_file_private(tmp_path: Path) -> None:
    mine = Keyring(dict(KEYS.keys))
    assert not mine.merge(KEYS)
    assert mine.merge(KEYS.rotated())
    path = tmp_path / "data-keys.cbor"
    mine.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path).keys == mine.keys
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not data keys"):
        Keyring.load(path)


def test_an_apps_session_secret_is_the_meshs_alone() -> None:
    secret = privacy.session_secret(KEYS, "counter")
    assert len(secret) == 16
    assert privacy.session_secret(KEYS.rotated(), "counter") == secret  # the first key's
    assert privacy.session_secret(KEYS, "thermo") != secret
    assert privacy.session_secret(Keyring.new(), "counter") != secret


def _authorities(granted: Keyring, lacking: Keyring) -> tuple[Authority, Authority]:
    """Two admitted devices of one mesh: one holding `granted`, one only `lacking`."""
    operator = keys.generate()
    identity = MeshIdentity(keys.public_bytes(operator))
    made = []
    for device, keyring in (("alpha", granted), ("beta", lacking)):
        key = keys.generate()
        admission = trust.admission(operator, identity, device, keys.public_bytes(key),
                                    Rights(), now_ms=int(time.time() * 1000))
        authority = Authority(device, key=key, identity=identity, admission=admission,
                              keyring=Keyring(dict(keyring.keys)))
        made.append(authority)
    for authority in made:
        for other in made:
            assert other.admission is not None
            authority.learn_admission(other.device, other.admission)
    return made[0], made[1]


def _sealed_head(authority: Authority, seq: int) -> bytes:
    snap = wire.Snapshot(app="counter", module="ab" * 32,
                         memory=wire.MemoryImage(65536, 4096, (), b""), epoch=1, seq=seq)
    return authority.seal_checkpoint(TOPIC).header(wire.encode(snap))


def test_a_checkpoint_sealed_with_a_key_not_held_is_never_passed_over() -> None:
    alpha, beta = _authorities(KEYS.rotated(), KEYS)
    inbox = Inbox(Topics(), beta)
    older = _sealed_head(beta, 1)  # with data key 1, which both hold
    inbox.snapshot("counter", None, older)
    assert inbox.checkpoint("counter") is not None
    newer = _sealed_head(alpha, 2)  # with data key 2, which beta was not given yet
    with pytest.raises(MissingKey):
        inbox.snapshot("counter", None, newer)
    assert inbox.unreadable("counter")  # not the older one, not a fresh start
    assert inbox.locked  # to be taken again once the key comes
    with pytest.raises(WireError):  # garbage does not lift that
        inbox.snapshot("counter", None, b"\xa1garbage")
    assert inbox.unreadable("counter")
    with pytest.raises(WireError, match=r"older data key .* \(replayed\)"):
        inbox.snapshot("counter", None, older)  # the one held, sent again
    assert inbox.unreadable("counter")
    assert inbox.checkpoint("counter") is not None  # (still held, but not to restore)
    beta.keyring.merge(alpha.keyring)  # the grant came
    inbox.snapshot("counter", None, newer)
    assert not inbox.unreadable("counter")
    assert inbox.version("counter") == (1, 2)
