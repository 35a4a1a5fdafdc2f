"""An on-disk cache of compiled modules, so a restart does not compile again.

Entries are keyed by the module's sha256 and by a fingerprint of everything that makes compiled
code valid: the wasmtime version, the engine settings and the version of our module rewriting.
Files are written atomically; an entry wasmtime refuses is dropped and compiled again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import wasmtime

log = logging.getLogger(__name__)


class ModuleCache:
    """Compiled modules in `directory`, one file per (sha256, fingerprint)."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}-{self.fingerprint}.cwasm"

    def get(self, engine: wasmtime.Engine, sha256: str) -> wasmtime.Module | None:
        path = self.path(sha256)
        if not path.exists():
            return None
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError as exc:
            log.warning("dropping unusable cache entry %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, sha256: str, module: wasmtime.Module) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(module.serialize())
            os.replace(tmp, self.path(sha256))
        except OSError as exc:
            log.warning("cannot cache compiled module %s: %s", sha256[:12], exc)
