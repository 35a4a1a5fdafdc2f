"""The Mosquitto a device hosts when the LAN has no broker (mesh.mosquitto): a real child
process, its store in the device's state directory."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from mesh.mosquitto import HostedMosquitto
from mesh.mqtt import BrokerAddress, Connection, Message
from tests.conftest import require_tool
from tests.harness import free_port


async def _retained(address: BrokerAddress, topic: str) -> bytes:
    got: asyncio.Queue[Message] = asyncio.Queue()
    async with Connection(address, f"reader-{os.getpid()}", on_message=got.put_nowait) as conn:
        await conn.subscribe(topic)
        return bytes((await asyncio.wait_for(got.get(), 10)).payload)


async def _back(broker: HostedMosquitto, old_pid: int) -> None:
    """Until the supervisor has started Mosquitto again, and it answers."""
    while broker.pid in (None, old_pid):
        await asyncio.sleep(0.05)
    async with Connection(broker.address, f"probe-{os.getpid()}"):
        pass


def test_the_hosted_mosquitto_keeps_its_store_and_comes_back_when_it_dies(
        tmp_path: Path) -> None:
    require_tool("mosquitto")

    async def scenario() -> None:
        port = free_port()
        address = BrokerAddress("127.0.0.1", port)
        async with HostedMosquitto("127.0.0.1", port, tmp_path), \
                Connection(address, "writer") as conn:
            await conn.publish("mesh/kept", b"across restarts", retain=True)
        # Stopped (SIGTERM: it saved its store), the port is free: started again on it.
        async with HostedMosquitto("127.0.0.1", port, tmp_path) as broker:
            assert await _retained(address, "mesh/kept") == b"across restarts"
            pid = broker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(_back(broker, pid), 20)
            assert await _retained(address, "mesh/kept") == b"across restarts"

    asyncio.run(scenario())
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    for limit in ("persistence true", "max_queued_messages 100000", "max_packet_size 2000000"):
        assert limit in conf
