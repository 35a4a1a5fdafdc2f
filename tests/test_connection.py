"""The node's MQTT connection (mesh.mqtt) against servers that misbehave, plain and TLS."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from pathlib import Path

import pytest

from mesh.errors import BrokerError
from mesh.mqtt import BrokerAddress, Connection
from mesh.privacy import Keyring
from mesh.tls import MeshCA

AUTHORITY = MeshCA.of(Keyring({1: bytes(range(32))}))


async def _hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.mark.parametrize("secure", [False, True])
def test_a_server_that_hangs_up_before_its_connack_fails_the_connect_at_once(
        secure: bool) -> None:
    """A connect to a server that closes before it answers says so at once: it waited for the
    whole timeout ("no answer"), which a node trying a broker again pays each time."""

    async def scenario() -> tuple[float, str]:
        context = None
        if secure:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            with tempfile.TemporaryDirectory() as files:
                context.load_cert_chain(*AUTHORITY.issue("kitchen", ["127.0.0.1"])
                                        .write(Path(files)))
        server = await asyncio.start_server(_hang_up, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        address = BrokerAddress("127.0.0.1", port, tls=secure,
                                ca=AUTHORITY.pem if secure else None)
        began = time.monotonic()
        async with server:
            with pytest.raises(BrokerError) as refused:
                await Connection(address, "a-node").connect(timeout=10)
        return time.monotonic() - began, str(refused.value)

    took, message = asyncio.run(scenario())
    assert "ended before it answered" in message
    assert took < 5
