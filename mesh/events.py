"""A node's event stream (`<root>/events`), and bad input reported at a bounded rate.

Every malformed record, command or input is rejected, but telling the world about each one
would let a flood of garbage turn into a flood of events and log lines on every node: garbage
must cost the sender, not the mesh. A `Limiter` lets through the first report from each source
at once, then at most one per source every `every_s`, and at most `burst` across all sources in
that time; what it holds back is counted and told with the source's next report.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh import wire
from mesh.wire import EventKind

log = logging.getLogger(__name__)


@dataclass
class _Source:
    last: float
    held: int = 0


class Limiter:
    def __init__(self, every_s: float = 10.0, burst: int = 20, max_sources: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.burst = burst
        self.max_sources = max_sources
        self.held = 0  # held back in all
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._window = -every_s
        self._told = 0

    def admit(self, source: str) -> int | None:
        """None: hold this report back (it is counted). Else report it now, saying that this
        many from the same source were held back before it."""
        now = self._clock()
        if now - self._window >= self.every_s:
            self._window, self._told = now, 0
        entry = self._sources.get(source)
        if (entry is not None and now - entry.last < self.every_s) or self._told >= self.burst:
            if entry is None:
                entry = self._remember(source, _Source(-self.every_s))
            entry.held += 1
            self.held += 1
            return None
        self._told += 1
        held = entry.held if entry else 0
        self._remember(source, _Source(now))
        return held

    def _remember(self, source: str, entry: _Source) -> _Source:
        self._sources[source] = entry
        self._sources.move_to_end(source)
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return entry


class Events:
    """Publishes events (fire and forget) and logs them; rejections of bad input go through a
    `Limiter`, per source (`detail["source"]`, else the app)."""

    def __init__(self, node_id: str, send: Callable[[bytes], None]) -> None:
        self.node_id = node_id
        self._send = send
        self.rejections = Limiter()

    def __call__(self, kind: EventKind, *, app: str | None = None, reason: str | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        if kind == "rejected":
            source = str((detail or {}).get("source") or app or "-")
            held = self.rejections.admit(source)
            if held is None:
                return
            log.warning("rejected %s%s", reason, f" ({held} more held back)" if held else "")
            if held:
                detail = {**(detail or {}), "held_back": held}
        event = wire.Event(event=kind, ts_ms=int(time.time() * 1000), node=self.node_id,
                           app=app, reason=reason, detail=detail or {})
        log.debug("event %s", event)
        self._send(wire.encode(event))
