"""liquid-mesh: move running WebAssembly apps, with their state, between devices.

The app runtime is here (`App`, `Runtime`, ... from `mesh.runtime` and `mesh.abi`); the mesh lives
in `mesh.node` (Node, NodeConfig), `mesh.client` (MeshClient) and `mesh.broker` (EmbeddedBroker).
All of it is imported on demand: wasmtime, amqtt and paho take a while to load, and the client
commands need no wasmtime, `mesh run` no amqtt or paho.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mesh.errors import AppError, BrokerError, MeshError, ModuleError, SnapshotError, WireError

if TYPE_CHECKING:
    from mesh.abi import AppIO, Limits, LocalIO
    from mesh.runtime import App, AppModule, Runtime

__all__ = [
    "App",
    "AppError",
    "AppIO",
    "AppModule",
    "BrokerError",
    "Limits",
    "LocalIO",
    "MeshError",
    "ModuleError",
    "Runtime",
    "SnapshotError",
    "WireError",
]

# Names this package gives on first use, and the module each comes from.
_LAZY = {"App": "mesh.runtime", "AppModule": "mesh.runtime", "Runtime": "mesh.runtime",
         "AppIO": "mesh.abi", "Limits": "mesh.abi", "LocalIO": "mesh.abi"}


def __getattr__(name: str) -> Any:  # PEP 562
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
