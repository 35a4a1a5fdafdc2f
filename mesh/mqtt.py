"""paho-mqtt driven by the asyncio event loop: no paho thread, awaitable connect/publish/subscribe.

paho's socket callbacks hand its socket to the loop (`add_reader`/`add_writer`), as in paho's
own asyncio example; a small task runs `loop_misc` for keepalives. Only a TLS connect runs on a
worker thread, as paho's handshake blocks; the client is the loop's again once it returns.
Messages are handed to a callback on the loop thread. With `manual_ack`, QoS 1 messages are
acknowledged only when the caller says so, which is how a node acknowledges inputs only after
a checkpoint holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from mesh import tls
from mesh.errors import BrokerError

log = logging.getLogger(__name__)

Message = paho.MQTTMessage


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    # With `tls`: the one CA (PEM) to trust, whose chain alone is checked (`mesh.tls`); None:
    # the system's CAs, and the server's name too.
    ca: str | None = field(default=None, repr=False)
    # The port of the same broker's TLS listener, when it announces one (`mesh.discovery`).
    tls_port: int | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtt[s]://[user:password@]host:port`, `host:port` or `host` (port 1883; 8883 for
        `mqtts`, TLS checked against the system's CAs)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            raise BrokerError(f"not a broker address: {url!r} (expected mqtt://host:port)")
        secure = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if secure else 1883)
        except ValueError:
            raise BrokerError(f"not a broker address: {url!r} (bad port)") from None
        return cls(parts.hostname, port, parts.username, parts.password, secure)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class _ClosedIfRefused(ssl.SSLSocket):
    """A TLS socket closed when its handshake fails (paho leaves it to the collector)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class Connection:
    """One MQTT client session. Use `async with Connection(...)`; callbacks run on the loop."""

    def __init__(self, broker: BrokerAddress, client_id: str, *,
                 on_message: Callable[[Message], None] | None = None,
                 clean_session: bool = True, manual_ack: bool = False,
                 keepalive: int = 10,
                 will: tuple[str, bytes, bool] | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.keepalive = keepalive
        self.on_message = on_message
        self.lost: asyncio.Future[str] | None = None
        # The broker still held this client id's persistent session (CONNACK "session present").
        self.resumed = False
        self._loop = asyncio.get_running_loop()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=clean_session, manual_ack=manual_ack,
                                   reconnect_on_failure=False)
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            context = ssl.create_default_context() if broker.ca is None else \
                tls.client_context(broker.ca)
            context.sslsocket_class = _ClosedIfRefused
            self._client.tls_set_context(context)  # (paho checks names as the context does)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        if will:
            topic, payload, retain = will
            self._client.will_set(topic, payload, qos=1, retain=retain)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self._misc: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[MQTTErrorCode] | None = None  # TLS, on a thread
        c = self._client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_ack
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._socket_opened
        c.on_socket_close = self._socket_closed
        c.on_socket_register_write = lambda _c, _u, sock: self._on_loop(
            self._loop.add_writer, sock, self._write)
        c.on_socket_unregister_write = self._socket_unwritable
        self._loop_thread = threading.get_ident()

    async def __aenter__(self) -> Connection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10) -> None:
        self.lost = self._loop.create_future()
        connect = functools.partial(self._client.connect, self.broker.host, self.broker.port,
                                    keepalive=self.keepalive)
        try:
            if self.broker.tls:
                # paho's TLS handshake blocks: on a worker thread, not to stall the loop (or a
                # broker served on it). Nothing else touches the client until it returns; the
                # socket callbacks it makes meanwhile come back to the loop (`_on_loop`).
                self._connecting = connecting = asyncio.ensure_future(asyncio.to_thread(connect))
                await asyncio.shield(connecting)
            else:
                connect()
        except asyncio.CancelledError:
            await self.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            whose = "the mesh's CA" if self.broker.ca is not None else "a CA this machine trusts"
            raise BrokerError(f"the broker at {self.broker} is not to be trusted: its "
                              f"certificate is not from {whose} ({exc.verify_message})") from None
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.broker}: {exc}") from None
        self._misc = asyncio.create_task(self._housekeeping(), name=f"mqtt-{self.client_id}")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._connected)
        except TimeoutError:
            await self.close()
            raise BrokerError(f"no answer from the broker at {self.broker}") from None
        except BrokerError:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect cleanly (no Last Will). Idempotent."""
        if self._connecting is not None and not self._connecting.done():
            # A connect on its thread cannot be stopped: drop what it opens once it returns.
            self._connecting.add_done_callback(lambda _: self._disconnect())
        else:
            self._disconnect()
        if self._misc:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        self._set_lost("closed")

    def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
            self._client.loop_write()  # sends DISCONNECT; paho then closes the socket
        sock = self._client.socket()
        if sock is not None:  # DISCONNECT could not be written in full: drop the socket
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            with contextlib.suppress(OSError):
                sock.close()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                      retain: bool = False) -> None:
        """Publish; with QoS 1, returns once the broker has acknowledged it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            return
        await self._wait(info.mid)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Queue a publication without waiting for its acknowledgement."""
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.warning("%s: cannot publish to %s: %s", self.client_id, topic,
                        paho.error_string(info.rc))

    @property
    def lost_reason(self) -> str | None:
        """Why the connection ended, or None while it is up."""
        return self.lost.result() if self.lost is not None and self.lost.done() else None

    async def subscribe(self, *topics: str, qos: int = 1) -> None:
        if not topics:
            return
        rc, mid = self._client.subscribe([(topic, qos) for topic in topics])
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"cannot subscribe: {paho.error_string(rc)}")
        await self._wait(mid)

    async def unsubscribe(self, *topics: str) -> None:
        if topics:
            self._client.unsubscribe(list(topics))

    def ack(self, mid: int) -> None:
        """Acknowledge a QoS 1 message received with manual acknowledgement."""
        self._client.ack(mid, 1)

    async def _wait(self, mid: int) -> None:
        lost = self.lost
        if lost is None or lost.done():
            raise BrokerError("not connected")
        future = self._loop.create_future()
        self._pending[mid] = future
        await asyncio.wait([future, lost], return_when=asyncio.FIRST_COMPLETED)
        self._pending.pop(mid, None)
        if future.done():
            future.result()  # raises the BrokerError a lost connection set
            return
        future.cancel()
        raise BrokerError(f"connection lost: {lost.result()}")

    async def _housekeeping(self) -> None:
        # Pings go out at most this late, well inside the broker's grace past the keepalive.
        every = min(1.0, self.keepalive / 4)
        while True:
            await asyncio.sleep(every)
            if self._client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                self._set_lost("keepalive failed")
                return

    def _read(self) -> None:
        rc = self._client.loop_read(1000)
        sock = self._client.socket()
        # What TLS has decrypted but paho not read yet wakes no reader: read it now.
        while rc == paho.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = self._client.loop_read(1000)
        if rc != paho.MQTT_ERR_SUCCESS:
            self._set_lost(paho.error_string(rc))

    def _write(self) -> None:
        rc = self._client.loop_write()
        if rc != paho.MQTT_ERR_SUCCESS:
            self._set_lost(paho.error_string(rc))

    # --- paho callbacks (on the loop thread) -------------------------------------------------

    def _on_loop(self, call: Callable[..., object], *args: Any) -> None:
        """`call(*args)` on the loop's thread (paho calls back on the one that connects)."""
        if threading.get_ident() == self._loop_thread:
            call(*args)
        else:
            self._loop.call_soon_threadsafe(call, *args)

    def _socket_opened(self, _c: Any, _u: Any, sock: Any) -> None:
        # Small control packets (acks, owner records) must not wait for Nagle's algorithm.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_loop(self._loop.add_reader, sock, self._read)

    def _socket_closed(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._loop.remove_reader, sock)

    def _socket_unwritable(self, _c: Any, _u: Any, sock: Any) -> None:
        self._on_loop(self._loop.remove_writer, sock)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode,
                    _props: Any) -> None:
        if self._connected.done():
            return
        self.resumed = bool(flags.session_present)
        if reason.is_failure:
            self._connected.set_exception(
                BrokerError(f"the broker at {self.broker} refused us: {reason}"))
        else:
            self._connected.set_result(None)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: ReasonCode,
                       _props: Any) -> None:
        self._set_lost(str(reason))

    def _set_lost(self, reason: str) -> None:
        if self.lost is not None and not self.lost.done():
            log.debug("%s: connection lost: %s", self.client_id, reason)
            self.lost.set_result(reason)
        if not self._connected.done():  # (a connect waiting for its CONNACK stops waiting)
            self._connected.set_exception(BrokerError(
                f"the connection to the broker at {self.broker} ended before it answered "
                f"({reason})"))
            self._connected.exception()  # seen, even if no connect waits any more
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerError(f"connection lost: {reason}"))
        self._pending.clear()

    def _on_ack(self, _c: Any, _u: Any, mid: int, *_rest: Any) -> None:
        future = self._pending.pop(mid, None)
        if future and not future.done():
            future.set_result(None)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode],
                      _props: Any) -> None:
        future = self._pending.pop(mid, None)
        if future and not future.done():
            if any(reason.is_failure for reason in reasons):
                future.set_exception(BrokerError("the broker refused a subscription"))
            else:
                future.set_result(None)

    def _on_message(self, _c: Any, _u: Any, message: Message) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception:
            log.exception("%s: message handler failed on %s", self.client_id, message.topic)
