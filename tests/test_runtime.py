"""The app host: runs apps by the ABI, bounds them, survives bad ones, snapshots and restores."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.abi import Limits, LocalIO
from mesh.errors import AppError, ModuleError, SnapshotError
from mesh.runtime import App, Runtime
from tests.conftest import wat

IMPORTS = """
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "mesh_alloc") (param i32) (result i32) (i32.const 1024))
"""

# Counts messages in a hidden global; a payload starting with "!" traps; publishes the count
# (one byte, '0' + count) on "n".
FRAGILE = wat(f"""(module {IMPORTS}
  (global $n (mut i32) (i32.const 0))
  (data (i32.const 0) "n")
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 33)) (then unreachable))
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 8) (i32.add (i32.const 48) (global.get $n)))
    (drop (call $publish (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 1)))))""")

SPIN = wat(f"""(module {IMPORTS}
  (func (export "mesh_on_message") (param i32 i32 i32 i32) (loop (br 0))))""")

GROW_TO_THE_CAP = wat(f"""(module {IMPORTS}
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (block $full (loop $more
      (br_if $full (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
      (br $more)))))""")

GROW_FOREVER = wat(f"""(module {IMPORTS}
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (loop $more (drop (memory.grow (i32.const 1))) (br $more))))""")

# Publishes with a topic containing '#', then reports the return code on "rc".
BAD_TOPIC = wat(f"""(module {IMPORTS}
  (data (i32.const 0) "a/#") (data (i32.const 16) "rc")
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (i32.store8 (i32.const 32) (i32.sub (i32.const 48)
      (call $publish (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 1))))
    (drop (call $publish (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 1)))))""")


@dataclasses.dataclass
class RecordingIO(LocalIO):
    logs: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def log(self, level: int, message: str) -> None:
        self.logs.append((level, message))


def start(runtime: Runtime, wasm: bytes, name: str = "app", limits: Limits | None = None,
          io: RecordingIO | None = None) -> tuple[App, RecordingIO]:
    io = io or RecordingIO(app=name)
    app = App(runtime, runtime.load(wasm), name=name, io=io, limits=limits)
    app.start()
    return app, io


def test_c_counter_keeps_its_state_on_the_heap(runtime: Runtime,
                                              examples: dict[str, Path]) -> None:
    app, io = start(runtime, examples["counter"].read_bytes())
    for payload in (b"one", b"two", b"reset", b"three"):
        app.deliver("", payload)
    counts = [payload.split()[0] for topic, payload in io.published]
    assert [topic for topic, _ in io.published] == ["count"] * 4
    assert counts == [b"1", b"2", b"0", b"1"]
    assert io.published[-1][1].endswith(b" 1 5")
    assert (1, "counter ready") in io.logs


def test_thermostat_reads_its_sensor_and_prints_to_the_app_log(
        runtime: Runtime, examples: dict[str, Path]) -> None:
    reading = [b"19.0"]
    io = RecordingIO(sensors={"temperature": lambda: reading[0]})
    app, _ = start(runtime, examples["thermostat"].read_bytes(), io=io)
    app.tick(0)
    reading[0] = b"23.5"
    app.tick(1)
    app.deliver("setpoint", b"25")
    app.tick(2)
    assert io.published == [("temperature", b"19.0"), ("heater", b"on"),
                            ("temperature", b"23.5"), ("heater", b"off"),
                            ("temperature", b"23.5"), ("heater", b"on")]
    assert (1, "setpoint now 25.0") in io.logs


def test_a_missing_sensor_is_an_error_code_not_a_crash(runtime: Runtime,
                                                      examples: dict[str, Path]) -> None:
    app, io = start(runtime, examples["thermostat"].read_bytes())
    app.tick(0)
    assert io.published == []
    assert (3, "no temperature sensor on this device") in io.logs


@pytest.mark.parametrize(("module", "message"), [
    (b"not wasm at all", r"not a WebAssembly module"),
    (b"\0asm\x01\0\0\0\x01\x05", "invalid WebAssembly: unexpected end-of-file"),
    (wat("(module)"), "defines 0 memories"),
    (wat("(module (memory 1))"), "does not export its memory as 'memory'"),
    (wat('(module (memory (export "memory") 1) (func (export "mesh_on_message") '
         "(param i32 i32 i32 i32)))"), "but not mesh_alloc"),
    (wat('(module (memory (export "memory") 1) (func (export "mesh_alloc")))'),
     r"exports mesh_alloc with the wrong type; expected a function \(i32\) -> \(i32\)"),
    (wat('(module (import "env" "sleep" (func)) (memory (export "memory") 1))'),
     "imports env.sleep, which the host does not provide"),
    (wat('(module (import "mesh" "publish" (func)) (memory (export "memory") 1))'),
     r"imports mesh.publish as \(\) -> \(\), expected"),
    (wat('(module (memory (export "memory") 1) (table 1 funcref) '
         "(func (table.set (i32.const 0) (ref.null func))))"), "uses table.set"),
    (wat('(module (memory (export "memory") 1 1 shared))'), "invalid WebAssembly"),
])
def test_bad_modules_are_refused_with_a_reason(runtime: Runtime, module: bytes,
                                               message: str) -> None:
    with pytest.raises(ModuleError, match=message):
        runtime.load(module)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_modules_raise_only_module_error(runtime: Runtime, data: st.DataObject) -> None:
    raw = bytearray(FRAGILE)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(8, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        module = runtime.load(bytes(raw))
    except ModuleError:
        return
    try:
        app = App(runtime, module, name="damaged", io=LocalIO())
    except AppError as exc:  # a damaged data segment may not fit memory
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "in instantiation" in refused
        return
    with app:
        try:
            app.start()
            app.deliver("", b"x")
        except AppError:
            pass


def test_a_trap_fails_only_that_app(runtime: Runtime) -> None:
    fragile, io = start(runtime, FRAGILE, "fragile")
    other, other_io = start(runtime, FRAGILE, "other")
    fragile.deliver("", b"a")
    with pytest.raises(AppError, match="app fragile trapped in mesh_on_message") as caught:
        fragile.deliver("", b"!boom")
    assert caught.value.trap is not None
    assert "unreachable" in caught.value.trap
    with pytest.raises(AppError, match="has failed"):
        fragile.deliver("", b"b")
    with pytest.raises(AppError, match="cannot be snapshotted"):
        fragile.snapshot()
    other.deliver("", b"fine")
    assert io.published == [("n", b"1")]
    assert other_io.published == [("n", b"1")]


def test_an_infinite_loop_is_stopped_at_the_time_limit(runtime: Runtime) -> None:
    spin, _ = start(runtime, SPIN, "spin", Limits(timeout_s=0.2))
    began = time.monotonic()
    with pytest.raises(AppError, match=r"app spin ran longer than 0.2s in mesh_on_message"):
        spin.deliver("", b"x")
    assert time.monotonic() - began < 5
    fine, io = start(runtime, FRAGILE, "fine")
    fine.deliver("", b"x")
    assert io.published == [("n", b"1")]


def test_memory_is_capped(runtime: Runtime) -> None:
    cap = 4 << 20
    greedy, _ = start(runtime, GROW_TO_THE_CAP, "greedy", Limits(memory_bytes=cap))
    greedy.deliver("", b"x")
    assert cap - 16 * 65536 < greedy.snapshot().memory.size <= cap
    bomb, _ = start(runtime, GROW_FOREVER, "bomb", Limits(memory_bytes=cap, timeout_s=0.2))
    with pytest.raises(AppError, match="ran longer than"):
        bomb.deliver("", b"x")
    huge = wat('(module (memory (export "memory") 2000))')
    with pytest.raises(AppError, match="failed in instantiation"):
        App(runtime, runtime.load(huge), name="huge", io=LocalIO(), limits=Limits(cap))


def test_publish_refuses_bad_topics_with_a_code(runtime: Runtime) -> None:
    app, io = start(runtime, BAD_TOPIC)
    app.deliver("", b"x")
    assert io.published == [("rc", b"1")]  # '0' - (-1)


def test_snapshot_and_restore_continue_exactly(runtime: Runtime,
                                              examples: dict[str, Path]) -> None:
    wasm = examples["counter"].read_bytes()
    straight, straight_io = start(runtime, wasm, "c")
    first, _first_io = start(runtime, wasm, "c")
    for payload in (b"a", b"bb", b"ccc"):
        straight.deliver("", payload)
        first.deliver("", payload)
    first.tick(5, next_tick_ms=105)
    snap = wire.decode(wire.Snapshot, wire.encode(first.snapshot(epoch=3, seq=9)))
    assert (snap.epoch, snap.seq, snap.host.delivered, snap.host.next_tick_ms) == (3, 9, 3, 105)
    resumed_io = RecordingIO()
    resumed = App(runtime, runtime.load(wasm), name="c", io=resumed_io)
    resumed.restore(snap)
    for payload in (b"dddd", b"e"):
        straight.deliver("", payload)
        resumed.deliver("", payload)
    assert resumed_io.published == straight_io.published[3:]
    assert resumed_io.logs == []  # mesh_init is not run again
    assert resumed.host == dataclasses.replace(straight.host, ticks=1, next_tick_ms=105)
    a, b = resumed.snapshot(), straight.snapshot()
    assert (a.memory, a.globals) == (b.memory, b.globals)


def test_restore_refuses_other_modules_and_used_instances(runtime: Runtime,
                                                         counter_wat_wasm: bytes) -> None:
    app, _ = start(runtime, FRAGILE)
    app.deliver("", b"x")
    snap = app.snapshot()
    other = App(runtime, runtime.load(counter_wat_wasm), name="app", io=LocalIO())
    with pytest.raises(SnapshotError, match=r"snapshot is of module .* refusing to restore"):
        other.restore(snap)
    with pytest.raises(SnapshotError, match="already run"):
        app.restore(snap)
    fresh = App(runtime, runtime.load(FRAGILE), name="app", io=LocalIO())
    bad_globals = dataclasses.replace(snap, globals=())
    with pytest.raises(SnapshotError, match="globals do not match"):
        fresh.restore(bad_globals)
    too_big = dataclasses.replace(snap, memory=dataclasses.replace(snap.memory, size=1 << 30))
    with pytest.raises(SnapshotError, match="exceeds the limit"):
        fresh.restore(too_big)
    fresh.restore(snap)  # the failed attempts changed nothing


def test_compiled_modules_come_from_the_cache_after_a_restart(
        tmp_path: Path, counter_wat_wasm: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with Runtime(cache_dir=tmp_path) as first:
        first.load(counter_wat_wasm)
    assert len(list(tmp_path.glob("*.cwasm"))) == 1

    def no_compiling(self: Runtime, wasm: bytes) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(Runtime, "_compile", no_compiling)
    with Runtime(cache_dir=tmp_path) as second:
        module = second.load(counter_wat_wasm)
        app, io = start(second, counter_wat_wasm)
        app.deliver("", b"x")
    assert module.globals == (("__mesh_global_0", "i64"), ("__mesh_global_1", "i64"))
    assert io.published[0][1].startswith(b"1 ")


def test_a_corrupt_cache_entry_is_compiled_again(tmp_path: Path,
                                                 counter_wat_wasm: bytes) -> None:
    with Runtime(cache_dir=tmp_path) as first:
        first.load(counter_wat_wasm)
    entry = next(tmp_path.glob("*.cwasm"))
    entry.write_bytes(b"garbage")
    with Runtime(cache_dir=tmp_path) as second:
        second.load(counter_wat_wasm)
    assert entry.read_bytes() != b"garbage"
