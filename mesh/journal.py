"""What an app applied since its last checkpoint, on top of that checkpoint's state.

A call that traps or hits a limit leaves the instance half-way through an update, so the
instance is refused from then on. The journal lets the host take that call back: a new instance
restored from the checkpoint (or started fresh, if there is none yet) with everything applied
since replayed into it, except the call that failed. Pure bookkeeping; the replay runs on the
app's worker thread like any other call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.runtime import App
from mesh.snapshot import Buffer
from mesh.wire import Snapshot

MAX_JOURNAL_BYTES = 4 << 20  # past this much input, the host checkpoints (and so clears it)


@dataclass(frozen=True, slots=True)
class Tick:
    """A tick due now, queued with the inputs."""

    now_ms: int
    next_ms: int


@dataclass(frozen=True, slots=True)
class Input:
    """An input message as the app sees it."""

    topic: str
    payload: bytes


def apply(app: App, item: Input | Tick) -> None:
    """One call into the app."""
    if isinstance(item, Tick):
        app.tick(item.now_ms, item.next_ms)
    else:
        app.deliver(item.topic, item.payload)


class Journal:
    """The base state (a checkpoint, or None for a fresh start) and what was applied since."""

    def __init__(self, base: Snapshot | None = None,
                 pieces: Sequence[Buffer] | None = None) -> None:
        self.checkpointed(base, pieces)

    def checkpointed(self, base: Snapshot | None, pieces: Sequence[Buffer] | None = None) -> None:
        """The app's state now is `base` (its memory in `pieces` if they travel apart)."""
        self._base, self._pieces = base, pieces
        self._since: list[Input | Tick] = []
        self.size = 0

    def applied(self, item: Input | Tick) -> None:
        self._since.append(item)
        if isinstance(item, Input):
            self.size += len(item.payload) + len(item.topic)

    def rebuild(self, new_instance: Callable[[], App]) -> App:
        """A new instance in the state the journal describes. Raises MeshError if it cannot be
        rebuilt (e.g. a replayed call fails too); the instance is closed then."""
        app = new_instance()
        try:
            if self._base is None:
                app.start()
            else:
                app.restore(self._base, self._pieces)
            for item in self._since:
                apply(app, item)
        except BaseException:
            app.close()
            raise
        return app
