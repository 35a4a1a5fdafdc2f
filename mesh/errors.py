"""The exceptions liquid-mesh raises: one root, one subclass per concern."""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error liquid-mesh raises on purpose. The message is one line, for people."""


class WireError(MeshError, ValueError):
    """Bytes from a peer (CBOR or JSON) that do not decode into a valid wire object."""


class ModuleError(MeshError, ValueError):
    """A module that is invalid, breaks the app ABI, or whose state cannot be captured."""


class AppError(MeshError):
    """A running app failed: it trapped, ran out of time or memory, or broke the ABI at run time.

    `trap` holds the runtime's own description when there is one.
    """

    def __init__(self, message: str, *, trap: str | None = None) -> None:
        super().__init__(message)
        self.trap = trap


class SnapshotError(MeshError, ValueError):
    """A snapshot that is corrupt, truncated, or taken from another module."""


class SnapshotIncomplete(SnapshotError):
    """A snapshot's memory chunks are not all its own yet (some are of an older one)."""


class ConfigError(MeshError, ValueError):
    """A device profile or option that is malformed or contradicts itself."""


class BrokerError(MeshError):
    """The broker cannot be reached, refused us, or dropped the connection."""


class TrustError(MeshError):
    """A record that is not signed by whom it must be, by a key the mesh has not admitted (or
    has revoked), or that is expired or replayed."""


class Revoked(TrustError):
    """A record genuinely signed by a device that was revoked since: not acted on, but not
    garbage either (a checkpoint of it is state the mesh once accepted)."""


class NotAdmitted(TrustError):
    """A record signed by a device this node has not seen admitted (yet: its admission may be
    on its way, and the record is checked again when it comes)."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(message)
        self.device = device
