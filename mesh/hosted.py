"""One app running on this node: its MQTT session, its worker thread, checkpoints and handover.

Each app has its own MQTT session, with the same client id on whichever node runs it
(`<root>-app-<app>`), a persistent session (clean_session false) and manual acknowledgement:

- inputs (QoS 1) are applied in order on the app's worker thread, and acknowledged only once a
  checkpoint that holds their effect has been stored on the broker (retained, QoS 1);
- the checkpoint lists the packet ids it holds but has not acknowledged yet, so a node that takes
  over skips their redelivery (DUP flag, same packet id) instead of applying them twice;
- taking over the session on another node makes the broker disconnect this one: a stale owner
  learns at once that it must stop; all its publications go through that session, so once it
  is taken over nothing it sends reaches anyone.

On Mosquitto this makes planned migration and failover lose no input and apply none twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import paho.mqtt.client as paho

from mesh import wire
from mesh.context import AppHostIO, HostContext
from mesh.errors import MeshError, SnapshotIncomplete
from mesh.journal import MAX_JOURNAL_BYTES, Input, Journal, Tick, apply
from mesh.mqtt import Connection, Message
from mesh.reconcile import AppState
from mesh.runtime import App, AppModule, Limits
from mesh.snapshot import Buffer
from mesh.topics import Topics
from mesh.transfer import publish_snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_INPUT_BYTES = 256 * 1024
BATCH = 64
DEFAULT_CHECKPOINT_MS = 1000
# Mosquitto's default max_inflight_messages: a broker sends no more unacknowledged QoS 1 messages
# than this, so by default a checkpoint (which acknowledges them) comes at least this often.
DEFAULT_CHECKPOINT_EVERY = 20
POISON_LIMIT = 3  # inputs in a row that fail before the app is failed for good
ACKED_MEMORY = 4096  # well under the 65535 packet ids a session cycles through
MAX_DEAD = 16  # dead letters kept per app (retained at dead/0 .. dead/15, oldest overwritten)


def input_filters(topics: Topics, spec: wire.AppSpec) -> tuple[str, ...]:
    """What an app's session subscribes to: its inputs (`in/#` matches `.../in` itself too),
    and the topics its spec names."""
    return (f"{topics.app(spec.app, 'in')}/#", *spec.subscriptions)


class HostedApp:
    """An app this node runs. States: starting, running, stopped, failed."""

    def __init__(self, ctx: HostContext, spec: wire.AppSpec, module: AppModule,
                 epoch: int) -> None:
        self.ctx = ctx
        self.spec = spec
        self.module = module
        self.epoch = epoch
        self.state: AppState = "starting"
        self.failure: str | None = None
        self._seq = 0
        self._loop = asyncio.get_running_loop()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"app-{spec.app}")
        self._app: App | None = None
        self._session: Connection | None = None
        self._inbox: asyncio.Queue[Message | Tick | None] = asyncio.Queue()
        self._ticked = 0  # ticks applied since the last checkpoint
        self._tick_queued = False
        self._unacked: list[tuple[int, int]] = []  # (packet id, QoS) applied, not yet acked
        self._journal = Journal()  # to take back a call that fails
        # The last packet ids acked: a broker back from an older store sends them again (DUP).
        self._acked: deque[int] = deque(maxlen=ACKED_MEMORY)
        self._streak = 0  # inputs in a row that failed
        self._dead = 0  # dead letters written
        self._skip: set[int] = set()
        self._stored = 0  # checkpoints stored since the start
        self._tasks: list[asyncio.Task[None]] = []
        self._final: asyncio.Future[None] | None = None  # a handover's checkpoint
        self._pausing = False
        self._closed = False
        self._in_prefix = ctx.topics.app(spec.app, "in")
        self._io = AppHostIO(app=spec.app, sensors=ctx.sensors, loop=self._loop,
                             send=self._send_outputs)

    @property
    def name(self) -> str:
        return self.spec.app

    @property
    def seq(self) -> int:
        """The sequence number of the newest checkpoint stored."""
        return self._seq

    def _run(self, call: Callable[[], T]) -> Awaitable[T]:
        """Run a wasm call on this app's worker thread, never on the event loop."""
        def job() -> T:
            try:
                return call()
            finally:
                self._io.flush()
        return self._loop.run_in_executor(self._worker, job)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, snapshot: wire.Snapshot | None, pieces: Sequence[bytes] | None = None,
                    check: Callable[[], bool] | None = None, *, seq: int = 0) -> None:
        """Instantiate and either start fresh or restore `snapshot`; then take the session.

        `pieces` hold the snapshot's memory bytes when they came as chunks; `check` tells
        whether they are the right ones (it hashes them, on another thread while restoring).
        `seq`: a fresh start's checkpoints number on from it (past an older module's, whose
        checkpoints every node holds: theirs must be newer).
        """
        def instantiate() -> App:
            app = self._new_instance()
            try:
                if snapshot is None:
                    app.start()
                else:
                    app.restore(snapshot, pieces)
            except BaseException:
                app.close()
                raise
            return app

        checking = asyncio.ensure_future(asyncio.to_thread(check)) if check else None
        try:
            self._app = await self._run(instantiate)
        except MeshError:  # chunks of an older checkpoint may not even decompress
            if checking and not await checking:
                raise SnapshotIncomplete(f"the memory chunks of {self.name}'s checkpoint are "
                                         "not all its own") from None
            raise
        if checking and not await checking:
            raise SnapshotIncomplete(f"the memory chunks of {self.name}'s checkpoint are not "
                                     "all its own")
        self._journal.checkpointed(snapshot, pieces)
        self._seq = seq
        if snapshot is not None:
            self._skip = set(snapshot.applied)
            self._seq = snapshot.seq
        session = await self.take_session()
        if not session.resumed:
            # A broker that lost the session (or never had it) numbers packets afresh: the
            # restored packet ids name nothing it will send again.
            self._skip.clear()
        if self._closed:
            raise MeshError(f"app {self.name} was stopped while it started")
        self.state = "running"
        self._tasks = [asyncio.create_task(self._process(), name=f"{self.name}-inputs"),
                       asyncio.create_task(self._watch(session), name=f"{self.name}-session")]
        self._tasks[0].add_done_callback(self._inputs_ended)
        if self.spec.tick_ms:
            self._tasks.append(asyncio.create_task(self._ticks(), name=f"{self.name}-ticks"))

    def _inputs_ended(self, task: asyncio.Task[None]) -> None:
        """The input loop stopped: if by an error while the app should run, the app has failed
        (it would apply nothing more, and no node would take it over)."""
        if task.cancelled() or self._pausing or self.state != "running":
            return
        if (error := task.exception()) is not None:
            self._tasks.append(asyncio.ensure_future(self._fail(f"its input loop failed: {error}")))

    async def take_session(self) -> Connection:
        """Connect the app's own session, if not yet: the broker disconnects whoever held it
        (a stale owner can store nothing from then on) and sends its queued inputs, which
        wait here until `start`."""
        if self._session is None:
            session_id = (self.ctx.session_id or self.ctx.topics.app_session)(self.name)
            self._session = Connection(self.ctx.broker, session_id,
                                       on_message=self._on_input, clean_session=False,
                                       manual_ack=True, keepalive=self.ctx.keepalive)
            await self._session.connect()
            await self._session.subscribe(*input_filters(self.ctx.topics, self.spec), qos=1)
        return self._session

    def _new_instance(self) -> App:
        """A new instance of the app under this device's caps (on the worker thread)."""
        spec, ctx = self.spec, self.ctx
        limits = Limits(memory_bytes=min(spec.memory_limit,
                                         ctx.app_memory_bytes or spec.memory_limit),
                        timeout_s=min(spec.timeout_ms, ctx.call_timeout_ms or spec.timeout_ms)
                        / 1000)
        return App(ctx.runtime, self.module, name=self.name, io=self._io, limits=limits)

    async def hand_over(self, epoch: int) -> None:
        """Planned migration, source side: pause and checkpoint for `epoch`; `close` next.

        Inputs received but not applied stay unacknowledged: the broker hands them to the
        session's next holder.
        """
        await self._pause()
        self.epoch = epoch
        # Sent straight from the app's memory: `close` lets it finish before freeing that.
        self._final = asyncio.ensure_future(self.checkpoint(final=True))
        await self._final

    async def suspend(self) -> wire.Snapshot | None:
        """The broker is gone: stop, keeping the app's state here (a snapshot) for the next."""
        await self._pause()
        snap = None
        app = self._app
        if self.state == "running" and app is not None:
            try:
                # If the broker kept them, they come again; and one back from an older
                # store sends again what it took for unacknowledged then.
                applied = self._applied(recent=True)
                snap = await self._run(lambda: app.snapshot(epoch=self.epoch, seq=self._seq,
                                                            applied=applied))
            except MeshError as exc:
                log.warning("%s: cannot keep its state: %s", self.name, exc)
        await self.close()
        return snap

    async def shutdown(self) -> None:
        """Stop without handing over: a last checkpoint if the session is still ours."""
        await self._pause()
        if self.state == "running" and self._session and not self._session.lost_reason:
            with contextlib.suppress(MeshError):
                await self.checkpoint()
        await self.close()

    async def close(self) -> None:
        """Stop at once: no checkpoint, unacknowledged inputs go back to the broker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.state in ("running", "starting"):
            self.state = "stopped"
        self._pausing = True
        tasks = [*self._tasks, *([self._final] if self._final else [])]
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("%s: %s while stopping", self.name, result)
        self._tasks = []
        if self._session:
            await self._session.close()
        app = self._app
        if app is not None:
            await self._run(app.close)
        self._worker.shutdown(wait=False)

    async def _pause(self) -> None:
        """Let the input loop finish the batch it is applying, then stop it."""
        self._pausing = True
        self._inbox.put_nowait(None)
        for task in self._tasks:
            if task.get_name().endswith("-inputs"):
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except MeshError as exc:  # e.g. a checkpoint the lost broker did not take
                    log.warning("%s: %s", self.name, exc)
            else:
                task.cancel()

    async def _watch(self, session: Connection) -> None:
        assert session.lost is not None
        reason = await asyncio.shield(session.lost)
        if not self._pausing and self.state == "running":
            self.ctx.lost(self, reason)

    # --- inputs, ticks, outputs --------------------------------------------------------------

    def _on_input(self, message: Message) -> None:
        topic = message.topic
        if self._app_topic(topic) is None:
            # Some brokers (amqtt) also send unrelated retained messages, and the persistent
            # session may still hold filters of an older spec. Ack, or they block the window.
            self._ack(message.mid, message.qos)
            return
        if message.retain:
            # Inputs are not retained; one that is would be applied again on every move.
            log.warning("%s: ignoring a retained input on %s", self.name, topic)
            self._ack(message.mid, message.qos)
            return
        self._inbox.put_nowait(message)

    async def _process(self) -> None:
        """Apply inputs and ticks in order; checkpoint after `every` changes or `period`."""
        every = self.spec.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        period = (self.spec.checkpoint_ms or DEFAULT_CHECKPOINT_MS) / 1000
        deadline: float | None = None
        while not self._pausing:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            first = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    first = await self._inbox.get()
            batch = [first] if first is not None else []
            while len(batch) < BATCH and not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None:
                    batch.append(item)
            if batch and not self._pausing:
                await self._apply(batch)
                if self.state == "failed":
                    return
                if deadline is None and (self._unacked or self._ticked):
                    deadline = time.monotonic() + period
            changes = len(self._unacked) + self._ticked
            if changes and (changes >= every or self._journal.size >= MAX_JOURNAL_BYTES or
                            (deadline is not None and time.monotonic() >= deadline)):
                await self.checkpoint()
                deadline = None

    async def _apply(self, batch: list[Message | Tick]) -> None:
        todo: list[tuple[Message | None, Input | Tick]] = []
        holding = {mid for mid, _ in self._unacked}
        for message in batch:
            if isinstance(message, Tick):
                self._tick_queued = False
                todo.append((None, message))
                continue
            if message.dup and message.mid in holding:
                continue  # the broker sent it again before our ack: it is applied already
            if message.mid in self._skip:
                self._skip.discard(message.mid)
                if message.dup:  # applied before the checkpoint we restored; not acked then
                    self._ack(message.mid, message.qos)
                    continue
            if len(message.payload) > MAX_INPUT_BYTES:
                self.ctx.event("rejected", app=self.name,
                               reason=f"input of {len(message.payload)} bytes exceeds "
                               f"{MAX_INPUT_BYTES}")
                self._unacked.append((message.mid, message.qos))
                continue
            sub = self._app_topic(message.topic) or ""
            todo.append((message, Input(sub, bytes(message.payload))))
        while todo:
            done, error = await self._deliver([item for _, item in todo])
            for applied, item in todo[:done]:
                self._journal.applied(item)
                if applied is None:
                    self._ticked += 1
                else:
                    self._unacked.append((applied.mid, applied.qos))
            if done:
                self._streak = 0
            if error is None:
                return
            poison, item = todo[done]
            todo = todo[done + 1:]
            if not await self._take_back(poison, item, str(error)):
                return

    def _deliver(self, items: list[Input | Tick]) -> Awaitable[tuple[int, MeshError | None]]:
        """Apply `items` in order on the worker; how many went in, and the error that stopped
        the rest."""
        app = self._app
        assert app is not None

        def deliver() -> tuple[int, MeshError | None]:
            for done, item in enumerate(items):
                try:
                    apply(app, item)
                except MeshError as exc:
                    return done, exc
            return len(items), None
        return self._run(deliver)

    async def _take_back(self, message: Message | None, item: Input | Tick,
                         reason: str) -> bool:
        """A call failed (a poison input): record it as a dead letter, acknowledge it, and go
        on from the state before it. False when the app has failed for good."""
        self._streak += 1
        await self._dead_letter(message, item, reason)
        if self._streak >= POISON_LIMIT:
            await self._fail(f"{self._streak} inputs in a row failed; the last one: {reason}")
            return False
        failed = self._app

        def rebuild() -> App:
            self._io.muted = True  # what it published then went out already
            try:
                app = self._journal.rebuild(self._new_instance)
            finally:
                self._io.muted = False
            if failed is not None:
                failed.close()
            return app
        try:
            self._app = await self._run(rebuild)
        except MeshError as exc:
            await self._fail(f"{reason}; and its state before it could not be rebuilt: {exc}")
            return False
        log.warning("%s: took back an input it could not take (%s)", self.name, reason)
        return True

    async def _dead_letter(self, message: Message | None, item: Input | Tick,
                           reason: str) -> None:
        topic, payload = ("(tick)", b"") if isinstance(item, Tick) else (item.topic,
                                                                          item.payload)
        letter = wire.DeadLetter(app=self.name, reason=reason[:1000], topic=topic[:256],
                                 payload=payload[:4096], size=len(payload),
                                 ts_ms=int(time.time() * 1000))
        slot, self._dead = self._dead % MAX_DEAD, self._dead + 1
        self.ctx.event("dead-letter", app=self.name, reason=reason,
                       detail={"topic": topic[:256], "size": len(payload), "slot": slot})
        assert self._session is not None
        await self._session.publish(self.ctx.topics.app(self.name, f"dead/{slot}"),
                                    wire.encode(letter), retain=True)
        if message is not None:
            self._ack(message.mid, message.qos)

    def _app_topic(self, topic: str) -> str | None:
        """The topic as the app sees it: after `.../in/` for its inputs, whole for the
        subscriptions its spec declares; None for anything else."""
        if topic == self._in_prefix or topic.startswith(self._in_prefix + "/"):
            return topic[len(self._in_prefix) + 1:]
        if any(paho.topic_matches_sub(sub, topic) for sub in self.spec.subscriptions):
            return topic
        return None

    async def _ticks(self) -> None:
        """Queue a tick every `tick_ms`, applied in order with the inputs (and, like them,
        held in the next checkpoint). A restored app keeps the schedule it had; one that was
        stopped for longer than a period goes on from now, without a burst of missed ticks."""
        app = self._app
        assert app is not None
        period = self.spec.tick_ms / 1000
        next_at = app.next_tick_ms / 1000 if app.next_tick_ms else time.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            now = time.time()
            next_at = max(next_at, now - period) + period
            if not self._tick_queued:  # an app slower than its ticks gets one at a time
                self._tick_queued = True
                self._inbox.put_nowait(Tick(int(now * 1000), int(next_at * 1000)))

    def _send_outputs(self, outputs: list[tuple[str, bytes]]) -> None:
        if self._session is None or self.state != "running":
            return
        for topic, payload in outputs:
            self._session.publish_nowait(self.ctx.topics.app(self.name, f"out/{topic}"),
                                         payload)

    async def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.failure = reason
        self._pausing = True
        log.error("%s", reason)
        self.ctx.event("failed", app=self.name, reason=reason)
        if self._session:
            await self._session.close()

    # --- checkpoints -------------------------------------------------------------------------

    async def checkpoint(self, *, final: bool = False) -> None:
        """Store the app's state (retained, via the app's session), then ack what it holds.

        `final`: the app runs no more (a handover), so memory is sent straight from the
        instance, not copied first.
        """
        app, session = self._app, self._session
        assert app is not None
        assert session is not None
        held, ticked = list(self._unacked), self._ticked
        applied = self._applied()
        epoch, seq = self.epoch, self._seq + 1
        pieces: Sequence[Buffer]
        if final:
            snap, pieces = await self._run(
                lambda: app.snapshot_pieces(epoch=epoch, seq=seq, applied=applied))
        else:
            snap = await self._run(lambda: app.snapshot(epoch=epoch, seq=seq, applied=applied))
            pieces = [snap.memory.data]
            self._journal.checkpointed(snap)
        await publish_snapshot(session, self.ctx.topics.app(self.name, "snapshot"), snap, pieces,
                               self.ctx.sealing)
        if not final:
            self.ctx.kept(snap)
        self._seq += 1
        for mid, qos in held:
            self._ack(mid, qos)
        del self._unacked[:len(held)]
        self._ticked -= ticked
        self._stored += 1
        if self._stored == 2:  # redeliveries come first on a session: all in by now
            self._skip.clear()  # (a packet id comes back into use after 65535 others)

    def _applied(self, *, recent: bool = False) -> tuple[int, ...]:
        """The packet ids of inputs applied but not acknowledged (their redeliveries are to be
        skipped), with restored ones not redelivered yet; `recent`: and the last ones acked."""
        return tuple(sorted({mid for mid, qos in self._unacked if qos} | self._skip
                            | (set(self._acked) if recent else set())))

    def _ack(self, mid: int, qos: int) -> None:
        if qos and self._session is not None:
            self._session.ack(mid)
            self._acked.append(mid)

