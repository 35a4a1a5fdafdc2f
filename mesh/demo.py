"""`mesh demo`: three nodes on this machine share an app that survives a migration and a crash.

Everything is real and narrated for a newcomer: the embedded MQTT broker runs in this process,
each node is its own `mesh node` process, and the steps are the commands a user would type.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path

import wasmtime

from mesh import privacy, trust, wire
from mesh.broker import EmbeddedBroker
from mesh.client import MeshClient
from mesh.home import OperatorHome
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.runtime import App, LocalIO, Runtime

NODES = ("kitchen", "hall", "garage")
TIMEOUT = 30.0


def _say(text: str = "") -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Watch:
    """What the demo sees on the broker: node records, events and the app's outputs."""

    def __init__(self, opener: privacy.Opener) -> None:
        self.opener = opener  # the operator's data keys: checkpoints travel encrypted
        self.nodes: dict[str, wire.NodeRecord] = {}
        self.events: list[wire.Event] = []
        self.outputs: list[str] = []
        self.checkpointed = 0  # messages held by the newest checkpoint
        self.changed = asyncio.Event()

    def on_message(self, message: Message) -> None:
        parts = message.topic.split("/")
        payload = bytes(message.payload)
        if parts[1] == "nodes" and len(parts) == 3:
            if payload:
                self.nodes[parts[2]] = wire.decode(wire.NodeRecord, trust.plain(payload))
            else:
                self.nodes.pop(parts[2], None)
        elif parts[1] == "events":
            self.events.append(wire.decode(wire.Event, payload))
        elif parts[-1] == "snapshot" and payload:
            header = self.opener.piece(message.topic, privacy.HEADER_INDEX, trust.plain(payload))
            self.checkpointed = wire.decode(wire.Snapshot, header).host.delivered
        elif "out" in parts:
            self.outputs.append(payload.decode())
            _say(f"      counter published: {payload.decode()}")
        self.changed.set()

    async def until(self, condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"mesh demo: gave up waiting for {what}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.changed.wait()

    def host(self) -> str | None:
        hosts = [n for n, record in self.nodes.items() if "counter" in record.apps]
        return hosts[0] if len(hosts) == 1 else None

    def event(self, kind: str) -> wire.Event | None:
        return next((e for e in reversed(self.events) if e.event == kind), None)


@contextlib.asynccontextmanager
async def _nodes(broker: BrokerAddress, workdir: Path,
                 home: OperatorHome) -> AsyncIterator[dict[str, asyncio.subprocess.Process]]:
    procs = {}
    for name in NODES:
        token = home.join_token(trust.Rights(may_deploy=True))
        log = (workdir / f"{name}.log").open("wb")
        procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "node", "--id", name, "--broker", str(broker),
            "--no-mdns", "--state-dir", str(workdir / name), "--keepalive", "2",
            "--token", token, stdout=log, stderr=log)
        log.close()
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await proc.wait()


async def _send(mesh: MeshClient, watch: Watch, payloads: list[str]) -> None:
    for payload in payloads:
        expected = len(watch.outputs) + 1
        await mesh.send("counter", payload.encode())
        await watch.until(functools.partial(_has_outputs, watch, expected),
                          f"the app to answer {payload!r}")


def _has_outputs(watch: Watch, count: int) -> bool:
    return len(watch.outputs) >= count


async def demo(workdir: Path) -> int:
    port = _free_port()
    broker = BrokerAddress("127.0.0.1", port)
    wasm = bytes(wasmtime.wat2wasm(
        resources.files("mesh").joinpath("apps/counter.wat").read_text()))
    _say("liquid-mesh demo: three devices share an app that keeps its state through a "
         "migration and a crash")
    _say()
    home = OperatorHome(workdir / "operator")
    identity = home.init("demo")
    watch = Watch(privacy.Opener(home.keyring()))
    _say(f"[1] Creating a mesh ({identity.id}: `mesh init`), starting the embedded MQTT broker "
         f"on {broker} and three nodes, each its own process, joined with a one-time token "
         "each (`mesh admit --token`):")
    async with EmbeddedBroker(broker.host, broker.port), \
            Connection(broker, "demo-watch", on_message=watch.on_message) as conn, \
            MeshClient(broker, operator=home.key()) as mesh, \
            _nodes(broker, workdir, home) as procs:
        await conn.subscribe("mesh/nodes/+", "mesh/events", "mesh/apps/counter/out/#",
                             "mesh/apps/counter/snapshot")
        await watch.until(lambda: set(NODES) <= set(watch.nodes), "the nodes to join")
        _say(f"    joined: {', '.join(sorted(watch.nodes))}")
        _say()
        _say("[2] Deploying the counter app (it counts messages and hashes their bytes):")
        _say("    $ mesh deploy counter counter.wat --checkpoint-every 1")
        await mesh.deploy({"app": "counter", "checkpoint_every": 1}, wasm)
        await watch.until(watch.host, "the app to start")
        first = watch.host()
        _say(f"    placement chose {first}; it runs there now.")
        _say()
        _say("[3] Sending five messages:")
        await _send(mesh, watch, ["a", "b", "c", "d", "e"])
        _say()
        target = next(n for n in NODES if n != first)
        _say(f"[4] Moving the running app to {target}:  $ mesh migrate counter {target}")
        await mesh.request(wire.Command(op="migrate", app="counter", to=target))
        await watch.until(lambda: watch.host() == target and watch.event("migrated"),
                          "the migration")
        moved = watch.event("migrated")
        assert moved is not None
        _say(f"    {first} checkpointed it and handed it over; {target} restored it "
             f"(epoch {moved.detail.get('epoch')}). Three more messages:")
        await _send(mesh, watch, ["f", "g", "h"])
        await watch.until(lambda: watch.checkpointed == 8, "the checkpoint of message 8")
        _say(f"    {target} checkpointed all eight (an input is acknowledged to the broker "
             "only once a checkpoint holds it: the broker gives a survivor any it has not).")
        _say()
        _say(f"[5] Pulling the plug on {target}:  kill -9")
        procs[target].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await watch.until(lambda: watch.host() not in (None, target) and
                          watch.event("failed-over"), "the failover")
        survivor = watch.host()
        _say(f"    {survivor} noticed, restored the last checkpoint and runs it now "
             f"({(time.monotonic() - killed) * 1000:.0f} ms after the crash). Two more messages:")
        await _send(mesh, watch, ["i", "j"])
        _say()
        count = watch.outputs[-1].split()[0]
        _, straight = _straight_run(wasm, list("abcdefghij"))
        ok = watch.outputs[-1] == straight
        _say(f"[6] 10 messages sent, count {count}, and the same hash as one process that "
             f"never moved: {'yes' if ok else 'NO'}.")
        _say("    The app moved twice, once by a crash, and lost nothing." if ok else
             "    Something was lost or applied twice: please report this with the logs.")
        _say()
        _say("Only your key could deploy and move it: every command, spec, record and "
             "checkpoint here was signed and checked, and the app's memory crossed the broker "
             "encrypted.\nNext: `mesh init`, then `mesh admit --token` for each device and "
             "`mesh node --token lmt1.…` on it, then `mesh deploy`, `mesh apps`, "
             "`mesh events`.")
        return 0 if ok else 1


def _straight_run(wasm: bytes, payloads: list[str]) -> tuple[int, str]:
    io = LocalIO()
    with Runtime() as runtime, App(runtime, runtime.load(wasm), name="counter", io=io) as app:
        app.start()
        for payload in payloads:
            app.deliver("", payload.encode())
    return len(io.published), io.published[-1][1].decode()


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        return asyncio.run(demo(Path(tmp)))
