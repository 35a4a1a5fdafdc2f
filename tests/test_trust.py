"""Admission and signed records (mesh.trust, mesh.keys): pure, no broker."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from mesh import keys, pairing, privacy, trust, wire
from mesh.errors import ConfigError, MeshError, Revoked, TrustError, WireError
from mesh.privacy import Keyring
from mesh.trust import MeshIdentity, Rights, TrustStore

NOW = 1_700_000_000_000
OPERATOR = keys.generate()
IDENTITY = MeshIdentity(keys.public_bytes(OPERATOR), "home")
DEVICE = keys.generate()
KEYS = Keyring.new()
OWNER_TOPIC = "mesh/apps/counter/owner"
RECORD = wire.encode(wire.OwnerRecord("kitchen", 3, 7))


def store() -> TrustStore:
    return TrustStore(IDENTITY)


def admitted(device: str = "kitchen", key: Ed25519PrivateKey = DEVICE,
             rights: Rights | None = None, now_ms: int = NOW) -> TrustStore:
    trusted = store()
    data = trust.admission(OPERATOR, IDENTITY, device, keys.public_bytes(key),
                           rights or Rights(), now_ms=now_ms)
    trusted.admit(device, data, NOW)
    return trusted


def test_the_mesh_id_is_its_operator_keys_fingerprint() -> None:
    assert IDENTITY.id == "m" + keys.fingerprint(keys.public_bytes(OPERATOR))
    assert MeshIdentity(keys.public_bytes(keys.generate())).id != IDENTITY.id
    assert wire.decode(MeshIdentity, wire.encode(IDENTITY)) == IDENTITY


def test_an_admitted_device_signs_records_for_their_own_topic_only() -> None:
    trusted = admitted()
    data = trust.seal(DEVICE, "kitchen", OWNER_TOPIC, RECORD)
    opened = trusted.open(OWNER_TOPIC, data, NOW)
    assert (opened.signer, opened.body) == ("kitchen", RECORD)
    with pytest.raises(TrustError, match="not signed by kitchen"):  # replayed elsewhere
        trusted.open("mesh/apps/ledger/owner", data, NOW)
    tampered = trust.seal(DEVICE, "kitchen", OWNER_TOPIC, RECORD)
    envelope = trust.unseal(tampered)
    forged = wire.encode(trust.Sealed("kitchen", RECORD + b"\0", envelope.sig))
    with pytest.raises(TrustError, match="not signed by kitchen"):
        trusted.open(OWNER_TOPIC, forged, NOW)
    later = wire.encode(trust.Sealed("kitchen", RECORD, envelope.sig, issued_ms=NOW))
    with pytest.raises(TrustError, match="not signed by kitchen"):
        trusted.open(OWNER_TOPIC, later, NOW)  # its time is signed too


def test_records_of_unknown_devices_and_forged_operator_records_are_refused() -> None:
    trusted = admitted()
    stranger = keys.generate()
    with pytest.raises(TrustError, match="'garage' is not admitted"):
        trusted.open(OWNER_TOPIC, trust.seal(stranger, "garage", OWNER_TOPIC, RECORD), NOW)
    with pytest.raises(TrustError, match="not signed by kitchen"):  # an impostor of kitchen
        trusted.open(OWNER_TOPIC, trust.seal(stranger, "kitchen", OWNER_TOPIC, RECORD), NOW)
    spec_topic = "mesh/apps/counter/spec"
    forged = trust.seal(stranger, trust.OPERATOR, spec_topic, RECORD)
    with pytest.raises(TrustError, match="not signed by the operator"):
        trusted.open(spec_topic, forged, NOW)
    genuine = trust.seal(OPERATOR, trust.OPERATOR, spec_topic, RECORD)
    assert trusted.open(spec_topic, genuine, NOW).signer == trust.OPERATOR
    assert trusted.may_deploy(trust.OPERATOR, NOW)
    assert not trusted.may_deploy("kitchen", NOW)
    assert not trusted.may_deploy("garage", NOW)


def test_an_admission_must_be_the_operators_for_this_mesh_and_this_device() -> None:
    trusted = store()
    key = keys.public_bytes(DEVICE)
    other = keys.generate()
    other_mesh = MeshIdentity(keys.public_bytes(other))
    with pytest.raises(TrustError, match="not signed by the operator"):
        trusted.admit("kitchen", trust.admission(other, IDENTITY, "kitchen", key, Rights(),
                                                 now_ms=NOW), NOW)
    with pytest.raises(TrustError, match="an admission for mesh"):
        trusted.admit("kitchen", trust.admission(OPERATOR, other_mesh, "kitchen", key,
                                                 Rights(), now_ms=NOW), NOW)
    for_garage = trust.admission(OPERATOR, IDENTITY, "garage", key, Rights(), now_ms=NOW)
    with pytest.raises(TrustError, match="not signed by the operator"):  # sealed for garage
        trusted.admit("kitchen", for_garage, NOW)
    assert trusted.admissions == {}


def test_an_expired_admission_or_a_revoked_device_acts_no_more() -> None:
    trusted = admitted(rights=Rights(expires_ms=NOW + 1000))
    data = trust.seal(DEVICE, "kitchen", OWNER_TOPIC, RECORD)
    assert trusted.open(OWNER_TOPIC, data, NOW + 999).signer == "kitchen"
    with pytest.raises(TrustError, match="expired"):
        trusted.open(OWNER_TOPIC, data, NOW + 1000)
    trusted = admitted()
    forged = trust.revocation(keys.generate(), IDENTITY, "kitchen", now_ms=NOW)
    with pytest.raises(TrustError, match="not signed by the operator"):
        trusted.revoke("kitchen", forged)
    assert trusted.open(OWNER_TOPIC, data, NOW).signer == "kitchen"
    trusted.revoke("kitchen", trust.revocation(OPERATOR, IDENTITY, "kitchen", now_ms=NOW))
    with pytest.raises(TrustError, match="'kitchen', revoked since"):
        trusted.open(OWNER_TOPIC, data, NOW)
    again = trust.admission(OPERATOR, IDENTITY, "kitchen", keys.public_bytes(DEVICE), Rights(),
                            now_ms=NOW + 5)
    with pytest.raises(TrustError, match="revoked"):  # revocation is for good
        trusted.admit("kitchen", again, NOW + 5)


def test_an_older_admission_replayed_is_refused() -> None:
    trusted = admitted(rights=Rights(may_deploy=False), now_ms=NOW + 10)
    older = trust.admission(OPERATOR, IDENTITY, "kitchen", keys.public_bytes(DEVICE),
                            Rights(may_deploy=True), now_ms=NOW)
    with pytest.raises(TrustError, match="older than the one held"):
        trusted.admit("kitchen", older, NOW + 20)
    assert not trusted.rights_of("kitchen", NOW + 20).rights.may_deploy


def test_a_join_token_admits_one_device_once() -> None:
    text = trust.join_token(OPERATOR, IDENTITY, Rights(caps=("gpio",)), now_ms=NOW,
                            data_keys=KEYS.encode())
    token = trust.read_token(text)
    assert Keyring.decode(token.keys).keys == KEYS.keys  # the device can read app memory
    identity, data = trust.redeem(token, "greenhouse", DEVICE, privacy.box_public(DEVICE))
    assert identity == IDENTITY
    trusted = store()
    admission = trusted.admit("greenhouse", data, NOW)
    assert (admission.device, admission.key, admission.rights.caps, admission.box) == (
        "greenhouse", keys.public_bytes(DEVICE), ("gpio",), privacy.box_public(DEVICE))
    signed = trust.seal(DEVICE, "greenhouse", OWNER_TOPIC, RECORD)
    assert trusted.open(OWNER_TOPIC, signed, NOW).signer == "greenhouse"
    assert trusted.admit("greenhouse", data, NOW).device == "greenhouse"  # the same, again
    _, second = trust.redeem(token, "shed", keys.generate())
    with pytest.raises(TrustError, match="was used already, by 'greenhouse'"):
        trusted.admit("shed", second, NOW)


def test_a_token_claim_needs_the_operators_voucher_and_the_tokens_key() -> None:
    rogue = keys.generate()
    rogue_identity = MeshIdentity(keys.public_bytes(rogue))
    # A voucher the rogue signed itself, for a mesh that trusts the real operator.
    fake = trust.read_token(trust.join_token(rogue, rogue_identity, Rights(), now_ms=NOW,
                                             data_keys=b""))
    _, data = trust.redeem(fake, "intruder", DEVICE)
    with pytest.raises(TrustError, match="not signed by the operator"):
        store().admit("intruder", data, NOW)
    # A real voucher, but the claim signed with another key than the token's.
    real = trust.read_token(trust.join_token(OPERATOR, IDENTITY, Rights(), now_ms=NOW,
                                             data_keys=KEYS.encode()))
    forged = trust.Token(real.root, real.identity, real.voucher,
                         keys.private_bytes(keys.generate()))
    _, data = trust.redeem(forged, "intruder", DEVICE)
    with pytest.raises(TrustError, match="not signed by token"):
        store().admit("intruder", data, NOW)


@pytest.mark.parametrize("text", ["", "lmt1.", "lmt1.!!!", "hello", "lmt1.AAAA"])
def test_a_malformed_join_token_is_one_clear_error(text: str) -> None:
    with pytest.raises(TrustError, match="join token"):
        trust.read_token(text)


@given(st.binary(max_size=512))
def test_garbage_never_opens_and_fails_only_with_a_mesh_error(data: bytes) -> None:
    trusted = admitted()
    with pytest.raises(MeshError):
        trusted.open(OWNER_TOPIC, data, NOW)
    with pytest.raises(MeshError):
        trusted.admit("kitchen", data, NOW)


def test_a_private_key_file_is_made_once_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    key = keys.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.public_bytes(keys.load_or_create(path)) == keys.public_bytes(key)
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        keys.load(tmp_path / "bad.key")


def test_a_revoked_devices_genuine_record_is_told_from_a_forged_one() -> None:
    trusted = admitted()
    trusted.revoke("kitchen", trust.revocation(OPERATOR, IDENTITY, "kitchen", now_ms=NOW))
    genuine = trust.seal(DEVICE, "kitchen", OWNER_TOPIC, RECORD)
    with pytest.raises(Revoked, match="revoked since"):
        trusted.open(OWNER_TOPIC, genuine, NOW)
    forged = trust.seal(keys.generate(), "kitchen", OWNER_TOPIC, RECORD)
    with pytest.raises(TrustError, match="not signed by kitchen"):
        trusted.open(OWNER_TOPIC, forged, NOW)


def test_a_pending_record_must_be_signed_with_the_key_it_names() -> None:
    key = keys.generate()
    topic = "mesh/pending/kitchen"
    request = pairing.Pending("kitchen", keys.public_bytes(key), privacy.box_public(key))
    signed = trust.seal(key, "kitchen", topic, wire.encode(request))
    assert pairing.pending_record(topic, signed) == request
    # The device's key (what the operator compares) with a stranger's box key in: refused.
    swapped = dataclasses.replace(request, box=privacy.box_public(keys.generate()))
    with pytest.raises(TrustError, match="not signed by kitchen"):
        pairing.pending_record(topic, trust.seal(keys.generate(), "kitchen", topic,
                                                 wire.encode(swapped)))
    with pytest.raises(WireError):
        pairing.pending_record(topic, wire.encode(swapped))  # not signed at all
    with pytest.raises(MeshError, match="is of 'kitchen'"):
        pairing.pending_record("mesh/pending/hall", signed)
