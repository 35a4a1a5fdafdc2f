"""The wire format: frozen value types for everything nodes exchange, and their strict codec.

Every top-level object travels as a CBOR map with a version field `v` and a `kind`. Decoding is
strict: a payload-length cap per kind, a nesting cap, no indefinite lengths or duplicate keys,
only plain CBOR types, and each field checked against its declared type and size (that generic
part is `mesh.schema`). Every failure is one `WireError` whose message says what is wrong and
where. Commands are also accepted as JSON, so that `mosquitto_pub -m '{"op": ...}'` works.

Pure code: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import cbor2

from mesh import schema
from mesh.errors import WireError

WIRE_VERSION = 1

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Epochs and checkpoint sequence numbers stay below this (the largest integer JSON tools read
# exactly), so the next one is always valid: a record at or past it is refused, never adopted.
MAX_EPOCH = (1 << 53) - 1
OPS = frozenset({"deploy", "stop", "migrate", "send", "restart", "apps", "nodes", "ping"})

T = TypeVar("T")


def check_name(what: str, value: str | None) -> None:
    if value is not None and not NAME_RE.fullmatch(value):
        raise WireError(f"{what} {value!r} is not a valid name "
                        "(1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit)")


def _check_sha256(what: str, value: str) -> None:
    if not SHA256_RE.fullmatch(value):
        raise WireError(f"{what} must be 64 lowercase hex digits (a sha256), got {value!r}")


def _check_filter(sub: str) -> None:
    """An MQTT topic filter: '+' alone in a level, '#' alone and last."""
    levels = sub.split("/")
    if not sub or "\0" in sub or any(
            ("+" in level and level != "+") or ("#" in level and level != "#")
            for level in levels) or "#" in levels[:-1]:
        raise WireError(f"{sub!r} is not a valid MQTT topic filter")


def _check_counter(what: str, value: int) -> None:
    if not 0 <= value < MAX_EPOCH:
        raise WireError(f"{what} must be from 0 to {MAX_EPOCH - 1}, got {value}")


def _check_nonnegative(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise WireError(f"{name} must not be negative, got {value}")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node's retained membership record: who it is, what it offers, what it hosts."""

    KIND: ClassVar[str] = "node"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    id: str
    caps: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    apps: tuple[str, ...] = ()
    broker: str | None = None
    load: float = 0.0
    started_ms: int = 0
    leaving: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # apps failed here, and why

    def __post_init__(self) -> None:
        check_name("node id", self.id)
        for app in (*self.apps, *self.failed):
            check_name("app", app)


@dataclass(frozen=True, slots=True)
class AppSpec:
    """The desired state of one app, retained at `mesh/apps/<app>/spec`."""

    KIND: ClassVar[str] = "spec"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    app: str
    module: str
    requires: tuple[str, ...] = ()
    prefers: dict[str, str] = field(default_factory=dict)
    pin: str | None = None
    tick_ms: int = 0
    checkpoint_ms: int = 0
    checkpoint_every: int = 0
    memory_limit: int = 64 * 1024 * 1024
    timeout_ms: int = 1000
    subscriptions: tuple[str, ...] = ()
    # Ed25519 signature of the module's sha256 by a trusted deployer. Carried now so that
    # verification can be switched on later without a wire change; not checked yet.
    signature: bytes | None = None

    def __post_init__(self) -> None:
        check_name("app", self.app)
        _check_sha256("module", self.module)
        check_name("pin", self.pin)
        _check_nonnegative(tick_ms=self.tick_ms, checkpoint_ms=self.checkpoint_ms,
                           checkpoint_every=self.checkpoint_every)
        if not 65536 <= self.memory_limit <= 1 << 32:
            raise WireError(f"memory_limit must be from one page (65536) to 4 GiB, "
                            f"got {self.memory_limit}")
        if not 0 < self.timeout_ms <= 60_000:
            raise WireError(f"timeout_ms must be from 1 to 60000, got {self.timeout_ms}")
        if 0 < self.tick_ms < 10:
            raise WireError(f"tick_ms must be 0 (no ticks) or at least 10, got {self.tick_ms}")
        for sub in self.subscriptions:
            _check_filter(sub)


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """Who runs an app. A new owner bumps the epoch; a lower epoch is stale."""

    KIND: ClassVar[str] = "owner"
    MAX_BYTES: ClassVar[int] = 4096
    node: str
    epoch: int
    # The sequence number of the checkpoint the owner went on from (0: it started fresh). A
    # node that can find no checkpoint that new does not start the app over: that is an alarm.
    seq: int = 0

    def __post_init__(self) -> None:
        check_name("node", self.node)
        _check_counter("epoch", self.epoch)
        _check_counter("seq", self.seq)


@dataclass(frozen=True, slots=True)
class Manifest:
    """Describes a large blob (module or snapshot memory) sent as raw numbered chunks."""

    KIND: ClassVar[str] = "manifest"
    MAX_BYTES: ClassVar[int] = 4096
    sha256: str
    size: int
    chunk_size: int
    count: int
    signature: bytes | None = None  # Ed25519 over sha256; not checked yet (see AppSpec)
    first: int = 0  # chunk topics are <base>/<first + i>

    def __post_init__(self) -> None:
        _check_sha256("sha256", self.sha256)
        _check_nonnegative(first=self.first)
        if self.chunk_size <= 0 or self.size < 0:
            raise WireError("manifest sizes must be positive")
        if self.count != -(-self.size // self.chunk_size):
            raise WireError(f"manifest count {self.count} does not match size {self.size} "
                            f"in chunks of {self.chunk_size}")


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """Linear memory, sparse: only runs of non-zero blocks are kept, zstd-compressed together.

    A large image travels with `data` empty and `external` describing the chunks it was cut into
    (published next to the snapshot, see `mesh.chunks`).
    """

    size: int
    block_size: int
    runs: tuple[tuple[int, int], ...]
    data: bytes
    external: Manifest | None = None
    codec: str = "zstd"  # or "raw" for data that does not compress

    def __post_init__(self) -> None:
        if self.codec not in ("zstd", "raw"):
            raise WireError(f"unknown memory codec {self.codec!r}")


@dataclass(frozen=True, slots=True)
class GlobalValue:
    """The value of one mutable global, by the export name the host reaches it under."""

    name: str
    type: str
    value: int | float

    def __post_init__(self) -> None:
        if self.type not in ("i32", "i64", "f32", "f64"):
            raise WireError(f"global {self.name!r} has unsupported type {self.type!r}")


@dataclass(frozen=True, slots=True)
class HostState:
    """What the host keeps for an app between calls."""

    initialized: bool = False
    delivered: int = 0
    published: int = 0
    ticks: int = 0
    next_tick_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An app's complete state between two calls, plus where it came from."""

    KIND: ClassVar[str] = "snapshot"
    MAX_BYTES: ClassVar[int] = 1 << 30
    app: str
    module: str
    memory: MemoryImage
    globals: tuple[GlobalValue, ...] = ()
    host: HostState = field(default_factory=HostState)
    epoch: int = 0
    seq: int = 0
    taken_ms: int = 0
    applied: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_name("app", self.app)
        _check_sha256("module", self.module)
        _check_counter("epoch", self.epoch)
        _check_counter("seq", self.seq)

    @property
    def version(self) -> tuple[int, int]:
        """How new this checkpoint is: a later one has a higher (epoch, seq)."""
        return self.epoch, self.seq


@dataclass(frozen=True, slots=True)
class Command:
    """A control request on `mesh/cmd` or `mesh/nodes/<node>/cmd`."""

    KIND: ClassVar[str] = "cmd"
    MAX_BYTES: ClassVar[int] = 1 << 20
    op: str
    id: str | None = None
    app: str | None = None
    to: str | None = None
    spec: AppSpec | None = None
    payload: bytes | None = None
    topic: str | None = None
    fresh: bool = False  # restart: from the app's first start, its state dropped

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise WireError(f"unknown op {self.op!r} (known: {', '.join(sorted(OPS))})")
        check_name("id", self.id)
        check_name("app", self.app)
        check_name("to", self.to)
        if self.topic is not None and (len(self.topic) > 256 or any(
                c in self.topic for c in "+#\0") or "//" in self.topic or
                self.topic.startswith("/")):
            raise WireError(f"topic {self.topic[:40]!r} is not a valid sub-topic")
        needs_app = self.op in ("deploy", "stop", "migrate", "send", "restart")
        if needs_app and self.app is None and self.spec is None:
            raise WireError(f"op {self.op!r} needs an app")
        if self.op == "migrate" and self.to is None:
            raise WireError("op 'migrate' needs 'to', the target node")
        if self.op == "deploy" and self.spec is None:
            raise WireError("op 'deploy' needs a spec")


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a command, on `mesh/replies/<id>`."""

    KIND: ClassVar[str] = "reply"
    MAX_BYTES: ClassVar[int] = 4 << 20
    id: str
    ok: bool
    error: str | None = None
    result: Any = None


EventKind = Literal["joined", "left", "peer-left", "deployed", "unplaceable", "started",
                    "migrating", "migrated", "failed-over", "fenced", "failed", "stopped",
                    "rejected", "dead-letter", "restarted"]


@dataclass(frozen=True, slots=True)
class MeshRecord:
    """Retained at `<root>/mesh` by the first node of a mesh: a broker without it has lost its
    store (or never had one), and nodes give it back what they hold."""

    KIND: ClassVar[str] = "mesh"
    MAX_BYTES: ClassVar[int] = 4096
    id: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class Tombstone:
    """Retained at `<root>/apps/<app>/stopped` when an app is stopped (cleared when it is
    deployed again): a node back with the app's spec from before the stop does not give it
    back to a broker that lost its store and was rebuilt meanwhile."""

    KIND: ClassVar[str] = "stopped"
    MAX_BYTES: ClassVar[int] = 4096
    app: str
    stopped_ms: int

    def __post_init__(self) -> None:
        check_name("app", self.app)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input (or tick) the app could not take, retained at `<root>/apps/<app>/dead/<n>`."""

    KIND: ClassVar[str] = "dead-letter"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    app: str
    reason: str
    topic: str  # as the app saw it; "" for its bare input topic; "(tick)" for a tick
    payload: bytes  # its first 4 KiB
    size: int
    ts_ms: int

    def __post_init__(self) -> None:
        check_name("app", self.app)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened, on `mesh/events`; `event` is an `EventKind` (a newer node may
    send kinds this one does not know)."""

    KIND: ClassVar[str] = "event"
    MAX_BYTES: ClassVar[int] = 64 * 1024
    event: str
    ts_ms: int
    node: str | None = None
    app: str | None = None
    reason: str | None = None
    detail: dict[str, str | int | float | bool | None] = field(default_factory=dict)


WireObject = (NodeRecord | AppSpec | OwnerRecord | Snapshot | Manifest | Command | Reply | Event
              | DeadLetter | MeshRecord | Tombstone)
_TOP_LEVEL: dict[str, type[Any]] = {
    cls.KIND: cls for cls in (NodeRecord, AppSpec, OwnerRecord, Snapshot, Manifest, Command,
                              Reply, Event, DeadLetter, MeshRecord, Tombstone)
}


# --- encoding ----------------------------------------------------------------------------------

class Kinded(Protocol):
    """A top-level record type (here, or another module's, e.g. `mesh.trust`'s)."""

    KIND: ClassVar[str]


def to_plain(obj: Kinded) -> dict[str, Any]:
    """The object as plain data with its version and kind, ready for CBOR or JSON."""
    plain: dict[str, Any] = {"v": WIRE_VERSION, "kind": obj.KIND}
    plain.update(schema.as_plain(obj))
    return plain


def encode(obj: Kinded) -> bytes:
    """CBOR bytes for a top-level wire object."""
    return cbor2.dumps(to_plain(obj))


def encode_json(obj: Kinded) -> bytes:
    """JSON bytes for a wire object (bytes fields must hold UTF-8 text)."""
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("utf-8", "backslashreplace")
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")
    return json.dumps(to_plain(obj), default=default, separators=(",", ":")).encode()


# --- decoding ----------------------------------------------------------------------------------

def _top_level(cls: type[T], plain: Any, from_json: bool) -> T:
    kind: str = cls.KIND  # type: ignore[attr-defined]
    if not isinstance(plain, dict):
        raise WireError(f"{kind}: expected a map, got {type(plain).__name__}")
    version = plain.get("v", WIRE_VERSION if from_json else None)
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError(f"{kind}: missing or invalid version field 'v'")
    if version > WIRE_VERSION:
        raise WireError(f"{kind}: wire version {version} is newer than this node's "
                        f"{WIRE_VERSION}; upgrade liquid-mesh")
    if plain.get("kind", kind) != kind:
        raise WireError(f"expected a {kind}, got a {plain.get('kind')!r}")
    return schema.from_plain(cls, plain, kind, from_json)


def decode(cls: type[T], data: bytes) -> T:
    """Decode CBOR bytes into a `cls` (a top-level wire type), or raise one WireError."""
    limit: int = cls.MAX_BYTES  # type: ignore[attr-defined]
    if len(data) > limit:
        raise WireError(f"{cls.KIND}: payload of {len(data)} bytes exceeds "  # type: ignore[attr-defined]
                        f"the limit of {limit}")
    return _top_level(cls, schema.loads_cbor(data), from_json=False)


def decode_command(data: bytes) -> tuple[Command, bool]:
    """Decode a command sent as CBOR or JSON; returns it and whether it came as JSON."""
    if len(data) > Command.MAX_BYTES:
        raise WireError(f"cmd: payload of {len(data)} bytes exceeds the limit of "
                        f"{Command.MAX_BYTES}")
    is_json = data.lstrip()[:1] in (b"{", b"[")
    plain = schema.loads_json(data) if is_json else schema.loads_cbor(data)
    return _top_level(Command, plain, from_json=is_json), is_json


def decode_any(data: bytes) -> WireObject:
    """Decode any top-level wire object by its `kind` field."""
    if len(data) > Snapshot.MAX_BYTES:
        raise WireError(f"payload of {len(data)} bytes exceeds every limit")
    plain = schema.loads_cbor(data)
    kind = plain.get("kind") if isinstance(plain, Mapping) else None
    cls = _TOP_LEVEL.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError(f"unknown or missing kind {kind!r}")
    if len(data) > cls.MAX_BYTES:
        raise WireError(f"{kind}: payload of {len(data)} bytes exceeds the limit of "
                        f"{cls.MAX_BYTES}")
    result: WireObject = _top_level(cls, plain, from_json=False)
    return result
