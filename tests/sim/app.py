"""A model of `mesh.hosted.HostedApp` running a tiny pure-Python app in place of wasm.

The app's state is the list of input ids it applied, in order. As in hosted.py: its own
persistent session (client id `<root>-app-<app>`, clean_session false, manual acks), inputs
applied in order in batches, a checkpoint every `checkpoint_every` inputs or `checkpoint_ms`
after the first unacknowledged one, stored retained through the app's session (chunks first
for a big app, then the header), and only once the broker acknowledged it are the inputs it
holds acknowledged; the checkpoint lists `applied`, the packet ids it holds unacknowledged plus
the restored skip set, and a restored app skips a redelivery (DUP) whose id is in it, acking it.
`take_session` connects the app's session before `start` (a claim fences the old holder at the
broker with it, then chooses the checkpoint; queued inputs arrive and wait in the inbox); `start`
restores and takes the session if not yet. The checkpoint deadline is set only once a batch
applied something not yet checkpointed (a batch of only skipped redeliveries sets none).
`hand_over` pauses and stores a final checkpoint at the new epoch; `suspend` keeps the state in
memory for a broker that comes back; `shutdown` takes a last checkpoint if it still can.

Not modelled: wasm (traps, limits, modules, poison inputs), ticks (hosted.py counts them as
changes like inputs: `_unacked or _ticked`; here only inputs change the state) and outputs,
oversized inputs, snapshot chunks being incomplete or foreign (a checkpoint here is one
object, its chunks are filler).
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mesh.errors import MeshError
from mesh.reconcile import AppState
from mesh.wire import AppSpec
from tests.sim.client import Client
from tests.sim.loop import Future, Task, first, sleep
from tests.sim.net import Delivery

if TYPE_CHECKING:
    from tests.sim.node import SimNode

BATCH = 64
DEFAULT_CHECKPOINT_EVERY = 20
DEFAULT_CHECKPOINT_MS = 1000


@dataclass(frozen=True, slots=True)
class SimSnapshot:
    """A checkpoint: what `wire.Snapshot` holds, with the app's memory as `state`."""

    app: str
    module: str
    epoch: int
    seq: int
    state: tuple[int, ...]  # input ids applied, in order
    applied: tuple[int, ...] = ()  # packet ids held unacknowledged (skip their redelivery)


class SimApp:
    # The `ack-before-checkpoint` mutant sets this: inputs are acked as soon as applied.
    ACK_AT_ONCE: ClassVar[bool] = False
    # A finding about hosted.py's `suspend` (see there): the model's suspended state also
    # skips the inputs acked since the last stored checkpoint; cleared, it does as the real
    # one does (only the ones not acked yet).
    SUSPEND_KEEPS_RECENT_ACKS: ClassVar[bool] = True

    def __init__(self, node: SimNode, spec: AppSpec, epoch: int, chunks: int) -> None:
        self.node = node
        self.spec = spec
        self.epoch = epoch
        self.chunks = chunks
        self.status: AppState = "starting"
        self.inputs: list[int] = []
        self._seen: set[int] = set()
        self.seq = 0
        self.session: Client | None = None
        self._inbox: deque[Delivery] = deque()
        self._waiter: Future[None] | None = None
        self._unacked: list[tuple[int, int]] = []  # (packet id, qos) applied, not acked
        self._skip: set[int] = set()
        self._recent: set[int] = set()  # acked since the last checkpoint was stored
        self._tasks: list[Task] = []
        self._pausing = False
        self._closed = False
        root = node.root
        self._in = f"{root}/apps/{spec.app}/in"
        self._snapshot = f"{root}/apps/{spec.app}/snapshot"

    @property
    def name(self) -> str:
        return self.spec.app

    def _sleep(self, seconds: float) -> Future[None]:
        return sleep(self.node.loop, self.node.proc, seconds)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, snapshot: SimSnapshot | None, seq: int = 0) -> None:
        """Restore `snapshot` (or start afresh, at `seq`), then take the session."""
        node = self.node
        await self._sleep(node.rng.uniform(0.001, 0.01))  # instantiate (and restore)
        self.seq = seq
        if snapshot is not None:
            self.inputs = list(snapshot.state)
            self._seen = set(snapshot.state)
            self._skip = set(snapshot.applied)
            self.seq = snapshot.seq
        session = await self.take_session()
        if not session.resumed:
            self._skip.clear()  # a new session's packet ids are not the old one's
        if self._closed:
            raise MeshError(f"app {self.name} was stopped while it started")
        self.status = "running"
        self._tasks = [node.spawn(self._process(), f"{self.name}-inputs"),
                       node.spawn(self._watch(session), f"{self.name}-session")]

    async def take_session(self) -> Client:
        """Connect the app's own session, if not yet: the broker disconnects whoever held it
        (a stale owner can store nothing from then on) and sends its queued inputs, which
        wait in the inbox until `start`."""
        if self.session is None:
            node = self.node
            self.session = node.client(f"{node.root}-app-{self.name}", on_message=self._on_input,
                                       clean=False, manual_ack=True)
            await self.session.connect()
            await self.session.subscribe(f"{self._in}/#", qos=1)
        return self.session

    async def hand_over(self, epoch: int) -> None:
        """Pause and store the checkpoint for `epoch`; `close` next."""
        await self._pause()
        self.epoch = epoch
        await self.checkpoint(final=True)

    async def suspend(self) -> SimSnapshot | None:
        await self._pause()
        snap = None
        if self.status == "running":  # if the broker kept the unacked ones, they come again
            applied = set(self._applied())
            # So may the ones acked lately (an ack still on its way when the broker went away
            # is lost): hosted.py keeps the last acked ids too. The switch off brings back the
            # old bug (such an input applied twice after a resume).
            if self.SUSPEND_KEEPS_RECENT_ACKS:
                applied |= self._recent
            snap = SimSnapshot(self.name, self.spec.module, self.epoch, self.seq,
                               tuple(self.inputs), tuple(sorted(applied)))
        await self.close()
        return snap

    async def shutdown(self) -> None:
        await self._pause()
        if self.status == "running" and self.session and not self.session.lost_reason:
            with contextlib.suppress(MeshError):
                await self.checkpoint()
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.status in ("running", "starting"):
            self.status = "stopped"
        self._pausing = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.session is not None:
            await self.session.close()

    async def _pause(self) -> None:
        """Let the input loop finish the batch it is applying, then stop it."""
        self._pausing = True
        self._wake()
        for task in self._tasks:
            if task.name.endswith("-inputs"):
                await first(task.done)  # it may end with a checkpoint the broker did not take
            else:
                task.cancel()

    async def _watch(self, session: Client) -> None:
        reason = await session.lost
        if not self._pausing and self.status == "running":
            self.node.app_lost(self, reason)

    # --- inputs -----------------------------------------------------------------------------

    def _on_input(self, message: Delivery) -> None:
        if message.retain or not message.topic.startswith(self._in):
            self._ack(message.pid, message.qos)
            return
        self._inbox.append(message)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set_result(None)
            self._waiter = None

    async def _process(self) -> None:
        every = self.spec.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        period = (self.spec.checkpoint_ms or DEFAULT_CHECKPOINT_MS) / 1000
        loop = self.node.loop
        deadline: float | None = None
        while not self._pausing:
            if not self._inbox:
                waiter = self._waiter = Future()
                if deadline is None:
                    await waiter
                else:
                    await first(waiter, self._sleep(max(0.0, deadline - loop.now)))
            batch: list[Delivery] = []
            while self._inbox and len(batch) < BATCH:
                batch.append(self._inbox.popleft())
            if batch and not self._pausing:
                await self._apply(batch)
                if deadline is None and self._unacked:  # hosted.py: `_unacked or _ticked`
                    deadline = loop.now + period
                elif deadline is None:  # (before 805b6b7 this set a deadline, and it spun)
                    self.node.trace(f"{self.name}: a batch of {len(batch)} skipped "
                                    "redeliveries, nothing to checkpoint")
            if self._unacked and (len(self._unacked) >= every or
                                  (deadline is not None and loop.now >= deadline)):
                await self.checkpoint()
                deadline = None
            elif not self._unacked and deadline is not None and loop.now >= deadline:
                # hosted.py would spin here (`wait_for(get(), 0)` over and over until the next
                # input); virtual time cannot, so the model says so and goes on.
                self.node.world.violation(f"{self.name} on {self.node.id}: hosted.py would "
                                          "spin (checkpoint deadline passed with nothing to "
                                          "checkpoint)")
                deadline = None

    async def _apply(self, batch: list[Delivery]) -> None:
        todo: list[Delivery] = []
        holding = {pid for pid, _ in self._unacked}
        for message in batch:
            if message.dup and message.pid in holding:
                continue  # sent again before our ack: applied already
            if message.pid in self._skip:
                self._skip.discard(message.pid)
                if message.dup:  # applied before the checkpoint we restored; not acked then
                    self._ack(message.pid, message.qos)
                    continue
            todo.append(message)
        await self._sleep(self.node.rng.uniform(0.0001, 0.001) * (1 + len(todo)))
        for message in todo:
            value = message.payload
            assert isinstance(value, int)
            if value in self._seen:
                self.node.world.violation(f"{self.name}: input {value} applied twice "
                                          f"(on {self.node.id}, epoch {self.epoch})")
            self._seen.add(value)
            self.inputs.append(value)
            self._unacked.append((message.pid, message.qos))
            if self.ACK_AT_ONCE:
                self._ack(message.pid, message.qos)

    # --- checkpoints -------------------------------------------------------------------------

    async def checkpoint(self, *, final: bool = False) -> None:
        """Store the state (retained, via the app's session), then ack what it holds."""
        session = self.session
        assert session is not None
        held = list(self._unacked)
        applied = self._applied()
        snap = SimSnapshot(self.name, self.spec.module, self.epoch, self.seq + 1,
                           tuple(self.inputs), applied)
        await self._sleep(self.node.rng.uniform(0.0005, 0.003))  # taking the snapshot
        if self.chunks:
            slot = 64 * (snap.seq % 2)
            sending = [self.node.spawn(session.publish(f"{self._snapshot}/{slot + i}",
                                                       ("chunk", snap.seq), retain=True),
                                       f"{self.name}-chunk")
                       for i in range(self.chunks)]
            for task in sending:
                await task.done
                task.done.result()
        await session.publish(self._snapshot, snap, retain=True)
        if not final:
            self.node.keep(snap)
        self.seq += 1
        self._recent.clear()
        for pid, qos in held:
            self._ack(pid, qos)
        del self._unacked[:len(held)]

    def _applied(self) -> tuple[int, ...]:
        """Packet ids applied but not acked (their redeliveries are skipped), with restored
        ones not redelivered yet."""
        return tuple(sorted({pid for pid, qos in self._unacked if qos} | self._skip))

    def _ack(self, pid: int, qos: int) -> None:
        if qos and self.session is not None:
            self._recent.add(pid)
            self.session.ack(pid)

