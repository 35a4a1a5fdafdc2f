"""`SimNode`: mesh/node.py's executor around the real decision code, on the simulated broker.

One `SimNode` is one `mesh.node.Node` object: one join of a broker (with mesh/actions.py and
mesh/recovery.py, which carry out its actions and its rebuild). It keeps the members,
specs, owner records and newest checkpoints from the retained messages; joins with a Last Will
that clears its record, subscribes, publishes its record and then a QoS 1 sync marker on
`<root>/nodes/<id>/sync`, and counts itself synced (`View.synced`) once the marker is back (its
session's order puts every retained message queued before it first). It then runs
`mesh.reconcile.decide` on every change (debounced 5 ms, and every 10 s anyway) and carries out
each app's action as its own task (none for an app whose last one is still under way), with
the real node's steps, awaits and re-checks; a lost app session is fenced if
the control session still answers; a lost broker suspends every app, keeping its state
(`Carry`), for the next join, which gives back what `plan_rebuild` says. The device loop
around it (join, backoff, rejoin with `only_if_empty`) is `tests.sim.device`.

Not modelled: modules (always at hand, a few ms to load), commands and replies, events, mDNS
goodbyes, failed apps (wasm traps, dead letters), snapshot chunks that are incomplete, the
checkpoint seq that owner records carry (no decision reads it yet). Mirrors mesh/node.py,
actions.py and recovery.py as of commit 83f55ef.
"""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from mesh import reconcile
from mesh.errors import BrokerError, MeshError
from mesh.reconcile import (
    HandOver,
    Held,
    Running,
    Unplaceable,
    View,
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
REJOIN_GRACE_S = 1.0  # plus 1.5x keepalive
KEEP_EVERY_S = 5.0
SYNC_WAIT_S = 30.0


class LeaveAborted(Exception):
    """The real leave would die here with a KeyError (the process exits)."""


@dataclass
class Carry:
    """What a node held when it lost its broker (`mesh.node.Carry`)."""

    held: Held
    retained: dict[str, SimSnapshot] = field(default_factory=dict)  # others' checkpoints
    suspended: dict[str, SimSnapshot] = field(default_factory=dict)  # its own apps' state


class SimNode:
    # The `no-sync` mutant clears this: synced as soon as the record is acknowledged.
    SYNC_MARKER: ClassVar[bool] = True
    # A finding about mesh/node.py's leave (see `leave`): a violation when set.
    LEAVE_KEYERROR_IS_VIOLATION: ClassVar[bool] = False

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
        self.members: dict[str, NodeRecord] = {}
        self.specs: dict[str, AppSpec] = {}
        self.owners: dict[str, OwnerRecord] = {}
        self.snapshots: dict[str, SimSnapshot] = {}
        self.hosted: dict[str, SimApp] = {}
        self.stopped = Event()
        self.leaving = False
        self.synced = False
        self._sync_token = 0
        self._synced = Event()
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
                                f"{root}/nodes/{self.id}/sync")
        await self._publish_record()
        if self.SYNC_MARKER:
            self._sync_token = self.world.token()
            await control.publish(f"{root}/nodes/{self.id}/sync", self._sync_token)
            await first(self._synced.wait(), control.lost, self.sleep(SYNC_WAIT_S))
            if not self.synced:
                raise BrokerError("the broker did not send the mesh's records in time")
        else:
            self.synced = True
        if self.carried is not None:
            await self._rebuild(self.carried)
        self.trace(f"joined ({len(self.specs)} specs, {len(self.owners)} owners)")
        self.spawn(self._reconciler(), "reconcile")
        self.spawn(self._watch_control(control), "control")

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
        for action in reconcile.plan_leave(self._view()):
            app = self.hosted.get(action.app)
            if app is None:  # mesh/node.py: `self.hosted[action.app]` raises KeyError
                self.world.finding(
                    f"{self.id}: node.leave() raises KeyError: {action.app} left `hosted` "
                    "during the leave (broker lost, or a session taken over); the process "
                    "dies with its record still retained", self.LEAVE_KEYERROR_IS_VIOLATION)
                raise LeaveAborted(action.app)
            try:
                if isinstance(action, HandOver):
                    await actions.hand_over(self, app, action.target, action.epoch,
                                          self.owners.get(action.app))
                else:
                    await app.shutdown()
            except MeshError:
                await app.close()
            self.hosted.pop(action.app, None)
        if control is not None and not control.lost_reason:
            with contextlib.suppress(BrokerError):
                await control.publish(f"{self.root}/nodes/{self.id}", None, retain=True)
        self.stopped.set()

    async def _watch_control(self, control: Client) -> None:
        reason = await control.lost
        self.trace(f"lost the broker ({reason}): suspending {sorted(self.hosted)}")
        self.leaving = True
        suspended: dict[str, SimSnapshot] = {}
        for name, app in list(self.hosted.items()):
            snap = await app.suspend()
            if snap is not None:
                suspended[name] = snap
                self.device.disk.checkpoints[name] = snap
        self.hosted.clear()
        held = Held(dict(self.specs), dict(self.owners),
                    {name: snap.epoch for name, snap in suspended.items()})
        self.carry = Carry(held, dict(self.snapshots), suspended)
        self.stopped.set()

    async def _rebuild(self, carry: Carry) -> None:
        """Joined after losing a broker: give this one back what it lacks of what we held."""
        assert self.control is not None
        control, held = self.control, carry.held
        plan = reconcile.plan_rebuild(self._view(), held)
        for name in plan.forget:  # the mesh went on without us: ours are stale
            self.gone_from_here(name)
        if held.only_if_empty and self.specs:
            return
        for name, snap in carry.retained.items():  # adopt: restore a lost device's apps
            self.snapshots.setdefault(name, snap)
        for spec in plan.specs:
            await control.publish(self.topic(spec.app, "spec"), spec, retain=True)
        for name, epoch in plan.resume:
            kept = carry.suspended[name]
            snap = replace(kept, epoch=epoch, seq=kept.seq + 1, applied=())
            await control.publish(self.topic(name, "snapshot"), snap, retain=True)
            record = self.owners[name] = OwnerRecord(self.id, epoch)
            await control.publish(self.topic(name, "owner"), record, retain=True)
        for name, owner in plan.owners:
            self.owners[name] = owner
            await control.publish(self.topic(name, "owner"), owner, retain=True)
        if plan.grace:
            grace = REJOIN_GRACE_S + 1.5 * self.device.keepalive
            self.claim_after = self.loop.now + grace
            self.spawn(self._wake_after(grace), "rejoin-grace")
        self.trace(f"rebuilt: specs {[s.app for s in plan.specs]} resumed {plan.resume} "
                   f"owners {[n for n, _ in plan.owners]}")

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
            case ("nodes", node_id, "sync"):
                if node_id == self.id and payload == self._sync_token:
                    self.synced = True
                    self._synced.set()
                    self.dirty.set()
            case ("apps", app, "spec"):
                self._set(self.specs, app, payload)
                if isinstance(payload, AppSpec):
                    self.device.disk.specs[app] = payload
                else:
                    self.device.disk.specs.pop(app, None)
            case ("apps", app, "owner"):
                self._set(self.owners, app, payload)
            case ("apps", app, "snapshot"):
                if isinstance(payload, SimSnapshot):
                    self.snapshots[app] = payload
                else:
                    self.snapshots.pop(app, None)
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
        return NodeRecord(id=self.id, caps=self.device.caps, labels=self.device.labels,
                          apps=running, broker="sim", load=float(len(running)),
                          started_ms=self._started_ms)

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
                    now=self.loop.now, claim_after=self.claim_after, synced=self.synced)

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
        todo = [a for a in actions if not isinstance(a, Unplaceable)]
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
