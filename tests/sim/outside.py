"""The world outside the mesh: a publisher of inputs and an operator, on one stable host.

The publisher sends each input once, QoS 1, to `<root>/apps/<app>/in`, and records the ones the
broker acknowledged (the ones the mesh must then apply exactly once). The operator does what
`mesh deploy`, `mesh stop` and `mesh migrate` make a node publish: an app's spec, retained (or
cleared), one command after the other, each retried until the broker acknowledges it. Both
reconnect (clean session) whenever the broker is back. Not modelled: the command/reply path
through a node (its validation is not what this simulator tests), except that a node refuses a
command (the operator tries again) while the broker lacks the mesh's marker: one that lost its
store takes no command until a survivor has given it back what the mesh held.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from mesh.errors import BrokerError
from tests.sim.client import Client
from tests.sim.loop import Event, Process, Task, first, sleep

if TYPE_CHECKING:
    from tests.sim.world import World


class Outside:
    def __init__(self, world: World) -> None:
        self.world = world
        self.proc = Process("outside")
        self.client: Client | None = None
        self._commands: deque[tuple[str, object]] = deque()
        self._more = Event()
        Task(world.loop, self.proc, self._connection(), "outside:connection")
        Task(world.loop, self.proc, self._operator(), "outside:operator")

    async def _connection(self) -> None:
        w = self.world
        while True:
            client = Client(w.fabric, self.proc, "outside", "outside", keepalive=5.0)
            try:
                await client.connect()
            except BrokerError:
                await sleep(w.loop, self.proc, 0.5)
                continue
            self.client = client
            await client.lost
            self.client = None
            await sleep(w.loop, self.proc, 0.2)

    # --- inputs -----------------------------------------------------------------------------

    def send(self, app: str, value: int) -> None:
        client = self.client
        if client is None or client.lost_reason:
            return  # not sent at all
        self.world.ledger.sent(app, value)
        Task(self.world.loop, self.proc, self._send(client, app, value), "outside:send")

    async def _send(self, client: Client, app: str, value: int) -> None:
        try:
            await client.publish(f"{self.world.root}/apps/{app}/in", value)
        except BrokerError:
            return
        self.world.ledger.acked(app, value)

    # --- commands ---------------------------------------------------------------------------

    def command(self, topic: str, payload: object) -> None:
        """Publish `payload` retained at `topic` (None clears it), after earlier commands."""
        self._commands.append((topic, payload))
        self._more.set()

    async def _operator(self) -> None:
        w = self.world
        while True:
            if not self._commands:
                self._more.clear()
                await self._more.wait()
            topic, payload = self._commands[0]
            client = self.client
            marked = f"{w.root}/mesh" in w.broker.retained
            if client is not None and not client.lost_reason and marked:
                try:
                    await client.publish(topic, payload, retain=True)
                    self._commands.popleft()
                    w.trace("outside", f"set {topic} = {payload!r:.120}")
                    continue
                except BrokerError:
                    pass
            await first(sleep(w.loop, self.proc, 0.5))
