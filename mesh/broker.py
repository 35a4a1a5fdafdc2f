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
from typing import Any

from amqtt.broker import Broker

from mesh import amqtt_fixes
from mesh.mqtt import BrokerAddress

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


class EmbeddedBroker:
    """`async with EmbeddedBroker(host, port) as broker:` serves MQTT until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 keepalive: int = DEFAULT_KEEPALIVE_S) -> None:
        self.address = BrokerAddress(host, port)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "timeout_disconnect_delay": math.ceil(keepalive / 2),
            "session_expiry_interval": SESSION_EXPIRY_S,
            "plugins": {f"{amqtt_fixes.__name__}.{amqtt_fixes.OpenAuth.__name__}": {}},
        }
        self._broker = Broker(config)

    async def __aenter__(self) -> EmbeddedBroker:
        await self._broker.start()
        log.info("embedded broker listening on %s", self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._broker.shutdown()

    def session_state(self, client_id: str) -> str | None:
        """"connected" or "disconnected" (away, its session kept), None if it has none."""
        held = self._broker.sessions.get(client_id)
        return None if held is None else str(held[0].transitions.state)
