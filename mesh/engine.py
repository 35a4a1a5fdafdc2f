"""The wasmtime engine apps are compiled for, and the fingerprint of what compiled code depends on.

The engine enables the WebAssembly features an app may use and turns off those whose state a
snapshot could not carry. `engine_fingerprint` names everything a compiled module depends on
(wasmtime's version, these settings, the version of `mesh.wasmbin`'s rewriting): the
compiled-module cache keeps code apart by it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Any

import wasmtime

_ENGINE_SETTINGS: dict[str, Any] = {
    "epoch_interruption": True,
    "cranelift_opt_level": "speed",
    "wasm_simd": True,
    "wasm_relaxed_simd": True,
    "wasm_relaxed_simd_deterministic": True,
    "wasm_bulk_memory": True,
    "wasm_reference_types": True,
    "wasm_multi_value": True,
    "wasm_tail_call": True,
    # Off: state these bring (threads, several memories, exceptions, GC heaps) cannot be captured.
    "wasm_threads": False,
    "shared_memory": False,
    "wasm_multi_memory": False,
    "wasm_memory64": False,
    "wasm_exceptions": False,
    "wasm_gc": False,
    "wasm_function_references": False,
    "wasm_wide_arithmetic": False,
    "wasm_custom_page_sizes": False,
    "wasm_stack_switching": False,
    "wasm_component_model": False,
}
_INSTRUMENT_VERSION = 1


def engine_fingerprint() -> str:
    """What compiled code depends on: wasmtime's version, engine settings, our rewriting."""
    text = repr((importlib.metadata.version("wasmtime"), sorted(_ENGINE_SETTINGS.items()),
                 _INSTRUMENT_VERSION))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    for name, value in _ENGINE_SETTINGS.items():
        setattr(config, name, value)
    return wasmtime.Engine(config)
