"""The embedded broker (amqtt, in-process) with the node's fixes to it (mesh.broker)."""

from __future__ import annotations

import asyncio

from mesh import discovery
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
