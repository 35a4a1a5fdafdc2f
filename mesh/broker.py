"""The embedded MQTT broker (amqtt), started in-process when a device has no broker to use.

It makes one device alone, or a LAN without Mosquitto, work out of the box. Its limits, which
the node states in a startup warning: MQTT 3.1.1 only, and it does not redeliver unacknowledged
or queued QoS 1 messages to a resumed session, so inputs published while an app moves between
devices, or after its device crashed and before a survivor took over, can be lost. For the
no-loss guarantees, use Mosquitto (see broker-config/mosquitto.conf).
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker

from mesh.mqtt import BrokerAddress

log = logging.getLogger(__name__)

LIMITS_WARNING = (
    "embedded broker (amqtt): inputs published while an app migrates, or between a crash and "
    "the failover, may be lost; use Mosquitto (--broker) for no-loss guarantees")


class EmbeddedBroker:
    """`async with EmbeddedBroker(host, port) as broker:` serves MQTT until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.address = BrokerAddress(host, port)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)

    async def __aenter__(self) -> EmbeddedBroker:
        await self._broker.start()
        log.info("embedded broker listening on %s", self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._broker.shutdown()
