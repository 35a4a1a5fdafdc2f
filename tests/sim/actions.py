"""The node's actions, carried out as mesh/actions.py does: claim, start, hand over, fence, stop.

Each is a few steps over MQTT with awaits between them; the world may change during any of
them, so each step checks again what it depends on ("things moved on while we waited").
Functions of the `SimNode` (tests/sim/node.py) that owns the state they read and write.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from mesh import reconcile
from mesh.errors import BrokerError, MeshError
from mesh.reconcile import Claim, Fence, HandOver, Replace, Start, Stop, View
from mesh.wire import AppSpec, OwnerRecord
from tests.sim.app import SimApp, SimSnapshot
from tests.sim.loop import Event, first

if TYPE_CHECKING:
    from tests.sim.node import SimNode

SNAPSHOT_WAIT_S = 5.0


async def execute(node: SimNode, action: reconcile.Action, view: View) -> None:
    """`mesh.actions.execute`."""
    match action:
        case Stop(app):
            await stop_app(node, app)
        case Fence(app, owner, epoch):
            if app in node.hosted:
                node.trace(f"fence {app}@{node.hosted[app].epoch}: {owner} owns it at "
                           f"{epoch}")
            await let_go(node, app)
        case Replace(app):
            old = node.hosted.pop(app)
            record = view.owners.get(app)
            why = ("another module" if old.spec.module != view.specs[app].module else
                   f"the owner record names it here at {record.epoch if record else '-'}")
            node.trace(f"replace {app}@{old.epoch}: {why}")
            await old.close()
            node.dirty.set()
        case HandOver(app, target, epoch):
            await hand_over(node, node.hosted[app], target, epoch, view.owners.get(app))
        case Start(app, epoch):
            await start(node, view.specs[app], epoch, handover=True)
        case Claim(app, epoch, failover):
            await claim(node, view.specs[app], epoch, view.owners.get(app),
                        failover=failover)


async def let_go(node: SimNode, name: str) -> None:
    """The app runs here no more: close it, and forget what this device kept of it."""
    app = node.hosted.pop(name, None)
    node.gone_from_here(name)
    if app is not None:
        await app.close()


async def claim(node: SimNode, spec: AppSpec, epoch: int, known: OwnerRecord | None, *,
                failover: bool) -> None:
    """Publish ownership at `epoch`, then start. `known`: the owner record the decision went
    by (for the invariants)."""
    assert node.control is not None
    before = node.owners.get(spec.app)
    held = node.snapshots.get(spec.app)  # `node.inbox.version`
    record = OwnerRecord(node.id, epoch, max(before.seq if before else 0,
                                             held.seq if held else 0))
    node.world.ledger.intend(record, known)
    # Ours until the broker says otherwise: a rival claim that it orders after this one
    # arrives after the publish completes, and must not be overwritten by it.
    node.owners[spec.app] = record
    node.trace(f"claim {spec.app}@{epoch}{' (failover)' if failover else ''}")
    await node.control.publish(node.topic(spec.app, "owner"), record, retain=True)
    await start(node, spec, epoch, handover=False)


async def start(node: SimNode, spec: AppSpec, epoch: int, *, handover: bool) -> None:
    """Start the app here at `epoch`. A claim (`handover` false) takes the app's session first,
    fencing the old owner at the broker, and syncs, so every checkpoint the old owner stored
    is here before it chooses the newest; a handover waits for the checkpoint of `epoch`."""
    name = spec.app

    def moved_on() -> bool:  # things may move on while we wait
        owner = node.owners.get(name)
        return owner is None or (owner.node, owner.epoch) != (node.id, epoch)

    await node.sleep(node.rng.uniform(0.0005, 0.005))  # the module, from the cache
    # The `choose-first` mutant: a claim chooses its checkpoint before it takes the session
    # (mesh/actions.py before 870eddb).
    early = not handover and not node.CLAIM_FENCES_FIRST
    snap = await checkpoint_for(node, name, spec, None) if early else None
    if name in node.hosted or moved_on():
        return
    app = node.hosted[name] = SimApp(node, spec, epoch, node.world.chunks.get(name, 0))
    try:
        if not handover and not early:
            await app.take_session()
            await node.sync()
        if not early:
            # A handover's owner record names the checkpoint it stored (seq); one that names
            # none has none to wait for.
            owner = node.owners.get(name)
            handed = handover and owner is not None and owner.seq > 0
            snap = await checkpoint_for(node, name, spec, epoch if handed else None)
        if moved_on() or node.hosted.get(name) is not app:
            raise BrokerError("it moved on meanwhile")
        await app.start(snap, _seq_floor(node, name, epoch) if snap is None else 0)
    except BrokerError as exc:  # not the app: try again later
        if node.hosted.get(name) is app:
            del node.hosted[name]
        await app.close()
        node.trace(f"could not start {name}@{epoch}: {exc}")
        return
    except MeshError:  # stopped while it started
        await app.close()
        if node.hosted.get(name) is app:
            app.status = "failed"
        return
    node.trace(f"start {name}@{epoch} from "
               f"{f'{snap.epoch}.{snap.seq} ({len(snap.state)} inputs)' if snap else '-'}")


def _seq_floor(node: SimNode, name: str, epoch: int) -> int:
    """A fresh start with a checkpoint held (of another module: an upgrade) numbers its
    checkpoints on from the held one's seq (mesh/actions.py), or every node would refuse them
    as older. `SimNode.FRESH_START_GOES_ON_FROM_SEQ` off brings back the old bug (seq 0)."""
    held = node.snapshots.get(name)
    if held is None or held.epoch > epoch:
        return 0
    return held.seq if node.FRESH_START_GOES_ON_FROM_SEQ else 0


async def checkpoint_for(node: SimNode, name: str, spec: AppSpec,
                          epoch: int | None) -> SimSnapshot | None:
    """The handover checkpoint for `epoch`, else the newest; waits while news comes."""
    deadline = node.loop.now + SNAPSHOT_WAIT_S
    waker = node.waking.setdefault(name, Event())
    while True:
        snap = node.snapshots.get(name)
        usable = snap if snap is not None and snap.module == spec.module else None
        wanted = epoch is not None and (usable is None or usable.epoch < epoch)
        if not wanted or node.loop.now >= deadline:
            return usable
        waker.clear()
        await first(waker.wait(), node.sleep(deadline - node.loop.now))
        if waker.is_set():
            deadline = node.loop.now + SNAPSHOT_WAIT_S  # news came: keep waiting


async def hand_over(node: SimNode, app: SimApp, target: str, epoch: int,
                     known: OwnerRecord | None) -> None:
    assert node.control is not None
    name = app.name
    node.trace(f"hand over {name}@{app.epoch} to {target} at {epoch}")
    previous = app.epoch
    try:
        await app.hand_over(epoch)
    except MeshError:
        if node.control.lost_reason:  # kept, paused, for the node to suspend
            app.epoch = previous
            raise
        node.hosted.pop(name, None)
        await app.close()
        node.dirty.set()
        raise
    record = OwnerRecord(target, epoch, app.seq)
    node.world.ledger.intend(record, known)
    await node.control.publish(node.topic(name, "owner"), record, retain=True)
    node.owners[name] = record
    await let_go(node, name)


async def stop_app(node: SimNode, name: str) -> None:
    if name not in node.hosted:
        return
    node.trace(f"stop {name}")
    await let_go(node, name)
    assert node.control is not None
    for part in ("snapshot", "owner"):
        await node.control.publish(node.topic(name, part), None, retain=True)


async def fence_if_taken(node: SimNode, app: SimApp, reason: str) -> None:
    """The app's session ended under us: if the broker still answers, another node took the
    app over, and it stops here; if not, the node keeps its state for the next broker."""
    control = node.control
    assert control is not None
    record = replace(node.record(), leaving=node.leaving)
    publishing = node.spawn(control.publish(f"{node.root}/nodes/{node.id}", record,
                                            retain=True), "record")
    await first(publishing.done, node.sleep(node.device.keepalive))
    if not publishing.done.done() or publishing.done.exception() is not None:
        publishing.cancel()
        if control.lost_reason:
            return  # the broker is gone: the node keeps the app's state for the next one
    if node.hosted.get(app.name) is app:
        node.trace(f"fence {app.name}@{app.epoch}: lost its session ({reason})")
        await let_go(node, app.name)
        node.dirty.set()
