"""The Mosquitto a device hosts when the LAN has no broker (mesh.mosquitto): a real child
process, its store in the device's state directory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from mesh.mosquitto import HostedMosquitto
from mesh.mqtt import BrokerAddress, Connection, Message
from tests.conftest import require_tool
from tests.harness import free_port, wait_until


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


HOST = """
import asyncio, sys
from pathlib import Path
from mesh.mosquitto import HostedMosquitto

async def main() -> None:
    async with HostedMosquitto("127.0.0.1", int(sys.argv[1]), Path(sys.argv[2])) as broker:
        print(broker.pid, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_hosted_mosquitto_dies_with_the_node_that_started_it(tmp_path: Path) -> None:
    require_tool("mosquitto")
    with subprocess.Popen([sys.executable, "-c", HOST, str(free_port()), str(tmp_path)],
                          stdout=subprocess.PIPE, text=True) as node:
        try:
            assert node.stdout is not None
            pid = int(node.stdout.readline())
            os.kill(pid, 0)  # running
        finally:
            node.kill()  # kill -9: no chance to stop it itself
            node.wait()
    wait_until(lambda: not _alive(pid), 10, "Mosquitto to stop with its node")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init is gone too
        return stat.read().split(") ")[1][0] != "Z"
