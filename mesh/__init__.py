"""liquid-mesh: move running WebAssembly apps, with their state, between devices."""

from mesh.errors import AppError, MeshError, ModuleError, SnapshotError, WireError
from mesh.runtime import App, AppIO, AppModule, Limits, LocalIO, Runtime

__all__ = [
    "App",
    "AppError",
    "AppIO",
    "AppModule",
    "Limits",
    "LocalIO",
    "MeshError",
    "ModuleError",
    "Runtime",
    "SnapshotError",
    "WireError",
]
