"""An app's state is never silently lost: real node processes on Mosquitto, faults injected."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import COUNTER_WAT, require_tool
from tests.harness import (
    Cluster,
    Observer,
    counter_hash,
    mesh_cli,
    mosquitto,
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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    require_tool("mosquitto")
    with mosquitto(tmp_path) as url:
        yield url


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    yield nodes
    nodes.stop_all()
    print(nodes.logs())  # shown when the test failed


def ticks(obs: Observer, app: str) -> list[int]:
    return [int.from_bytes(out, "little") for out in obs.outputs.get(app, [])]


def test_a_tick_driven_app_goes_on_from_its_ticks_after_kill_9(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    module = tmp_path / "ticker.wat"
    module.write_text(TICKER)
    with Observer(broker) as obs:
        for node in ("alpha", "beta"):
            cluster.start(node, broker)
        wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 20, "nodes to join")
        result = mesh_cli("deploy", "ticker", str(module), "--on", "alpha", "--tick-ms", "50",
                          broker=broker)
        assert result.returncode == 0, result.stderr
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
        for node in ("alpha", "beta"):
            cluster.start(node, broker)
        wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 20, "nodes to join")
        for args in (("counter", str(COUNTER_WAT), "--on", "alpha"),
                     ("spinner", str(spinner), "--on", "beta", "--timeout-ms", "60000")):
            result = mesh_cli("deploy", *args, broker=broker)
            assert result.returncode == 0, result.stderr
        wait_until(lambda: obs.running("counter") == "alpha" and obs.running("spinner") == "beta",
                   20, "both apps running")
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
