"""The embedded broker (amqtt, in-process) with the node's fixes to it (mesh.broker)."""

from __future__ import annotations

import asyncio

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
