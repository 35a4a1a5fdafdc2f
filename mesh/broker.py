"""The embedded MQTT broker (amqtt), started in-process when a device has no broker to use.

It makes one device alone, or a LAN without Mosquitto, work out of the box, with the node's
fixes to amqtt (`mesh.amqtt_fixes`): persistent sessions keep and redeliver QoS 1 messages as
MQTT 3.1.1 says, so migration and failover lose no input on it either. Its limits, which the
node states in a startup warning: MQTT 3.1.1 only, and it keeps everything in memory, so a
restart of the broker loses what it had queued for apps that were away.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from mesh import amqtt_fixes
from mesh.accounts import Accounts
from mesh.mqtt import BrokerAddress
from mesh.tls import TlsListener

log = logging.getLogger(__name__)

# Past a client's keepalive, amqtt waits this much longer for a packet before it drops the
# client and publishes its Last Will: at least 1.5x the mesh's keepalive, as the MQTT spec says
# (amqtt takes whole seconds).
DEFAULT_KEEPALIVE_S = 5
SESSION_EXPIRY_S = 7 * 24 * 3600  # a persistent session away this long is dropped (as Mosquitto's)

LIMITS_WARNING = (
    "embedded broker (amqtt): it keeps its store in memory only, so inputs queued for an app "
    "that was moving when the broker restarted are lost; Mosquitto (apt-get install mosquitto) "
    "keeps them on disk")


_ROLE = "_mesh_role"  # on a Session: what its client may do (`mesh.accounts`)


class AccountsAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """The mesh's accounts (`mesh.accounts`): a client with the mesh's password, or one without
    credentials (a device waiting to be admitted, kept to its topics by `AccountsTopics`).
    Neither is marked anonymous: its persistent session is kept (see `OpenAuth`)."""

    Config = Accounts  # amqtt makes the plugin's configuration one

    async def authenticate(self, *, session: Session) -> bool:
        role = self.context.config.role(session.username, session.password)
        setattr(session, _ROLE, role)
        return role is not None


class AccountsTopics(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """What each of the mesh's accounts may publish, receive and subscribe to."""

    Config = Accounts

    async def topic_filtering(self, *, session: Session | None = None,
                              topic: str | None = None, action: Any = None) -> bool:
        return session is not None and topic is not None and self.context.config.permits(
            getattr(session, _ROLE, None), topic)


class EmbeddedBroker:
    """`async with EmbeddedBroker(host, port) as broker:` serves MQTT until the block ends;
    with `accounts`, only to the mesh's (`mesh.accounts`); with `tls` (a port and a
    certificate), over TLS there too."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 keepalive: int = DEFAULT_KEEPALIVE_S, accounts: Accounts | None = None,
                 tls: TlsListener | None = None) -> None:
        self.address = BrokerAddress(host, port, tls_port=tls[0] if tls else None)
        plugins: dict[str, Any] = {f"{amqtt_fixes.__name__}.{amqtt_fixes.OpenAuth.__name__}": {}}
        if accounts is not None:
            settings = {"root": accounts.root, "password": accounts.password}
            plugins = {f"{__name__}.{AccountsAuth.__name__}": settings,
                       f"{__name__}.{AccountsTopics.__name__}": settings}
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
        # amqtt reads the certificate from files, when it starts: they are gone once it has.
        self._files: tempfile.TemporaryDirectory[str] | None = None
        if tls is not None:
            self._files = tempfile.TemporaryDirectory(prefix="mesh-broker-")
            certificate, key = tls[1].write(Path(self._files.name))
            listeners["tls"] = {"type": "tcp", "bind": f"{host}:{tls[0]}", "ssl": True,
                                "certfile": str(certificate), "keyfile": str(key)}
        config: dict[str, Any] = {
            "listeners": listeners,
            "timeout_disconnect_delay": math.ceil(keepalive / 2),
            "session_expiry_interval": SESSION_EXPIRY_S,
            "plugins": plugins,
        }
        self._broker = Broker(config)

    async def __aenter__(self) -> EmbeddedBroker:
        try:
            await self._broker.start()
        finally:
            if self._files is not None:
                self._files.cleanup()
        log.info("embedded broker listening on %s", self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._broker.shutdown()

    def session_state(self, client_id: str) -> str | None:
        """"connected" or "disconnected" (away, its session kept), None if it has none."""
        held = self._broker.sessions.get(client_id)
        return None if held is None else str(held[0].transitions.state)
