"""Real parts for mesh tests: a Mosquitto or embedded broker, nodes as OS processes, an observer.

Nothing is mocked: brokers listen on free loopback ports, every node is `python -m mesh node` in
its own process, and the observer is a plain paho client. Waits are on conditions, with timeouts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import wasmtime
from paho.mqtt.enums import CallbackAPIVersion

from mesh import privacy, tls, trust, wire
from mesh.errors import WireError
from mesh.home import OperatorHome
from mesh.mosquitto import config as mosquitto_config
from mesh.mqtt import BrokerAddress
from mesh.tls import MeshCA
from mesh.trust import Rights

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 100000
set_tcp_nodelay true
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


@contextmanager
def mosquitto(workdir: Path, conf: str = MOSQUITTO_CONF) -> Iterator[str]:
    """A Mosquitto broker on a free port (`conf` with `{port}` in it); yields its URL."""
    port = free_port()
    path = workdir / "mosquitto.conf"
    path.write_text(conf.format(port=port))
    with _serving(["mosquitto", "-c", str(path)], port, workdir / "mosquitto.log"):
        yield f"mqtt://127.0.0.1:{port}"


@contextmanager
def hosted_mosquitto(workdir: Path) -> Iterator[str]:
    """Mosquitto configured as a device hosts it (`mesh.mosquitto.config`: persistence in
    `workdir`, the mesh's limits), on a free port; yields its URL."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "hosted-mosquitto.conf"
    path.write_text(mosquitto_config("127.0.0.1", port, workdir))
    with _serving(["mosquitto", "-c", str(path)], port, workdir / "hosted-mosquitto.out"):
        yield f"mqtt://127.0.0.1:{port}"


@contextmanager
def embedded_broker(workdir: Path) -> Iterator[str]:
    """The embedded broker (amqtt) as `mesh broker`, on a free port; yields its URL."""
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    with _serving([sys.executable, "-m", "mesh", "broker", "--broker", url], port,
                  workdir / "embedded-broker.log"):
        yield url


@contextmanager
def _serving(command: list[str], port: int, log_path: Path) -> Iterator[None]:
    """Run a server process until the block ends; fail with its log if it does not listen."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        wait_until(lambda: _accepts(port) or proc.poll() is not None, 20, command[0])
        assert proc.poll() is None, log_path.read_text()
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class NodeProcess:
    """`mesh node` in its own OS process."""

    node_id: str
    broker: str
    workdir: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.node_id}.log"

    def start(self) -> NodeProcess:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "-v", "node", "--id", self.node_id,
                 "--broker", self.broker, "--state-dir", str(self.workdir / self.node_id),
                 "--keepalive", "2", "--no-mdns", *self.args],
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


SECURITY_FLAGS = frozenset({"--token", "--insecure", "--pair"})


def joining(home: OperatorHome | None, args: tuple[str, ...]) -> tuple[str, ...]:
    """`mesh node` arguments that join `home`'s mesh (made now if need be) with a new join
    token (a device allowed to deploy), unless they say how to join already."""
    if home is None or SECURITY_FLAGS & set(args):
        return args
    if not home.exists():
        home.init("test")
    return (*args, "--token", home.join_token(Rights(may_deploy=True)))


def read_checkpoint(topic: str, payload: bytes) -> wire.Snapshot:
    """A checkpoint as published at `topic`; in a secure mesh, opened with the data keys of
    the test's mesh (`$MESH_HOME`)."""
    body = trust.plain(payload)
    if body[:len(privacy.MAGIC)] == privacy.MAGIC:
        body = privacy.Opener(OperatorHome().keyring()).piece(topic, privacy.HEADER_INDEX, body)
    return wire.decode(wire.Snapshot, body)


def connect(client: paho.Client, broker: str, keepalive: int = 60) -> None:
    """Connect a plain paho client to `mqtt[s]://[user:password@]host:port`; over TLS, the
    broker is one a device of the test's mesh hosts, checked against the mesh's CA."""
    address = BrokerAddress.parse(broker)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls.client_context(MeshCA.of(OperatorHome().keyring()).pem))
    client.connect(address.host, address.port, keepalive)


def retained(broker: str, topic: str, timeout: float = 10) -> bytes:
    """The retained message at `topic`, read by a new plain client."""
    got: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    connect(client, broker)
    client.subscribe(topic, 1)
    client.loop_start()
    try:
        wait_until(lambda: got, timeout, f"a retained message at {topic}")
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def checkpointed(broker: str, app: str, delivered: int) -> None:
    """Wait until the app's stored checkpoint holds `delivered` inputs."""
    topic = f"mesh/apps/{app}/snapshot"
    wait_until(lambda: read_checkpoint(topic, retained(broker, topic)).host.delivered
               == delivered, 10, "a checkpoint")


class Cluster:
    """The node processes of one test, each joined to the mesh of `home` (see `joining`)."""

    def __init__(self, workdir: Path, home: OperatorHome | None = None) -> None:
        self.workdir = workdir
        self.home = home
        self.nodes: dict[str, NodeProcess] = {}

    def start(self, node_id: str, broker: str, *args: str) -> NodeProcess:
        node = NodeProcess(node_id, broker, self.workdir, joining(self.home, args)).start()
        self.nodes[node_id] = node
        return node

    def __getitem__(self, node_id: str) -> NodeProcess:
        return self.nodes[node_id]

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"----- log of node {n.node_id} -----\n{n.log()}"
                         for n in self.nodes.values())


@dataclass
class Observer:
    """A plain MQTT client that records node records, owners, events, outputs and replies."""

    broker: str
    root: str = "mesh"
    nodes: dict[str, wire.NodeRecord] = field(default_factory=dict)
    owners: dict[str, wire.OwnerRecord] = field(default_factory=dict)
    events: list[wire.Event] = field(default_factory=list)
    outputs: dict[str, list[bytes]] = field(default_factory=dict)
    output_times: dict[str, list[float]] = field(default_factory=dict)
    replies: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Observer:
        port = BrokerAddress.parse(self.broker).port
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{port}")
        self.client.on_message = self._on_message
        self.client.on_connect = self._subscribe  # again after a broker restart, too
        self.client.on_disconnect = self._forget
        self.client.reconnect_delay_set(1, 1)
        connect(self.client, self.broker)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the observer to subscribe")
        return self

    def _forget(self, *_: Any) -> None:
        with self._lock:  # what the broker holds comes again (a restarted one may hold less)
            self.nodes.clear()
            self.owners.clear()

    def _subscribe(self, client: paho.Client, *_: Any) -> None:
        r = self.root
        client.subscribe([(f"{r}/nodes/+", 1), (f"{r}/apps/+/owner", 1), (f"{r}/events", 1),
                          (f"{r}/apps/+/out/#", 1), (f"{r}/replies/+", 1)])
        self._subscribed.set()

    def __exit__(self, *exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        # Tests publish hostile records on purpose: the nodes must reject them, not the observer.
        with contextlib.suppress(WireError):
            self._record(message.topic.split("/")[1:], bytes(message.payload))

    def _record(self, parts: list[str], payload: bytes) -> None:
        if parts[:1] == ["nodes"] or parts[-1:] == ["owner"]:
            payload = trust.plain(payload)  # signed in a secure mesh (checked by the nodes)
        with self._lock:
            match parts:
                case ["nodes", node]:
                    if payload:
                        self.nodes[node] = wire.decode(wire.NodeRecord, payload)
                    else:
                        self.nodes.pop(node, None)
                case ["apps", app, "owner"] if payload:
                    self.owners[app] = wire.decode(wire.OwnerRecord, payload)
                case ["events"]:
                    self.events.append(wire.decode(wire.Event, payload))
                case ["apps", app, "out", *_]:
                    self.outputs.setdefault(app, []).append(payload)
                    self.output_times.setdefault(app, []).append(time.monotonic())
                case ["replies", request]:
                    self.replies[request] = payload

    def running(self, app: str) -> str | None:
        """The node whose record lists `app` as running, if exactly one does."""
        with self._lock:
            hosts = [n for n, record in self.nodes.items() if app in record.apps]
        return hosts[0] if len(hosts) == 1 else None

    def last_output(self, app: str) -> bytes | None:
        with self._lock:
            outputs = self.outputs.get(app)
            return outputs[-1] if outputs else None

    def has_event(self, kind: str, app: str | None = None, node: str | None = None) -> bool:
        with self._lock:
            return any(e.event == kind and (app is None or e.app == app) and
                       (node is None or e.node == node) for e in self.events)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)


def count_of(output: bytes | None) -> int:
    return int(output.split()[0]) if output else 0


@contextmanager
def sniffing(broker: str, topic_filter: str) -> Iterator[dict[str, bytes]]:
    """A plain MQTT client (as anyone could run) subscribed to `topic_filter`: the last payload
    it got at each topic."""
    host, port = broker.removeprefix("mqtt://").split(":")
    seen: dict[str, bytes] = {}
    subscribed = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sniffer-{time.monotonic_ns()}")
    client.on_message = lambda _c, _u, message: seen.__setitem__(message.topic,
                                                                 bytes(message.payload))
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, int(port))
    client.subscribe(topic_filter, 1)
    client.loop_start()
    try:
        wait_until(subscribed.is_set, 10, "the sniffer to subscribe")
        yield seen
    finally:
        client.loop_stop()
        client.disconnect()


def wait_count(obs: Observer, app: str, count: int, timeout: float = 30) -> bytes:
    output: bytes = wait_until(
        lambda: (out := obs.last_output(app)) is not None and count_of(out) >= count and out,
        timeout, f"{app} to reach {count}")
    return output


def stream(obs: Observer, app: str, count: int) -> tuple[list[bytes], threading.Thread]:
    """Publish `count` QoS 1 inputs from a thread, paced like a sensor."""
    payloads = [f"reading-{i}".encode() for i in range(count)]
    done = threading.Event()

    def run() -> None:
        for payload in payloads:
            obs.publish(f"mesh/apps/{app}/in", payload)
            done.wait(0.004)

    thread = threading.Thread(target=run, name="stream")
    thread.start()
    return payloads, thread


def assert_exactly_once(obs: Observer, app: str, payloads: list[bytes]) -> None:
    final = wait_count(obs, app, len(payloads), timeout=60)
    assert final == f"{len(payloads)} {counter_hash(payloads)}".encode(), \
        "an input was lost or applied twice"


def mesh_cli(*args: str, broker: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "-q", *args, "--broker", broker],
                          capture_output=True, text=True, timeout=timeout, check=False)


# Fills all of its memory with pseudo-random bytes at start (so that a checkpoint carries all of
# it). Each message adds one to a count and publishes it (8 bytes, little-endian) followed by
# the sum of the 32-bit words in [1024, checksum_end), also 8 bytes.
BALLAST = """(module
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (global $count (mut i64) (i64.const 0))
  (data (i32.const 0) "n")
  (func (export "mesh_alloc") (param i32) (result i32) (i32.const 64))
  (func (export "mesh_init")
    (local $at i32) (local $x i32)
    (local.set $at (i32.const 1024))
    (local.set $x (i32.const 2463534242))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $at) (i32.mul (memory.size) (i32.const 65536))))
      (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 13))))
      (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 17))))
      (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 5))))
      (i32.store (local.get $at) (local.get $x))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br $next))))
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (local $at i32) (local $sum i64)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (local.set $at (i32.const 1024))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $at) (i32.const {checksum_end})))
      (local.set $sum (i64.add (local.get $sum) (i64.load32_u (local.get $at))))
      (local.set $at (i32.add (local.get $at) (i32.const 4)))
      (br $next)))
    (i64.store (i32.const 8) (global.get $count))
    (i64.store (i32.const 16) (local.get $sum))
    (drop (call $publish (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 16)))))"""


def ballast_wasm(pages: int, checksum_end: int = 1024) -> bytes:
    """An app with `pages` of dense memory; see BALLAST (1024: no checksum)."""
    return bytes(wasmtime.wat2wasm(BALLAST.format(pages=pages, checksum_end=checksum_end)))


def counter_hash(payloads: list[bytes]) -> int:
    """What the counter app's running hash is after these payloads, in this order."""
    value = 5381
    for payload in payloads:
        for byte in payload:
            value = (value * 33 + byte) & ((1 << 64) - 1)
    return value
