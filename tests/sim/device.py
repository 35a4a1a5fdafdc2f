"""A device: the loop of `mesh.device.Device.run` for a given broker, its disk, its faults.

Modelled: the device joins with what it kept on disk (`Carry.from_disk`: its apps' newest kept
checkpoints as its own at their epochs, the specs it saw; given back only to a broker with no
apps), retries a broker it cannot reach with a backoff from 1 s doubling to 30 s, and after a
lost broker joins again at once with what it held, `only_if_lost` (a given broker outlives us);
while it holds state to give back, it tries a broker at least every CARRY_RETRY_S.
The disk survives crashes: specs are written as they arrive, an app's newest checkpoint at most
every 5 s and when the broker is lost. Faults: `crash` (kill -9: the OS closes the sockets),
`boot`, `pause`/`resume` (SIGSTOP/SIGCONT), `cut`/`heal` (a partition from the broker), `leave`
(SIGTERM: a graceful leave).

Not modelled: mDNS, broker election and hosting (the broker is given), state directory errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from mesh.errors import BrokerError
from mesh.reconcile import Held
from mesh.wire import AppSpec, OwnerRecord
from tests.sim.app import SimSnapshot
from tests.sim.loop import Event, Process, Task, first, sleep
from tests.sim.node import CARRY_RETRY_S, Carry, SimNode

if TYPE_CHECKING:
    from tests.sim.world import World

RETRY_S = (1.0, 30.0)


@dataclass
class Disk:
    specs: dict[str, AppSpec] = field(default_factory=dict)
    checkpoints: dict[str, SimSnapshot] = field(default_factory=dict)
    marker: object = None  # the mesh's marker on the last broker joined (`mesh.cbor`)

    def carry(self, node_id: str) -> Carry:
        """`Carry.from_disk`."""
        kept = dict(self.checkpoints)
        held = Held(dict(self.specs), {app: OwnerRecord(node_id, snap.epoch, snap.seq)
                                       for app, snap in kept.items()},
                    {app: (snap.epoch, snap.seq) for app, snap in kept.items()},
                    only_if_lost=True, from_disk=frozenset(kept))
        return Carry(held, {}, kept, self.marker)


class Device:
    def __init__(self, world: World, node_id: str, caps: tuple[str, ...],
                 labels: dict[str, str], keepalive: float) -> None:
        self.world = world
        self.id = node_id
        self.caps = caps
        self.labels = labels
        self.keepalive = keepalive
        self.disk = Disk()
        self.proc = Process(node_id)
        self.proc.dead = True  # not booted yet
        self.node: SimNode | None = None
        self._stopping = Event()
        self.gone = False  # left gracefully (until booted again)
        self.carrying: Carry | None = None  # for the next join

    @property
    def up(self) -> bool:
        return not self.proc.dead

    def boot(self) -> None:
        self.proc = Process(self.id)
        self._stopping = Event()
        self.gone = False
        self.world.trace(self.id, "boots")
        Task(self.world.loop, self.proc, self._run(), f"{self.id}:device")

    async def _run(self) -> None:
        loop = self.world.loop
        self.carrying = self.disk.carry(self.id)
        backoff = RETRY_S[0]
        while not self._stopping.is_set():
            node = self.node = SimNode(self, self.carrying)
            try:
                await node.join()
            except BrokerError:
                await node.teardown()
                await first(self._stopping.wait(), sleep(loop, self.proc, backoff))
                # Holding apps' state for the broker: try often (device.py).
                backoff = min(backoff * 2, RETRY_S[1] if self.carrying is None else
                              CARRY_RETRY_S)
                continue
            self.carrying, backoff = None, RETRY_S[0]
            await first(node.stopped.wait(), self._stopping.wait())
            if self._stopping.is_set():
                await node.leave()
            await node.teardown()
            self.node = None
            if node.carry is not None:
                held = replace(node.carry.held, only_if_lost=True)
                self.carrying = replace(node.carry, held=held)
        self.gone = True
        self.world.trace(self.id, "left")
        loop.kill(self.proc)

    # --- faults -----------------------------------------------------------------------------

    def crash(self) -> None:
        self.world.trace(self.id, "crashes")
        self.world.loop.kill(self.proc)
        self.world.net.crash(self.id)
        self.node = None

    def leave(self) -> None:
        self._stopping.set()

    def pause(self) -> None:
        self.world.loop.pause(self.proc)
        self.world.net.go_silent(self.id)

    def resume(self) -> None:
        self.world.net.speak(self.id)
        self.world.loop.resume(self.proc)

    def cut(self) -> None:
        self.world.net.partition(self.id)

    def heal(self) -> None:
        self.world.net.heal(self.id)

    def holding(self, app: str) -> list[SimSnapshot]:
        """Every state of `app` this device holds in memory: running, suspended, seen."""
        held: list[SimSnapshot] = []
        node = self.node
        if node is not None:
            held += [SimSnapshot(a.name, a.spec.module, a.epoch, a.seq, tuple(a.inputs))
                     for a in node.hosted.values() if a.name == app]
            held += [s for s in (node.snapshots.get(app),) if s is not None]
            if node.carry is not None:
                held += [s for s in (node.carry.suspended.get(app),
                                     node.carry.retained.get(app)) if s is not None]
        if self.carrying is not None:
            held += [s for s in (self.carrying.suspended.get(app),
                                 self.carrying.retained.get(app)) if s is not None]
        return held
