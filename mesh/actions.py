"""Carrying out what `mesh.reconcile` decides: claim, start, hand over, fence, stop.

Each action is a few steps over MQTT with awaits between them; the world may change during
any of them, so each step checks again what it depends on ("things moved on while we waited").
`mesh.node.Node` calls `execute` for every action of a reconcile pass, concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from mesh import recovery, wire
from mesh.errors import BrokerError, MeshError, SnapshotIncomplete, WireError
from mesh.hosted import MAX_DEAD, HostedApp
from mesh.reconcile import (
    Action,
    Claim,
    Fence,
    HandOver,
    Missing,
    Replace,
    Start,
    Stop,
    Unplaceable,
    View,
    plan_leave,
)
from mesh.runtime import AppModule
from mesh.transfer import Checkpoint
from mesh.wire import EventKind

if TYPE_CHECKING:
    from mesh.node import Node

log = logging.getLogger(__name__)

SNAPSHOT_WAIT_S = 5.0
MODULE_WAIT_S = 30.0

def report(node: Node, todo: list[Action]) -> None:
    """Tell what a pass found but cannot act on, once per app when it starts to be so: apps
    no member can run, and apps that cannot start for want of a checkpoint (an alarm)."""
    unplaceable = {a.app: a for a in todo if isinstance(a, Unplaceable)}
    for name in unplaceable.keys() - node.unplaceable:
        node.event("unplaceable", app=name,
                   reason=f"no node has all of: {', '.join(unplaceable[name].requires)}")
    node.unplaceable = set(unplaceable)
    missing, node.missing = node.missing, {a.app: a.reason for a in todo
                                           if isinstance(a, Missing)}
    for name in node.missing.keys() - missing.keys():
        log.error("%s: %s", name, node.missing[name])
        node.event("failed", app=name, reason=node.missing[name])


async def module(node: Node, sha256: str, wait: float = MODULE_WAIT_S) -> AppModule:
    """The module with this hash: from memory, the disk, or the broker's store."""
    if sha256 in node.modules:
        return node.modules[sha256]
    wasm = await asyncio.to_thread(node.store.module, sha256)
    if wasm is None:
        wasm = await node.inbox.fetch_module(node.control, sha256, wait)
        await asyncio.to_thread(node.store.save_module, sha256, wasm)
    loaded = node.modules[sha256] = await asyncio.to_thread(node.runtime.load, wasm)
    return loaded


async def hold_module(node: Node, sha256: str) -> None:
    """Keep the module of an app deployed in the mesh on this device's disk, whether or not
    the app runs here: a broker that lost its store gets it back from any survivor (see
    `mesh.recovery.rebuild`), even once every device that ran the app is gone."""
    if await asyncio.to_thread(node.store.has_module, sha256):
        return
    try:
        wasm = await node.inbox.fetch_module(node.control, sha256, MODULE_WAIT_S)
    except MeshError as exc:  # fetched again when the app must start here
        log.warning("cannot keep a copy of a deployed module: %s", exc)
        return
    await asyncio.to_thread(node.store.save_module, sha256, wasm)


async def execute(node: Node, action: Action, view: View) -> None:
    """Carry out one action decided on `view`."""
    match action:
        case Stop(app):
            await stop_app(node, app)
        case Fence(app, owner, epoch):
            log.warning("%s: %s owns it at epoch %d; stopping it here", app, owner, epoch)
            await let_go(node, app)
            node.event("fenced", app=app, detail={"owner": owner, "epoch": epoch})
        case Replace(app):
            hosted = node.hosted.pop(app)
            await hosted.close()
            node.changed()
        case HandOver(app):
            await hand_over(node, node.hosted[app], action)
        case Start(app, epoch):
            await start(node, view.specs[app], epoch, handover=True)
        case Claim(app, epoch, failover):
            await claim(node, view.specs[app], epoch, failover=failover)


async def claim(node: Node, spec: wire.AppSpec, epoch: int, *, failover: bool) -> None:
    """Publish ownership at `epoch`, then start from the newest checkpoint (or fresh)."""
    before = node.owners.get(spec.app)
    held = node.inbox.version(spec.app)
    record = wire.OwnerRecord(node.id, epoch, max(before.seq if before else 0,
                                                  held[1] if held else 0))
    # Ours until the broker says otherwise: a rival claim that it orders after this one
    # arrives after the publish completes, and must not be overwritten by it.
    node.owners[spec.app] = record
    await node.publish_record(node.topics.app(spec.app, "owner"), record)
    await start(node, spec, epoch, handover=False, failover=failover)


async def start(node: Node, spec: wire.AppSpec, epoch: int, *, handover: bool,
                failover: bool = False) -> None:
    """Start the app here at `epoch`: from the handover checkpoint, the newest, or fresh."""
    name = spec.app
    began = time.monotonic()

    def moved_on() -> bool:  # things may move on while we wait
        owner = node.owners.get(name)
        return owner is None or (owner.node, owner.epoch) != (node.id, epoch)

    loaded = await module(node, spec.module)
    if name in node.hosted or moved_on():
        return
    hosted = node.hosted[name] = HostedApp(node.host_ctx, spec, loaded, epoch)
    checkpoint = None
    try:
        if not handover:
            # A takeover: fence the old owner at the broker first (it can store nothing after
            # that), then wait for every checkpoint it stored before, and restore the newest.
            await hosted.take_session()
            await node.sync()
        # A handover's owner record names the checkpoint it stored (seq); one that names none
        # (a start over) has none to wait for.
        owner = node.owners.get(name)
        handed = handover and owner is not None and owner.seq > 0
        checkpoint = await checkpoint_for(node, name, spec, epoch if handed else None)
        if moved_on() or node.hosted.get(name) is not hosted:
            raise BrokerError("it moved on meanwhile")
        held = node.inbox.version(name)
        if handover and owner is not None and owner.seq == 0 and held and held[0] < epoch:
            checkpoint = None  # started over (`restart --fresh`): not from one before that
        elif node.inbox.unreadable(name):  # never an older one, nor a fresh start, over it
            raise SnapshotIncomplete(f"the newest checkpoint of {name} is one this device "
                                     "cannot open (sealed with a data key it was not given: "
                                     "run `mesh grant`; or signed by a device revoked since)")
        elif checkpoint is None and held and node.inbox.module_of(name) == spec.module:
            # Its checkpoint's header is here but not all of it: never a fresh start over it.
            raise SnapshotIncomplete(f"the checkpoint of {name} has not all arrived")
        if checkpoint:
            await hosted.start(checkpoint.snap, checkpoint.pieces, checkpoint.matches)
        else:
            # Numbered past any checkpoint seen (an upgrade's old module's): never refused.
            await hosted.start(None, seq=held[1] if held and held[0] <= epoch else 0)
    except (BrokerError, SnapshotIncomplete) as exc:  # not the app: try again later
        if node.hosted.get(name) is hosted:
            del node.hosted[name]
        await hosted.close()
        log.warning("%s: could not start: %s", name, exc)
        if checkpoint and isinstance(exc, SnapshotIncomplete):
            node.inbox.incomplete(checkpoint)  # wait for the rest of it
            node.changed()
        return
    except MeshError as exc:  # the app itself (a trap, a bad checkpoint): it stays failed
        await hosted.close()
        if node.hosted.get(name) is hosted:
            hosted.state, hosted.failure = "failed", str(exc)
            node.event("failed", app=name, reason=str(exc))
        return
    snap = checkpoint.snap if checkpoint else None
    kind: EventKind = "migrated" if handover else "failed-over" if failover else "started"
    node.event(kind, app=name, detail={
        "epoch": epoch, "restored_seq": snap.seq if snap else None,
        "ms": round((time.monotonic() - began) * 1000, 1)})
    log.info("%s: %s here at epoch %d%s", name, kind, epoch,
             f" from checkpoint {snap.seq}" if snap else "")


async def checkpoint_for(node: Node, name: str, spec: wire.AppSpec,
                          epoch: int | None) -> Checkpoint | None:
    """The checkpoint to restore: the handover one for `epoch`, else the newest.

    Waits while one is on its way (a header whose chunks are still arriving, or the handover
    checkpoint), for as long as pieces keep coming; gives up after SNAPSHOT_WAIT_S of
    silence and takes the newest complete one.
    """
    deadline = time.monotonic() + SNAPSHOT_WAIT_S
    waker = node.inbox.waker(name)
    while True:
        try:
            checkpoint = node.inbox.checkpoint(name)
            arriving = node.inbox.arriving(name)
        except WireError as exc:
            log.warning("%s: its checkpoint is unusable: %s", name, exc)
            checkpoint, arriving = None, False
        usable = checkpoint if checkpoint and checkpoint.snap.module == spec.module else None
        wanted = epoch is not None and (usable is None or usable.snap.epoch < epoch)
        if not (arriving or wanted) or time.monotonic() >= deadline:
            return usable
        waker.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline - time.monotonic()):
                await waker.wait()
            deadline = time.monotonic() + SNAPSHOT_WAIT_S  # news came: keep waiting


async def hand_over(node: Node, hosted: HostedApp, action: HandOver) -> None:
    """Planned migration: checkpoint for the next epoch, release, name the target owner."""
    name, target, epoch = action.app, action.target, action.epoch
    began = time.monotonic()
    node.event("migrating", app=name, detail={"to": target, "epoch": epoch})
    previous = hosted.epoch
    try:
        await hosted.hand_over(epoch)
    except MeshError:
        if node.control.lost_reason:
            # The broker is gone: the app stays here, paused and still ours, and the node
            # keeps its state when it suspends its apps.
            hosted.epoch = previous
            raise
        # Stop it here; we still own it, so the next reconcile restores the newest checkpoint.
        node.hosted.pop(name, None)
        await hosted.close()
        node.changed()
        raise
    record = wire.OwnerRecord(target, epoch, hosted.seq)
    # The target starts on this. If it cannot be published (the broker is gone), the app
    # stays here, paused, for the node to keep its state.
    await node.publish_record(node.topics.app(name, "owner"), record)
    node.owners[name] = record
    await let_go(node, name)
    log.info("%s: handed over to %s at epoch %d in %.1f ms", name, target, epoch,
             (time.monotonic() - began) * 1000)


async def stop_app(node: Node, name: str) -> None:
    """Its spec is gone: stop it, and clear its checkpoint and owner record on the broker."""
    if name not in node.hosted:
        return
    await let_go(node, name)
    stale = [*node.inbox.snapshot_parts(name),
             *(node.topics.app(name, f"dead/{slot}") for slot in range(MAX_DEAD))]
    for topic in (*stale, node.topics.app(name, "snapshot"), node.topics.app(name, "owner")):
        await node.control.publish(topic, b"", retain=True)  # forget it on the broker
    node.event("stopped", app=name)


async def let_go(node: Node, name: str) -> None:
    """The app runs here no more: close it, and forget what this device kept of it."""
    hosted = node.hosted.pop(name, None)
    node.kept.forget(name)
    if hosted is not None:
        await hosted.close()


async def fence_if_taken(node: Node, hosted: HostedApp, reason: str) -> None:
    """The app's session ended under us: if the broker still answers, another node took the
    app over, and it stops here; if not, the node keeps its state for the next broker."""
    record = replace(node.record(), leaving=node.leaving)
    try:  # the broker still answers us: the app was taken over, so it stops here
        async with asyncio.timeout(node.config.keepalive):
            await node.publish_record(node.topics.node(node.id), record)
    except (BrokerError, TimeoutError):
        if node.control.lost_reason:
            return  # the broker is gone: the node keeps the app's state for the next one
    if node.hosted.get(hosted.name) is hosted:
        log.warning("%s: lost its session (%s); stopping it here", hosted.name, reason)
        await let_go(node, hosted.name)
        node.event("fenced", app=hosted.name, reason=f"session lost: {reason}")
        node.changed()


async def leave(node: Node) -> None:
    """Leave gracefully: hand every app to the node that should run it next."""
    if node.leaving:
        return
    node.leaving = True
    log.info("node %s leaving: handing over %d apps", node.id, len(node.hosted))
    if not node.broker_gone:
        with contextlib.suppress(MeshError):  # others stop placing apps here at once
            await node.publish_record(node.topics.node(node.id),
                                      replace(node.record(), leaving=True))
    await node.busy.acquire()  # let a reconcile pass in progress finish; none after it
    await asyncio.gather(*node.acting.values(), return_exceptions=True)
    if node.deferred and node.carried is not None and not node.broker_gone:
        # State from disk still put off: on the broker now, for whoever takes it over.
        with contextlib.suppress(MeshError):
            await recovery.resume_deferred(node, node.carried, set(node.deferred),
                                           lost=node.deferred_lost)
    for action in plan_leave(node.view()):
        if node.broker_gone:
            break  # the broker is gone: `suspend` keeps every app left (on disk too)
        hosted = node.hosted.get(action.app)
        if hosted is None:  # the broker was lost meanwhile: its state is kept, suspended
            continue
        try:
            if isinstance(action, HandOver):
                await hand_over(node, hosted, action)
            else:
                await hosted.shutdown()
        except (MeshError, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                raise  # we are cancelled (a suspend cancelling the handover is not that)
            if node.broker_gone:
                break
            log.warning("could not hand %s over: %s", action.app, exc)
            await hosted.close()
        node.hosted.pop(action.app, None)
    await node.said_goodbye()


async def close_all(node: Node) -> None:
    """Close every app here, handing nothing over, and leave."""
    await node.busy.acquire()  # let a reconcile pass in progress finish; none after it
    await asyncio.gather(*node.acting.values(), return_exceptions=True)
    for name, hosted in list(node.hosted.items()):
        await hosted.close()
        node.hosted.pop(name, None)
    await node.said_goodbye()
