"""The mesh node: membership, placement, ownership, migration and failover over MQTT.

Every node keeps the same view of the retained state (node records, app specs, owner records,
newest checkpoints) and reconciles it with what it runs:

- an app this node should run (placement) with no live owner: claim it (owner epoch + 1) and
  start it from the newest checkpoint (failover), or fresh;
- an app whose owner record names this node after a handover: restore the snapshot written for
  that epoch and take the app's session;
- an app this node runs but another node should (a join, a pin, a leave): hand it over;
- an app this node runs but whose owner record names another node at the same or a higher
  epoch: stop it at once (fencing).

Commands on `<root>/cmd` are answered by one node, the one with the lowest id (every node knows
which); commands on `<root>/nodes/<id>/cmd` by that node. Wasm runs on per-app worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh import chunks, wire
from mesh.errors import BrokerError, MeshError, SnapshotIncomplete, WireError
from mesh.hosted import HostContext, HostedApp, publish_blob, publish_snapshot
from mesh.mqtt import BrokerAddress, Connection, Message
from mesh.placement import Placement
from mesh.runtime import AppModule, Runtime
from mesh.store import StateStore
from mesh.topics import Topics

log = logging.getLogger(__name__)

MAX_MODULE_BYTES = 64 << 20
MAX_SNAPSHOT_BYTES = 1 << 30
MODULE_WAIT_S = 30.0
DEPLOY_MODULE_WAIT_S = 3.0
SNAPSHOT_WAIT_S = 5.0
RECONCILE_EVERY_S = 10.0
REJOIN_GRACE_S = 1.0  # plus 1.5x keepalive
KEEP_EVERY_S = 5.0  # how often an app's newest checkpoint is also written to this device's disk


@dataclass(frozen=True)
class Checkpoint:
    """An app's newest checkpoint as this node holds it."""

    head: bytes  # the retained message it was decoded from
    snap: wire.Snapshot
    pieces: list[bytes] | None = None  # its memory bytes, when they came as chunks

    def matches(self) -> bool:
        """Whether the chunks are this checkpoint's own (they hash right); takes a while."""
        external = self.snap.memory.external
        if external is None:
            return True
        return self.pieces is not None and chunks.matches(external, self.pieces)


@dataclass
class Carry:
    """What a node held when it lost its broker, for the next one (which may hold none of it).

    The next broker may be a new one that a survivor just started: it gets the specs, the
    owner records and the modules back from the nodes, which keep running the apps they ran
    (from the state they had, `suspended`) and bring back the apps of a lost device from the
    newest checkpoint they hold (`retained`).
    """

    members: set[str]
    specs: dict[str, wire.AppSpec]
    owners: dict[str, wire.OwnerRecord]
    retained: chunks.Retained
    suspended: dict[str, wire.Snapshot] = field(default_factory=dict)
    # Given back only to a broker that holds no app at all (one that lost everything, as an
    # embedded broker does when it restarts); a broker that has apps is the mesh's memory.
    only_if_empty: bool = False

    @classmethod
    def from_disk(cls, store: StateStore, node_id: str) -> Carry:
        """What this device kept on disk (see `mesh.store`)."""
        kept = store.checkpoints()
        return cls(set(), store.specs(), {app: wire.OwnerRecord(node_id, snap.epoch)
                                          for app, snap in kept.items()},
                   chunks.Retained(), kept, only_if_empty=True)


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


class Node:
    """`async with Node(config) as node: await node.stopped` runs a mesh node."""

    def __init__(self, config: NodeConfig, carry: Carry | None = None) -> None:
        """`carry`: what to give the broker if it lacks it (see `Carry`)."""
        self.config = config
        self.carried = carry
        self.carry: Carry | None = None  # set when the broker is lost
        self.id = config.node_id
        self.topics = Topics(config.root)
        self.runtime = Runtime(cache_dir=config.state_dir / "compiled")
        self.members: dict[str, wire.NodeRecord] = {}
        self.specs: dict[str, wire.AppSpec] = {}
        self.owners: dict[str, wire.OwnerRecord] = {}
        self._decoded: dict[str, Checkpoint | bytes] = {}  # or the head of a bad one
        self.hosted: dict[str, HostedApp] = {}
        self.stopped: asyncio.Event = asyncio.Event()
        self._leaving = False
        self._started_ms = int(time.time() * 1000)
        self._modules: dict[str, AppModule] = {}
        self._module_waiters: dict[str, asyncio.Future[bytes]] = {}
        self._retained = chunks.Retained()
        self.store = StateStore(config.state_dir)
        self._kept_at: dict[str, float] = {}  # when each app's checkpoint was last kept on disk
        self._keeping: dict[str, asyncio.Task[None]] = {}  # ... and that write
        self._claim_after = 0.0  # after a broker change, claims of others' apps wait this long
        self._said_goodbye: set[str] = set()  # peers whose mDNS goodbye came
        self._dirty = asyncio.Event()
        self._waking: dict[str, asyncio.Event] = {}
        self._unplaceable: set[str] = set()
        self._control: Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._busy = asyncio.Lock()  # one reconcile pass, or the leave, at a time
        self._ctx = HostContext(self.runtime, config.broker, self.topics, config.keepalive,
                                config.sensors, self.event, self._app_lost,
                                config.app_memory_bytes, config.call_timeout_ms, self._keep)

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        try:
            await self._join()
        except BaseException:
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
        # Checkpoints first: the broker sends retained messages filter by filter, so they are
        # all here before the owner records that may make this node restore one.
        await control.subscribe(f"{t.root}/apps/+/snapshot/+", f"{t.root}/apps/+/snapshot",
                                f"{t.root}/nodes/+", f"{t.root}/apps/+/spec",
                                f"{t.root}/apps/+/owner", t.cmd, t.node_cmd(self.id))
        await self._publish_record()  # answered after the retained messages: all here now
        if self.carried is not None:
            await self._rebuild(self.carried)
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
        if self._leaving:
            return
        self._leaving = True
        log.info("node %s leaving: handing over %d apps", self.id, len(self.hosted))
        if self._control and not self._control.lost_reason:
            with contextlib.suppress(MeshError):  # others stop placing apps here at once
                await self._control.publish(self.topics.node(self.id), wire.encode(
                    replace(self._record(), leaving=True)), retain=True)
        await self._busy.acquire()  # let a reconcile pass in progress finish; none after it
        others = Placement(m for m in self._live_members().values()
                           if m.id != self.id and not m.leaving)
        for name, hosted in list(self.hosted.items()):
            target = others.best(hosted.spec)
            try:
                if target and hosted.state == "running":
                    await self._hand_over(hosted, target)
                else:
                    await hosted.shutdown()
            except MeshError as exc:
                log.warning("could not hand %s over: %s", name, exc)
                await hosted.close()
            self.hosted.pop(name, None)
        if self._control and not self._control.lost_reason:
            self.event("left")
            with contextlib.suppress(MeshError):
                await self._control.publish(self.topics.node(self.id), b"", retain=True)
        self.stopped.set()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
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
        self._leaving = True
        suspended = {}
        for name, hosted in list(self.hosted.items()):
            try:
                snap = await hosted.suspend()
                if snap is not None:
                    suspended[name] = snap
                    await asyncio.to_thread(self.store.save_checkpoint, snap)
            except (MeshError, OSError) as exc:
                log.warning("%s: could not keep its state: %s", name, exc)
                await hosted.close()
        self.hosted.clear()
        self.carry = Carry(set(self.members) - {self.id}, dict(self.specs), dict(self.owners),
                           self._retained, suspended)
        self.stopped.set()

    async def _rebuild(self, carry: Carry) -> None:
        """Joined after losing a broker: give this one back what it lacks of what we held."""
        assert self._control is not None
        control, t = self._control, self.topics
        if carry.only_if_empty and self.specs:
            for name in carry.suspended:  # the mesh went on without us: ours are stale
                owner = self.owners.get(name)
                if name not in self.specs or owner is None or owner.node != self.id:
                    self._gone_from_here(name)
            return
        self._retained.adopt(carry.retained)
        specs, resumed = [name for name in carry.specs if name not in self.specs], []
        for name in specs:
            spec = carry.specs[name]
            await control.publish(t.app(name, "spec"), wire.encode(spec), retain=True)
            await self._republish_module(spec.module)
        for name, kept in carry.suspended.items():  # ours: they go on from where they were
            owner = self.owners.get(name)
            if owner is not None and (owner.node != self.id or owner.epoch > kept.epoch):
                continue  # another node took it over meanwhile
            if name not in carry.specs and name not in self.specs:
                continue  # stopped meanwhile
            epoch = kept.epoch + 1
            snap = replace(kept, epoch=epoch, seq=kept.seq + 1, applied=())
            await publish_snapshot(control, t.app(name, "snapshot"), snap, [snap.memory.data])
            record = self.owners[name] = wire.OwnerRecord(self.id, epoch)
            await control.publish(t.app(name, "owner"), wire.encode(record), retain=True)
            resumed.append(name)
        for name, owner in carry.owners.items():  # the epochs a takeover must go past
            if name not in self.owners and name not in carry.suspended:
                self.owners[name] = owner
                await control.publish(t.app(name, "owner"), wire.encode(owner), retain=True)
        if not carry.only_if_empty:
            # The other survivors come back too, each with its own apps: give them a moment
            # before taking over an app whose owner has not come back yet. (Each notices
            # the loss on its own keepalive: a silent broker, within 1.5 K.)
            grace = REJOIN_GRACE_S + 1.5 * self.config.keepalive
            self._claim_after = time.monotonic() + grace
            self._spawn(self._wake_after(grace), "rejoin-grace")
        if specs or resumed:
            log.info("node %s gave the broker back %d app specs and the state of its own "
                     "apps %s", self.id, len(specs), ", ".join(resumed) or "(none)")

    async def _republish_module(self, sha256: str) -> None:
        path = self.config.state_dir / "modules" / f"{sha256}.wasm"
        if path.exists():
            assert self._control is not None
            wasm = await asyncio.to_thread(path.read_bytes)
            await publish_blob(self._control, self.topics.module(sha256), wasm)

    async def _wake_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._dirty.set()

    def _keep(self, snap: wire.Snapshot) -> None:
        """A checkpoint of an app here was stored: keep it on disk too, now and then."""
        now = time.monotonic()
        if now - self._kept_at.get(snap.app, -KEEP_EVERY_S) >= KEEP_EVERY_S:
            self._kept_at[snap.app] = now
            self._keeping[snap.app] = self._spawn(
                asyncio.to_thread(self.store.save_checkpoint, snap), f"{snap.app}-keep")

    def _gone_from_here(self, name: str) -> None:
        """An app no longer runs here: what this device kept of it is stale now."""
        self._kept_at.pop(name, None)
        writing = self._keeping.pop(name, None)
        if writing is not None and not writing.done():  # forget it once it is written
            writing.add_done_callback(lambda _: self.store.forget_checkpoint(name))
        else:
            self.store.forget_checkpoint(name)

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

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        parts = self.topics.parse(message.topic)
        payload = bytes(message.payload)
        try:
            self._dispatch(parts, payload)
        except WireError as exc:
            log.warning("ignoring %s: %s", message.topic, exc)
            self.event("rejected", reason=f"{message.topic}: {exc}")

    def _dispatch(self, parts: tuple[str, ...], payload: bytes) -> None:
        match parts:
            case ("nodes", node_id):
                self._set(self.members, node_id, payload, wire.NodeRecord)
            case ("apps", app, "spec"):
                self._set(self.specs, app, payload, wire.AppSpec)
                spec = self.specs.get(app)
                if spec is not None:
                    self.store.save_spec(spec)
                else:
                    self.store.forget_spec(app)
            case ("apps", app, "owner"):
                self._set(self.owners, app, payload, wire.OwnerRecord)
            case ("apps", app, "snapshot"):  # kept as is; put together only when needed
                self._retained.whole(self.topics.app(app, "snapshot"), payload)
                self._decoded.pop(app, None)
                self._wake(app)
            case ("apps", app, "snapshot", index):
                self._retained.chunk(self.topics.app(app, "snapshot"), index, payload)
                self._decoded.pop(app, None)
                self._wake(app)
            case ("modules", sha256):
                self._retained.whole(self.topics.module(sha256), payload)
                self._module_arrived(sha256)
            case ("modules", sha256, index):
                self._retained.chunk(self.topics.module(sha256), index, payload)
                self._module_arrived(sha256)
            case ("cmd",):
                self._command(payload, everyone=True)
            case ("nodes", node_id, "cmd") if node_id == self.id:
                self._command(payload, everyone=False)

    def _set(self, table: dict[str, Any], key: str, payload: bytes, cls: type[Any]) -> None:
        if not payload:
            table.pop(key, None)
        else:
            value = wire.decode(cls, payload)
            named = value.id if cls is wire.NodeRecord else value.app if cls is wire.AppSpec \
                else key
            if named != key:
                raise WireError(f"a {cls.KIND} for {named!r} published under {key!r}")
            table[key] = value
        self._dirty.set()  # our own record cleared (a late Last Will) is published again
        self._wake(key)

    def _wake(self, key: str) -> None:
        """Wake whoever waits for news of `key` (an app's checkpoint, a handover)."""
        waker = self._waking.get(key)
        if waker:
            waker.set()

    def _module_arrived(self, sha256: str) -> None:
        waiter = self._module_waiters.get(sha256)
        topic = self.topics.module(sha256)
        head = self._retained.head(topic)
        if waiter is None or waiter.done() or head is None:
            return
        try:
            manifest = chunks.is_manifest(head)
            blob = head if manifest is None else chunks.join(
                manifest, self._retained.parts(topic), MAX_MODULE_BYTES)
        except WireError as exc:
            waiter.set_exception(MeshError(f"module {sha256[:12]}: {exc}"))
            return
        if blob is None:
            return
        if hashlib.sha256(blob).hexdigest() != sha256:
            waiter.set_exception(MeshError(f"module {sha256[:12]} does not match its hash"))
        else:
            waiter.set_result(blob)

    def checkpoint(self, app: str) -> Checkpoint | None:
        """The newest checkpoint of `app` on the broker, once all its chunks have arrived.

        Whether they are its own (and not some of an older one) is `Checkpoint.matches`.
        """
        cached = self._decoded.get(app)  # until a piece of a newer one comes
        if cached is not None:
            return cached if isinstance(cached, Checkpoint) else None
        topic = self.topics.app(app, "snapshot")
        head = self._retained.head(topic)
        if head is None:
            return None
        snap = wire.decode(wire.Snapshot, head)
        external = snap.memory.external
        pieces = None
        if external is not None:  # its memory is in chunks, restored straight from them
            pieces = chunks.collect(external, self._retained.parts(topic), MAX_SNAPSHOT_BYTES)
            if pieces is None:
                return None
        checkpoint = self._decoded[app] = Checkpoint(head, snap, pieces)
        return checkpoint

    # --- modules ----------------------------------------------------------------------------

    async def module(self, sha256: str, wait: float = MODULE_WAIT_S) -> AppModule:
        """The module with this hash: from memory, the disk cache, or the broker's store."""
        if sha256 in self._modules:
            return self._modules[sha256]
        path = self.config.state_dir / "modules" / f"{sha256}.wasm"
        if path.exists() and hashlib.sha256(data := path.read_bytes()).hexdigest() == sha256:
            wasm = data
        else:
            wasm = await self._fetch_module(sha256, wait)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(wasm)
        module = await asyncio.to_thread(self.runtime.load, wasm)
        self._modules[sha256] = module
        return module

    async def _fetch_module(self, sha256: str, wait: float) -> bytes:
        assert self._control is not None
        waiter = self._module_waiters.get(sha256)
        if waiter is None:
            waiter = self._module_waiters[sha256] = asyncio.get_running_loop().create_future()
            topic = self.topics.module(sha256)
            await self._control.subscribe(topic, f"{topic}/+")
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), wait)
        except TimeoutError:
            raise MeshError(f"module {sha256[:12]} is not in the module store "
                            f"({self.topics.module(sha256)})") from None
        finally:
            if waiter.done():
                self._module_waiters.pop(sha256, None)
                topic = self.topics.module(sha256)
                await self._control.unsubscribe(topic, f"{topic}/+")
                self._retained.whole(topic, b"")  # kept on disk now, not in memory

    # --- reconciling ------------------------------------------------------------------------

    async def _reconciler(self) -> None:
        while True:
            # On every change, and now and then anyway: a start that failed (a module not in
            # the store yet) is tried again without waiting for an unrelated change.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), RECONCILE_EVERY_S)
            self._dirty.clear()
            await asyncio.sleep(0.005)  # let a burst of retained messages land first
            self._dirty.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconciling failed; will retry on the next change")

    async def _reconcile(self) -> None:
        async with self._busy:
            if not self._leaving:
                await self._reconcile_all()

    async def _reconcile_all(self) -> None:
        members = self._live_members()
        placement = Placement(m for m in members.values() if not m.leaving)
        work = []
        for name in set(self.hosted) - set(self.specs):
            work.append(self._stop_app(name))
        for name, spec in self.specs.items():
            target = placement.best(spec)
            self._report_unplaceable(name, spec, target)
            work.append(self._reconcile_app(name, spec, target, members))
        results = await asyncio.gather(*work, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("%s", result)
        await self._publish_record()

    def _live_members(self) -> dict[str, wire.NodeRecord]:
        members = {node_id: replace(record, leaving=True) if node_id in self._said_goodbye
                   else record for node_id, record in self.members.items()}
        members[self.id] = self._record()
        return members

    def _report_unplaceable(self, name: str, spec: wire.AppSpec, target: str | None) -> None:
        if target is None and name not in self._unplaceable:
            self._unplaceable.add(name)
            self.event("unplaceable", app=name,
                       reason=f"no node has all of: {', '.join(spec.requires)}")
        elif target is not None:
            self._unplaceable.discard(name)

    async def _reconcile_app(self, name: str, spec: wire.AppSpec, target: str | None,
                             members: dict[str, wire.NodeRecord]) -> None:
        owner = self.owners.get(name)
        hosted = self.hosted.get(name)
        if hosted is not None:
            if owner and owner.node != self.id and owner.epoch >= hosted.epoch:
                log.warning("%s: %s owns it at epoch %d; stopping it here", name, owner.node,
                            owner.epoch)
                self.hosted.pop(name, None)
                self._gone_from_here(name)
                await hosted.close()
                self.event("fenced", app=name, detail={"owner": owner.node,
                                                       "epoch": owner.epoch})
            elif hosted.spec.module != spec.module:
                self.hosted.pop(name, None)
                await hosted.close()
                self._dirty.set()
            elif hosted.state == "running" and target and target != self.id:
                await self._hand_over(hosted, target)
            return
        if owner is not None and owner.node == self.id:
            await self._start(spec, owner.epoch, handover=True)
        elif target == self.id and (owner is None or owner.node not in members):
            if owner is not None and time.monotonic() < self._claim_after:
                return  # its owner may still be on its way back from a lost broker
            epoch = (owner.epoch if owner else 0) + 1
            await self._claim(spec, epoch, failover=owner is not None)

    async def _claim(self, spec: wire.AppSpec, epoch: int, *, failover: bool) -> None:
        assert self._control is not None
        record = wire.OwnerRecord(self.id, epoch)
        # Ours until the broker says otherwise: a rival claim that it orders after this one
        # arrives after the publish completes, and must not be overwritten by it.
        self.owners[spec.app] = record
        await self._control.publish(self.topics.app(spec.app, "owner"), wire.encode(record),
                                    retain=True)
        await self._start(spec, epoch, handover=False, failover=failover)

    async def _start(self, spec: wire.AppSpec, epoch: int, *, handover: bool,
                     failover: bool = False) -> None:
        name = spec.app
        began = time.monotonic()
        module = await self.module(spec.module)
        checkpoint = await self._checkpoint_for(name, spec, epoch if handover else None)
        snap = checkpoint.snap if checkpoint else None
        if name in self.hosted or self.owners.get(name) != wire.OwnerRecord(self.id, epoch):
            return  # things moved on while we waited
        hosted = HostedApp(self._ctx, spec, module, epoch)
        self.hosted[name] = hosted
        try:
            if checkpoint:
                await hosted.start(snap, checkpoint.pieces, checkpoint.matches)
            else:
                await hosted.start(None)
        except (BrokerError, SnapshotIncomplete) as exc:  # not the app: try again later
            self.hosted.pop(name, None)
            await hosted.close()
            log.warning("%s: could not start: %s", name, exc)
            if checkpoint and isinstance(exc, SnapshotIncomplete):
                self._decoded[name] = checkpoint.head  # wait for the rest of it
                self._dirty.set()
            return
        except MeshError as exc:  # the app itself (a trap, a bad checkpoint): it stays failed
            await hosted.close()
            hosted.state, hosted.failure = "failed", str(exc)
            self.event("failed", app=name, reason=str(exc))
            return
        kind = "migrated" if handover else "failed-over" if failover else "started"
        self.event(kind, app=name, detail={
            "epoch": epoch, "restored_seq": snap.seq if snap else None,
            "ms": round((time.monotonic() - began) * 1000, 1)})
        log.info("%s: %s here at epoch %d%s", name, kind, epoch,
                 f" from checkpoint {snap.seq}" if snap else "")

    async def _checkpoint_for(self, name: str, spec: wire.AppSpec,
                              epoch: int | None) -> Checkpoint | None:
        """The checkpoint to restore: the handover one for `epoch`, else the newest.

        Waits while one is on its way (a header whose chunks are still arriving, or the handover
        checkpoint), for as long as pieces keep coming; gives up after SNAPSHOT_WAIT_S of
        silence and takes the newest complete one.
        """
        topic = self.topics.app(name, "snapshot")
        deadline = time.monotonic() + SNAPSHOT_WAIT_S
        waker = self._waking.setdefault(name, asyncio.Event())
        while True:
            try:
                checkpoint = self.checkpoint(name)
            except WireError as exc:
                log.warning("%s: its checkpoint is unusable: %s", name, exc)
                checkpoint = None
            usable = checkpoint if checkpoint and checkpoint.snap.module == spec.module else None
            arriving = checkpoint is None and self._retained.head(topic) is not None
            wanted = epoch is not None and (usable is None or usable.snap.epoch < epoch)
            if not (arriving or wanted) or time.monotonic() >= deadline:
                return usable
            waker.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.wait(), deadline - time.monotonic())
                deadline = time.monotonic() + SNAPSHOT_WAIT_S  # news came: keep waiting

    async def _hand_over(self, hosted: HostedApp, target: str) -> None:
        """Planned migration: checkpoint for the next epoch, release, name the target owner."""
        assert self._control is not None
        name = hosted.name
        epoch = max(hosted.epoch, self.owners.get(name, wire.OwnerRecord(self.id, 0)).epoch) + 1
        began = time.monotonic()
        self.event("migrating", app=name, detail={"to": target, "epoch": epoch})
        try:
            await hosted.hand_over(epoch)
        except MeshError:
            # Stop it here; we still own it, so the next reconcile restores the newest checkpoint.
            self.hosted.pop(name, None)
            await hosted.close()
            self._dirty.set()
            raise
        record = wire.OwnerRecord(target, epoch)
        # The target starts on this. If it cannot be published (the broker is gone), the app
        # stays here, paused, for the node to keep its state.
        await self._control.publish(self.topics.app(name, "owner"), wire.encode(record),
                                    retain=True)
        self.owners[name] = record
        self.hosted.pop(name, None)
        self._gone_from_here(name)
        await hosted.close()
        log.info("%s: handed over to %s at epoch %d in %.1f ms", name, target, epoch,
                 (time.monotonic() - began) * 1000)

    async def _stop_app(self, name: str) -> None:
        hosted = self.hosted.pop(name, None)
        if hosted is None:
            return
        self._gone_from_here(name)
        await hosted.close()
        assert self._control is not None
        snapshot = self.topics.app(name, "snapshot")
        stale = [f"{snapshot}/{index}" for index in self._retained.parts(snapshot)]
        for topic in (*stale, snapshot, self.topics.app(name, "owner")):
            await self._control.publish(topic, b"", retain=True)  # forget it on the broker
        self.event("stopped", app=name)

    def _app_lost(self, hosted: HostedApp, reason: str) -> None:
        """The app's session ended under us: another node took it over, or the broker is gone."""
        if self.hosted.get(hosted.name) is hosted:
            self._spawn(self._fence_if_taken(hosted, reason), f"{hosted.name}-lost")

    async def _fence_if_taken(self, hosted: HostedApp, reason: str) -> None:
        assert self._control is not None
        record = replace(self._record(), leaving=self._leaving)
        try:  # the broker still answers us: the app was taken over, so it stops here
            await asyncio.wait_for(self._control.publish(
                self.topics.node(self.id), wire.encode(record), retain=True),
                self.config.keepalive)
        except (BrokerError, TimeoutError):
            if self._control.lost_reason:
                return  # the broker is gone: the node keeps the app's state for the next one
        if self.hosted.get(hosted.name) is hosted:
            log.warning("%s: lost its session (%s); stopping it here", hosted.name, reason)
            self.hosted.pop(hosted.name, None)
            self._gone_from_here(hosted.name)
            await hosted.close()
            self.event("fenced", app=hosted.name, reason=f"session lost: {reason}")
            self._dirty.set()

    # --- records and events -----------------------------------------------------------------

    def _record(self) -> wire.NodeRecord:
        running = tuple(sorted(n for n, h in self.hosted.items() if h.state == "running"))
        return wire.NodeRecord(id=self.id, caps=self.config.caps, labels=self.config.labels,
                               apps=running, broker=str(self.config.broker),
                               load=float(len(running)), started_ms=self._started_ms)

    async def _publish_record(self) -> None:
        record = self._record()
        if self._control and not self._leaving and self.members.get(self.id) != record:
            self.members[self.id] = record
            await self._control.publish(self.topics.node(self.id), wire.encode(record),
                                        retain=True)

    def event(self, kind: str, *, app: str | None = None, reason: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        """Publish an event on `<root>/events` (fire and forget) and log it."""
        event = wire.Event(event=kind, ts_ms=int(time.time() * 1000), node=self.id, app=app,
                           reason=reason, detail=detail or {})
        log.debug("event %s", event)
        if self._control and not self._control.lost_reason:
            self._control.publish_nowait(self.topics.events, wire.encode(event))

    # --- commands ---------------------------------------------------------------------------

    def _command(self, payload: bytes, *, everyone: bool) -> None:
        if everyone and min(self._live_members()) != self.id:
            return  # the node with the lowest id answers commands to everyone
        try:
            command, as_json = wire.decode_command(payload)
        except WireError as exc:
            self.event("rejected", reason=f"command: {exc}")
            return
        self._spawn(self._answer(command, as_json), f"command-{command.op}")

    async def _answer(self, command: wire.Command, as_json: bool) -> None:
        try:
            reply = wire.Reply(id=command.id or "-", ok=True,
                               result=await self._perform(command))
        except MeshError as exc:
            reply = wire.Reply(id=command.id or "-", ok=False, error=str(exc))
            self.event("rejected", app=command.app, reason=f"{command.op}: {exc}")
        except Exception:
            log.exception("command %s failed", command.op)
            reply = wire.Reply(id=command.id or "-", ok=False,
                               error=f"{command.op} failed inside the node; see its log")
        if command.id and self._control:
            data = wire.encode_json(reply) if as_json else wire.encode(reply)
            await self._control.publish(self.topics.reply(command.id), data)

    async def _perform(self, command: wire.Command) -> Any:
        assert self._control is not None
        match command.op:
            case "ping":
                return {"node": self.id}
            case "nodes":
                return [{"id": m.id, "caps": list(m.caps), "labels": m.labels,
                         "apps": list(m.apps), "online": True}
                        for m in sorted(self._live_members().values(), key=lambda m: m.id)]
            case "apps":
                return self.app_table()
            case "deploy":
                assert command.spec is not None
                return await self._deploy(command.spec)
            case "stop":
                name = self._known_app(command)
                await self._control.publish(self.topics.app(name, "spec"), b"", retain=True)
                return {"app": name, "state": "stopping"}
            case "migrate":
                name = self._known_app(command)
                target = command.to
                if target not in self._live_members():
                    raise MeshError(f"no node {target!r} in the mesh")
                spec = replace(self.specs[name], pin=target)
                await self._control.publish(self.topics.app(name, "spec"), wire.encode(spec),
                                            retain=True)
                return {"app": name, "to": target}
            case "send":
                name = self._known_app(command)
                topic = self.topics.app(name, "in" + (f"/{command.topic}" if command.topic
                                                      else ""))
                await self._control.publish(topic, command.payload or b"")
                return {"app": name}
        raise MeshError(f"op {command.op!r} is not supported")  # pragma: no cover

    def _known_app(self, command: wire.Command) -> str:
        name = command.app
        if name is None or name not in self.specs:
            raise MeshError(f"no app {name!r} is deployed")
        return name

    async def _deploy(self, spec: wire.AppSpec) -> dict[str, Any]:
        assert self._control is not None
        try:
            await self.module(spec.module, wait=DEPLOY_MODULE_WAIT_S)
        except MeshError as exc:
            raise MeshError(f"cannot deploy {spec.app}: {exc}") from None
        if spec.pin and spec.pin not in self._live_members():
            raise MeshError(f"no node {spec.pin!r} in the mesh")
        await self._control.publish(self.topics.app(spec.app, "spec"), wire.encode(spec),
                                    retain=True)
        target = Placement(self._live_members().values()).best(spec)
        self.event("deployed", app=spec.app, detail={"module": spec.module, "node": target})
        if target is None:
            return {"app": spec.app, "state": "pending",
                    "reason": f"no node has all of: {', '.join(spec.requires)}"}
        return {"app": spec.app, "node": target, "state": "pending"}

    def app_table(self) -> list[dict[str, Any]]:
        """[{app, node, state, epoch, module}] as `mesh apps --json` prints it."""
        members = self._live_members()
        placement = Placement(members.values())
        rows = []
        for name, spec in sorted(self.specs.items()):
            owner = self.owners.get(name)
            node = owner.node if owner else None
            host = members.get(node) if node else None
            if node == self.id and name in self.hosted:
                state = "failed" if self.hosted[name].state == "failed" else "running"
            elif host is not None and name in host.apps:
                state = "running"
            else:
                state = "pending"
            if state == "running" and placement.best(spec) not in (None, node):
                state = "migrating"
            rows.append({"app": name, "node": node, "state": state,
                         "epoch": owner.epoch if owner else 0, "module": spec.module})
        return rows


async def publish_module(conn: Connection, topics: Topics, wasm: bytes) -> str:
    """Put a module in the store (retained, chunked if large); returns its sha256."""
    sha256 = hashlib.sha256(wasm).hexdigest()
    await publish_blob(conn, topics.module(sha256), wasm)
    return sha256
