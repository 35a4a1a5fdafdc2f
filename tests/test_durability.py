"""An app's state is never silently lost: real node processes on Mosquitto, faults injected."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mesh import keys, trust, wire
from mesh.store import StateStore
from tests.conftest import COUNTER_WAT, require_tool
from tests.harness import (
    Cluster,
    Observer,
    assert_exactly_once,
    checkpointed,
    count_of,
    counter_hash,
    free_port,
    mesh_cli,
    retained,
    stream,
    wait_count,
    wait_until,
)

# Counts its ticks in a global it does not export, and publishes the count (8 bytes, LE).
TICKER = """(module
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $n (mut i64) (i64.const 0))
  (data (i32.const 0) "tick")
  (func (export "mesh_on_tick") (param i64)
    (global.set $n (i64.add (global.get $n) (i64.const 1)))
    (i64.store (i32.const 16) (global.get $n))
    (drop (call $publish (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 8)))))"""


def running_on(obs: Observer, cluster: Cluster, broker: str, app: str, *args: str, node: str,
               module: Path = COUNTER_WAT) -> None:
    """Nodes alpha and beta in the mesh, and `app` deployed from `module` running on `node`."""
    for each in ("alpha", "beta"):
        cluster.start(each, broker)
    wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 20, "nodes to join")
    result = mesh_cli("deploy", app, str(module), "--on", node, *args, broker=broker)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: obs.running(app) == node, 20, f"{app} on {node}")


def fed_and_checkpointed(obs: Observer, broker: str, app: str, payloads: list[bytes]) -> None:
    """Send `payloads` to the app, and wait until a stored checkpoint holds them all."""
    for payload in payloads:
        obs.publish(f"mesh/apps/{app}/in", payload)
    wait_count(obs, app, len(payloads))
    checkpointed(broker, app, len(payloads))


def ticks(obs: Observer, app: str) -> list[int]:
    return [int.from_bytes(out, "little") for out in obs.outputs.get(app, [])]


def test_a_tick_driven_app_goes_on_from_its_ticks_after_kill_9(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    module = tmp_path / "ticker.wat"
    module.write_text(TICKER)
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "ticker", "--tick-ms", "50", node="alpha",
                   module=module)
        wait_until(lambda: len(ticks(obs, "ticker")) >= 60, 30, "60 ticks on alpha")
        cluster["alpha"].signal(signal.SIGKILL)
        before = len(ticks(obs, "ticker"))
        wait_until(lambda: obs.running("ticker") == "beta", 30, "failover to beta")
        wait_until(lambda: len(ticks(obs, "ticker")) > before + 2, 30, "ticks on beta")
        seen = ticks(obs, "ticker")
        last, resumed = max(seen[:before]), seen[before]
        # A checkpoint holds the ticks of at most checkpoint_ms (1 s, 20 ticks) before it,
        # and every 20 changes one is taken: beta goes on from there, not from zero.
        assert last - 25 <= resumed <= last + 1, (last, resumed)


# Spins on every input until its call's deadline.
SPINNER = """(module
  (memory (export "memory") 1)
  (func (export "mesh_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "mesh_on_message") (param i32 i32 i32 i32) (loop $spin (br $spin))))"""


def test_a_long_call_holds_up_neither_its_stop_nor_another_apps_failover(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    spinner = tmp_path / "spinner.wat"
    spinner.write_text(SPINNER)
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="alpha")
        result = mesh_cli("deploy", "spinner", str(spinner), "--on", "beta", "--timeout-ms",
                          "60000", broker=broker)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: obs.running("spinner") == "beta", 20, "spinner on beta")
        obs.publish("mesh/apps/spinner/in", b"spin")  # beta's call now runs for 60 s
        obs.publish("mesh/apps/counter/in", b"one")
        wait_count(obs, "counter", 1)
        assert mesh_cli("stop", "spinner", broker=broker).returncode == 0
        cluster["alpha"].signal(signal.SIGKILL)
        wait_until(lambda: obs.running("counter") == "beta", 15, "counter to fail over to beta")
        wait_until(lambda: obs.running("spinner") is None, 15, "spinner to stop")
        obs.publish("mesh/apps/counter/in", b"two")
        assert wait_count(obs, "counter", 2, timeout=15) == \
            f"2 {counter_hash([b'one', b'two'])}".encode()


def app_row(broker: str, app: str) -> dict[str, Any]:
    result = mesh_cli("apps", "--json", broker=broker)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return next(row for row in rows if row["app"] == app)


def test_an_input_the_app_cannot_take_goes_to_a_dead_letter_and_the_app_goes_on(
        broker: str, cluster: Cluster) -> None:
    big = b"x" * 70_000  # more than the counter's 64 KiB input buffer: its mesh_alloc says no
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="beta")
        for payload in (b"a", big, b"b"):
            obs.publish("mesh/apps/counter/in", payload)
        assert wait_count(obs, "counter", 2) == f"2 {counter_hash([b'a', b'b'])}".encode()
        letter = wire.decode(wire.DeadLetter, retained(broker, "mesh/apps/counter/dead/0"))
        assert (letter.app, letter.size, letter.payload) == ("counter", 70_000, big[:4096])
        assert "mesh_alloc" in letter.reason
        assert obs.has_event("dead-letter", app="counter", node="beta")
        assert app_row(broker, "counter")["state"] == "running"

        for _ in range(3):  # three in a row: the app has failed, and says why
            obs.publish("mesh/apps/counter/in", big)
        row = wait_until(lambda: (r := app_row(broker, "counter"))["state"] == "failed" and r,
                         20, "counter to be failed")
        assert "3 inputs in a row failed" in row["reason"]
        assert row["node"] == "beta"

        result = mesh_cli("restart", "counter", broker=broker)  # answered by alpha, for beta
        assert result.returncode == 0, result.stderr
        wait_until(lambda: app_row(broker, "counter")["state"] == "running", 20, "a restart")
        obs.publish("mesh/apps/counter/in", b"c")
        assert wait_count(obs, "counter", 3) == \
            f"3 {counter_hash([b'a', b'b', b'c'])}".encode()


def garbage(i: int) -> tuple[str, bytes]:
    """The i-th of a flood of malformed messages, on the topics the nodes read."""
    match i % 6:
        case 0:
            return f"mesh/nodes/junk{i % 50}", b"\xff\x00 not cbor"
        case 1:
            return "mesh/cmd", b"{not json"
        case 2:
            return f"mesh/apps/junk{i % 500}/snapshot/{i % 100}", b"x" * 8000
        case 3:
            return "mesh/apps/counter/spec", b"\xa1\x61v\x01"
        case 4:
            return "mesh/apps/counter/owner", b"\x00"
        case _:
            return f"mesh/apps/junk{i % 500}/snapshot", b"\x83\x01\x02"


def test_a_garbage_flood_costs_the_mesh_nothing(broker: str, cluster: Cluster) -> None:
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="alpha")
        payloads, publisher = stream(obs, "counter", 300)
        host, port = broker.removeprefix("mqtt://").split(":")
        flooder = paho.Client(CallbackAPIVersion.VERSION2, client_id="flooder")
        flooder.max_queued_messages_set(0)
        flooder.connect(host, int(port))
        flooder.loop_start()
        try:
            for i in range(10_000):
                last = flooder.publish(*garbage(i), qos=1)
            last.wait_for_publish(60)
        finally:
            flooder.loop_stop()
            flooder.disconnect()
        publisher.join()
        assert_exactly_once(obs, "counter", payloads)
        assert obs.running("counter") == "alpha"
        assert not obs.has_event("fenced")
        rejected = [e for e in obs.events if e.event == "rejected"]
        assert 0 < len(rejected) <= 2 * 40, len(rejected)  # two nodes, a burst or two each


def test_garbage_on_a_checkpoint_topic_never_replaces_a_good_checkpoint(
        broker: str, cluster: Cluster) -> None:
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="alpha")
        fed_and_checkpointed(obs, broker, "counter", [b"a", b"b"])
        # Garbage as the newest checkpoint (not retained), by any client; then the owner is
        # lost and the next one takes over from the newest checkpoint it holds.
        obs.publish("mesh/apps/counter/snapshot", b"\x01\x02\x03")
        wait_until(lambda: obs.has_event("rejected", node="beta"), 10, "the garbage refused")
        cluster["alpha"].signal(signal.SIGKILL)
        wait_until(lambda: obs.has_event("failed-over", app="counter", node="beta"), 20,
                   "a failover to beta")
        wait_until(lambda: obs.running("counter") is not None, 20, "counter running again")
        obs.publish("mesh/apps/counter/in", b"c")
        assert wait_count(obs, "counter", 3) == \
            f"3 {counter_hash([b'a', b'b', b'c'])}".encode()


def test_an_owner_record_at_an_epoch_nothing_can_follow_is_refused(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="alpha")
        fed_and_checkpointed(obs, broker, "counter", [b"a", b"b"])
        # Signed by the owner's own key: what a device gone wrong could publish.
        topic = "mesh/apps/counter/owner"
        forged = cbor2.dumps({"v": 1, "kind": "owner", "node": "alpha", "epoch": 2**64 - 1})
        obs.publish(topic, trust.seal(keys.load(tmp_path / "alpha" / "device.key"), "alpha",
                                      topic, forged, issued_ms=int(time.time() * 1000)),
                    retain=True)
        wait_until(lambda: obs.has_event("rejected", node="beta"), 10, "the record refused")
        cluster["alpha"].signal(signal.SIGKILL)
        wait_until(lambda: obs.has_event("failed-over", app="counter", node="beta"), 20,
                   "a failover to beta")
        owner = obs.owners["counter"]
        assert (owner.node, owner.epoch) == ("beta", 2)
        assert owner.seq > 0  # it went on from a checkpoint, and says which
        obs.publish("mesh/apps/counter/in", b"c")
        assert wait_count(obs, "counter", 3) == \
            f"3 {counter_hash([b'a', b'b', b'c'])}".encode()


# --- the broker lost: kill -9, and back empty or from an older autosave ---------------------

PERSISTENT = """\
listener {port} 127.0.0.1
allow_anonymous true
user root
persistence true
persistence_location {dir}/
autosave_interval {autosave}
max_inflight_messages 100
max_queued_messages 100000
"""


class Broker:
    """Mosquitto with persistence, on one port, that a test kills and starts again."""

    def __init__(self, workdir: Path, autosave: int) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.dir = workdir / "broker"
        self.dir.mkdir()
        self.conf = workdir / "persistent.conf"
        self.conf.write_text(PERSISTENT.format(port=self.port, dir=self.dir, autosave=autosave))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> Path:
        return self.dir / "mosquitto.db"

    def start(self) -> None:
        with (self.dir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log,
                                         stderr=log)
        wait_until(lambda: accepts(self.port), 20, "mosquitto to listen")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def fold(output: bytes, payload: bytes) -> bytes:
    """The counter's output after one more input `payload`, from its output `output`."""
    count, value = (int(part) for part in output.split())
    for byte in payload:
        value = (value * 33 + byte) & ((1 << 64) - 1)
    return f"{count + 1} {value}".encode()


@pytest.mark.parametrize("store", ["lost", "older"])
def test_a_broker_killed_and_back_empty_or_older_loses_nothing_a_node_held(
        store: str, tmp_path: Path, cluster: Cluster) -> None:
    """kill -9 of Mosquitto, back with an empty store (killed before its first autosave) or
    with an older one (an autosave before the last inputs): the owner, held up until the other
    node has given the broker back what it held, goes on from the state it had."""
    require_tool("mosquitto")
    broker = Broker(tmp_path, autosave=3600 if store == "lost" else 2)
    broker.start()
    try:
        with Observer(broker.url) as obs:
            running_on(obs, cluster, broker.url, "counter", node="alpha")
            for i in range(30):
                obs.publish("mesh/apps/counter/in", f"first-{i}".encode())
            wait_count(obs, "counter", 30)
            if store == "older":
                saved = broker.store.stat().st_mtime if broker.store.exists() else 0.0
                wait_until(lambda: broker.store.exists() and broker.store.stat().st_mtime
                           > saved, 10, "an autosave")
                for i in range(30):
                    obs.publish("mesh/apps/counter/in", f"second-{i}".encode())
                wait_count(obs, "counter", 60)
            held = obs.last_output("counter")
            assert held is not None
            broker.kill()
            wait_until(lambda: "lost the broker" in cluster["alpha"].log(), 10, "alpha to notice")
            cluster["alpha"].signal(signal.SIGSTOP)  # beta gives the new broker back first
            try:
                broker.start()
                wait_until(lambda: "beta" in obs.nodes, 20, "beta back")
            finally:
                cluster["alpha"].signal(signal.SIGCONT)
            wait_until(lambda: obs.running("counter") == "alpha", 30, "counter back on alpha")
            obs.publish("mesh/apps/counter/in", b"after")
            assert wait_count(obs, "counter", count_of(held) + 1) == fold(held, b"after")
    finally:
        broker.stop()


def test_restart_fresh_is_the_operators_way_to_start_an_app_over(
        broker: str, cluster: Cluster) -> None:
    with Observer(broker) as obs:
        running_on(obs, cluster, broker, "counter", node="beta")
        fed_and_checkpointed(obs, broker, "counter", [b"a", b"b"])
        result = mesh_cli("restart", "counter", "--fresh", broker=broker)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["fresh"] is True
        wait_until(lambda: obs.has_event("migrated", app="counter", node="beta"), 20,
                   "counter started over, and back on beta")
        obs.publish("mesh/apps/counter/in", b"x")
        wait_until(lambda: obs.last_output("counter") == f"1 {counter_hash([b'x'])}".encode(),
                   20, "a count from the start")


def test_a_survivor_that_never_ran_an_app_gives_a_new_broker_everything_it_needs(
        tmp_path: Path, cluster: Cluster) -> None:
    """The app's device and the broker's store lost together: the one node left never ran
    the app, yet holds its module (every node keeps the modules of the mesh's apps), its newest
    checkpoint and the admissions its records are checked against; it gives all of them back
    and runs the app on from that checkpoint."""
    require_tool("mosquitto")
    broker = Broker(tmp_path, autosave=3600)  # killed, it comes back empty
    broker.start()
    try:
        with Observer(broker.url) as obs:
            running_on(obs, cluster, broker.url, "counter", "--checkpoint-every", "1",
                       node="alpha")
            sent = [f"in-{i}".encode() for i in range(5)]
            fed_and_checkpointed(obs, broker.url, "counter", sent)
            beta = StateStore(tmp_path / "beta")
            module = beta.specs()["counter"][0].module  # the spec it took, as it took it
            wait_until(lambda: beta.has_module(module), 20, "beta to keep the module")
            cluster["alpha"].signal(signal.SIGKILL)
            broker.kill()
            broker.start()
            wait_until(lambda: obs.running("counter") == "beta", 60,
                       f"counter on beta\n{cluster.logs()}")
            sent.append(b"after")
            obs.publish("mesh/apps/counter/in", b"after")
            assert wait_count(obs, "counter", 6) == f"6 {counter_hash(sent)}".encode()
    finally:
        broker.stop()
