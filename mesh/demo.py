"""`mesh demo`: an app runs in one process, is snapshotted, and continues in another.

Narrated for someone seeing liquid-mesh for the first time. Every step runs the real `mesh run`
command in its own OS process, exactly as a user would.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import wasmtime

from mesh import wasmbin, wire

FIRST = ["hello", "liquid", "mesh"]
SECOND = ["state", "survives"]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _run(app: Path, *args: str) -> tuple[int, list[str]]:
    """Run `mesh run` in a new process; returns its pid and the lines it printed."""
    command = [sys.executable, "-m", "mesh", "-q", "run", str(app), "--app", "counter", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"mesh demo: a step failed: {err.strip() or out.strip()}")
    return proc.pid, out.splitlines()


def _feed(payloads: list[str]) -> list[str]:
    return [arg for payload in payloads for arg in ("--in", payload)]


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        app = Path(tmp) / "counter.wat"
        app.write_text(resources.files("mesh").joinpath("apps/counter.wat").read_text())
        snap = Path(tmp) / "counter.snapshot"
        wasm = bytes(wasmtime.wat2wasm(app.read_text()))
        hidden = wasmbin.instrument(wasm).globals

        _say("liquid-mesh demo: a running WebAssembly app moves to another process, state intact")
        _say()
        _say("[1] The app: a counter that counts messages and hashes their bytes.")
        _say(f"    module sha256 {hashlib.sha256(wasm).hexdigest()[:16]}..., "
             f"{len(wasm)} bytes; its state is {len(hidden)} mutable globals it does not export.")
        _say("    The host rewrites the module at load time so that a snapshot can reach them.")
        _say()
        _say(f"[2] Process A starts the app and sends it {', '.join(FIRST)}:")
        started = time.monotonic()
        pid, lines = _run(app, *_feed(FIRST), "--snapshot-out", str(snap))
        for line in lines:
            _say(f"      pid {pid} published: {line}")
        taken = wire.decode(wire.Snapshot, snap.read_bytes())
        _say(f"    ...then saves a snapshot and exits: {snap.stat().st_size} bytes for "
             f"{taken.memory.size // 1024} KiB of memory and {len(taken.globals)} globals "
             f"(step took {time.monotonic() - started:.2f}s, most of it starting Python).")
        _say()
        _say(f"[3] Process B, a new process, restores the snapshot and sends {', '.join(SECOND)}:")
        pid_b, resumed = _run(app, "--restore", str(snap), *_feed(SECOND))
        for line in resumed:
            _say(f"      pid {pid_b} published: {line}")
        _say()
        _say("[4] Check: one process that gets all five messages straight through prints:")
        _, straight = _run(app, *_feed(FIRST + SECOND))
        for line in straight[len(FIRST):]:
            _say(f"      {line}")
        if lines + resumed != straight:
            _say("    MISMATCH: the resumed app diverged from the straight run.")
            return 1
        _say("    Identical: the count and hash went on from 3 to 5 across processes; nothing "
             "was lost or applied twice.")
        _say()
        _say("Try it with your own app:  mesh run FILE.wasm --in PAYLOAD --snapshot-out s.cbor")
        _say("                      then mesh run FILE.wasm --restore s.cbor --in MORE")
        return 0
