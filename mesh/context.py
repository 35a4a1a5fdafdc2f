"""What a hosted app needs from its node, and where its effects go.

`HostContext` is the node's side of a hosted app: the runtime, the broker, the topic tree, this
device's caps on what one app may use, and where its events, lost sessions and stored
checkpoints are reported. `AppHostIO` collects an app's publications on its worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mesh import wire
from mesh.abi import LocalIO
from mesh.mqtt import BrokerAddress
from mesh.topics import Topics
from mesh.transfer import PLAIN, Sealing
from mesh.wire import EventKind

if TYPE_CHECKING:
    from mesh.hosted import HostedApp
    from mesh.runtime import Runtime


@dataclass
class AppHostIO(LocalIO):
    """Where a hosted app's effects go; called on its worker thread.

    Publications are collected during a job on the worker and handed to the event loop in one
    go when it ends (`flush`): one wake-up of the loop per batch of inputs, not per output.
    """

    loop: asyncio.AbstractEventLoop = field(kw_only=True)
    send: Callable[[list[tuple[str, bytes]]], None] = field(kw_only=True)
    pending: list[tuple[str, bytes]] = field(default_factory=list)
    muted: bool = False  # replaying what was published already

    def publish(self, topic: str, payload: bytes) -> None:
        if not self.muted:
            self.pending.append((topic, payload))

    def flush(self) -> None:
        if self.pending:
            self.loop.call_soon_threadsafe(self.send, self.pending)
            self.pending = []


class EventSink(Protocol):
    """Where a hosted app reports what happens to it (the node's event stream)."""

    def __call__(self, kind: EventKind, *, app: str | None = None, reason: str | None = None,
                 detail: dict[str, Any] | None = None) -> None: ...


@dataclass
class HostContext:
    """What a hosted app needs from its node."""

    runtime: Runtime
    broker: BrokerAddress
    topics: Topics
    keepalive: int
    sensors: dict[str, Callable[[], bytes]]
    event: EventSink
    lost: Callable[[HostedApp, str], None]
    app_memory_bytes: int | None = None  # this device's caps on what one app may use
    call_timeout_ms: int | None = None
    kept: Callable[[wire.Snapshot], None] = lambda snap: None  # a checkpoint was stored
    sealing: Sealing = PLAIN  # how checkpoints are signed and encrypted
    session_id: Callable[[str], str] | None = None  # an app's session's client id (else
    # `Topics.app_session`)
