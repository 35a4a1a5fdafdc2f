"""A thin client of the mesh's MQTT interface: what the CLI's `deploy`, `apps`, ... use.

Everything here can also be done with a plain MQTT client (see DESIGN.md): modules are retained
at `<root>/modules/<sha256>`, commands go to `<root>/cmd` as JSON or CBOR, replies come back on
`<root>/replies/<id>`, events on `<root>/events`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import trust, wire
from mesh.discovery import Discovery
from mesh.errors import MeshError
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.topics import Topics
from mesh.transfer import publish_module

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DISCOVERY_S = 2.0


def broker_from(url: str | None) -> BrokerAddress:
    """`--broker`, else `MESH_BROKER`, else the local default."""
    return BrokerAddress.parse(url or os.environ.get("MESH_BROKER") or DEFAULT_BROKER)


async def find_broker(url: str | None, root: str = "mesh",
                      look_s: float = DISCOVERY_S) -> BrokerAddress:
    """`--broker`, else `MESH_BROKER`, else the mesh's broker found on the LAN with mDNS (the
    one its nodes elected), else the local default."""
    given = url or os.environ.get("MESH_BROKER")
    if given:
        return BrokerAddress.parse(given)
    async with Discovery(f"cli-{uuid.uuid4().hex[:8]}", root) as lan:
        deadline = asyncio.get_running_loop().time() + look_s
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            found = await lan.answering_broker()
            if found is not None:
                ad, host = found
                return BrokerAddress(host, ad.port, tls_port=ad.tls_port)
            await lan.wait_for_change(left)
    return BrokerAddress.parse(DEFAULT_BROKER)


class MeshClient:
    """`async with MeshClient(broker) as mesh: await mesh.request(...)`."""

    def __init__(self, broker: BrokerAddress, root: str = "mesh",
                 operator: Ed25519PrivateKey | None = None) -> None:
        """`operator`: the mesh's operator key, to sign commands with (`mesh init`)."""
        self.broker = broker
        self.operator = operator
        self.topics = Topics(root)
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._conn: Connection | None = None

    async def __aenter__(self) -> MeshClient:
        self._conn = Connection(self.broker, f"{self.topics.root}-cli-{uuid.uuid4().hex[:12]}",
                                on_message=self._inbox.put_nowait)
        await self._conn.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn:
            await self._conn.close()

    @property
    def conn(self) -> Connection:
        assert self._conn is not None, "use MeshClient as an async context manager"
        return self._conn

    async def request(self, command: wire.Command, timeout: float = 10) -> Any:
        """Send a command and return its result, or raise MeshError with the node's reason."""
        request_id = command.id or uuid.uuid4().hex[:16]
        command = dataclasses.replace(command, id=request_id)
        reply_topic = self.topics.reply(request_id)
        await self.conn.subscribe(reply_topic)
        body = wire.encode(command)
        if self.operator is not None:
            body = trust.seal(self.operator, trust.OPERATOR, self.topics.cmd, body,
                              issued_ms=int(time.time() * 1000))
        await self.conn.publish(self.topics.cmd, body)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self._inbox.get()
                    if message.topic == reply_topic:
                        break
        except TimeoutError:
            raise MeshError(f"no node answered within {timeout:g}s; is a mesh node running "
                            f"on {self.broker}?") from None
        finally:
            await self.conn.unsubscribe(reply_topic)
        reply = wire.decode(wire.Reply, bytes(message.payload))
        if not reply.ok:
            raise MeshError(reply.error or "the command failed")
        return reply.result

    async def deploy(self, spec_fields: dict[str, Any], wasm: bytes) -> Any:
        """Store the module, then ask the mesh to run it under `spec_fields`."""
        sha256 = await publish_module(self.conn, self.topics, wasm)
        spec = wire.AppSpec(module=sha256, **spec_fields)
        return await self.request(wire.Command(op="deploy", spec=spec))

    async def send(self, app: str, payload: bytes, sub: str = "") -> None:
        """Publish one input to an app (QoS 1), straight to its input topic."""
        await self.conn.publish(self.topics.app(app, "in" + (f"/{sub}" if sub else "")),
                                payload, qos=1)

    async def outputs(self, app: str) -> AsyncIterator[Message]:
        """What `app` publishes, from now on (its topic, payload and all)."""
        prefix = self.topics.app(app, "out/")
        await self.conn.subscribe(f"{prefix}#", qos=0)
        while True:
            message = await self._inbox.get()
            if message.topic.startswith(prefix) and not message.retain:
                yield message

    async def events(self) -> AsyncIterator[wire.Event]:
        """The event stream, from now on; malformed events are skipped."""
        await self.conn.subscribe(self.topics.events, qos=0)
        while True:
            message = await self._inbox.get()
            if message.topic != self.topics.events:
                continue
            try:
                yield wire.decode(wire.Event, bytes(message.payload))
            except MeshError:
                continue
