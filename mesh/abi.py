"""The app ABI: what a module must look like to run here, and what the host gives it.

The contract of DESIGN.md in code: the functions an app may export (`EXPORTS`) and the `mesh`
imports the host provides (`IMPORTS`) with their signatures, the return codes of those imports
(`E_*`), where an app's effects go (`AppIO`, `LocalIO`), what it may use (`Limits`), and
`check_module`, which holds a compiled module to the contract. `first_line` and `trap_reason`
turn wasmtime's messages into the one-line reasons apps fail with.

wasmtime is loaded only by `check_module`, which is handed a compiled module: the command line
uses `Limits` and `LocalIO` without paying for the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mesh.errors import ModuleError

if TYPE_CHECKING:
    import wasmtime

log = logging.getLogger("mesh.runtime")  # where app logs have always gone

# Return codes of the `mesh` imports (also in examples/include/mesh.h).
E_INVALID = -1
E_TOO_LARGE = -2
E_UNKNOWN = -3
E_FAULT = -4
E_FAILED = -5

MAX_TOPIC_BYTES = 256

I32, I64 = "i32", "i64"
Signature = tuple[tuple[str, ...], tuple[str, ...]]
EXPORTS: dict[str, Signature] = {
    "mesh_alloc": ((I32,), (I32,)),
    "mesh_free": ((I32,), ()),
    "_initialize": ((), ()),
    "mesh_init": ((), ()),
    "mesh_on_message": ((I32, I32, I32, I32), ()),
    "mesh_on_tick": ((I64,), ()),
}
IMPORTS: dict[str, Signature] = {
    "publish": ((I32, I32, I32, I32), (I32,)),
    "log": ((I32, I32, I32), ()),
    "now_ms": ((), (I64,)),
    "read": ((I32, I32, I32, I32), (I32,)),
}
WASI = "wasi_snapshot_preview1"


class AppIO(Protocol):
    """Where an app's effects go. Called on the app's thread, during a call into the app."""

    def publish(self, topic: str, payload: bytes) -> None: ...
    def log(self, level: int, message: str) -> None: ...
    def read(self, name: str) -> bytes | None: ...
    def now_ms(self) -> int: ...


@dataclass
class LocalIO:
    """An `AppIO` that keeps publications in a list and logs through `logging`."""

    app: str = "app"
    sensors: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    clock: Callable[[], int] = field(default=lambda: int(time.time() * 1000))

    def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def log(self, level: int, message: str) -> None:
        levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
        log.log(levels[max(0, min(level, 3))], "[%s] %s", self.app, message)

    def read(self, name: str) -> bytes | None:
        source = self.sensors.get(name)
        return None if source is None else source()

    def now_ms(self) -> int:
        return self.clock()


@dataclass(frozen=True, slots=True)
class Limits:
    """What one app may use. Every call is bounded in time; memory is capped per store."""

    memory_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 1.0
    max_publish_bytes: int = 256 * 1024
    max_publishes_per_call: int = 1000
    max_log_bytes: int = 4096


def _signature(ty: wasmtime.FuncType) -> Signature:
    return tuple(str(t) for t in ty.params), tuple(str(t) for t in ty.results)


def _describe(sig: Signature) -> str:
    params, results = sig
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def check_module(module: wasmtime.Module) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """Exports and mutable globals of a module that keeps the app ABI; else ModuleError."""
    import wasmtime  # noqa: PLC0415 - only a caller holding a compiled module needs it

    for imp in module.imports:
        where = f"{imp.module}.{imp.name}"
        if imp.module == WASI:
            continue
        expected = IMPORTS.get(imp.name or "") if imp.module == "mesh" else None
        if expected is None or not isinstance(imp.type, wasmtime.FuncType):
            raise ModuleError(f"imports {where}, which the host does not provide")
        if _signature(imp.type) != expected:
            raise ModuleError(f"imports {where} as {_describe(_signature(imp.type))}, "
                              f"expected {_describe(expected)}")
    exports: dict[str, Any] = {exp.name: exp.type for exp in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise ModuleError("does not export its memory as 'memory'")
    for name, expected in EXPORTS.items():
        ty = exports.get(name)
        if ty is None:
            continue
        if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != expected:
            raise ModuleError(f"exports {name} with the wrong type; expected a function "
                              f"{_describe(expected)}")
    if "mesh_on_message" in exports and "mesh_alloc" not in exports:
        raise ModuleError("exports mesh_on_message but not mesh_alloc, which the host needs "
                          "to pass messages in")
    mutable = tuple((name, str(ty.content)) for name, ty in exports.items()
                    if isinstance(ty, wasmtime.GlobalType) and ty.mutable)
    return frozenset(exports), mutable


def first_line(text: str) -> str:
    """wasmtime's multi-line messages folded into one line of reasonable length."""
    folded = " ".join(text.split()) or "unknown error"
    return folded if len(folded) <= 300 else folded[:297] + "..."


def trap_reason(trap: wasmtime.Trap) -> str:
    """'out of bounds memory access (memory fault at ...) in fill' from wasmtime's trap text."""
    text = trap.message
    causes = [line.strip().split(": ", 1)[-1] for line in text.split("Caused by:", 1)[-1]
              .splitlines() if line.strip()] if "Caused by:" in text else [text]
    reason = causes[-1].removeprefix("wasm trap: ")
    if len(causes) > 1:
        reason += f" ({'; '.join(causes[:-1])})"
    frames = trap.frames
    if frames and frames[0].func_name:
        reason += f" in function {frames[0].func_name}"
    return first_line(reason)
