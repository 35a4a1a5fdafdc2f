"""The embedded broker (amqtt, in-process) with the node's fixes to it (mesh.broker)."""

from __future__ import annotations

import asyncio

import pytest

from mesh import amqtt_fixes, discovery
from mesh.broker import EmbeddedBroker
from mesh.mqtt import BrokerAddress, Connection, Message
from tests.harness import free_port


def test_a_subscriber_gets_only_the_topics_it_asked_for() -> None:
    """amqtt 0.12.1 sent a connecting client the retained messages of everyone's
    subscriptions: a plain subscriber to one app's outputs got the node records too."""

    async def scenario() -> list[str]:
        address = BrokerAddress("127.0.0.1", free_port())
        got: asyncio.Queue[Message] = asyncio.Queue()
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-node") as node:
            await node.subscribe("mesh/nodes/+")
            await node.publish("mesh/nodes/kitchen", b"a node record", retain=True)
            async with Connection(address, "a-plain-subscriber",
                                  on_message=got.put_nowait) as plain:
                await plain.subscribe("mesh/apps/ledger/out/#")
                await node.publish("mesh/apps/ledger/out/total", b"42")
                topics: list[str] = []
                while not topics or topics[-1] != "mesh/apps/ledger/out/total":
                    topics.append((await asyncio.wait_for(got.get(), 10)).topic)
                return topics

    assert asyncio.run(scenario()) == ["mesh/apps/ledger/out/total"]


def test_a_broker_hosted_again_listens_on_the_port_of_the_one_before() -> None:
    """A device that closed its broker (yielding to a better one) and must host again later
    takes the same port, though the old broker's connections linger in TIME_WAIT on it; a port
    a broker listens on is never taken."""

    async def scenario() -> tuple[int, int, int]:
        port = free_port()
        address = BrokerAddress("127.0.0.1", port)
        client = Connection(address, "a-node")
        async with EmbeddedBroker("0.0.0.0", port):
            await client.connect()
            await client.subscribe("mesh/nodes/+")
            busy = discovery.free_port(preferred=port)
        await client.close()
        again = discovery.free_port(preferred=port)
        async with EmbeddedBroker("0.0.0.0", again), Connection(address, "a-node"):
            pass
        return port, busy, again

    port, busy, again = asyncio.run(scenario())
    assert busy != port
    assert again == port


async def _next(got: asyncio.Queue[Message]) -> tuple[bytes, bool, bool, int]:
    message = await asyncio.wait_for(got.get(), 10)
    return bytes(message.payload), message.dup, message.retain, message.mid


async def _away(broker: EmbeddedBroker, client_id: str) -> None:
    """Until the broker has seen the client's DISCONNECT (a client closes without waiting)."""
    async with asyncio.timeout(10):
        while broker.session_state(client_id) != "disconnected":
            await asyncio.sleep(0.01)


def test_a_resumed_session_gets_what_was_in_flight_then_what_was_queued_then_the_rest() -> None:
    """MQTT 3.1.1 section 4.4, for a client without credentials (as every mesh session is on
    the embedded broker): QoS 1 messages sent but not acknowledged come again with DUP and the
    same packet id, then those published while it was away (not retained), in order; amqtt
    0.12.1 dropped the session of a client without a username at once, and with it both."""

    async def scenario() -> tuple[list[tuple[bytes, bool, bool, int]], ...]:
        address = BrokerAddress("127.0.0.1", free_port())
        got: asyncio.Queue[Message] = asyncio.Queue()

        def session() -> Connection:
            return Connection(address, "an-app", on_message=got.put_nowait,
                              clean_session=False, manual_ack=True)

        async with EmbeddedBroker(address.host, address.port) as broker, \
                Connection(address, "a-sensor") as sensor:
            async with session() as app:
                await app.subscribe("in")
                for payload in (b"1", b"2"):
                    await sensor.publish("in", payload)
                first = [await _next(got) for _ in range(2)]  # not acknowledged
            await _away(broker, "an-app")
            for payload in (b"3", b"4"):
                await sensor.publish("in", payload)  # while the app is away
            async with session():
                again = [await _next(got) for _ in range(4)]  # not acknowledged either
            async with session() as app:
                third = [await _next(got) for _ in range(4)]
                for *_, mid in third:
                    app.ack(mid)
                await sensor.publish("in", b"5")
                after = [await _next(got)]
        return first, again, third, after

    first, again, third, after = asyncio.run(scenario())
    assert [(p, dup, retain) for p, dup, retain, _ in first] == [(b"1", False, False),
                                                               (b"2", False, False)]
    assert [(p, dup, retain) for p, dup, retain, _ in again] == [
        (b"1", True, False), (b"2", True, False), (b"3", False, False), (b"4", False, False)]
    assert [mid for *_, mid in again[:2]] == [mid for *_, mid in first]
    assert [(p, dup, mid) for p, dup, _, mid in third] == [(p, True, mid) for p, _, _, mid in again]
    assert [p for p, *_ in after] == [b"5"]


def test_a_client_that_acknowledges_nothing_holds_a_bounded_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A session has at most MAX_IN_FLIGHT QoS 1 messages unacknowledged; the rest wait, in
    order, and follow as it acknowledges (amqtt let the flight grow until, at 65535, it looked
    for a free packet id forever: one silent subscriber hung the broker, and its device)."""
    monkeypatch.setattr(amqtt_fixes, "MAX_IN_FLIGHT", 10)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        address = BrokerAddress("127.0.0.1", free_port())
        got: asyncio.Queue[Message] = asyncio.Queue()
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-sensor") as sensor, \
                Connection(address, "an-app", on_message=got.put_nowait, clean_session=False,
                           manual_ack=True) as app:
            await app.subscribe("in")
            await app.subscribe("mark", qos=0)
            for i in range(15):
                await sensor.publish("in", str(i).encode())
            await sensor.publish("mark", b"after the 15", qos=0)  # sent behind the first 10
            first = []
            while (message := await asyncio.wait_for(got.get(), 10)).topic != "mark":
                first.append(message)
            for message in first[:5]:
                app.ack(message.mid)
            rest = [await asyncio.wait_for(got.get(), 10) for _ in range(5)]
            return [bytes(m.payload) for m in first], [bytes(m.payload) for m in rest]

    first, rest = asyncio.run(scenario())
    assert first == [str(i).encode() for i in range(10)]
    assert rest == [str(i).encode() for i in range(10, 15)]


def test_what_waits_for_a_session_away_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages queued for a session that is away are kept within MAX_QUEUED_BYTES (as
    Mosquitto's `max_queued_bytes`): past it they are dropped, so the inputs of an app that
    never comes back cannot fill the device's memory. amqtt kept them all."""
    monkeypatch.setattr(amqtt_fixes, "MAX_QUEUED_BYTES", 10)

    async def scenario() -> list[bytes]:
        address = BrokerAddress("127.0.0.1", free_port())
        got: asyncio.Queue[Message] = asyncio.Queue()

        def session() -> Connection:
            return Connection(address, "an-app", on_message=got.put_nowait,
                              clean_session=False)

        async with EmbeddedBroker(address.host, address.port) as broker, \
                Connection(address, "a-sensor") as sensor:
            async with session() as app:
                await app.subscribe("in")
            await _away(broker, "an-app")
            for payload in (b"1111", b"2222", b"3333", b"4"):
                await sensor.publish("in", payload)
            async with session():
                await sensor.publish("in", b"live")  # behind whatever was queued
                received: list[bytes] = []
                while not received or received[-1] != b"live":
                    received.append(bytes((await asyncio.wait_for(got.get(), 10)).payload))
                return received

    assert asyncio.run(scenario()) == [b"1111", b"2222", b"4", b"live"]


def test_a_client_that_acknowledges_late_is_not_held_up() -> None:
    """A node acknowledges an app's inputs only once a checkpoint holds them. amqtt waited for
    the PUBACK of the retained messages it sent on a subscribe before it served the client any
    further: a late acknowledger's next subscribe and its publications waited on itself."""

    async def scenario() -> bytes:
        address = BrokerAddress("127.0.0.1", free_port())
        got: asyncio.Queue[Message] = asyncio.Queue()
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-sensor") as sensor, \
                Connection(address, "a-watcher", on_message=got.put_nowait) as watcher, \
                Connection(address, "an-app", clean_session=False, manual_ack=True) as app:
            await sensor.publish("weather", b"sunny", retain=True)
            await watcher.subscribe("out")
            await app.subscribe("weather")  # its retained message is never acknowledged
            await asyncio.wait_for(app.subscribe("in"), 10)
            await asyncio.wait_for(app.publish("out", b"still served"), 10)
            return bytes((await asyncio.wait_for(got.get(), 10)).payload)

    assert asyncio.run(scenario()) == b"still served"


def test_a_session_taken_over_goes_on_receiving_on_the_new_connection() -> None:
    """A client that connects with the id of one still connected (a node taking over an app
    whose device froze) takes the session: amqtt 0.12.1 then let the old connection's close
    mark the session disconnected, and the new connection received nothing more."""

    async def scenario() -> list[bytes]:
        address = BrokerAddress("127.0.0.1", free_port())
        old: asyncio.Queue[Message] = asyncio.Queue()
        new: asyncio.Queue[Message] = asyncio.Queue()
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-sensor") as sensor:
            frozen = Connection(address, "an-app", on_message=old.put_nowait,
                                clean_session=False)
            await frozen.connect()
            await frozen.subscribe("in")
            async with Connection(address, "an-app", on_message=new.put_nowait,
                                  clean_session=False):
                assert frozen.lost is not None
                await asyncio.wait_for(asyncio.shield(frozen.lost), 10)  # closed by the broker
                received = []
                for payload in (b"1", b"2", b"3"):
                    await sensor.publish("in", payload)
                    received.append(bytes((await asyncio.wait_for(new.get(), 10)).payload))
            await frozen.close()
            return received

    assert asyncio.run(scenario()) == [b"1", b"2", b"3"]


def test_a_session_taken_over_twice_redelivers_what_no_connection_acknowledged() -> None:
    """Two takeovers in a row (a node taking over an app, then another taking it from that
    one before it acknowledged anything): each new connection gets what was in flight again,
    with DUP and the same packet ids, then what came meanwhile; nothing is lost on the way."""

    async def scenario() -> list[list[tuple[bytes, bool, bool, int]]]:
        address = BrokerAddress("127.0.0.1", free_port())
        queues: list[asyncio.Queue[Message]] = [asyncio.Queue() for _ in range(3)]
        connections = [Connection(address, "an-app", on_message=q.put_nowait,
                                  clean_session=False, manual_ack=True) for q in queues]
        seen: list[list[tuple[bytes, bool, bool, int]]] = []
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-sensor") as sensor:
            await connections[0].connect()
            await connections[0].subscribe("in")
            for turn, (connection, got) in enumerate(zip(connections, queues, strict=True)):
                if turn:
                    await connection.connect()  # takes the session over
                await sensor.publish("in", str(turn + 1).encode())
                seen.append([await _next(got) for _ in range(turn + 1)])
            for *_, mid in seen[-1]:
                connections[-1].ack(mid)
            await sensor.publish("in", b"4")
            seen.append([await _next(queues[-1])])
            for connection in connections:
                await connection.close()
        return seen

    first, second, third, after = asyncio.run(scenario())
    assert [(p, dup) for p, dup, _, _ in first] == [(b"1", False)]
    assert [(p, dup) for p, dup, _, _ in second] == [(b"1", True), (b"2", False)]
    assert [(p, dup) for p, dup, _, _ in third] == [(b"1", True), (b"2", True), (b"3", False)]
    assert [mid for *_, mid in third[:2]] == [mid for *_, mid in second]
    assert second[0][3] == first[0][3]
    assert [(p, dup) for p, dup, _, _ in after] == [(b"4", False)]


def _packet(kind: int, body: bytes) -> bytes:
    length, size = b"", len(body)
    while True:
        size, digit = size >> 7, size & 0x7F
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return bytes([kind]) + length + body


def _string(text: str) -> bytes:
    return len(text).to_bytes(2, "big") + text.encode()


async def _read_until(reader: asyncio.StreamReader, kind: int) -> None:
    """Read MQTT packets until one of this kind (the high nibble of its first byte)."""
    while True:
        first = (await asyncio.wait_for(reader.readexactly(1), 10))[0]
        size, shift = 0, 0
        while (digit := (await reader.readexactly(1))[0]) & 0x80:
            size, shift = size | (digit & 0x7F) << shift, shift + 7
        await reader.readexactly(size | digit << shift)
        if first >> 4 == kind:
            return


def test_a_session_resuming_while_others_subscribe_is_not_dropped() -> None:
    """A resuming session gets its subscriptions' retained messages in a walk over the broker's
    subscriptions that waits on each send: a client subscribing to a new filter meanwhile broke
    the walk ("dictionary changed size during iteration") and the resumed session was left
    half served (its later requests never answered). Here the resuming client reads nothing
    until the others have subscribed, so the walk waits on it."""

    async def scenario() -> None:
        address = BrokerAddress("127.0.0.1", free_port())
        async with EmbeddedBroker(address.host, address.port), \
                Connection(address, "a-node") as node:
            for i in range(64):
                await node.publish(f"r/{i}", bytes(64 * 1024), retain=True)
            async with Connection(address, "a-watcher", clean_session=False) as first:
                await first.subscribe("r/#")
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(_packet(0x10, _string("MQTT") + bytes([4, 0, 0, 60])
                                 + _string("a-watcher")))  # clean session 0
            await _read_until(reader, 2)  # CONNACK; the retained walk now waits on our reads
            for i in range(10):
                async with Connection(address, f"a-subscriber-{i}") as other:
                    await other.subscribe(f"s/{i}")
            writer.write(_packet(0x82, (7).to_bytes(2, "big") + _string("t") + bytes([1])))
            await _read_until(reader, 9)  # SUBACK: the session is served
            writer.close()

    asyncio.run(scenario())
