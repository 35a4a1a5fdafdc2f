"""What liquid-mesh fixes in amqtt 0.12.1 (the embedded broker), applied when imported.

Each fix is written for amqtt 0.12.1 (pinned in pyproject.toml) so that it could be offered
upstream as it is; broker-config/amqtt-fixes.md says what each one changes and why:

1. a silent client is dropped, which publishes its Last Will;
2. a connecting client gets the retained messages of its own subscriptions only;
3. a client without credentials keeps a persistent session (`OpenAuth`);
4. a QoS 1 message stays in its session's flight until the client acknowledges it, and is
   sent again, with DUP set and the same packet id, when the session resumes; a session has at
   most MAX_IN_FLIGHT messages in flight and MAX_QUEUED (MAX_QUEUED_BYTES) waiting, as
   Mosquitto's limits;
5. a resumed session gets, in order: what was in flight, what was queued while it was away
   (as ordinary messages, not retained ones), then what comes after;
6. when a new connection takes over a session, the old one's close leaves the session alone;
7. the broker's subscriptions and retained messages are walked over copies, so a client that
   subscribes meanwhile no longer breaks the walk ("dictionary changed size during iteration").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from amqtt.broker import Broker
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import OutgoingApplicationMessage, Session

log = logging.getLogger(__name__)

_tasks: set[asyncio.Future[Any]] = set()


def _spawn(work: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(work)
    _tasks.add(task)
    task.add_done_callback(_finished)


def _finished(task: asyncio.Future[Any]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("embedded broker: a delivery ended: %s", task.exception())


# --- 1. a silent client is dropped --------------------------------------------------------------

def _drop_silent_client(handler: BrokerProtocolHandler) -> None:
    """amqtt notices that a client went silent (a read timeout) and does nothing, so a device
    whose cable is pulled keeps its session and no Last Will is sent: drop it, as MQTT 3.1.1
    section 3.1.2.10 says, which publishes the Will."""
    _spawn(handler.handle_connection_closed())


# --- 2. retained messages of the client's own subscriptions --------------------------------------

_retained_for_subscription = Broker._publish_retained_messages_for_subscription


async def _retained_for_own_subscription(self: Broker, subscription: tuple[str, int],
                                         session: Session) -> None:
    """amqtt, when a client connects, sends it the retained messages of every subscription in
    the broker, anyone's (a plain subscriber to one app's outputs got the node records, specs
    and checkpoints): only those of the client's own subscriptions, as MQTT says."""
    holders = self._subscriptions.get(subscription[0], ())
    if any(held.client_id == session.client_id for held, _ in holders):
        await _retained_for_subscription(self, subscription, session)


# --- 3. persistent sessions without credentials --------------------------------------------------

class OpenAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Lets every client in, as amqtt's AnonymousAuthPlugin does, without marking its session
    anonymous: amqtt neither queues messages for an anonymous session that is away nor keeps it
    once it disconnects, so `clean_session=False` meant nothing to a client without a username.
    MQTT ties a persistent session to the client id, not to credentials."""

    @dataclass
    class Config:
        """Nothing to configure."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


# --- 4 and 5. QoS 1 flight, redelivery, and order on resume --------------------------------------

_HOLD = "_mesh_hold"  # on a Session: a connection is resuming it; QoS 1 messages wait in its queue
_CONNECTION = "_mesh_connection"  # on a Session and its handler: which connection owns the session
_STOPPED = "_mesh_stopped"  # on a handler: its connection is closed; nothing more waits on it
_connections = itertools.count(1)

_publish = BrokerProtocolHandler.mqtt_publish
_start = BrokerProtocolHandler.start
_stop_waiters = BrokerProtocolHandler._stop_waiters
_initialize_client_session = Broker._initialize_client_session
_retain_broadcast = Broker._retain_broadcast_message

# A session's QoS 1 messages sent and not yet acknowledged, at most (as Mosquitto's
# `max_inflight_messages`); and the messages waiting for it, at most (`max_queued_messages`,
# `max_queued_bytes`, as the mesh configures Mosquitto).
MAX_IN_FLIGHT = 1000
MAX_QUEUED = 100_000
MAX_QUEUED_BYTES = 256 << 20
_QUEUED_BYTES = "_mesh_queued_bytes"  # on a Session: the payload bytes waiting in its queue


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A QoS 1 message waiting in a session's queue (amqtt queues its own kind, while the
    session is away: those are never retained ones)."""

    topic: str
    data: bytes | bytearray
    qos: int
    retain: bool


def _holds(session: Session, handler: BrokerProtocolHandler) -> bool:
    """The handler's connection is the newest of the session."""
    return getattr(session, _CONNECTION, None) == getattr(handler, _CONNECTION, None)


def _owns(session: Session, handler: BrokerProtocolHandler) -> bool:
    """... and it is open."""
    return _holds(session, handler) and not getattr(handler, _STOPPED, False)


def _mqtt_publish(self: BrokerProtocolHandler, topic: str, data: bytes | bytearray,  # noqa: PLR0917 - amqtt's signature
                  qos: int | None, retain: bool,
                  ack_timeout: int | None = None) -> Awaitable[OutgoingApplicationMessage | None]:
    """A QoS 1 message enters its session's flight the moment the broker sends it, not when the
    sending task first runs (by then the connection may be gone, and amqtt dropped it), and no
    caller waits for its PUBACK (amqtt's subscribe handling did: a client that acknowledges
    late, as a node does, held up its own session). It waits in the session's queue, behind
    older ones, while a connection resumes the session or while the flight is full
    (MAX_IN_FLIGHT: a client that acknowledges nothing would otherwise use up the 65535 packet
    ids, and amqtt looks for a free one forever)."""
    session = self.session
    if qos != QOS_1 or session is None:
        return _publish(self, topic, data, qos, retain, ack_timeout)  # type: ignore[no-any-return]
    queue = session.retained_messages
    if (getattr(session, _HOLD, False) or len(session.inflight_out) >= MAX_IN_FLIGHT
            or not queue.empty()):
        _queue(session, _Waiting(topic, data, QOS_1, retain))
    else:
        _spawn(_in_flight(self, _enter_flight(session, topic, data, retain)))
    return _done(None)


async def _done(value: None) -> None:
    return value


def _enter_flight(session: Session, topic: str, data: bytes | bytearray,
                  retain: bool) -> OutgoingApplicationMessage:
    message = OutgoingApplicationMessage(session.next_packet_id, topic, QOS_1, data, retain)
    session.inflight_out[message.packet_id] = message
    return message


def _queue(session: Session, message: _Waiting) -> None:
    if _room(session, message.topic, len(message.data)):
        session.retained_messages.put_nowait(message)
        _count(session, len(message.data))


def _room(session: Session, topic: str, size: int) -> bool:
    """Whether a message may still queue for the session: past MAX_QUEUED messages or
    MAX_QUEUED_BYTES it is dropped, as Mosquitto drops past its limits."""
    queued = getattr(session, _QUEUED_BYTES, 0)
    if session.retained_messages.qsize() < MAX_QUEUED and queued + size <= MAX_QUEUED_BYTES:
        return True
    log.warning("embedded broker: %d messages (%d bytes) wait for %s already; dropping one on "
                "%s", session.retained_messages.qsize(), queued, session.client_id, topic)
    return False


def _count(session: Session, size: int) -> None:
    setattr(session, _QUEUED_BYTES, getattr(session, _QUEUED_BYTES, 0) + size)


def _send_queued(handler: BrokerProtocolHandler) -> None:
    """Move the session's queued messages into its flight, in order, while there is room, if
    this handler's connection holds the session."""
    session = handler.session
    if session is None or not _owns(session, handler):
        return
    queue = session.retained_messages
    while (not getattr(session, _HOLD, False) and len(session.inflight_out) < MAX_IN_FLIGHT
           and not queue.empty()):
        queued = queue.get_nowait()
        _count(session, -len(queued.data))
        # amqtt's own kind, queued while the session was away, says retained: it is not
        retain = queued.retain if isinstance(queued, _Waiting) else False
        if queued.qos == QOS_1:
            _spawn(_in_flight(handler, _enter_flight(session, queued.topic, queued.data, retain)))
        else:  # QoS 2: amqtt's own flow
            _spawn(_publish(handler, queued.topic, queued.data, queued.qos, retain))


async def _in_flight(self: BrokerProtocolHandler, message: OutgoingApplicationMessage) -> None:
    """Send a message of the session's flight (DUP if it was sent before) and wait for its
    PUBACK. amqtt gave up after 5 s and when the connection closed, and forgot the message
    either way; here it leaves the flight only once acknowledged (MQTT 3.1.1 section 4.4)."""
    session = self.session
    assert session is not None
    assert message.packet_id is not None
    packet = message.build_publish_packet(dup=message.publish_packet is not None)
    await self._send_packet(packet)
    message.publish_packet = packet
    if getattr(self, _STOPPED, False):
        return  # closed: the next connection of the session sends it again
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    self._puback_waiters[message.packet_id] = waiter
    try:
        await asyncio.wait([waiter])  # cancelled when the connection closes
    finally:
        if self._puback_waiters.get(message.packet_id) is waiter:
            del self._puback_waiters[message.packet_id]
    if not waiter.cancelled():
        message.puback_packet = waiter.result()
        session.inflight_out.pop(message.packet_id, None)
        _send_queued(self)


async def _redeliver(self: BrokerProtocolHandler) -> None:
    """On resume, send again what is in flight, in the order it was first sent, without waiting
    for the acknowledgements (amqtt waited, then gave up on each after 10 s, and forgot it)."""
    session = self.session
    assert session is not None
    for message in list(session.inflight_out.values()):
        if message.qos == QOS_1:
            _spawn(_in_flight(self, message))
        else:  # QoS 2: amqtt's own flow
            _spawn(asyncio.wait_for(self._handle_message_flow(message), 10))
    for message in list(session.inflight_in.values()):
        _spawn(asyncio.wait_for(self._handle_message_flow(message), 10))


async def _started(self: BrokerProtocolHandler) -> None:
    """A connection that resumes a session, once it reads its client's packets: what was in
    flight goes again first, then what was queued, then the rest. (amqtt then sent what was
    queued while the session was away with the retain flag set: a client may rightly ignore a
    retained input, and the node does.) Only if no newer connection took the session since."""
    await _start(self)
    session = self.session
    if session is not None and _owns(session, self):
        setattr(session, _HOLD, False)
        _send_queued(self)


async def _nothing_queued(self: Broker, session: Session) -> None:
    """amqtt's delivery of the messages queued while the session was away: done on `start`."""


def _stop(self: BrokerProtocolHandler) -> None:
    setattr(self, _STOPPED, True)
    _stop_waiters(self)


async def _initialize(self: Broker, *args: Any) -> tuple[BrokerProtocolHandler, Session]:
    handler, session = await _initialize_client_session(self, *args)
    connection = next(_connections)
    setattr(session, _CONNECTION, connection)
    setattr(handler, _CONNECTION, connection)
    setattr(session, _HOLD, True)
    return handler, session


async def _queue_for_away(self: Broker, broadcast: dict[str, Any], qos: int,
                          session: Session) -> None:
    """A message for a session that is away: queued, within the limits (amqtt queued all)."""
    size = len(broadcast.get("data") or b"")
    if _room(session, str(broadcast.get("topic")), size):
        await _retain_broadcast(self, broadcast, qos, session)
        _count(session, size)


# --- 6. a session taken over ---------------------------------------------------------------------

async def _disconnected(self: Broker, session: Session, handler: BrokerProtocolHandler,
                        waiter: asyncio.Future[Any]) -> None:
    """amqtt's `_handle_disconnect`, but when a client connects with the id of one still
    connected, amqtt closes the old connection, whose own close then marked the session
    disconnected under the new connection: the session stopped receiving anything. A
    connection that no longer holds its session now closes alone (no Will: the session's Will
    is the new connection's by then), checked again after each wait."""
    owner = _holds(session, handler)
    if owner and not isinstance(waiter.result(), DisconnectPacket) and session.will_flag:
        await self._broadcast_message(session, session.will_topic, session.will_message,
                                      session.will_qos)
        if session.will_retain:
            await self.retain_message(session, session.will_topic, session.will_message,
                                      session.will_qos)
    await self._stop_handler(handler)
    if owner and _holds(session, handler):
        session.transitions.disconnect()
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_DISCONNECTED,
                                              client_id=session.client_id,
                                              client_session=session)


# --- 7. walks over copies ------------------------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


class _Walkable(dict[K, V]):
    """A dict whose walks go over a copy: amqtt awaits inside its walks over the broker's
    subscriptions and retained messages, and another client's subscribe meanwhile raised
    "dictionary changed size during iteration" and dropped the client or the message."""

    def __iter__(self) -> Iterator[K]:
        return iter(list(super().__iter__()))

    def items(self) -> Any:
        return list(super().items())

    def values(self) -> Any:
        return list(super().values())


_broker_init = Broker.__init__


def _init(self: Broker, *args: Any, **kwargs: Any) -> None:
    _broker_init(self, *args, **kwargs)
    self._subscriptions = _Walkable(self._subscriptions)
    self._retained_messages = _Walkable(self._retained_messages)


BrokerProtocolHandler.handle_read_timeout = _drop_silent_client
Broker._publish_retained_messages_for_subscription = _retained_for_own_subscription
BrokerProtocolHandler.mqtt_publish = _mqtt_publish
BrokerProtocolHandler.start = _started
BrokerProtocolHandler._retry_deliveries = _redeliver
BrokerProtocolHandler._stop_waiters = _stop
Broker._initialize_client_session = _initialize
Broker._publish_session_retained_messages = _nothing_queued
Broker._retain_broadcast_message = _queue_for_away
Broker._handle_disconnect = _disconnected
Broker.__init__ = _init
