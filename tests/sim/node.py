"""`SimNode`: mesh/node.py's executor around the real decision code, on the simulated broker.

One `SimNode` is one `mesh.node.Node` object: one join of a broker (with mesh/actions.py and
mesh/recovery.py, which carry out its actions and its rebuild). It keeps the members,
specs, owner records and newest checkpoints from the retained messages; joins with a Last Will
that clears its record, subscribes, publishes its record and syncs (`sync`: a QoS 1 marker on
`<root>/nodes/<id>/sync`, back on the same session after every message queued before it; a claim
syncs again), and counts itself synced (`View.synced`) once the join's marker is back. A
checkpoint replaces the one held only if it is no older (`transfer.Inbox`). It then runs
`mesh.reconcile.decide` on every change (debounced 5 ms, and every 10 s anyway) and carries out
each app's action as its own task (none for an app whose last one is still under way), with
the real node's steps, awaits and re-checks; a lost app session is fenced if
the control session still answers; a lost broker suspends every app, keeping its state
(`Carry`), for the next join, which gives back what `plan_rebuild` says (`after_join`: a
broker without the mesh's marker, `<root>/mesh`, lost its store; the first node to see that
marks it). An app whose owner record's seq is past every checkpoint here is `Missing`: an
alarm (in the node record's `failed`), not acted on. The device loop around it (join,
backoff, rejoin with `only_if_lost`) is `tests.sim.device`.

Owner records carry the checkpoint seq their owner went on from, as the real ones do (the
`Missing` rule reads it); the invariants compare owner records by (node, epoch) only.

Not modelled: modules (always at hand, a few ms to load), commands and replies, events, mDNS
goodbyes, failed apps (wasm traps, dead letters), snapshot chunks that are incomplete. Mirrors
mesh/node.py, actions.py, hosted.py, recovery.py and transfer.Inbox as of commit ad88520.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from mesh import reconcile
from mesh.errors import BrokerError, MeshError
from mesh.reconcile import (
    HandOver,
    Held,
    Missing,
    Running,
    Unplaceable,
    View,
    copy_wanted,
)
from mesh.wire import AppSpec, NodeRecord, OwnerRecord
from tests.sim import actions
from tests.sim.app import SimApp, SimSnapshot
from tests.sim.client import Client
from tests.sim.loop import Event, Future, Lock, Task, first, gather, sleep
from tests.sim.net import Delivery

if TYPE_CHECKING:
    from tests.sim.device import Device

RECONCILE_EVERY_S = 10.0
REJOIN_GRACE_S = 1.0  # plus 1.5x keepalive, plus CARRY_RETRY_S
CARRY_RETRY_S = 2.0  # how often, at most, a device holding apps' state tries a broker again
KEEP_EVERY_S = 5.0
SYNC_WAIT_S = 30.0


@dataclass
class Carry:
    """What a node held when it lost its broker (`mesh.node.Carry`)."""

    held: Held
    retained: dict[str, SimSnapshot] = field(default_factory=dict)  # every app's checkpoint
    suspended: dict[str, SimSnapshot] = field(default_factory=dict)  # its own apps' state
    marker: object = None  # the mesh's marker on the broker it held this for


class SimNode:
    # The `choose-first` mutant clears this: a claim chooses its checkpoint, then takes the
    # app's session (the order before the fix).
    CLAIM_FENCES_FIRST: ClassVar[bool] = True
    # A finding about mesh/actions.py's start (see tests.sim.actions.start): an app started
    # afresh (an upgrade) goes on from the seq of the newest checkpoint held, so that its
    # checkpoints are newer than the old module's; cleared, it starts at seq 0 as the real
    # one does, and every node's Inbox refuses its checkpoints as older.
    FRESH_START_GOES_ON_FROM_SEQ: ClassVar[bool] = True
    # The `no-sync` mutant clears this: the join does not sync (synced once its record is
    # acknowledged); a claim still does.
    SYNC_MARKER: ClassVar[bool] = True

    def __init__(self, device: Device, carried: Carry | None) -> None:
        self.device = device
        self.world = device.world
        self.loop = device.world.loop
        self.rng = device.world.rng
        self.proc = device.proc
        self.id = device.id
        self.root = device.world.root
        self.carried = carried
        self.carry: Carry | None = None
        self.deferred: set[str] = set()  # own apps from disk, resumed after a grace
        self.deferred_lost = False  # ... on a broker that had lost its store
        self._watcher: Task | None = None  # `_watch_control`
        self.tombstones: set[str] = set()  # apps stopped since last deployed
        self.members: dict[str, NodeRecord] = {}
        self.specs: dict[str, AppSpec] = {}
        self.owners: dict[str, OwnerRecord] = {}
        self.snapshots: dict[str, SimSnapshot] = {}
        self.hosted: dict[str, SimApp] = {}
        self.stopped = Event()
        self.leaving = False
        self.marker: object = None  # the mesh's marker as the broker holds it (None: none)
        self.missing: dict[str, str] = {}  # apps that should start here but have no checkpoint
        self.synced = False  # every retained record the broker held at our join is here
        self._syncing: dict[int, Event] = {}  # markers on their way back to us
        self.dirty = Event()
        self.waking: dict[str, Event] = {}
        self._busy = Lock()
        self.claim_after = 0.0
        self._kept_at: dict[str, float] = {}
        self._started_ms = int(self.loop.now * 1000)
        self.control: Client | None = None
        self._tasks: list[Task] = []
        self.acting: dict[str, Task] = {}  # each app's action under way

    # --- plumbing ---------------------------------------------------------------------------

    def client(self, client_id: str, **options: Any) -> Client:
        return Client(self.world.fabric, self.proc, self.id, client_id,
                      keepalive=self.device.keepalive, **options)

    def spawn(self, work: Coroutine[Future[Any], None, Any], name: str, *,
              eager: bool = False) -> Task:
        task = Task(self.loop, self.proc, work, f"{self.id}:{name}", eager=eager)
        if len(self._tasks) > 64:
            self._tasks = [t for t in self._tasks if not t.done.done()]
        self._tasks.append(task)
        return task

    def sleep(self, seconds: float) -> Future[None]:
        return sleep(self.loop, self.proc, seconds)

    def trace(self, what: str) -> None:
        self.world.trace(self.id, what)

    def topic(self, app: str, part: str) -> str:
        return f"{self.root}/apps/{app}/{part}"

    # --- lifecycle --------------------------------------------------------------------------

    async def join(self) -> None:
        root = self.root
        control = self.control = self.client(f"{root}-node-{self.id}", on_message=self._on_message,
                                             will=(f"{root}/nodes/{self.id}", None))
        await control.connect()
        await control.subscribe(f"{root}/apps/+/snapshot/+", f"{root}/apps/+/snapshot",
                                f"{root}/nodes/+", f"{root}/apps/+/spec", f"{root}/apps/+/owner",
                                f"{root}/apps/+/stopped", f"{root}/mesh",
                                f"{root}/nodes/{self.id}/sync")
        await self._publish_record()
        if self.SYNC_MARKER:
            await self.sync()
        self.synced = True
        await self._after_join(self.carried)
        self.trace(f"joined ({len(self.specs)} specs, {len(self.owners)} owners)")
        self.spawn(self._reconciler(), "reconcile")
        self._watcher = self.spawn(self._watch_control(control), "control")

    async def sync(self) -> None:
        """`Node.sync`: wait until everything the broker sent us before now has arrived (a
        marker we send ourselves comes back after it, on the same session). As in the real
        one, a broker lost after the marker's PUBACK is noticed only after SYNC_WAIT_S."""
        assert self.control is not None
        marker = self.world.token()
        back = self._syncing[marker] = Event()
        try:
            await self.control.publish(f"{self.root}/nodes/{self.id}/sync", marker)
            await first(back.wait(), self.sleep(SYNC_WAIT_S))
            if not back.is_set():
                raise BrokerError(f"the broker did not answer within {SYNC_WAIT_S:.0f} s")
        finally:
            del self._syncing[marker]

    async def teardown(self) -> None:
        """`Node.__aexit__`: cancel what runs, close what is left and the control session."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for app in list(self.hosted.values()):  # a start that raced the loss
            await app.close()
        self.hosted.clear()
        if self.control is not None:
            await self.control.close()

    async def leave(self) -> None:
        """Leave gracefully: hand every app to the node that should run it next."""
        if self.leaving:
            return
        self.leaving = True
        self.trace(f"leaving with {sorted(self.hosted)}")
        control = self.control
        if control is not None and not control.lost_reason:
            with contextlib.suppress(BrokerError):
                await control.publish(f"{self.root}/nodes/{self.id}",
                                      replace(self.record(), leaving=True), retain=True)
        await self._busy.acquire()
        await gather([task.done for task in self.acting.values()])
        if self.deferred and self.carried is not None and control is not None \
                and not control.lost_reason:  # node.py: state from disk, on the broker now
            with contextlib.suppress(MeshError):
                await self.resume_deferred(self.carried, set(self.deferred),
                                           lost=self.deferred_lost)
        for action in reconcile.plan_leave(self._view()):
            if control is None or control.lost_reason:
                self.trace("leave: the broker was lost; the apps left are kept, suspended")
                break
            app = self.hosted.get(action.app)
            if app is None:  # the broker was lost meanwhile: its state is kept, suspended
                self.trace(f"leave: {action.app} is no longer here (suspended)")
                continue
            try:
                if isinstance(action, HandOver):
                    await actions.hand_over(self, app, action.target, action.epoch,
                                          self.owners.get(action.app))
                else:
                    await app.shutdown()
            except MeshError:
                if control.lost_reason:  # node.py: kept for suspend
                    self.trace(f"leave: {action.app} kept, suspended (the broker was lost)")
                    break
                await app.close()
            self.hosted.pop(action.app, None)
        if control is not None and control.lost_reason and self._watcher is not None:
            await self._watcher.done  # node.py: let the suspend finish first
        elif control is not None:
            with contextlib.suppress(BrokerError):
                await control.publish(f"{self.root}/nodes/{self.id}", None, retain=True)
        self.stopped.set()

    async def _watch_control(self, control: Client) -> None:
        reason = await control.lost
        self.trace(f"lost the broker ({reason}): suspending {sorted(self.hosted)}")
        self.leaving = True
        # `recovery.suspend`: state from disk still waiting for its grace goes on waiting.
        carried = self.carried
        later = {name: carried.suspended[name] for name in self.deferred
                 if carried is not None and name in carried.suspended}
        suspended: dict[str, SimSnapshot] = {}
        for name, app in list(self.hosted.items()):
            snap = await app.suspend()
            if snap is not None:
                suspended[name] = snap
                self.device.disk.checkpoints[name] = snap
        self.hosted.clear()
        later = {name: snap for name, snap in later.items() if name not in suspended}
        suspended = {**later, **suspended}
        held = Held(dict(self.specs), dict(self.owners),
                    {name: (snap.epoch, snap.seq) for name, snap in suspended.items()},
                    {name: (snap.epoch, snap.seq) for name, snap in self.snapshots.items()
                     if name not in suspended},
                    from_disk=frozenset(later))
        self.carry = Carry(held, dict(self.snapshots), suspended, self.marker)
        self.stopped.set()

    async def _after_join(self, carry: Carry | None) -> None:
        """`recovery.after_join`: a broker without the mesh's marker lost its store (or never
        had one). Give it what it lacks of `carry`, and mark it."""
        assert self.control is not None
        marker = self.marker
        if carry is not None:  # (a marker other than the one we knew: see recovery)
            remarked = marker is not None and carry.marker is not None and marker != carry.marker
            await self._rebuild(carry, lost=marker is None or remarked, remarked=remarked)
        if marker is None:
            await self.control.publish(f"{self.root}/mesh", ("mesh", self.world.token()),
                                       retain=True)
            await self.sync()

    async def _rebuild(self, carry: Carry, *, lost: bool, remarked: bool = False) -> None:
        """Joined after losing a broker: give this one back what it lacks of what we held, and
        keep the newer of its checkpoints and ours."""
        assert self.control is not None
        control = self.control
        plan = reconcile.plan_rebuild(self._view(), carry.held, lost=lost, remarked=remarked)
        for name in plan.forget:  # the mesh went on without us: ours are stale
            self.gone_from_here(name)
        for name, snap in carry.retained.items():  # `Inbox.adopt`: the newer ones
            mine = self.snapshots.get(name)
            if mine is None or (mine.epoch, mine.seq) < (snap.epoch, snap.seq):
                self.snapshots[name] = snap
        for spec in plan.specs:
            await control.publish(self.topic(spec.app, "spec"), spec, retain=True)
        await self._resume(carry, plan.resume, lost=lost)
        for name, owner in plan.owners:  # the epochs a takeover must go past
            self.owners[name] = owner
            await control.publish(self.topic(name, "owner"), owner, retain=True)
        grace = REJOIN_GRACE_S + 1.5 * self.device.keepalive + CARRY_RETRY_S
        if plan.grace:
            self.claim_after = self.loop.now + grace
            self.spawn(self._wake_after(grace), "rejoin-grace")
        if plan.copies:  # recovery._give_copies: after the grace, checked again
            self.spawn(self._give_copies(carry, plan.copies, grace), "copies")
        if plan.later:  # recovery._resume_later
            self.deferred.update(plan.later)
            self.deferred_lost = lost
            self.spawn(self._resume_later(carry, plan.later, 2 * grace, lost=lost), "resume")
        self.trace(f"rebuilt ({'lost' if lost else 'kept'} store): specs "
                   f"{[s.app for s in plan.specs]} resumed {plan.resume} owners "
                   f"{[n for n, _ in plan.owners]} copies {list(plan.copies)} forgot "
                   f"{list(plan.forget)}")

    async def _resume(self, carry: Carry, resume: tuple[tuple[str, int], ...], *,
                      lost: bool) -> None:
        """`recovery._resume`."""
        control = self.control
        assert control is not None
        for name, epoch in resume:  # ours: they go on from where they were
            kept = carry.suspended[name]
            # Its `applied` stay if the broker kept its store (see recovery.rebuild).
            snap = replace(kept, epoch=epoch, seq=kept.seq + 1,
                           applied=() if lost else kept.applied)
            await control.publish(self.topic(name, "snapshot"), snap, retain=True)
            record = self.owners[name] = OwnerRecord(self.id, epoch, snap.seq)
            await control.publish(self.topic(name, "owner"), record, retain=True)

    async def _resume_later(self, carry: Carry, names: tuple[str, ...], after: float, *,
                            lost: bool) -> None:
        """`recovery._resume_later`."""
        await self.sleep(after)
        await self.resume_deferred(carry, names, lost=lost)

    async def resume_deferred(self, carry: Carry, names: Collection[str], *,
                              lost: bool) -> None:
        """`recovery.resume_deferred`: still put off if the broker goes meanwhile."""
        plan = reconcile.plan_resume(self._view(), carry.held, names)
        for name in plan.forget:
            self.gone_from_here(name)
        await self._resume(carry, plan.resume, lost=lost)
        self.trace(f"resumed from disk {plan.resume}, dropped {list(plan.forget)}")
        self.deferred.difference_update(names)
        self.dirty.set()

    async def _give_copies(self, carry: Carry, names: tuple[str, ...], after: float) -> None:
        await self.sleep(after)
        members = {**self.members, self.id: self.record()}
        for name in names:
            held = self.snapshots.get(name)
            copy = carry.retained[name]
            if name not in self.specs:  # stopped meanwhile
                continue
            if copy_wanted(self.owners.get(name), members,
                           None if held is None else (held.epoch, held.seq),
                           (copy.epoch, copy.seq)):
                assert self.control is not None
                await self.control.publish(self.topic(name, "snapshot"), copy, retain=True)
                self.trace(f"gave back copy {name} {copy.epoch}.{copy.seq}")

    async def _wake_after(self, seconds: float) -> None:
        await self.sleep(seconds)
        self.dirty.set()

    def keep(self, snap: SimSnapshot) -> None:
        """A checkpoint of an app here was stored: keep it on disk too, now and then."""
        now = self.loop.now
        if now - self._kept_at.get(snap.app, -KEEP_EVERY_S) >= KEEP_EVERY_S:
            self._kept_at[snap.app] = now
            self.device.disk.checkpoints[snap.app] = snap

    def gone_from_here(self, name: str) -> None:
        self._kept_at.pop(name, None)
        self.device.disk.checkpoints.pop(name, None)

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, message: Delivery) -> None:
        parts = tuple(message.topic.split("/")[1:])
        payload = message.payload
        match parts:
            case ("nodes", node_id):
                self._set(self.members, node_id, payload)
            case ("mesh",):
                self.marker = payload
                if payload is not None:  # recovery: kept on disk whenever it changes
                    self.device.disk.marker = payload
            case ("apps", app, "stopped"):
                if payload is None:
                    self.tombstones.discard(app)
                else:
                    self.tombstones.add(app)
            case ("nodes", node_id, "sync"):
                marker = self._syncing.get(payload) if isinstance(payload, int) else None
                if node_id == self.id and marker is not None:
                    marker.set()
            case ("apps", app, "spec"):
                self._set(self.specs, app, payload)
                if isinstance(payload, AppSpec):
                    self.device.disk.specs[app] = payload
                else:
                    self.device.disk.specs.pop(app, None)
            case ("apps", app, "owner"):
                owner = self.owners.get(app)
                if owner and isinstance(payload, OwnerRecord) and reconcile.stale_owner(
                        owner, payload):
                    # node.py: a claim that landed late is refused; an owner puts its back
                    self.trace(f"refused owner {app}={payload.node}@{payload.epoch}: older "
                               f"than {owner.node}@{owner.epoch}")
                    if owner.node == self.id and self.control:
                        self.spawn(self.control.publish(self.topic(app, "owner"), owner,
                                                        retain=True), "owner")
                    return
                self._set(self.owners, app, payload)
            case ("apps", app, "snapshot"):
                held = self.snapshots.get(app)
                if not isinstance(payload, SimSnapshot):
                    self.snapshots.pop(app, None)
                elif held is None or (payload.epoch, payload.seq) >= (held.epoch, held.seq):
                    self.snapshots[app] = payload
                else:  # `Inbox._check_head`: older than the one held, refused
                    self.trace(f"refused checkpoint {app} {payload.epoch}.{payload.seq}: "
                               f"older than {held.epoch}.{held.seq}")
                self._wake(app)

    def _set(self, table: dict[str, Any], key: str, payload: object) -> None:
        if payload is None:
            table.pop(key, None)
        else:
            table[key] = payload
        self.dirty.set()
        self._wake(key)

    def _wake(self, key: str) -> None:
        waker = self.waking.get(key)
        if waker is not None:
            waker.set()

    # --- reconciling ------------------------------------------------------------------------

    def record(self) -> NodeRecord:
        running = tuple(sorted(n for n, a in self.hosted.items() if a.status == "running"))
        failed = {**self.missing, **{n: "failed" for n, a in self.hosted.items()
                                     if a.status == "failed"}}
        return NodeRecord(id=self.id, caps=self.device.caps, labels=self.device.labels,
                          apps=running, broker="sim", load=float(len(running)),
                          started_ms=self._started_ms, failed=dict(sorted(failed.items())))

    async def _publish_record(self) -> None:
        record = self.record()
        if self.control and not self.leaving and self.members.get(self.id) != record:
            self.members[self.id] = record
            await self.control.publish(f"{self.root}/nodes/{self.id}", record, retain=True)

    def _view(self) -> View:
        members = dict(self.members)
        members[self.id] = self.record()
        hosted = {name: Running(app.epoch, app.spec.module, app.status)
                  for name, app in self.hosted.items()}
        return View(self.id, members, dict(self.specs), dict(self.owners), hosted,
                    now=self.loop.now, claim_after=self.claim_after, synced=self.synced,
                    deferred=frozenset(self.deferred), tombstones=frozenset(self.tombstones),
                    checkpoints={name: (snap.epoch, snap.seq)
                                 for name, snap in self.snapshots.items()})

    async def _reconciler(self) -> None:
        while True:
            await first(self.dirty.wait(), self.sleep(RECONCILE_EVERY_S))
            self.dirty.clear()
            await self.sleep(0.005)  # let a burst of retained messages land first
            self.dirty.clear()
            await self._busy.acquire()
            try:
                if not self.leaving:
                    await self._reconcile_all()
            except MeshError:
                pass  # logged by the real node; tried again on the next change
            finally:
                self._busy.release()

    async def _reconcile_all(self) -> None:
        view = self._view()
        actions = reconcile.decide(view)
        missing, self.missing = self.missing, {a.app: a.reason for a in actions
                                               if isinstance(a, Missing)}
        for name in self.missing.keys() - missing.keys():  # an alarm, not a fresh start
            self.trace(f"missing {name}: {self.missing[name]}")
        todo = [a for a in actions if not isinstance(a, Unplaceable | Missing)]
        if todo:
            self.trace(f"decide {_brief(todo)} | owners {_owners(view)}")
        for action in todo:
            # Each app's action goes on by itself (as in mesh/node.py): a slow one holds up
            # neither this pass nor another app's.
            if action.app not in self.acting:
                self.acting[action.app] = self.spawn(self._act(action, view),
                                                      type(action).__name__)
        await self._publish_record()

    async def _act(self, action: reconcile.Action, view: View) -> None:
        try:
            await actions.execute(self, action, view)
        except MeshError:
            pass  # tried again on the next change, or within RECONCILE_EVERY_S
        else:
            self.dirty.set()  # the node's record, and what it decides next, may change now
        finally:
            self.acting.pop(action.app, None)


    def app_lost(self, app: SimApp, reason: str) -> None:
        """The app's session ended under us: taken over, or the broker is gone."""
        if self.hosted.get(app.name) is app:
            self.spawn(actions.fence_if_taken(self, app, reason), f"{app.name}-lost")


def _brief(actions: Sequence[reconcile.Action]) -> str:
    return ", ".join(f"{type(a).__name__}({', '.join(str(v) for v in vars_of(a))})"
                     for a in actions)


def vars_of(action: object) -> list[object]:
    return [getattr(action, name) for name in getattr(action, "__match_args__", ())]


def _owners(view: View) -> str:
    return " ".join(f"{app}={o.node}@{o.epoch}" for app, o in sorted(view.owners.items()))
