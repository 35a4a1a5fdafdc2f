"""A node that lost its broker: what it keeps, and what it gives the next broker back.

The next broker may be a new one that a survivor just started, holding nothing: it gets the
specs, the owner records and the modules back from the nodes, which go on running the apps they
ran (from the state they had when they lost the broker: `Carry.suspended`) and bring back the
apps of a lost device from the newest checkpoint they hold (`Carry.retained`). What to give
back is decided by `mesh.reconcile.plan_rebuild`; this module carries it out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mesh import chunks, wire
from mesh.errors import MeshError, WireError
from mesh.hosted import input_filters
from mesh.mqtt import Connection
from mesh.reconcile import Held, Version, copy_wanted, plan_rebuild, plan_resume
from mesh.store import StateStore
from mesh.transfer import publish_blob, publish_snapshot, republish

if TYPE_CHECKING:
    from mesh.node import Node

log = logging.getLogger(__name__)

DEPARTED_S = 3.0  # a member whose record was cleared this shortly before a broker's loss

REJOIN_GRACE_S = 1.0  # plus 1.5x keepalive, plus CARRY_RETRY_S
CARRY_RETRY_S = 2.0  # how often, at most, a node holding apps' state tries a lost broker again
KEEP_EVERY_S = 5.0  # how often an app's newest checkpoint is also written to this device's disk


@dataclass
class Carry:
    """What a node held when it lost its broker, for the next one (which may hold none of it)."""

    members: set[str]
    specs: dict[str, wire.AppSpec]
    spec_payloads: dict[str, bytes]  # ... as they came (signed, in a secure mesh)
    owners: dict[str, wire.OwnerRecord]
    retained: chunks.Retained  # the checkpoints of every app, as this node last had them
    copies: dict[str, Version] = field(default_factory=dict)  # ... and how new they are
    suspended: dict[str, wire.Snapshot] = field(default_factory=dict)  # its own apps' state
    only_if_lost: bool = False  # see `mesh.reconcile.Held`
    from_disk: set[str] = field(default_factory=set)  # ... and there
    marker: str | None = None  # the id of the mesh's marker on the broker we held this for
    trust: dict[str, bytes] = field(default_factory=dict)  # admissions and revocations, by topic
    # For a broker this device has just started, that no one else can find yet: the apps'
    # sessions are opened on it before anything runs (`hold_inputs`), then this is set (and
    # the device announces the broker).
    sessions_opened: asyncio.Event | None = None

    @classmethod
    def kept_on_disk(cls, store: StateStore, node_id: str) -> Carry:
        """What this device kept on disk (see `mesh.store`)."""
        kept, marker, specs = store.checkpoints(), store.marker(), store.specs()
        return cls(set(), {app: spec for app, (spec, _) in specs.items()},
                   {app: payload for app, (_, payload) in specs.items()},
                   {app: wire.OwnerRecord(node_id, snap.epoch, snap.seq)
                    for app, snap in kept.items()},
                   chunks.Retained(), suspended=kept, only_if_lost=True, from_disk=set(kept),
                   marker=marker.id if marker else None)

    def held(self) -> Held:
        return Held(self.specs, self.owners,
                    {name: snap.version for name, snap in self.suspended.items()},
                    {name: v for name, v in self.copies.items() if name not in self.suspended},
                    self.only_if_lost, frozenset(self.from_disk))


class DiskCopies:
    """The newest checkpoint of each app running here, also kept on this device's disk."""

    def __init__(self, store: StateStore,
                 spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]) -> None:
        self.store = store
        self._spawn = spawn
        self._kept_at: dict[str, float] = {}  # when each app's checkpoint was last kept
        self._writing: dict[str, asyncio.Task[None]] = {}  # ... and that write

    def keep(self, snap: wire.Snapshot) -> None:
        """A checkpoint of an app here was stored: keep it on disk too, now and then."""
        now = time.monotonic()
        if now - self._kept_at.get(snap.app, -KEEP_EVERY_S) >= KEEP_EVERY_S:
            self._kept_at[snap.app] = now
            self._writing[snap.app] = self._spawn(
                asyncio.to_thread(self.store.save_checkpoint, snap), f"{snap.app}-keep")

    def forget(self, name: str) -> None:
        """An app no longer runs here: what this device kept of it is stale now."""
        self._kept_at.pop(name, None)
        writing = self._writing.pop(name, None)
        if writing is not None and not writing.done():  # forget it once it is written
            writing.add_done_callback(lambda _: self.store.forget_checkpoint(name))
        else:
            self.store.forget_checkpoint(name)


async def suspend(node: Node) -> Carry:
    """The broker is gone: stop every app, keeping its state (in memory and on disk)."""
    # State from disk still waiting for its grace goes on waiting, for the next broker.
    later = {name: node.carried.suspended[name] for name in node.deferred
             if node.carried is not None and name in node.carried.suspended}
    suspended = {}
    for name, hosted in list(node.hosted.items()):
        try:
            snap = await hosted.suspend()
            if snap is not None:
                suspended[name] = snap
                await asyncio.to_thread(node.store.save_checkpoint, snap)
        except (MeshError, OSError) as exc:
            log.warning("%s: could not keep its state: %s", name, exc)
            await hosted.close()
    node.hosted.clear()
    versions = {name: version for name, version in node.inbox.versions().items()
                if _complete(node, name)}
    # The members to elect the next broker's host among: a broker stopped gracefully (or a
    # Mosquitto sent SIGTERM) first publishes every client's Last Will, so the ones that just
    # left count too, or each survivor would think itself the only one and host at once.
    now = time.monotonic()
    members = {*node.members, *(n for n, at in node.departed.items() if now - at < DEPARTED_S)}
    return Carry(members - {node.id}, dict(node.specs),
                 dict(node.desired.payloads), dict(node.owners),
                 node.inbox.retained, versions, {**later, **suspended},
                 from_disk=set(later) - set(suspended),
                 marker=node.marker.id if node.marker else None,
                 trust=dict(node.authority.records))


async def _resume(node: Node, carry: Carry, resume: tuple[tuple[str, int], ...], *,
                  lost: bool) -> None:
    """Our own apps go on from the state we kept, each at its epoch in `resume`."""
    control, topics = node.control, node.topics
    for name, epoch in resume:
        kept = carry.suspended[name]
        # Its `applied` stay if the broker kept its store: inputs applied but not acked come
        # again (DUP), and are skipped. A broker that lost it lost the app's session too: the
        # packet ids of the next one name other inputs.
        snap = replace(kept, epoch=epoch, seq=kept.seq + 1,
                       applied=() if lost else kept.applied)
        await publish_snapshot(control, topics.app(name, "snapshot"), snap, [snap.memory.data],
                               node.authority)
        record = node.owners[name] = wire.OwnerRecord(node.id, epoch, snap.seq)
        await node.publish_record(topics.app(name, "owner"), record)


async def _resume_later(node: Node, carry: Carry, names: tuple[str, ...], after: float, *,
                        lost: bool) -> None:
    """State from this device's disk that the broker had nothing as new as: resumed after
    `after` if no newer one came back meanwhile (`mesh.reconcile.plan_resume`)."""
    await asyncio.sleep(after)
    await resume_deferred(node, carry, names, lost=lost)


async def resume_deferred(node: Node, carry: Carry, names: Collection[str], *,
                          lost: bool) -> None:
    """Decide now on state from disk put off (`_resume_later`, or a leave that cannot wait).
    If the broker goes meanwhile, it stays put off: `suspend` carries it to the next one."""
    plan = plan_resume(node.view(), carry.held(), names)
    for name in plan.forget:
        node.kept.forget(name)
    await _resume(node, carry, plan.resume, lost=lost)
    log.info("node %s: of the state kept on disk, resumed %s, dropped %s (newer found)",
             node.id, ", ".join(name for name, _ in plan.resume) or "(none)",
             ", ".join(plan.forget) or "(none)")
    node.deferred.difference_update(names)
    node.changed()


def _complete(node: Node, name: str) -> bool:
    """Whether every piece of the checkpoint of `name` held here has arrived (a copy that is
    not whole cannot be given back, so it must not count)."""
    try:
        return node.inbox.checkpoint(name) is not None
    except WireError:
        return False


async def _give_copies(node: Node, carry: Carry, names: tuple[str, ...], after: float) -> None:
    """The newest checkpoints we hold of apps no one ran, given back to a broker that lost its
    store: after the grace, where still wanted (`mesh.reconcile.copy_wanted`)."""
    await asyncio.sleep(after)
    members = node.live_members()
    for name in names:
        if name not in node.specs:  # stopped meanwhile
            continue
        if copy_wanted(node.owners.get(name), members, node.inbox.version(name),
                       carry.copies[name]):
            await republish(node.control, carry.retained, node.topics.app(name, "snapshot"),
                            node.authority)


async def after_join(node: Node, carry: Carry | None) -> None:
    """Just joined, with every retained record here: a broker without the mesh's marker lost
    its store (or never had one). Give it what it lacks of `carry`, and mark it."""
    marker = node.marker
    if carry is not None:
        # A marker other than the one we knew: the broker lost the store we held this for (or
        # is a new one), and another node marked it since.
        remarked = (marker is not None and carry.marker is not None
                    and marker.id != carry.marker)
        if carry.sessions_opened is not None:
            if marker is None:
                await hold_inputs(node, carry.specs.values())
            carry.sessions_opened.set()
        await rebuild(node, carry, lost=marker is None or remarked, remarked=remarked)
    if marker is None:
        mark = wire.MeshRecord(secrets.token_hex(8), int(time.time() * 1000))
        await node.control.publish(node.topics.mesh, wire.encode(mark), retain=True)
        await node.sync()  # our marker is back (or another's that landed after it)


async def rebuild(node: Node, carry: Carry, *, lost: bool, remarked: bool = False) -> None:
    """Joined after losing a broker: give this one back what it lacks of what we held (`lost`:
    it lost its store), and keep the newer of its checkpoints and ours."""
    plan = plan_rebuild(node.view(), carry.held(), lost=lost, remarked=remarked)
    for name in plan.forget:  # the mesh went on without us: ours are stale
        node.kept.forget(name)
    node.inbox.adopt(carry.retained, carry.copies)
    control, topics = node.control, node.topics
    if lost:  # who was admitted, or revoked: what the specs, records and checkpoints given
        for topic, record in carry.trust.items():  # back next are checked against
            await control.publish(topic, record, retain=True)
    for spec in plan.specs:
        await control.publish(topics.app(spec.app, "spec"), carry.spec_payloads[spec.app],
                              retain=True)
        wasm = await asyncio.to_thread(node.store.module, spec.module)
        if wasm is not None:
            await publish_blob(control, topics.module(spec.module), wasm)
    await _resume(node, carry, plan.resume, lost=lost)
    for name, owner in plan.owners:  # the epochs a takeover must go past
        node.owners[name] = owner
        await node.publish_record(topics.app(name, "owner"), owner)
    # The other survivors come back too, each with its own apps: give them a moment before
    # taking over an app whose owner has not come back yet. (Each notices the loss on its own
    # keepalive: a silent broker, within 1.5 K; a node given its broker tries again at least
    # every CARRY_RETRY_S.)
    grace = REJOIN_GRACE_S + 1.5 * node.config.keepalive + CARRY_RETRY_S
    if plan.grace:
        node.claim_after = time.monotonic() + grace
        node.wake_after(grace)
    if plan.copies:  # for whoever takes those apps over, once their owners had their chance
        node.spawn(_give_copies(node, carry, plan.copies, grace), "copies")
    if plan.later:  # once every survivor came back, and gave back its copies after its grace
        node.deferred.update(plan.later)
        node.deferred_lost = lost
        node.spawn(_resume_later(node, carry, plan.later, 2 * grace, lost=lost), "resume")
    if plan.specs or plan.resume or plan.copies:
        log.info("node %s gave the broker back %d app specs, the state of its own apps %s and "
                 "the checkpoints of %s", node.id, len(plan.specs),
                 ", ".join(name for name, _ in plan.resume) or "(none)",
                 ", ".join(plan.copies) or "(none)")


async def hold_inputs(node: Node, specs: Iterable[wire.AppSpec]) -> None:
    """On a new broker that no one else can find yet, before any app runs on it: open each
    app's persistent session, subscribed to its inputs, so that inputs published before the
    app is back wait in its queue (the broker would take and drop them: no one subscribed).
    The node that runs the app takes the session over with everything queued in it. (Only
    then: taking the session of an app running elsewhere would stop it.)"""
    opened = 0
    for spec in specs:
        session = Connection(node.config.broker, node.authority.app_session(spec.app),
                             clean_session=False, keepalive=node.config.keepalive)
        async with session:
            await session.subscribe(*input_filters(node.topics, spec), qos=1)
        opened += 1
    if opened:
        log.info("node %s opened the sessions of %d apps on the new broker, to hold their "
                 "inputs", node.id, opened)
