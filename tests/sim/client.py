"""A model of `mesh.mqtt.Connection`: one MQTT client session, driven by simulated packets.

As in the real one: `connect` waits for CONNACK (10 s at most), `publish` with QoS 1 returns
once the broker's PUBACK arrives and raises `BrokerError` if the connection is lost first;
`lost` is a future set with the reason once the connection ends, for any cause; with
`manual_ack` QoS 1 messages are acknowledged only when the owner calls `ack`, else (as paho
does) right after the message callback. `close` sends DISCONNECT (so no Last Will).
Not modelled: paho's own outgoing queue limits, reconnect logic (the mesh does not use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.errors import BrokerError
from tests.sim.loop import Future, Loop, Process, first, sleep
from tests.sim.net import Conn, Delivery, Network

if TYPE_CHECKING:
    from tests.sim.broker import Broker

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Fabric:
    """What every client is built on."""

    loop: Loop
    net: Network
    broker: Broker


class Client:
    def __init__(self, fabric: Fabric, proc: Process, node: str, client_id: str, *,
                 on_message: Callable[[Delivery], None] | None = None, clean: bool = True,
                 manual_ack: bool = False, keepalive: float = 5.0,
                 will: tuple[str, object] | None = None) -> None:
        self.loop, self.net, self.broker = fabric.loop, fabric.net, fabric.broker
        self.proc = proc
        self.node = node
        self.client_id = client_id
        self.on_message = on_message
        self.clean = clean
        self.manual_ack = manual_ack
        self.keepalive = keepalive
        self.will = will
        self.lost: Future[str] = Future()
        self.resumed = False  # the CONNACK said "session present"
        self.conn: Conn | None = None
        self._connected: Future[None] = Future()
        self._pending: dict[int, Future[None]] = {}
        self._next_pid = 0

    @property
    def lost_reason(self) -> str | None:
        return self.lost.result() if self.lost.done() else None

    async def connect(self) -> None:
        conn = self.conn = self.net.open(self.node, self.proc, self.client_id, self,
                                         self.keepalive)
        broker, clean, will = self.broker, self.clean, self.will
        self.net.up(conn, lambda: broker.connect(conn, clean, will))
        await first(self._connected, sleep(self.loop, self.proc, CONNECT_TIMEOUT_S))
        if not self._connected.done():
            await self.close()
            raise BrokerError("no answer from the broker")
        self._connected.result()

    async def close(self) -> None:
        """Disconnect cleanly (no Last Will). Idempotent."""
        conn = self.conn
        if conn is not None and conn.client_open:
            broker = self.broker
            self.net.up(conn, lambda: broker.disconnect(conn))
            self.net.close_client_end(conn, eof=False)
        self._set_lost("closed")

    def _pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def _usable(self) -> Conn:
        conn = self.conn
        if conn is None or not conn.client_open or self.lost.done():
            raise BrokerError("not connected")
        return conn

    async def publish(self, topic: str, payload: object, *, qos: int = 1,
                      retain: bool = False) -> None:
        conn = self._usable()
        pid = self._pid()
        done: Future[None] = Future()
        if qos:
            self._pending[pid] = done
        broker = self.broker
        self.net.up(conn, lambda: broker.publish(conn, pid, topic, payload, qos=qos,
                                                  retain=retain))
        if qos:
            await done

    def publish_nowait(self, topic: str, payload: object, *, qos: int = 1) -> None:
        conn = self.conn
        if conn is not None and conn.client_open and not self.lost.done():
            pid = self._pid()
            broker = self.broker
            self.net.up(conn, lambda: broker.publish(conn, pid, topic, payload, qos=qos,
                                                      retain=False))

    async def subscribe(self, *filters: str, qos: int = 1) -> None:
        conn = self._usable()
        pid = self._pid()
        done: Future[None] = Future()
        self._pending[pid] = done
        broker = self.broker
        self.net.up(conn, lambda: broker.subscribe(conn, pid, filters, qos))
        await done

    def ack(self, pid: int) -> None:
        conn = self.conn
        if conn is not None and conn.client_open:
            broker = self.broker
            self.net.up(conn, lambda: broker.puback(conn, pid))

    # --- from the broker --------------------------------------------------------------------

    def on_connack(self, present: bool) -> None:
        self.resumed = present
        self._connected.set_result(None)

    def on_suback(self, pid: int) -> None:
        self._settle(pid)

    def on_puback(self, pid: int) -> None:
        self._settle(pid)

    def _settle(self, pid: int) -> None:
        future = self._pending.pop(pid, None)
        if future is not None:
            future.set_result(None)

    def on_publish(self, delivery: Delivery) -> None:
        if self.lost.done():
            return
        if self.on_message is not None:
            self.on_message(delivery)
        if delivery.qos and not self.manual_ack:
            self.ack(delivery.pid)

    def on_eof(self, reason: str) -> None:
        conn = self.conn
        if conn is not None:
            conn.client_open = False
        self._connected.set_exception(BrokerError(f"the broker refused us: {reason}"))
        self._set_lost(reason)

    def _set_lost(self, reason: str) -> None:
        self.lost.set_result(reason)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(BrokerError(f"connection lost: {reason}"))
