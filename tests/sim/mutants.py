"""Deliberate bugs, to show the simulator has teeth: each patches one rule while it is active.

The decision code is patched where the simulated node looks it up (`mesh.reconcile`'s module
attributes), the models through their class switches; nothing under mesh/ is edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from mesh import reconcile
from mesh.reconcile import Claim, Fence, Running, View
from mesh.wire import OwnerRecord
from tests.sim.app import SimApp
from tests.sim.node import SimNode


@contextlib.contextmanager
def _patched(target: object, name: str, value: Any) -> Iterator[None]:
    real = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, real)


def _decide_with(change: Callable[[View, list[reconcile.Action]], list[reconcile.Action]]
                 ) -> contextlib.AbstractContextManager[None]:
    real = reconcile.decide

    def decide(view: View) -> list[reconcile.Action]:
        return change(view, real(view))

    return _patched(reconcile, "decide", decide)


def claim_same_epoch() -> contextlib.AbstractContextManager[None]:
    """A claim at the owner's epoch, not the one after it."""
    def change(view: View, actions: list[reconcile.Action]) -> list[reconcile.Action]:
        return [replace(a, epoch=view.owners[a.app].epoch)
                if isinstance(a, Claim) and a.app in view.owners else a for a in actions]
    return _decide_with(change)


def no_fence() -> contextlib.AbstractContextManager[None]:
    """decide never stops an app another node owns at a higher or the same epoch."""
    def change(view: View, actions: list[reconcile.Action]) -> list[reconcile.Action]:
        return [a for a in actions if not isinstance(a, Fence)]
    return _decide_with(change)


def handover_same_epoch() -> contextlib.AbstractContextManager[None]:
    """A handover names the next owner at the current epoch."""
    def same(running: Running, owner: OwnerRecord | None) -> int:
        return max(running.epoch, owner.epoch if owner else 0)
    return _patched(reconcile, "handover_epoch", same)


def ack_before_checkpoint() -> contextlib.AbstractContextManager[None]:
    """The app acknowledges each input as soon as it applied it."""
    return _patched(SimApp, "ACK_AT_ONCE", True)


def no_sync() -> contextlib.AbstractContextManager[None]:
    """No sync marker at the join: synced as soon as the node's own record is acknowledged."""
    return _patched(SimNode, "SYNC_MARKER", False)


def choose_first() -> contextlib.AbstractContextManager[None]:
    """A claim chooses the checkpoint to restore before it takes the app's session (and
    without syncing): a live old owner can store a newer one, and ack inputs, meanwhile."""
    return _patched(SimNode, "CLAIM_FENCES_FIRST", False)


MUTANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "claim-same-epoch": claim_same_epoch,
    "no-fence": no_fence,
    "handover-same-epoch": handover_same_epoch,
    "ack-before-checkpoint": ack_before_checkpoint,
    "no-sync": no_sync,
    "choose-first": choose_first,
}


def mutant(name: str | None) -> contextlib.AbstractContextManager[None]:
    return MUTANTS[name]() if name else contextlib.nullcontext()
