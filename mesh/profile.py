"""Device profiles (TOML in `devices/`), sensor sources, and a device's lasting identity.

A profile says what a device is: its id (else one is generated once and kept in the state
directory), labels and capabilities for placement, the sensors behind `mesh.read`, limits on
what one app may use here, and optionally the broker. Every field is optional, so `mesh node`
with no profile and no arguments is a device too.

    id = "kitchen-display"
    caps = ["display", "temperature"]
    [labels]
    room = "kitchen"
    [limits]
    app_memory_mb = 128
    [sensors.temperature]
    source = "simulated"    # or "file" (path = ...) or "command" (command = [...])
"""

from __future__ import annotations

import math
import os
import random
import re
import secrets
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.store import StateStore
from mesh.wire import NAME_RE

NODE_ID = NAME_RE  # a node id names topics and its state directory: no "..", no "/"
MAX_READING_BYTES = 4096
COMMAND_TIMEOUT_S = 2.0

Sensor = Callable[[], bytes]


HOSTED_BROKERS = ("auto", "mosquitto", "amqtt")  # which broker a device hosts (auto: the best)

@dataclass(frozen=True)
class Profile:
    """What a device profile says; defaults describe a plain device."""

    id: str | None = None
    caps: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    sensors: dict[str, Sensor] = field(default_factory=dict)
    broker: str | None = None
    state_dir: Path | None = None
    keepalive: int | None = None
    app_memory_bytes: int | None = None  # the most memory one app may have here
    call_timeout_ms: int | None = None  # the longest one call into an app may run here
    token: str | None = None  # a join token (`mesh admit --token`), redeemed on the first start
    insecure: bool = False  # with no admission: an open mesh (else: wait to be admitted)
    hosted_broker: str | None = None  # one of HOSTED_BROKERS (see `mesh.device`)


def load(path: Path) -> Profile:
    """Read and check a profile; any mistake is a ConfigError naming the file and the key."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read profile {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"profile {path} is not valid TOML: {exc}") from None
    try:
        return parse(data, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"profile {path}: {exc}") from None


def parse(data: dict[str, Any], base: Path = Path()) -> Profile:
    """A profile from decoded TOML; relative file paths are taken from `base`."""
    _only(data, "", {"id", "caps", "labels", "sensors", "broker", "state_dir", "keepalive",
                     "limits", "token", "insecure", "hosted_broker"})
    node_id = _get(data, "id", str)
    if node_id is not None and not NODE_ID.fullmatch(node_id):
        raise ConfigError(f"id {node_id!r} must be 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    caps = _get(data, "caps", list) or []
    if not all(isinstance(cap, str) and cap for cap in caps):
        raise ConfigError("caps must be a list of names")
    labels = _get(data, "labels", dict) or {}
    if not all(isinstance(value, str) for value in labels.values()):
        raise ConfigError("labels must map names to strings")
    limits = _get(data, "limits", dict) or {}
    _only(limits, "limits.", {"app_memory_mb", "call_timeout_ms"})
    memory_mb = _get(limits, "app_memory_mb", int, "limits.")
    timeout_ms = _get(limits, "call_timeout_ms", int, "limits.")
    keepalive = _get(data, "keepalive", int)
    for name, value in (("limits.app_memory_mb", memory_mb), ("limits.call_timeout_ms",
                                                             timeout_ms), ("keepalive", keepalive)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive")
    state_dir = _get(data, "state_dir", str)
    hosted = _get(data, "hosted_broker", str)
    if hosted is not None and hosted not in HOSTED_BROKERS:
        raise ConfigError(f"hosted_broker must be one of {', '.join(HOSTED_BROKERS)}, not "
                          f"{hosted!r}")
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"insecure must be true or false, not {type(insecure).__name__}")
    sensors = {name: sensor(name, spec, base)
               for name, spec in (_get(data, "sensors", dict) or {}).items()}
    return Profile(id=node_id, caps=tuple(caps), labels=dict(labels), sensors=sensors,
                   broker=_get(data, "broker", str),
                   state_dir=Path(state_dir) if state_dir else None, keepalive=keepalive,
                   app_memory_bytes=memory_mb << 20 if memory_mb else None,
                   call_timeout_ms=timeout_ms, token=_get(data, "token", str),
                   insecure=insecure, hosted_broker=hosted)


def sensor(name: str, spec: Any, base: Path = Path()) -> Sensor:
    """The reading function of `[sensors.<name>]`."""
    where = f"sensors.{name}."
    if not isinstance(spec, dict):
        raise ConfigError(f"sensors.{name} must be a table")
    match spec.get("source"):
        case "simulated":
            _only(spec, where, {"source", "min", "max", "period_s", "seed"})
            low = float(_get(spec, "min", (int, float), where) or 0.0)
            high = float(_get(spec, "max", (int, float), where) or 1.0)
            period = float(_get(spec, "period_s", (int, float), where) or 600.0)
            if high < low or period <= 0:
                raise ConfigError(f"{where}min must not exceed max, period_s must be positive")
            return simulated(low, high, period, _get(spec, "seed", int, where) or 0)
        case "file":
            _only(spec, where, {"source", "path"})
            path = _get(spec, "path", str, where)
            if not path:
                raise ConfigError(f"{where}path is required for a file sensor")
            return from_file(base / path)
        case "command":
            _only(spec, where, {"source", "command", "cache_ms"})
            argv = _get(spec, "command", list, where)
            if not argv or not all(isinstance(arg, str) for arg in argv):
                raise ConfigError(f"{where}command must be a list of strings")
            return from_command(argv, (_get(spec, "cache_ms", int, where) or 1000) / 1000)
        case other:
            raise ConfigError(f"{where}source must be simulated, file or command, "
                              f"not {other!r}")


def simulated(low: float, high: float, period_s: float, seed: int = 0) -> Sensor:
    """A reading that drifts between `low` and `high` over `period_s`, with a little noise."""
    noise = random.Random(seed)
    phase = noise.random() * 2 * math.pi

    def read() -> bytes:
        wave = (math.sin(2 * math.pi * time.time() / period_s + phase) + 1) / 2
        jitter = (noise.random() - 0.5) * (high - low) * 0.02
        value = min(high, max(low, low + wave * (high - low) + jitter))
        return f"{value:.2f}".encode()
    return read


def from_file(path: Path) -> Sensor:
    """The first bytes of a file, read anew each time (sysfs and the like), trimmed."""
    def read() -> bytes:
        with path.open("rb") as source:
            return source.read(MAX_READING_BYTES).strip()
    return read


def from_command(argv: list[str], cache_s: float) -> Sensor:
    """What a command prints, run at most once per `cache_s` (apps may read often)."""
    lock = threading.Lock()
    last: list[tuple[float, bytes]] = []

    def read() -> bytes:
        with lock:
            if last and time.monotonic() - last[0][0] < cache_s:
                return last[0][1]
            done = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S,
                                  check=True, stdin=subprocess.DEVNULL)
            value = done.stdout[:MAX_READING_BYTES].strip()
            last[:] = [(time.monotonic(), value)]
            return value
    return read


def default_state_dir(node_id: str | None) -> Path:
    """Where a device keeps its identity, modules and compiled code."""
    if "MESH_STATE_DIR" in os.environ:
        base = Path(os.environ["MESH_STATE_DIR"])
    elif os.geteuid() == 0:
        base = Path("/var/lib/liquid-mesh")
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        base = base / "liquid-mesh"
    return base / (node_id or "device")


def identity(state_dir: Path, configured: str | None) -> str:
    """The node id: the configured one, else the one this device chose on its first start."""
    if configured is not None:
        if not NODE_ID.fullmatch(configured):
            raise ConfigError(f"node id {configured!r} must be 1-64 letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit")
        return configured
    path = StateStore(state_dir).node_id_file
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if NODE_ID.fullmatch(kept):
        return kept
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]).strip("-_.")
    chosen = f"{host[:50] or 'device'}-{secrets.token_hex(3)}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fresh = path.with_name("node-id.tmp")
        fresh.write_text(chosen + "\n")
        fresh.replace(path)
    except OSError as exc:
        raise ConfigError(f"cannot keep the node id in {path}: {exc.strerror}") from None
    return chosen


def _only(table: dict[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(allowed))})")


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...],
         where: str = "") -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}{key} must be a {names}, not {type(value).__name__}")
    return value
