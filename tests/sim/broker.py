"""A model of the MQTT broker the mesh relies on: Mosquitto 2 with persistence, MQTT 3.1.1.

Modelled:
- retained messages (an empty payload, `None` here, deletes one), sent to a new subscription
  filter by filter, each filter's topics in sorted order, with the retain flag set;
- sessions: clean ones end with their connection; persistent ones (clean_session false) keep
  their subscriptions, their unacknowledged QoS 1 messages and the QoS 1 messages queued while
  offline; on a resumed session the unacknowledged ones go out again first (DUP set, SAME packet
  id), then the queued ones, in order;
- per session a window of `window` unacknowledged QoS 1 messages (Mosquitto's
  max_inflight_messages, default 20); the rest wait in the session's queue and go out as acks
  free slots. A PUBACK for a client's own publish is not subject to the window, so it overtakes
  messages still queued for that client (retained ones after a subscribe, for instance);
- packet ids: per session, assigned when a message is queued, never reused within a run;
- Last Will: published when a connection ends without DISCONNECT (a socket closed, a keepalive
  expired) and on a takeover where either session is clean (Mosquitto's rule); a second CONNECT
  with a client id in use closes the first connection;
- `stop(wills=True)`: Mosquitto's orderly shutdown sends every connected client's will, then
  saves everything; `start(wipe=True)` comes back empty, as a broker killed before its first
  autosave (or an embedded broker) does.

Not modelled: QoS 2, MQTT 5 properties, max_queued_messages, message expiry, ACLs, QoS 0
messages to offline sessions (dropped, as by default).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from tests.sim.loop import Loop
from tests.sim.net import Conn, Delivery, Network


def matches(sub: str, topic: str) -> bool:
    sub_parts, topic_parts = sub.split("/"), topic.split("/")
    for index, part in enumerate(sub_parts):
        if part == "#":
            return True
        if index >= len(topic_parts) or (part != "+" and part != topic_parts[index]):
            return False
    return len(sub_parts) == len(topic_parts)


class Message:
    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: object, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


class Session:
    __slots__ = ("client_id", "conn", "inflight", "next_pid", "persistent", "queue", "subs")

    def __init__(self, client_id: str, persistent: bool) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.subs: dict[str, int] = {}
        self.inflight: dict[int, Message] = {}  # sent, not acknowledged (insertion order)
        self.queue: deque[tuple[int, Message]] = deque()
        self.next_pid = 0
        self.conn: Conn | None = None


Hook = Callable[[str, object, str], None]
Routed = Callable[[str, object, int], None]


class Broker:
    def __init__(self, loop: Loop, net: Network, window: int = 20) -> None:
        self.loop = loop
        self.net = net
        self.window = window
        self.up = True
        self.retained: dict[str, object] = {}
        self.sessions: dict[str, Session] = {}
        self.conns: dict[str, Conn] = {}  # client id -> its live connection
        self.on_retained: Hook = lambda topic, payload, client_id: None
        self.on_routed: Routed = lambda topic, payload, sessions: None
        self._match: dict[tuple[str, str], bool] = {}
        net.on_eof = lambda conn: self._close(conn, will=True, reason="connection closed")
        net.on_keepalive_expired = lambda conn: self._close(conn, will=True,
                                                             reason="keepalive expired")
        net.broker_up = lambda: self.up

    def _matches(self, sub: str, topic: str) -> bool:
        key = (sub, topic)
        found = self._match.get(key)
        if found is None:
            found = self._match[key] = matches(sub, topic)
        return found

    # --- packets from clients (called by the network on arrival) -----------------------------

    def connect(self, conn: Conn, clean: bool, will: tuple[str, object] | None) -> None:
        client = conn.client
        if not self.up:
            conn.broker_open = False
            self.net.down(conn, lambda: client.on_eof("connection refused"))
            return
        cid = conn.client_id
        old = self.conns.get(cid)
        session = self.sessions.get(cid)
        if old is not None and old is not conn:
            old_clean = session is None or not session.persistent
            self._close(old, will=old_clean or clean, reason="session taken over")
            session = self.sessions.get(cid)
        present = session is not None and not clean
        if session is None or clean:
            session = self.sessions[cid] = Session(cid, persistent=not clean)
        conn.session, conn.will = session, will
        session.conn = conn
        self.conns[cid] = conn
        self.net.down(conn, lambda: client.on_connack(present))
        for pid, message in session.inflight.items():  # again, DUP, same packet id
            self._send(conn, message, pid, dup=True)
        self._pump(session)

    def subscribe(self, conn: Conn, pid: int, filters: tuple[str, ...], qos: int) -> None:
        session = conn.session
        assert session is not None
        for sub in filters:
            session.subs[sub] = qos
        client = conn.client
        self.net.down(conn, lambda: client.on_suback(pid))
        for sub in filters:
            for topic in sorted(self.retained):
                if self._matches(sub, topic):
                    self._enqueue(session, Message(topic, self.retained[topic], min(qos, 1),
                                                   retain=True))

    def publish(self, conn: Conn, pid: int, topic: str, payload: object, *, qos: int,
                retain: bool) -> None:
        self._publish(topic, payload, qos, retain, conn.client_id)
        if qos:
            client = conn.client
            self.net.down(conn, lambda: client.on_puback(pid))

    def subscribers(self, topic: str) -> int:
        """How many sessions would get a message on `topic` now."""
        return sum(1 for s in self.sessions.values()
                   if any(self._matches(sub, topic) for sub in s.subs))

    def _publish(self, topic: str, payload: object, qos: int, retain: bool,
                 client_id: str) -> None:
        if retain:
            if payload is None:
                self.retained.pop(topic, None)
            else:
                self.retained[topic] = payload
            self.on_retained(topic, payload, client_id)
        routed = 0
        for session in list(self.sessions.values()):
            granted = max((q for sub, q in session.subs.items() if self._matches(sub, topic)),
                          default=-1)
            if granted >= 0:
                routed += 1
                self._enqueue(session, Message(topic, payload, min(qos, granted), retain=False))
        if not retain:
            self.on_routed(topic, payload, routed)

    def puback(self, conn: Conn, pid: int) -> None:
        session = conn.session
        if session is not None and session.inflight.pop(pid, None) is not None:
            self._pump(session)

    def disconnect(self, conn: Conn) -> None:
        self._close(conn, will=False, reason="disconnected")

    # --- sessions -----------------------------------------------------------------------------

    def _enqueue(self, session: Session, message: Message) -> None:
        conn = session.conn
        if message.qos == 0:
            if conn is not None:
                self._send(conn, message, 0, dup=False)
            return
        session.next_pid += 1
        pid = session.next_pid
        if conn is not None and len(session.inflight) < self.window:
            session.inflight[pid] = message
            self._send(conn, message, pid, dup=False)
        else:
            session.queue.append((pid, message))

    def _pump(self, session: Session) -> None:
        conn = session.conn
        while conn is not None and session.queue and len(session.inflight) < self.window:
            pid, message = session.queue.popleft()
            session.inflight[pid] = message
            self._send(conn, message, pid, dup=False)

    def _send(self, conn: Conn, message: Message, pid: int, *, dup: bool) -> None:
        delivery = Delivery(message.topic, message.payload, message.qos, message.retain, pid,
                            dup)
        client = conn.client
        self.net.down(conn, lambda: client.on_publish(delivery))

    def _close(self, conn: Conn, *, will: bool, reason: str) -> None:
        if not conn.broker_open:
            return
        conn.broker_open = False
        session = conn.session
        if self.conns.get(conn.client_id) is conn:
            del self.conns[conn.client_id]
        if session is not None and session.conn is conn:
            session.conn = None
            if not session.persistent and self.sessions.get(session.client_id) is session:
                del self.sessions[session.client_id]
        if will and conn.will is not None:
            topic, payload = conn.will
            self._publish(topic, payload, 1, True, conn.client_id)
        client = conn.client
        self.net.down(conn, lambda: client.on_eof(reason))

    # --- faults -----------------------------------------------------------------------------

    def stop(self, *, wills: bool) -> None:
        """Mosquitto stopping (`wills`: an orderly stop, which sends them) or killed."""
        for conn in list(self.conns.values()):
            self._close(conn, will=wills, reason="broker went away")
        self.up = False

    def start(self, *, wipe: bool) -> None:
        if wipe:
            self.retained.clear()
            self.sessions.clear()
        self.up = True
