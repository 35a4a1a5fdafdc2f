"""The embedded MQTT broker (amqtt), started in-process when a device has no broker to use.

It makes one device alone, or a LAN without Mosquitto, work out of the box. Its limits, which
the node states in a startup warning: MQTT 3.1.1 only, and it does not redeliver unacknowledged
or queued QoS 1 messages to a resumed session, so inputs published while an app moves between
devices, or after its device crashed and before a survivor took over, can be lost. For the
no-loss guarantees, use Mosquitto (see broker-config/mosquitto.conf).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from mesh.mqtt import BrokerAddress

log = logging.getLogger(__name__)

# Past a client's keepalive, amqtt waits this much longer for a packet before it drops the
# client and publishes its Last Will: at least 1.5x the mesh's keepalive, as the MQTT spec says
# (amqtt takes whole seconds).
DEFAULT_KEEPALIVE_S = 5


def _drop_silent_client(handler: BrokerProtocolHandler) -> None:
    """amqtt 0.12 notices that a client went silent (a read timeout) and does nothing, so a
    device whose cable is pulled keeps its session and no Last Will is sent: drop it, as the
    MQTT spec says, which publishes the will."""
    closing = asyncio.ensure_future(handler.handle_connection_closed())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


_closing: set[asyncio.Future[None]] = set()


BrokerProtocolHandler.handle_read_timeout = _drop_silent_client

_retained_for_subscription = Broker._publish_retained_messages_for_subscription


async def _retained_for_own_subscription(self: Broker, subscription: tuple[str, int],
                                         session: Session) -> None:
    """amqtt 0.12.1, when a client connects, sends it the retained messages of every
    subscription in the broker, anyone's (a plain subscriber to one app's outputs got the node
    records, specs and checkpoints): only those of the client's own subscriptions, as MQTT
    says. (Also fewer awaits while it walks the broker's subscriptions, which others change.)"""
    holders = self._subscriptions.get(subscription[0], ())
    if any(held.client_id == session.client_id for held, _ in holders):
        await _retained_for_subscription(self, subscription, session)


Broker._publish_retained_messages_for_subscription = (
    _retained_for_own_subscription)

LIMITS_WARNING = (
    "embedded broker (amqtt): inputs published while an app migrates, or between a crash and "
    "the failover, may be lost; use Mosquitto (--broker) for no-loss guarantees")


class EmbeddedBroker:
    """`async with EmbeddedBroker(host, port) as broker:` serves MQTT until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883,
                 keepalive: int = DEFAULT_KEEPALIVE_S) -> None:
        self.address = BrokerAddress(host, port)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "timeout_disconnect_delay": math.ceil(keepalive / 2),
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
