"""The app host: load, run, snapshot and restore WebAssembly apps on wasmtime.

A `Runtime` owns one engine (`mesh.engine`), the compiled-module cache and an epoch ticker that
bounds the time of every call. `Runtime.load` checks a module against the app ABI (`mesh.abi`,
see DESIGN.md), rewrites it so that every mutable global is reachable, and compiles it. `App` is
one running instance: messages and ticks go in, publications and logs come out through an
`AppIO`, and `snapshot`/`restore` carry its complete state between processes.

`AppIO`, `LocalIO`, `Limits` (from `mesh.abi`) and `make_engine` (from `mesh.engine`) are
importable from here too.

wasmtime-py calls are synchronous and a store is not thread-safe: call one `App` from one thread
at a time (the node gives each app its own worker thread). Nothing here touches an event loop.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from mesh import abi, wasmbin
from mesh import snapshot as memimage
from mesh.abi import AppIO, Limits, LocalIO
from mesh.cache import ModuleCache
from mesh.engine import engine_fingerprint, make_engine
from mesh.errors import AppError, ModuleError, SnapshotError
from mesh.wire import GlobalValue, HostState, Snapshot

__all__ = ["EPOCH_TICK_S", "App", "AppIO", "AppModule", "Limits", "LocalIO", "Runtime",
           "engine_fingerprint", "make_engine"]

log = logging.getLogger(__name__)

EPOCH_TICK_S = 0.005

_current = threading.local()

# WASI output streams end on a wasmtime worker thread that calls back into Python; if a store
# outlived the interpreter that call would abort the process. Close every open app before exit.
_open_apps: weakref.WeakSet[App] = weakref.WeakSet()


@atexit.register
def _close_open_apps() -> None:
    for app in list(_open_apps):
        app.close()


@dataclass(frozen=True, slots=True)
class AppModule:
    """A loaded module: checked against the ABI, rewritten, compiled, imports resolved."""

    sha256: str
    size: int
    pre: wasmtime.InstancePre
    exports: frozenset[str]
    globals: tuple[tuple[str, str], ...]


class Runtime:
    """One wasmtime engine with its module cache and epoch ticker. Use as a context manager."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.engine = make_engine()
        self.fingerprint = engine_fingerprint()
        self._cache = ModuleCache(cache_dir, self.fingerprint) if cache_dir else None
        self._linker = self._make_linker()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="mesh-epoch", daemon=True)
        self._ticker.start()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the epoch ticker. Idempotent."""
        self._stop.set()
        if self._ticker.is_alive() and self._ticker is not threading.current_thread():
            self._ticker.join()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()

    def _make_linker(self) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        kinds = {abi.I32: i32, abi.I64: i64}
        handlers: dict[str, Callable[..., Any]] = {
            "publish": _publish, "log": _log, "now_ms": _now_ms, "read": _read}
        for name, (params, results) in abi.IMPORTS.items():
            ty = wasmtime.FuncType([kinds[p] for p in params], [kinds[r] for r in results])
            linker.define_func("mesh", name, ty, handlers[name], access_caller=name != "now_ms")
        return linker

    def load(self, wasm: bytes) -> AppModule:
        """Check, rewrite and compile a module (or take it from the cache)."""
        sha256 = hashlib.sha256(wasm).hexdigest()
        module = self._cache.get(self.engine, sha256) if self._cache else None
        if module is None:
            module = self._compile(wasm)
            if self._cache:
                self._cache.put(sha256, module)
        exports, mutable = abi.check_module(module)
        try:
            pre = self._linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"cannot link: {abi.first_line(str(exc))}") from None
        return AppModule(sha256, len(wasm), pre, exports, mutable)

    def _compile(self, wasm: bytes) -> wasmtime.Module:
        if wasm[:4] != b"\0asm":
            raise ModuleError("not a WebAssembly module (no \\0asm header)")
        try:
            wasmtime.Module.validate(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"invalid WebAssembly: {abi.first_line(str(exc))}") from None
        rewritten = wasmbin.instrument(wasm).wasm
        try:
            return wasmtime.Module(self.engine, rewritten)
        except wasmtime.WasmtimeError as exc:  # pragma: no cover - rewriting keeps validity
            raise ModuleError(f"cannot compile: {abi.first_line(str(exc))}") from None


def _app() -> App:
    app: App | None = getattr(_current, "app", None)
    if app is None:  # pragma: no cover - the linker is only used by App
        raise AppError("host function called outside an app call")
    return app


# The linker is shared by all apps; these route each import to the app whose call is running.
def _publish(caller: wasmtime.Caller, *args: int) -> int:
    return _app()._host_publish(caller, *args)


def _log(caller: wasmtime.Caller, *args: int) -> None:
    _app()._host_log(caller, *args)


def _now_ms() -> int:
    return _app().io.now_ms()


def _read(caller: wasmtime.Caller, *args: int) -> int:
    return _app()._host_read(caller, *args)


class App:
    """One instance of an app module. Call it from one thread at a time."""

    def __init__(self, runtime: Runtime, module: AppModule, *, name: str, io: AppIO,
                 limits: Limits | None = None) -> None:
        self.name = name
        self.module = module
        self.io = io
        self.limits = limits or Limits()
        self.initialized = False
        self.delivered = self.published = self.ticks = 0
        self.next_tick_ms: int | None = None
        self.failure: str | None = None
        self._deadline = max(1, round(self.limits.timeout_s / EPOCH_TICK_S))
        self._quiet = False
        self._publishes = 0
        self._out = {1: bytearray(), 2: bytearray()}
        self._store = wasmtime.Store(runtime.engine)
        self._store.set_limits(memory_size=self.limits.memory_bytes, instances=1, memories=1,
                               table_elements=1 << 20)
        wasi = wasmtime.WasiConfig()
        wasi.stdout_custom = lambda data: self._stdio(1, data)
        wasi.stderr_custom = lambda data: self._stdio(2, data)
        self._store.set_wasi(wasi)
        _open_apps.add(self)
        self._mem: wasmtime.Memory | None = None
        try:  # a data segment that does not fit, a memory above the limit: it never runs
            with self._calling("instantiation"):
                instance = module.pre.instantiate(self._store)
        except AppError:
            self.close()  # nothing of it may outlive the interpreter (see _close_open_apps)
            raise
        exports = instance.exports(self._store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self._mem = memory
        self._funcs: dict[str, wasmtime.Func] = {}
        for export in abi.EXPORTS:
            func = exports.get(export) if export in module.exports else None
            if isinstance(func, wasmtime.Func):
                self._funcs[export] = func
        self._globals: list[tuple[str, str, wasmtime.Global]] = []
        for gname, gtype in module.globals:
            handle = exports[gname]
            assert isinstance(handle, wasmtime.Global)
            self._globals.append((gname, gtype, handle))

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the instance. Idempotent; the app refuses calls afterwards."""
        if self.failure is None:
            self.failure = "closed"
        self._store.close()
        _open_apps.discard(self)

    # --- running ---------------------------------------------------------------------------

    @property
    def accepts_messages(self) -> bool:
        return "mesh_on_message" in self._funcs

    @property
    def has_tick(self) -> bool:
        return "mesh_on_tick" in self._funcs

    @property
    def host(self) -> HostState:
        """The host-side state that goes into a snapshot."""
        return HostState(self.initialized, self.delivered, self.published, self.ticks,
                         self.next_tick_ms)

    def start(self) -> None:
        """First start: `_initialize` (WASI reactors), then `mesh_init`. Never after a restore."""
        if self.initialized:
            raise AppError(f"app {self.name} is already started")
        for export in ("_initialize", "mesh_init"):
            if export in self._funcs:
                self._call(export)
        self.initialized = True

    def deliver(self, topic: str, payload: bytes) -> None:
        """One input message: topic and payload are written into memory from `mesh_alloc`."""
        if not self.accepts_messages:
            raise AppError(f"app {self.name} does not take messages (no mesh_on_message)")
        raw_topic = topic.encode()
        size = len(raw_topic) + len(payload)
        with self._calling("mesh_on_message"):
            ptr = self._funcs["mesh_alloc"](self._store, max(size, 1))
            if ptr <= 0 or ptr + size > self._memory.data_len(self._store):
                raise AppError(f"app {self.name}: mesh_alloc({size}) returned an invalid "
                               f"pointer {ptr}")
            base = ctypes.addressof(self._memory.data_ptr(self._store).contents)
            ctypes.memmove(base + ptr, raw_topic, len(raw_topic))
            ctypes.memmove(base + ptr + len(raw_topic), payload, len(payload))
            self._funcs["mesh_on_message"](self._store, ptr, len(raw_topic),
                                           ptr + len(raw_topic), len(payload))
            if "mesh_free" in self._funcs:
                self._funcs["mesh_free"](self._store, ptr)
        self.delivered += 1

    def tick(self, now_ms: int, next_tick_ms: int | None = None) -> None:
        """One tick; `next_tick_ms` is when the next is due (kept in the snapshot)."""
        if self.has_tick:
            self._call("mesh_on_tick", now_ms)
        self.ticks += 1
        self.next_tick_ms = next_tick_ms

    def _call(self, export: str, *args: Any) -> Any:
        with self._calling(export):
            return self._funcs[export](self._store, *args)

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Bound one call into wasm in time, route host calls here, and turn traps into AppError.

        After a trap the instance may be half-way through an update, so it is marked failed and
        refuses further calls; restore it from a snapshot.
        """
        if self.failure:
            raise AppError(f"app {self.name} has failed ({self.failure}); restore it from a "
                           "snapshot")
        self._store.set_epoch_deadline(self._deadline)
        self._publishes = 0
        _current.app = self
        try:
            yield
        except wasmtime.ExitTrap as exc:
            self._fail(f"exited with status {exc.code} during {what}")
        except wasmtime.Trap as exc:
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                reason = f"ran longer than {self.limits.timeout_s:g}s in {what} and was stopped"
            else:
                reason = f"trapped in {what}: {abi.trap_reason(exc)}"
            self._fail(reason, str(exc))
        except wasmtime.WasmtimeError as exc:
            self._fail(f"failed in {what}: {abi.first_line(str(exc))}", str(exc))
        except AppError as exc:
            self._fail(str(exc).removeprefix(f"app {self.name}: "))
        finally:
            _current.app = None

    def _fail(self, reason: str, trap: str | None = None) -> None:
        self.failure = reason
        raise AppError(f"app {self.name} {reason}", trap=trap)

    # --- host functions (called from wasm, on this app's thread) ----------------------------

    @property
    def _memory(self) -> wasmtime.Memory:
        assert self._mem is not None, "used before instantiation"
        return self._mem

    def _memory_of(self, caller: wasmtime.Caller) -> wasmtime.Memory:
        if self._mem is not None:
            return self._mem
        memory = caller.get("memory")  # during instantiation, from a start function
        assert isinstance(memory, wasmtime.Memory)
        return memory

    def _view(self, caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
        memory = self._memory_of(caller)
        if ptr < 0 or length < 0 or ptr + length > memory.data_len(caller):
            return None
        return bytes(memory.read(caller, ptr, ptr + length))

    def _host_publish(self, caller: wasmtime.Caller, tp: int, tl: int, pp: int, pl: int) -> int:
        if tl > abi.MAX_TOPIC_BYTES or pl > self.limits.max_publish_bytes:
            return abi.E_TOO_LARGE
        if self._publishes >= self.limits.max_publishes_per_call:
            return abi.E_TOO_LARGE
        raw_topic, payload = self._view(caller, tp, tl), self._view(caller, pp, pl)
        if raw_topic is None or payload is None:
            return abi.E_FAULT
        try:
            topic = raw_topic.decode()
        except UnicodeDecodeError:
            return abi.E_INVALID
        if any(c in topic for c in "+#\0") or topic.startswith("/") or "//" in topic:
            return abi.E_INVALID
        self._publishes += 1
        if self._quiet:
            return 0
        try:
            self.io.publish(topic, payload)
        except Exception:
            log.exception("app %s: publish failed", self.name)
            return abi.E_FAILED
        self.published += 1
        return 0

    def _host_log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        raw = self._view(caller, ptr, min(length, self.limits.max_log_bytes))
        if raw is not None and not self._quiet:
            self.io.log(level, raw.decode("utf-8", "replace"))

    def _host_read(self, caller: wasmtime.Caller, np: int, nl: int, out: int, cap: int) -> int:
        raw_name = self._view(caller, np, min(nl, abi.MAX_TOPIC_BYTES))
        memory = self._memory_of(caller)
        if raw_name is None or out < 0 or cap < 0 or out + cap > memory.data_len(caller):
            return abi.E_FAULT
        try:
            value = self.io.read(raw_name.decode("utf-8", "replace"))
        except Exception as exc:
            log.warning("app %s: reading %r failed: %s", self.name, raw_name, exc)
            return abi.E_FAILED
        if value is None:
            return abi.E_UNKNOWN
        if len(value) > cap:
            return abi.E_TOO_LARGE
        memory.write(caller, value, out)
        return len(value)

    def _stdio(self, stream: int, data: bytes) -> None:
        buffer = self._out[stream]
        buffer += data
        *lines, rest = bytes(buffer).split(b"\n")
        if len(rest) > self.limits.max_log_bytes:
            lines.append(rest)
            rest = b""
        self._out[stream] = bytearray(rest)
        if not self._quiet:
            for line in lines:
                self.io.log(1 if stream == 1 else 2, line.decode("utf-8", "replace"))

    # --- state ------------------------------------------------------------------------------

    def snapshot(self, *, epoch: int = 0, seq: int = 0,
                 applied: tuple[int, ...] = ()) -> Snapshot:
        """The app's complete state. Take it between calls, on the app's thread."""
        snap, pieces = self.snapshot_pieces(epoch=epoch, seq=seq, applied=applied)
        return dataclasses.replace(snap, memory=dataclasses.replace(
            snap.memory, data=b"".join(pieces)))

    def snapshot_pieces(self, *, epoch: int = 0, seq: int = 0, applied: tuple[int, ...] = ()
                        ) -> tuple[Snapshot, list[memimage.Buffer]]:
        """`snapshot` with the memory bytes left in pieces (the image's `data` is empty).

        Pieces may be views of linear memory itself, saving a copy of it: they are valid until
        the next call into the app, or `close`.
        """
        if self.failure:
            raise AppError(f"app {self.name} has failed ({self.failure}): its state is not "
                           "consistent and cannot be snapshotted")
        values = tuple(GlobalValue(gname, gtype, handle.value(self._store))
                       for gname, gtype, handle in self._globals)
        memory, pieces = memimage.capture_pieces(self._live_memory())
        return Snapshot(app=self.name, module=self.module.sha256, memory=memory,
                        globals=values, host=self.host, epoch=epoch, seq=seq,
                        taken_ms=int(time.time() * 1000), applied=applied), pieces

    def restore(self, snap: Snapshot, pieces: Sequence[memimage.Buffer] | None = None) -> None:
        """Continue from `snap` in this fresh instance (instead of `start`).

        `pieces` are its memory bytes, in order, when they travelled apart from it (chunks).
        """
        if snap.module != self.module.sha256:
            raise SnapshotError(f"snapshot is of module {snap.module[:12]}, not "
                                f"{self.module.sha256[:12]}; refusing to restore it")
        if self.initialized or self.delivered:
            raise SnapshotError(f"app {self.name} has already run; restore into a new instance")
        expected = {(gname, gtype) for gname, gtype, _ in self._globals}
        got = {(g.name, g.type) for g in snap.globals}
        if expected != got:
            raise SnapshotError("snapshot globals do not match the module's")
        memimage.check(snap.memory, self.limits.memory_bytes, pieces)
        self._set_memory_size(snap.memory.size)
        try:
            memimage.restore_into(snap.memory, self._live_memory(), self.limits.memory_bytes,
                                  pieces)
        except SnapshotError as exc:
            self.failure = f"a restore failed half-way: {exc}"
            raise
        handles = {gname: handle for gname, _, handle in self._globals}
        for value in snap.globals:
            handles[value.name].set_value(self._store, value.value)
        host = snap.host
        self.initialized, self.delivered, self.published = (host.initialized, host.delivered,
                                                            host.published)
        self.ticks, self.next_tick_ms = host.ticks, host.next_tick_ms

    def _live_memory(self) -> memoryview:
        """A view of linear memory itself. Valid until the next call into the app."""
        size = self._memory.data_len(self._store)
        base = ctypes.addressof(self._memory.data_ptr(self._store).contents)
        return memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")

    def _set_memory_size(self, size: int) -> None:
        page = 65536
        current = self._memory.data_len(self._store)
        if size % page or size < current:
            raise SnapshotError(f"snapshot memory of {size} bytes cannot replace this module's "
                                f"{current} bytes")
        if size > current:
            try:
                self._memory.grow(self._store, (size - current) // page)
            except wasmtime.WasmtimeError as exc:
                raise SnapshotError(f"cannot grow memory to {size} bytes: "
                                    f"{abi.first_line(str(exc))}") from None
