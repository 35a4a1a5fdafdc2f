"""Runtime benchmarks: load, instantiate, per-message cost, snapshot and restore.

    .venv/bin/python benchmarks/runtime_bench.py [--quick]

Prints Markdown tables (medians of several rounds) with a bare wasmtime-py baseline measured in
the same run, so that ratios stay meaningful on a noisy machine. Builds the C counter example
with clang (see examples/Makefile).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import wasmtime

from mesh import wire
from mesh.abi import Limits, LocalIO
from mesh.engine import make_engine
from mesh.runtime import App, Runtime

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

# An app with a memory of PAGES pages. A message "s" writes 1 MiB (a quarter of a smaller memory)
# of pseudo-random bytes in the middle of memory (sparse); "d" writes them over all of it (dense).
FILLER = """(module
  (memory (export "memory") {pages})
  (func (export "mesh_alloc") (param i32) (result i32) (i32.const 64))
  (func $fill (param $from i32) (param $to i32)
    (local $x i32)
    (local.set $x (i32.const 2463534242))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $from) (local.get $to)))
      (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 13))))
      (local.set $x (i32.xor (local.get $x) (i32.shr_u (local.get $x) (i32.const 17))))
      (local.set $x (i32.xor (local.get $x) (i32.shl (local.get $x) (i32.const 5))))
      (i32.store (local.get $from) (local.get $x))
      (local.set $from (i32.add (local.get $from) (i32.const 4)))
      (br $next))))
  (func (export "mesh_on_message") (param i32 i32 i32 i32)
    (if (i32.eq (i32.load8_u (local.get 2)) (i32.const 100))
      (then (call $fill (i32.const 1024) (i32.mul (memory.size) (i32.const 65536))))
      (else (call $fill (i32.const {middle}) (i32.const {middle_end}))))))"""


def median_ms(action: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        action()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def build_counter(out: Path) -> bytes:
    subprocess.run(["make", "-s", "-C", str(ROOT / "examples"), f"BUILD={out}"], check=True)
    return (out / "counter.wasm").read_bytes()


def bench_load(wasm: bytes, work: Path, rounds: int) -> list[tuple[str, float]]:
    def compile_fresh() -> None:
        with Runtime(cache_dir=None) as runtime:
            runtime.load(wasm)

    cache = work / "cache"
    with Runtime(cache_dir=cache) as runtime:
        runtime.load(wasm)  # fill the cache
        cached = median_ms(lambda: runtime.load(wasm), rounds * 10)
        module = runtime.load(wasm)

        def instantiate() -> None:
            App(runtime, module, name="b", io=LocalIO()).close()

        instantiated = median_ms(instantiate, rounds * 10)
    return [("compile (validate, rewrite, compile)", median_ms(compile_fresh, rounds)),
            ("cached load", cached),
            ("instantiate", instantiated),
            ("cached load + instantiate", cached + instantiated)]


def bare_instance(wasm: bytes) -> tuple[wasmtime.Store, dict[str, wasmtime.Func],
                                        wasmtime.Memory]:
    """The same module in plain wasmtime-py: the least a host must do to run it."""
    engine = make_engine()
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 40)
    store.set_wasi(wasmtime.WasiConfig())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    published: list[tuple[bytes, bytes]] = []
    memory: list[wasmtime.Memory] = []

    def publish(caller: wasmtime.Caller, tp: int, tl: int, pp: int, pl: int) -> int:
        published.append((bytes(memory[0].read(caller, tp, tp + tl)),
                          bytes(memory[0].read(caller, pp, pp + pl))))
        return 0

    linker.define_func("mesh", "publish", wasmtime.FuncType([i32] * 4, [i32]), publish,
                       access_caller=True)
    linker.define_func("mesh", "log", wasmtime.FuncType([i32] * 3, []), lambda *a: None)
    linker.define_func("mesh", "now_ms", wasmtime.FuncType([], [i64]), lambda: 0)
    linker.define_func("mesh", "read", wasmtime.FuncType([i32] * 4, [i32]), lambda *a: -3)
    instance = linker.instantiate(store, wasmtime.Module(engine, wasm))
    exports = instance.exports(store)
    funcs = {name: exports[name] for name in ("_initialize", "mesh_init", "mesh_alloc",
                                              "mesh_on_message", "mesh_free")}
    mem = exports["memory"]
    assert isinstance(mem, wasmtime.Memory)
    memory.append(mem)
    typed = {name: func for name, func in funcs.items() if isinstance(func, wasmtime.Func)}
    typed["_initialize"](store)
    typed["mesh_init"](store)
    return store, typed, mem


def bench_messages(wasm: bytes, rounds: int, count: int) -> list[tuple[str, float]]:
    topic, payload = b"sensor/1", b"21.5 degrees"
    store, funcs, memory = bare_instance(wasm)
    alloc, on_message, free = funcs["mesh_alloc"], funcs["mesh_on_message"], funcs["mesh_free"]

    def bare() -> None:
        for _ in range(count):
            ptr = alloc(store, len(topic) + len(payload))
            memory.write(store, topic + payload, ptr)
            on_message(store, ptr, len(topic), ptr + len(topic), len(payload))
            free(store, ptr)

    with Runtime() as runtime:
        app = App(runtime, runtime.load(wasm), name="b", io=LocalIO())
        app.start()

        def hosted() -> None:
            for _ in range(count):
                app.deliver("sensor/1", payload)

        bare_runs, host_runs = [], []
        for _ in range(rounds):  # interleaved, so that both see the same machine load
            bare_runs.append(median_ms(bare, 1))
            host_runs.append(median_ms(hosted, 1))
        bare_us = statistics.median(bare_runs) * 1000 / count
        host_us = statistics.median(host_runs) * 1000 / count
        app.close()
    return [("bare wasmtime-py (alloc, write, call, free)", bare_us),
            ("liquid-mesh App.deliver", host_us),
            ("ratio host / bare", host_us / bare_us)]


def bare_memory_read_ms(wasm: bytes, fill: bytes, rounds: int) -> float:
    """Baseline: plain wasmtime-py copying the same memory out once (Memory.read)."""
    engine = make_engine()
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 40)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, wasm), [])
    exports = instance.exports(store)
    on_message, memory = exports["mesh_on_message"], exports["memory"]
    assert isinstance(on_message, wasmtime.Func)
    assert isinstance(memory, wasmtime.Memory)
    store_fill = fill + b"\0"
    memory.write(store, store_fill, 64)
    on_message(store, 0, 0, 64, len(fill))
    return median_ms(lambda: memory.read(store, 0), rounds)


def bench_snapshot(runtime: Runtime, size: int, mode: str,
                   rounds: int) -> tuple[float, float, float, float]:
    """Snapshot size (MiB), bare copy, snapshot and restore times (ms) for one memory."""
    middle, touched = size // 2, min(MIB, size // 4)
    wasm = bytes(wasmtime.wat2wasm(FILLER.format(
        pages=size // 65536, middle=middle, middle_end=middle + touched)))
    fill = b"d" if mode == "dense" else b"s"
    module = runtime.load(wasm)
    limits = Limits(memory_bytes=max(size, 64 * MIB), timeout_s=30)
    with App(runtime, module, name="b", io=LocalIO(), limits=limits) as app:
        app.start()
        app.deliver("", fill)
        data = wire.encode(app.snapshot())
        snap_ms = median_ms(lambda: wire.encode(app.snapshot()), rounds)

    def restore() -> None:
        with App(runtime, module, name="b", io=LocalIO(), limits=limits) as fresh:
            fresh.restore(wire.decode(wire.Snapshot, data))

    restore_ms = median_ms(restore, rounds)
    return len(data) / MIB, bare_memory_read_ms(wasm, fill, rounds), snap_ms, restore_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds, small sizes (smoke)")
    args = parser.parse_args()
    rounds = 3 if args.quick else 9
    sizes = [1 * MIB, 16 * MIB] if args.quick else [1 * MIB, 16 * MIB, 64 * MIB]
    print(f"Python {platform.python_version()}, wasmtime-py "
          f"{__import__('importlib.metadata').metadata.version('wasmtime')}, "
          f"{platform.machine()}; medians of {rounds} rounds\n")
    with tempfile.TemporaryDirectory() as tmp:
        wasm = build_counter(Path(tmp) / "build")
        print(f"| load (C counter, {len(wasm) // 1024} KiB) | ms |")
        print("|---|---:|")
        for name, ms in bench_load(wasm, Path(tmp), rounds):
            print(f"| {name} | {ms:.2f} |")
        print()
        print("| per message (C counter) | µs |")
        print("|---|---:|")
        for name, value in bench_messages(wasm, rounds, 200 if args.quick else 2000):
            print(f"| {name} | {value:.2f} |" if "ratio" not in name else
                  f"| **{name}** | **{value:.2f}x** |")
        print()
        print("| memory | contents | snapshot MiB | bare Memory.read ms | snapshot ms "
              "| restore ms |")
        print("|---|---|---:|---:|---:|---:|")
        with Runtime() as runtime:
            for size in sizes:
                for mode in ("sparse", "dense"):
                    mib, copy_ms, snap_ms, restore_ms = bench_snapshot(runtime, size, mode,
                                                                       rounds)
                    print(f"| {size // MIB} MiB | {mode} | {mib:.3f} | {copy_ms:.1f} | "
                          f"{snap_ms:.1f} | {restore_ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
