"""liquid-mesh: move running WebAssembly apps, with their state, between devices.

The app runtime is here; the mesh lives in `mesh.node` (Node, NodeConfig), `mesh.client`
(MeshClient) and `mesh.broker` (EmbeddedBroker), imported on demand: amqtt and paho take a
while to load, and `mesh run` needs neither.
"""

from mesh.errors import AppError, BrokerError, MeshError, ModuleError, SnapshotError, WireError
from mesh.runtime import App, AppIO, AppModule, Limits, LocalIO, Runtime

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
