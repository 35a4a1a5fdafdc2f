"""A device's state directory: the one place that knows its layout.

- `node-id`: the id the device chose on its first start (`mesh.profile.identity`);
- `modules/<sha256>.wasm`: modules it ran, so it needs the broker's store only once each;
- `compiled/`: the runtime's cache of compiled modules;
- `specs/<app>.cbor`: the app specs it knows;
- `apps/<app>.cbor`: the newest checkpoint of each app it runs (written at most every few
  seconds);
- `mesh.cbor`: the mesh's marker on the last broker it joined (a broker with another one, or
  none, is not the store this device's state was kept for).

The embedded broker keeps nothing across a restart: a device that starts and finds a broker
holding no apps at all gives it the specs and checkpoints back (see `mesh.recovery`); a broker
that has apps is the mesh's memory and wins. Files are wire-encoded; a damaged one is logged and
skipped.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mesh import trust, wire
from mesh.errors import WireError

log = logging.getLogger(__name__)


class StateStore:
    """The mesh state kept under a device's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.node_id_file = state_dir / "node-id"
        self.specs_dir = state_dir / "specs"
        self.apps_dir = state_dir / "apps"
        self.modules_dir = state_dir / "modules"
        self.compiled_dir = state_dir / "compiled"
        self.marker_file = state_dir / "mesh.cbor"

    def module(self, sha256: str) -> bytes | None:
        """The module with this hash if this device has it (and it is intact)."""
        try:
            wasm = (self.modules_dir / f"{sha256}.wasm").read_bytes()
        except OSError:
            return None
        return wasm if hashlib.sha256(wasm).hexdigest() == sha256 else None

    def has_module(self, sha256: str) -> bool:
        return (self.modules_dir / f"{sha256}.wasm").exists()

    def save_module(self, sha256: str, wasm: bytes) -> None:
        _write(self.modules_dir / f"{sha256}.wasm", wasm)

    def save_spec(self, app: str, payload: bytes) -> None:
        """Keep an app's spec as it came (signed, in a secure mesh)."""
        _write(self.specs_dir / f"{app}.cbor", payload)

    def forget_spec(self, app: str) -> None:
        (self.specs_dir / f"{app}.cbor").unlink(missing_ok=True)

    def save_checkpoint(self, snap: wire.Snapshot) -> None:
        """Keep `snap` (its memory held in it, not in chunks) as the app's newest here."""
        _write(self.apps_dir / f"{snap.app}.cbor", wire.encode(snap))

    def forget_checkpoint(self, app: str) -> None:
        (self.apps_dir / f"{app}.cbor").unlink(missing_ok=True)

    def save_marker(self, marker: wire.MeshRecord) -> None:
        if self.marker() != marker:
            try:
                _write(self.marker_file, wire.encode(marker))
            except OSError as exc:  # the state kept stays the mesh's; only a wipe goes unseen
                log.warning("cannot keep the mesh's marker in %s: %s", self.marker_file, exc)

    def marker(self) -> wire.MeshRecord | None:
        try:
            return wire.decode(wire.MeshRecord, self.marker_file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, WireError) as exc:
            log.warning("skipping %s: %s", self.marker_file, exc)
            return None

    def specs(self) -> dict[str, tuple[wire.AppSpec, bytes]]:
        """Each app's spec, and its bytes as they came."""
        return {spec.app: (spec, payload) for spec, payload in _read_all(
            self.specs_dir, lambda data: wire.decode(wire.AppSpec, trust.plain(data)))}

    def checkpoints(self) -> dict[str, wire.Snapshot]:
        return {snap.app: snap for snap, _ in _read_all(
            self.apps_dir, lambda data: wire.decode(wire.Snapshot, data))}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp",
                                     delete=False) as fresh:
        fresh.write(data)
    Path(fresh.name).replace(path)


T = TypeVar("T", wire.AppSpec, wire.Snapshot)


def _read_all(folder: Path, decode: Callable[[bytes], T]) -> list[tuple[T, bytes]]:
    """Each file's record and bytes; a damaged or misplaced one is logged and skipped."""
    found = []
    for path in sorted(folder.glob("*.cbor")):
        try:
            data = path.read_bytes()
            value = decode(data)
        except (OSError, WireError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if path.stem != value.app:
            log.warning("skipping %s: it holds app %r", path, value.app)
            continue
        found.append((value, data))
    return found
