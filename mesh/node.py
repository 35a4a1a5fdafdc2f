"""The mesh node: it gathers what the mesh looks like and carries out what `mesh.reconcile` decides.

Every node keeps the same view of the retained state (node records, app specs, owner records,
newest checkpoints). On every change it asks `mesh.reconcile.decide` what to do and does it:
claim an app and start it from its newest checkpoint, start one handed to it, hand one over,
stop one that another node owns (fencing). The rooms next door: `mesh.commands` answers
commands, `mesh.transfer` moves checkpoints and modules, `mesh.recovery` gives a new broker what
a lost one held, `mesh.hosted` runs one app. Wasm runs on per-app worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh import actions, commands, recovery, wire
from mesh.authority import Authority
from mesh.context import HostContext
from mesh.desired import DesiredState
from mesh.errors import BrokerError, MeshError, NotAdmitted, TrustError, WireError
from mesh.events import Events
from mesh.hosted import HostedApp
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.reconcile import (
    Action,
    Missing,
    Running,
    Unplaceable,
    View,
    decide,
    stale_owner,
)
from mesh.runtime import AppModule, Runtime
from mesh.store import StateStore
from mesh.topics import Topics
from mesh.transfer import Inbox

log = logging.getLogger(__name__)

SYNC_WAIT_S = 30.0
RECONCILE_EVERY_S = 10.0
PRUNE_EVERY_S = 5.0
MAX_UNCHECKED = 4096  # records held for an admission still to come, at most


@dataclass
class NodeConfig:
    node_id: str
    broker: BrokerAddress
    state_dir: Path
    root: str = "mesh"
    caps: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    sensors: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    keepalive: int = 5
    app_memory_bytes: int | None = None
    call_timeout_ms: int | None = None
    token: str | None = None  # a join token to redeem on the first start (`mesh.authority`)


class Node:
    """`async with Node(config) as node: await node.stopped` runs a mesh node."""

    def __init__(self, config: NodeConfig, carry: recovery.Carry | None = None) -> None:
        """`carry`: what to give the broker if it lacks it (see `mesh.recovery`)."""
        self.config = config
        self.carried = carry
        self.carry: recovery.Carry | None = None  # set when the broker is lost
        self.id = config.node_id
        self.topics = Topics(config.root)
        self.store = StateStore(config.state_dir)
        self.authority = Authority.load(config.state_dir, config.node_id, config.root,
                                        config.token)
        self.runtime = Runtime(cache_dir=self.store.compiled_dir)
        self.inbox = Inbox(self.topics, self.authority)
        self.members: dict[str, wire.NodeRecord] = {}
        self.departed: dict[str, float] = {}  # node id -> when its record was cleared
        self.desired = DesiredState(self.authority, self.topics, self.store)
        self.specs = self.desired.specs  # the apps to run, and
        self.tombstones = self.desired.tombstones  # the apps stopped since last deployed
        self.owners: dict[str, wire.OwnerRecord] = {}
        self.hosted: dict[str, HostedApp] = {}
        self.stopped: asyncio.Event = asyncio.Event()
        self.leaving = False
        self.revoked = False  # this device was taken out of the mesh (`mesh revoke`)
        self.marker: wire.MeshRecord | None = None  # the mesh's marker, as the broker holds it
        self._marked = asyncio.Event()  # ... once it is here (see `marked`)
        self.missing: dict[str, str] = {}  # apps that should start here but have no checkpoint
        self.claim_after = 0.0  # after a broker change, claims of others' apps wait this long
        self.deferred: set[str] = set()  # own apps from disk, resumed after a grace (recovery)
        self.deferred_lost = False  # ... on a broker that had lost its store
        # Records signed by a device not (yet) seen admitted, by topic: checked again when
        # its admission comes.
        self._unchecked: dict[str, tuple[str, bytes]] = {}
        self._started_ms = int(time.time() * 1000)
        self.modules: dict[str, AppModule] = {}  # loaded, by sha256 (see `actions.module`)
        self.kept = recovery.DiskCopies(self.store, self.spawn)  # apps' checkpoints on disk
        self._said_goodbye: set[str] = set()  # peers whose mDNS goodbye came
        self._synced = False  # every retained record the broker held at our join is here
        self._syncing: dict[bytes, asyncio.Event] = {}  # markers on their way back to us
        self._dirty = asyncio.Event()
        self.unplaceable: set[str] = set()
        self._pruned = 0.0  # when the inbox was last pruned
        self._control: Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.busy = asyncio.Lock()  # one reconcile pass, or the leave, at a time
        self.acting: dict[str, asyncio.Task[None]] = {}  # each app's action under way
        self.event = Events(self.id, self._send_event)
        self.host_ctx = HostContext(self.runtime, config.broker, self.topics, config.keepalive,
                                config.sensors, self.event, self._app_lost,
                                config.app_memory_bytes, config.call_timeout_ms, self.kept.keep,
                                self.authority, self.authority.app_session)

    @property
    def control(self) -> Connection:
        assert self._control is not None, "the node has not joined"
        return self._control

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        try:
            await self._join()
        except BaseException:
            await self._cancel_all()  # what a rebuild started (copies, resumes, wakes)
            if self._control is not None:
                await self._control.close()
            self.runtime.close()
            raise
        return self

    async def _join(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        control = Connection(self.config.broker, f"{self.config.root}-node-{self.id}",
                             on_message=self._on_message, keepalive=self.config.keepalive,
                             will=(self.topics.node(self.id), b"", True))
        await control.connect()
        self._control = control
        t = self.topics
        # The broker sends retained messages filter by filter: admissions, revocations and our
        # data keys first (every other record is checked or opened with them), then
        # checkpoints, all here before the owner records that may make this node restore one.
        await control.subscribe(f"{t.root}/admissions/+", f"{t.root}/revoked/+",
                                f"{t.root}/keys/{self.id}", *self._checkpoint_filters(),
                                f"{t.root}/nodes/+", f"{t.root}/apps/+/spec",
                                f"{t.root}/apps/+/owner", f"{t.root}/apps/+/stopped", t.mesh,
                                t.cmd, t.node_cmd(self.id), t.node_sync(self.id))
        if self.authority.admission is not None:  # how the others know our key
            await control.publish(f"{t.root}/admissions/{self.id}", self.authority.admission,
                                  retain=True)
        await self._publish_record()
        # The broker may still be sending the retained records (a bounded window at a time),
        # and the ack of our own publish can overtake them: no claim can lower an epoch we
        # have not seen yet once our marker is back.
        await self.sync()
        self._synced = True
        await recovery.after_join(self, self.carried)
        self.event("joined", detail={"caps": ",".join(self.config.caps)})
        self._tasks = [asyncio.create_task(self._reconciler(), name="reconcile"),
                       asyncio.create_task(self._watch_control(control), name="control")]
        log.info("node %s joined the mesh at %s", self.id, self.config.broker)

    async def __aexit__(self, *exc: object) -> None:
        await self.leave()
        await self._cancel_all()
        if self._control:
            await self._control.close()
        self.runtime.close()

    async def leave(self) -> None:
        """Leave gracefully: hand every app to the node that should run it next."""
        await actions.leave(self)

    def _checkpoint_filters(self) -> tuple[str, str]:
        return f"{self.topics.root}/apps/+/snapshot/+", f"{self.topics.root}/apps/+/snapshot"

    @property
    def broker_gone(self) -> bool:
        return self._control is None or bool(self._control.lost_reason)

    async def said_goodbye(self) -> None:
        """The end of a leave: gone from the broker (once a suspend in progress is done)."""
        if self._control and self._control.lost_reason:
            for task in self._tasks:
                if task.get_name() == "control":
                    await asyncio.gather(task, return_exceptions=True)
        elif self._control:
            self.event("left")
            with contextlib.suppress(MeshError):
                await self.control.publish(self.topics.node(self.id), b"", retain=True)
        self.stopped.set()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `work` in the background, owned by the node: cancelled when it stops."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _cancel_all(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in (*self._tasks, *self._background) if t is not current]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_control(self, control: Connection) -> None:
        assert control.lost is not None
        reason = await asyncio.shield(control.lost)
        log.error("node %s lost the broker (%s): suspending every app, then joining again",
                  self.id, reason)
        self.leaving = True
        self.carry = await recovery.suspend(self)
        self.stopped.set()

    # --- what this node sees ----------------------------------------------------------------

    def view(self) -> View:
        """The mesh as this node sees it now, for `mesh.reconcile`."""
        return View(node=self.id, members=self.live_members(), specs=dict(self.specs),
                    owners=dict(self.owners),
                    hosted={name: Running(h.epoch, h.spec.module, h.state)
                            for name, h in self.hosted.items()},
                    now=time.monotonic(), claim_after=self.claim_after,
                    deferred=frozenset(self.deferred), tombstones=frozenset(self.tombstones),
                    synced=self._synced, checkpoints=self.inbox.versions())

    def live_members(self) -> dict[str, wire.NodeRecord]:
        members = {node_id: replace(record, leaving=True) if node_id in self._said_goodbye
                   else record for node_id, record in self.members.items()}
        members[self.id] = self.record()
        return members

    @property
    def marked(self) -> bool:
        """The broker holds the mesh's marker: it did not lose its store (or a survivor has
        given it back what the mesh held)."""
        return self._marked.is_set()

    async def until_marked(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the mesh's marker; whether the broker holds it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._marked.wait()
        return self.marked

    async def sync(self) -> None:
        """Wait until everything the broker sent us before now has arrived: a marker we send
        ourselves comes back after it, on the same session."""
        marker = secrets.token_hex(8).encode()
        back = self._syncing[marker] = asyncio.Event()
        try:
            await self.control.publish(self.topics.node_sync(self.id), marker)
            async with asyncio.timeout(SYNC_WAIT_S):
                await back.wait()
        except TimeoutError:
            raise BrokerError(f"the broker did not answer within {SYNC_WAIT_S:.0f} s") from None
        finally:
            del self._syncing[marker]

    def peer_gone(self, node_id: str) -> None:
        """A peer said goodbye on the LAN: place nothing more there, as if it were leaving."""
        log.info("node %s said goodbye on the LAN", node_id)
        self.event("peer-left", detail={"peer": node_id})
        self._said_goodbye.add(node_id)
        self._dirty.set()

    def peer_back(self, node_id: str) -> None:
        """A peer announced itself on the LAN (again)."""
        if node_id in self._said_goodbye:
            self._said_goodbye.discard(node_id)
            self._dirty.set()

    def changed(self) -> None:
        """Something the decisions depend on changed: reconcile soon."""
        self._dirty.set()

    def wake_after(self, seconds: float) -> None:
        """Reconcile again in `seconds` (when a wait the view cannot tell of has passed)."""
        async def wake() -> None:
            await asyncio.sleep(seconds)
            self._dirty.set()
        self.spawn(wake(), "wake")

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        self._take(message.topic, bytes(message.payload))

    def _take(self, topic: str, payload: bytes) -> None:
        parts = self.topics.parse(topic)
        try:
            self._dispatch(parts, payload)
        except NotAdmitted as exc:
            # Its signer's admission may still be on its way (retained messages come filter by
            # filter, and not every broker keeps that order): checked again when it comes.
            if parts[-1:] != ("cmd",) and (topic in self._unchecked
                                           or len(self._unchecked) < MAX_UNCHECKED):
                self._unchecked[topic] = (exc.device, payload)
            self.event("rejected", reason=f"{topic}: {exc} (held until its admission comes)",
                       detail={"source": topic})
            return
        except (WireError, TrustError) as exc:
            self.event("rejected", reason=f"{topic}: {exc}", detail={"source": topic})
            return
        self._unchecked.pop(topic, None)
        if parts[:1] == ("admissions",) and len(parts) == 2:
            for waiting, (device, held) in list(self._unchecked.items()):
                if device == parts[1]:
                    del self._unchecked[waiting]
                    self._take(waiting, held)

    def _dispatch(self, parts: tuple[str, ...], payload: bytes) -> None:
        match parts:
            case ("nodes", node_id):
                self._node_record(node_id, payload)
            case ("apps", app, "spec" | "stopped" as part):
                try:
                    (self.desired.spec if part == "spec" else self.desired.tombstone)(app, payload)
                finally:
                    self._dirty.set()
                    self.inbox.wake(app)
                if part == "spec" and (spec := self.specs.get(app)) is not None:
                    self.spawn(actions.hold_module(self, spec.module), "hold-module")
            case ("apps", app, "owner"):
                self._owner_record(app, payload)
            case ("apps", app, "snapshot", *index) if len(index) <= 1:
                self._bare_clear(app, payload)
                self.inbox.snapshot(app, index[0] if index else None, payload)
            case ("modules", sha256):
                self.inbox.module(sha256, None, payload)
            case ("modules", sha256, index):
                self.inbox.module(sha256, index, payload)
            case ("cmd",):
                commands.receive(self, payload, everyone=True)
            case ("nodes", node_id, "cmd") if node_id == self.id:
                commands.receive(self, payload, everyone=False)
            case ("admissions", device):
                self.authority.learn_admission(device, payload)
            case ("revoked", device):
                if self.authority.learn_revocation(device, payload):
                    self._revoked(device)
            case ("keys", device) if device == self.id:
                if self.authority.learn_grant(payload) and self.inbox.locked:
                    self.inbox.locked = False  # what it refused for lack of the key: again
                    self.spawn(self.control.subscribe(*self._checkpoint_filters()), "reopen")
            case ("mesh",):
                self.marker = wire.decode(wire.MeshRecord, payload) if payload else None
                if self.marker is None:
                    self._marked.clear()
                else:  # the store this device's state is kept for, from now on
                    self._marked.set()
                    self.spawn(asyncio.to_thread(self.store.save_marker, self.marker), "marker")
            case ("nodes", node_id, "sync") if node_id == self.id:
                if (marker := self._syncing.get(payload)) is not None:
                    marker.set()

    def _revoked(self, device: str) -> None:
        """A device taken out of the mesh is no member: its apps go on elsewhere from the last
        checkpoint the mesh took from it. This one stops its apps (no node would take a hand
        over from it) and the node (`revoked`)."""
        if device != self.id:
            self.members.pop(device, None)
            self._dirty.set()
        elif not self.revoked:
            log.error("node %s was revoked from the mesh: stopping its apps", self.id)
            self.revoked = self.leaving = True
            self.spawn(actions.close_all(self), "revoked")

    def _node_record(self, node_id: str, payload: bytes) -> None:
        topic = self.topics.node(node_id)
        try:
            body = self.authority.open_record(topic, payload, signer=node_id)
        except TrustError:
            if node_id == self.id and not self.leaving:  # ours, forged: put it back
                self.spawn(self.publish_record(topic, self.record()), "record")
            raise
        if body:
            self.authority.check_caps(node_id, wire.decode(wire.NodeRecord, body).caps)
            self.departed.pop(node_id, None)
        elif node_id in self.members:  # a broker going down gracefully sends every Will
            self.departed[node_id] = time.monotonic()
        self._set(self.members, node_id, body, wire.NodeRecord)

    def _bare_clear(self, app: str, payload: bytes) -> None:
        """In a secure mesh only a stop clears an app's checkpoint and owner record (they
        cannot be signed): a clear while the app has a spec is refused."""
        if not payload and self.authority.secure and app in self.specs:
            raise TrustError(f"a bare clear of a record of {app}, which is deployed")

    def _owner_record(self, app: str, payload: bytes) -> None:
        topic = self.topics.app(app, "owner")
        self._bare_clear(app, payload)
        body = self.authority.open_record(topic, payload)
        held = self.owners.get(app)
        if held and body and stale_owner(held, wire.decode(wire.OwnerRecord, body)):
            if held.node == self.id:  # ours: put it back
                self.spawn(self.publish_record(topic, held), "owner")
            raise WireError(f"an owner record of {app} older than epoch {held.epoch}")
        self._set(self.owners, app, body, wire.OwnerRecord)

    def _set(self, table: dict[str, Any], key: str, payload: bytes, cls: type[Any]) -> None:
        if not payload:
            table.pop(key, None)
        else:
            value = wire.decode(cls, payload)
            named = value.id if cls is wire.NodeRecord else key
            if named != key:
                raise WireError(f"a {cls.KIND} for {named!r} published under {key!r}")
            table[key] = value
        self._dirty.set()  # our own record cleared (a late Last Will) is published again
        self.inbox.wake(key)

    # --- reconciling ------------------------------------------------------------------------

    async def _reconciler(self) -> None:
        while True:
            # On every change, and now and then anyway: a start that failed (a module not in
            # the store yet) is tried again without waiting for an unrelated change.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONCILE_EVERY_S):
                    await self._dirty.wait()
            self._dirty.clear()
            await asyncio.sleep(0.005)  # let a burst of retained messages land first
            self._dirty.clear()
            try:
                async with self.busy:
                    if not self.leaving:
                        await self._reconcile()
            except Exception:
                log.exception("reconciling failed; will retry on the next change")

    async def _reconcile(self) -> None:
        view = self.view()
        if view.synced and view.now - self._pruned >= PRUNE_EVERY_S:
            self._pruned = view.now
            if dropped := self.inbox.prune(view.specs, view.now):
                log.info("dropped %d bytes of checkpoint pieces no app needs", dropped)
        todo = decide(view)
        actions.report(self, todo)
        for action in todo:
            # Each app's action goes on by itself: a slow one (a busy app, a checkpoint still
            # arriving) holds up neither this pass nor another app's failover.
            if not isinstance(action, Unplaceable | Missing) and action.app not in self.acting:
                self.acting[action.app] = self.spawn(
                    self._act(action, view), f"{action.app}-{type(action).__name__.lower()}")
        await self._publish_record()

    async def _act(self, action: Action, view: View) -> None:
        try:
            await actions.execute(self, action, view)
        except Exception as exc:  # tried again on the next change, or within RECONCILE_EVERY_S
            log.warning("%s: %s", action.app, exc)
        else:
            self.changed()  # the node's record, and what it decides next, may change now
        finally:
            self.acting.pop(action.app, None)

    def _app_lost(self, hosted: HostedApp, reason: str) -> None:
        """The app's session ended under us: another node took it over, or the broker is gone."""
        if self.hosted.get(hosted.name) is hosted:
            self.spawn(actions.fence_if_taken(self, hosted, reason), f"{hosted.name}-lost")

    # --- records and events -----------------------------------------------------------------

    def record(self) -> wire.NodeRecord:
        running = tuple(sorted(n for n, h in self.hosted.items() if h.state == "running"))
        failed = {n: r[:200] for n, r in sorted({**self.missing, **{
            n: h.failure or "failed" for n, h in self.hosted.items() if h.state == "failed"}
            }.items())}
        return wire.NodeRecord(id=self.id, caps=self.config.caps, labels=self.config.labels,
                               apps=running, broker=str(self.config.broker),
                               load=float(len(running)), started_ms=self._started_ms,
                               failed=failed)

    async def _publish_record(self) -> None:
        record = self.record()
        if self._control and not self.leaving and self.members.get(self.id) != record:
            self.members[self.id] = record
            await self.publish_record(self.topics.node(self.id), record)

    async def publish_record(self, topic: str, record: wire.Kinded) -> None:
        """Publish a record of ours, retained (signed, in a secure mesh)."""
        await self.control.publish(topic, self.authority.sign_record(topic, wire.encode(record)),
                                   retain=True)

    def _send_event(self, data: bytes) -> None:
        if self._control and not self._control.lost_reason:
            self._control.publish_nowait(self.topics.events, data)
