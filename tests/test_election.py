"""Broker election and mDNS records: pure rules every device applies alike."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import election
from mesh.discovery import Discovery, parse_broker, parse_peer
from mesh.election import BrokerAd
from mesh.errors import WireError


def embedded(node: str, started: int) -> BrokerAd:
    return BrokerAd(f"{node}._mqtt._tcp.local.", ("10.0.0.1",), 1883, node, started)


def test_a_broker_set_up_on_purpose_comes_first() -> None:
    mosquitto = BrokerAd("Mosquitto._mqtt._tcp.local.", ("10.0.0.9",), 1883)
    ads = [embedded("b", 5), mosquitto, embedded("a", 7)]
    assert election.ranked(ads) == [mosquitto, embedded("b", 5), embedded("a", 7)]


def test_two_devices_booting_together_agree_who_yields() -> None:
    kitchen, hall = embedded("kitchen", 1000), embedded("hall", 1000)
    assert election.better_than(kitchen, [hall]) == [hall]  # same start: lower id wins
    assert election.better_than(hall, [kitchen]) == []
    older = embedded("kitchen", 999)
    assert election.better_than(hall, [older, kitchen]) == [older]  # started first wins
    assert election.better_than(hall, [hall]) == []
    mosquitto = BrokerAd("Mosquitto._mqtt._tcp.local.", ("10.0.0.9",), 1883)
    assert election.better_than(kitchen, [hall, mosquitto]) == [mosquitto, hall]


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 3)), min_size=1,
                max_size=6, unique_by=lambda host: host[0]))
def test_every_device_ends_up_with_the_same_broker(hosts: list[tuple[str, int]]) -> None:
    ads = [embedded(node, started) for node, started in hosts]
    keepers = [ad for ad in ads if not election.better_than(ad, ads)]
    assert keepers == [election.ranked(ads)[0]]


def test_survivors_take_turns_hosting_a_new_broker() -> None:
    members = {"a", "b", "c", "d"}
    assert election.host_wait_s("b", members, lost="a") == 0
    assert election.host_wait_s("c", members, lost="a") == election.STAGGER_S
    assert election.host_wait_s("d", members, lost="a") == 2 * election.STAGGER_S
    assert election.host_wait_s("a", {"b"}, lost="a") > election.host_wait_s("b", {"a"}, "a")


def test_broker_records_parse() -> None:
    txt = {b"mesh": b"mesh", b"node": b"kitchen", b"started": b"1700000000000", b"tls": b"8884"}
    ad = parse_broker("kitchen._mqtt._tcp.local.", ["10.0.0.5"], 1884, txt)
    assert ad == BrokerAd("kitchen._mqtt._tcp.local.", ("10.0.0.5",), 1884, "kitchen",
                          1700000000000, "mesh", 8884)
    avahi = parse_broker("Mosquitto._mqtt._tcp.local.", ["10.0.0.9"], 1883, {})
    assert (avahi.node, avahi.started_ms, avahi.root, avahi.tls_port) == (None, 0, None, None)


@pytest.mark.parametrize(("addresses", "port", "txt", "message"), [
    ([], 1883, {}, "no address"),
    (["10.0.0.1"], 0, {}, "bad port"),
    (["10.0.0.1"], None, {}, "bad port"),
    (["10.0.0.1"], 1883, {b"node": b"../etc"}, "bad node id"),
    (["10.0.0.1"], 1883, {b"started": b"soon"}, "bad start time"),
    (["10.0.0.1"], 1883, {b"node": b"\xff\xfe"}, "not text"),
    (["10.0.0.1"], 1883, {b"tls": b"0"}, "bad TLS port"),
    (["10.0.0.1"], 1883, {b"tls": b"0000011883"}, "bad TLS port"),
    (["10.0.0.1"], 1883, {b"tls": b"65536"}, "bad TLS port"),
    (["10.0.0.1"], 1883, {b"tls": b"\xd9\xa3"}, "bad TLS port"),  # an Arabic-Indic 3
])
def test_hostile_broker_records_are_refused(addresses: list[str], port: int | None,
                                            txt: dict[bytes, bytes], message: str) -> None:
    with pytest.raises(WireError, match=message):
        parse_broker("x._mqtt._tcp.local.", addresses, port, txt)


def test_peer_records_parse_and_garbage_is_refused() -> None:
    peer = parse_peer("hall._liquid-mesh._tcp.local.",
                      {b"id": b"hall", b"caps": b"display,relay", b"broker": b"mqtt://x:1"})
    assert (peer.node, peer.genuine) == ("hall", True)
    assert not parse_peer("Impostor._liquid-mesh._tcp.local.", {b"id": b"hall"}).genuine
    with pytest.raises(WireError, match="bad node id"):
        parse_peer("x", {b"caps": b"relay"})


@given(st.dictionaries(st.binary(max_size=20), st.none() | st.binary(max_size=40)),
       st.lists(st.text(max_size=20), max_size=3), st.none() | st.integers(-5, 70000))
def test_any_record_parses_or_is_refused_cleanly(txt: dict[bytes, bytes | None],
                                                 addresses: list[str], port: int | None) -> None:
    for parse in (lambda: parse_broker("x", addresses, port, txt), lambda: parse_peer("x", txt)):
        with contextlib.suppress(WireError):
            parse()


def test_a_change_that_comes_while_a_device_looks_is_not_missed() -> None:
    """A record resolved while the caller asks the brokers it knows (and finds none) wakes its
    next wait at once: `mesh apps` found no broker in 2 s when the mesh's record came then."""

    async def scenario() -> tuple[float, bool]:
        lan = Discovery("me", "mesh")
        lan.changed.set()  # resolved while the caller looked
        began = time.monotonic()
        await lan.wait_for_change(5)
        return time.monotonic() - began, lan.changed.is_set()

    waited, still_set = asyncio.run(scenario())
    assert waited < 1
    assert not still_set  # consumed: the next wait waits for the next change
