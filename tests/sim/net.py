"""The network between clients and the broker: TCP connections as two ordered pipes.

Modelled: each connection (`Conn`) carries packets in each direction in order (TCP), each after
a delay drawn from the seed (0.5-20 ms; while the network jitters, one in 20 takes 50-300 ms;
0.1-1.5 s more while a node's link is slow); a partitioned node's packets are held (TCP
retransmits) and go out in order when the partition heals, unless an end closed the
connection meanwhile; a crashed process's sockets are closed by its OS at once (the broker
sees the EOF after the usual delay); keepalive: the broker drops a connection it has heard
nothing on for 1.5 x keepalive (its last packet, or a ping up to one keepalive before the
silence began), the client notices a silent broker after one to two keepalives (paho: a ping,
then no answer within a keepalive).

Not modelled: packet loss without a partition (TCP hides it), bandwidth, Nagle, half-open
connections after a partition that heals with both ends still open (they simply go on).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tests.sim.loop import Loop, Process

if TYPE_CHECKING:
    from tests.sim.broker import Session


@dataclass(slots=True)
class Delivery:
    """A PUBLISH as a client receives it."""

    topic: str
    payload: object
    qos: int
    retain: bool
    pid: int
    dup: bool


class ClientEnd(Protocol):
    """What the broker calls on a client (through the network)."""

    def on_connack(self, present: bool) -> None: ...
    def on_suback(self, pid: int) -> None: ...
    def on_puback(self, pid: int) -> None: ...
    def on_publish(self, delivery: Delivery) -> None: ...
    def on_eof(self, reason: str) -> None: ...


class Conn:
    """One TCP connection from a client on `node` to the broker."""

    __slots__ = ("broker_open", "client", "client_id", "client_open", "down_at", "held", "id",
                 "keepalive", "last_heard", "node", "proc", "session", "silent", "up_at",
                 "will")

    def __init__(self, ident: int, node: str, proc: Process, *, client_id: str,
                 client: ClientEnd, keepalive: float) -> None:
        self.id = ident
        self.node = node
        self.proc = proc
        self.client_id = client_id
        self.client = client
        self.keepalive = keepalive
        self.client_open = True
        self.broker_open = True  # until the broker refuses or drops it
        self.up_at = 0.0  # arrival time of the last packet sent each way (keeps them in order)
        self.down_at = 0.0
        self.last_heard = 0.0  # when the broker last heard from it
        self.held: list[tuple[bool, Callable[[], None]]] = []  # (upstream?, packet)
        self.session: Session | None = None
        self.will: tuple[str, object] | None = None
        self.silent = 0  # the silence (pause or partition) the broker last judged it by


class Network:
    def __init__(self, loop: Loop, rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng
        self.conns: dict[str, list[Conn]] = {}  # node -> its open connections
        self.partitioned: set[str] = set()
        self.silent: dict[str, int] = {}  # node -> token of its current silence
        self.slow_until: dict[str, float] = {}
        self.jitter_until = -1.0  # until then, one packet in 20 takes 50-300 ms
        self._ids = 0
        self._tokens = 0
        self.on_keepalive_expired: Callable[[Conn], None] = lambda conn: None
        self.on_eof: Callable[[Conn], None] = lambda conn: None  # the broker sees a socket close
        self.broker_up: Callable[[], bool] = lambda: True

    def open(self, node: str, proc: Process, client_id: str, client: ClientEnd,
             keepalive: float) -> Conn:
        self._ids += 1
        conn = Conn(self._ids, node, proc, client_id=client_id, client=client,
                    keepalive=keepalive)
        conn.last_heard = self.loop.now
        live = self.conns.setdefault(node, [])
        live[:] = [c for c in live if c.client_open or c.broker_open]
        live.append(conn)
        return conn

    def latency(self, node: str) -> float:
        rng, now = self.rng, self.loop.now
        delay = rng.uniform(0.0005, 0.02)
        if self.jitter_until > now and rng.random() < 0.05:
            delay = rng.uniform(0.05, 0.3)
        if self.slow_until.get(node, -1.0) > now:
            delay += rng.uniform(0.1, 1.5)
        return delay

    def up(self, conn: Conn, packet: Callable[[], None]) -> None:
        """Client to broker; dropped if the broker closed the connection before it arrives."""
        if conn.node in self.partitioned:
            conn.held.append((True, packet))
            return
        at = conn.up_at = max(conn.up_at, self.loop.now + self.latency(conn.node))

        def arrive() -> None:
            if conn.broker_open:  # (the broker closed every connection when it stopped)
                conn.last_heard = self.loop.now
                packet()

        self.loop.call_at(at, arrive)

    def down(self, conn: Conn, packet: Callable[[], None]) -> None:
        """Broker to client; runs in the client's process unless the client closed its end."""
        if conn.node in self.partitioned:
            conn.held.append((False, packet))
            return
        at = conn.down_at = max(conn.down_at, self.loop.now + self.latency(conn.node))

        def arrive() -> None:
            if conn.client_open:
                packet()

        self.loop.call_at(at, arrive, conn.proc)

    # --- faults -----------------------------------------------------------------------------

    def go_silent(self, node: str) -> int:
        """`node` says nothing from now (paused or cut off): the broker will drop it."""
        self._tokens += 1
        token = self.silent[node] = self._tokens
        for conn in self.conns.get(node, []):
            if conn.broker_open:
                conn.silent = token
                last = max(conn.last_heard, self.loop.now - self.rng.uniform(0, conn.keepalive))
                self._check_keepalive(conn, token, last)
        return token

    def _check_keepalive(self, conn: Conn, token: int, last: float) -> None:
        def check() -> None:
            if not conn.broker_open or self.silent.get(conn.node) != token:
                return
            if conn.last_heard > last:  # a packet sent before the silence came in late
                self._check_keepalive(conn, token, conn.last_heard)
                return
            if self.broker_up():
                self.on_keepalive_expired(conn)

        self.loop.call_at(last + 1.5 * conn.keepalive, check)

    def speak(self, node: str) -> None:
        self.silent.pop(node, None)

    def partition(self, node: str) -> None:
        self.partitioned.add(node)
        token = self.go_silent(node)
        for conn in self.conns.get(node, []):
            if conn.client_open:  # paho: a ping, and no answer within a keepalive
                wait = conn.keepalive * (1 + self.rng.random())
                self.loop.call_later(wait, functools.partial(self._client_gives_up, conn, token),
                                     conn.proc)

    def _client_gives_up(self, conn: Conn, token: int) -> None:
        if conn.client_open and self.silent.get(conn.node) == token:
            self.close_client_end(conn, eof=True)
            conn.client.on_eof("keepalive timeout")

    def heal(self, node: str) -> None:
        self.partitioned.discard(node)
        self.speak(node)
        for conn in self.conns.get(node, []):
            held, conn.held = conn.held, []
            for upstream, packet in held:
                (self.up if upstream else self.down)(conn, packet)

    def close_client_end(self, conn: Conn, *, eof: bool) -> None:
        """The client closes its socket; with `eof`, the broker sees it close (after the data
        sent before: else the client sent DISCONNECT first)."""
        if not conn.client_open:
            return
        conn.client_open = False
        if eof:
            self.up(conn, lambda: self.on_eof(conn))

    def crash(self, node: str) -> None:
        """The node's process died: its OS closes its sockets."""
        for conn in list(self.conns.get(node, [])):
            self.close_client_end(conn, eof=True)
