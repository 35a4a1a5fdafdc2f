"""A device: its mesh node, and the broker it finds, or hosts when there is none.

With a broker given, the device just runs its node there, joining again whenever it loses it.
Without one it looks on the LAN (mDNS, `mesh.discovery`) for a short while; if no broker
answers, it hosts one and announces it: Mosquitto when the device has it (`mesh.mosquitto`),
else the embedded amqtt broker (`mesh.broker`). When two devices did that at the same
moment, the one `mesh.election` ranks lower shuts its broker, and its node, like every node that
used it, finds the other. When the broker's device is lost, the survivors elect a new host and
bring the mesh back on it from what they hold (`mesh.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from mesh import election, mosquitto
from mesh.accounts import Accounts
from mesh.broker import LIMITS_WARNING, EmbeddedBroker
from mesh.discovery import (
    BROKER_SERVICE,
    NODE_SERVICE,
    Discovery,
    first_answering,
    free_port,
    local_addresses,
)
from mesh.election import BrokerAd
from mesh.errors import BrokerError, ConfigError, TrustError
from mesh.mosquitto import HostedMosquitto
from mesh.mqtt import BrokerAddress
from mesh.node import Node, NodeConfig
from mesh.profile import HOSTED_BROKERS
from mesh.recovery import CARRY_RETRY_S, Carry
from mesh.store import StateStore
from mesh.tls import PORT as TLS_PORT

log = logging.getLogger(__name__)

SEARCH_S = 1.5  # how long a device that boots looks for a broker before it hosts one
LOOK_EVERY_S = 0.25
ANNOUNCE_WAIT_S = 10.0  # at most, for our node to open the apps' sessions on the broker we host
RETRY_S = (1.0, 30.0)  # backoff when a broker cannot be reached


class Device:
    """`await Device(config, ...).run(stopping)` runs until `stopping` is set."""

    def __init__(self, config: NodeConfig, *, broker: BrokerAddress | None, mdns: bool = True,
                 broker_port: int = 1883, hosted: str = "auto") -> None:
        if hosted not in HOSTED_BROKERS:
            raise ConfigError(f"the broker to host is one of {', '.join(HOSTED_BROKERS)}, "
                              f"not {hosted!r}")
        if hosted == "mosquitto" and mosquitto.available() is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
        self.config = config
        self.broker = broker  # given: use only this one
        self.mdns = mdns
        self.broker_port = broker_port
        self.hosted = hosted
        self.lan: Discovery | None = None
        self.node: Node | None = None
        self._hosted: EmbeddedBroker | HostedMosquitto | None = None
        self._hosted_ad: BrokerAd | None = None
        self._watching: asyncio.Task[None] | None = None
        self._sessions_opened = asyncio.Event()  # on the broker we host, by our node
        self._announced = False  # the broker we host is announced on the LAN

    async def run(self, stopping: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.mdns:
                self.lan = await stack.enter_async_context(
                    Discovery(self.config.node_id, self.config.root, on_goodbye=self._goodbye,
                              on_hello=self._hello))
            stack.push_async_callback(self._stop_hosting)
            # What we give a broker that lacks it: first what this device kept on disk, then
            # what it held when it lost a broker.
            carry: Carry | None = await asyncio.to_thread(
                Carry.kept_on_disk, StateStore(self.config.state_dir), self.config.node_id)
            known: set[str] | None = None  # the members we last knew, once we lost a broker
            lost: BrokerAd | None = None
            backoff = RETRY_S[0]
            while not stopping.is_set():
                choice = await self._choose(known, lost, stopping)
                if choice is None:
                    return
                address, ad = choice
                if ad is not None and ad is self._hosted_ad and not self._announced:
                    if carry is None:  # nothing to hold
                        self._sessions_opened.set()
                    else:
                        carry = replace(carry, sessions_opened=self._sessions_opened)
                node = Node(replace(self.config, broker=self._signed_in(address)), carry)
                try:
                    async with node:
                        self.node = node
                        carry = None  # given to this broker (if it needed it): let it go
                        backoff = RETRY_S[0]
                        if self.lan:
                            await self.lan.advertise_node(self.config.caps,
                                                          self._public_url(address))
                        await _first(node.stopped.wait(), stopping.wait())
                        if stopping.is_set():  # goodbye on the LAN and on the broker at once
                            await asyncio.gather(node.leave(), *(
                                [self.lan.withdraw(NODE_SERVICE)] if self.lan else []))
                except BrokerError as exc:
                    log.warning("%s; trying again in %.0f s", exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await stopping.wait()
                    # Holding apps' state for the broker: try often, so that we are back
                    # before the others' grace runs out and they take our apps over.
                    backoff = min(backoff * 2, RETRY_S[1] if carry is None else CARRY_RETRY_S)
                finally:
                    self.node = None
                if node.revoked:
                    raise TrustError(f"device {node.id} was revoked from the mesh (`mesh "
                                     "revoke`): it runs nothing until it is admitted again")
                if node.carry is None:
                    continue
                if self.broker is None:
                    # Lost a broker found on the LAN: the next one may be a new one, to give
                    # back what we held.
                    carry, known, lost = node.carry, node.carry.members, ad
                else:
                    # A given broker outlives us (others may have taken our apps over
                    # meanwhile): we start again from what it holds, unless it lost it all.
                    carry = replace(node.carry, only_if_lost=True)

    # --- choosing a broker ------------------------------------------------------------------

    async def _choose(self, known: set[str] | None, lost: BrokerAd | None,
                      stopping: asyncio.Event) -> tuple[BrokerAddress, BrokerAd | None] | None:
        """The broker to join (and its announcement, if it was found on the LAN); `known`
        are the members we knew when we lost the last one (None on the first start)."""
        if self.broker is not None:
            return self.broker, None
        if self._hosted is not None and self._hosted_ad is not None:
            return BrokerAddress("127.0.0.1", self._hosted_ad.port), self._hosted_ad
        lan = self.lan
        if lan is None:
            raise BrokerError("no broker given and mDNS is off: use --broker")
        if known is None:
            wait = SEARCH_S
        else:
            wait = election.host_wait_s(self.config.node_id, known, lost.node if lost else None)
            log.info("node %s looks for a new broker (hosting one in %.1f s if none answers)",
                     self.config.node_id, wait)
        deadline = time.monotonic() + wait
        while not stopping.is_set():
            found = await lan.answering_broker(skip=lost)
            if found is not None:
                ad, host = found
                log.info("using the broker %s at %s:%d", ad.name, host, ad.port)
                return BrokerAddress(host, ad.port, tls_port=ad.tls_port), ad
            if time.monotonic() >= deadline:
                return await self._host()
            await lan.wait_for_change(min(LOOK_EVERY_S, deadline - time.monotonic()))
        return None

    async def _host(self) -> tuple[BrokerAddress, BrokerAd]:
        """Start a broker here (Mosquitto if this device has it) and announce it."""
        assert self.lan is not None
        port = free_port(preferred=self.broker_port)
        broker: EmbeddedBroker | HostedMosquitto
        accounts = Accounts.of_device(self.config.state_dir, self.config.root)
        addresses = tuple(local_addresses())
        tls = None
        if accounts is not None and accounts.authority is not None:
            tls = (free_port(preferred=TLS_PORT if port != TLS_PORT else 0),
                   accounts.authority.issue(self.config.node_id, addresses))
        if self.hosted != "amqtt" and mosquitto.available() is not None:
            broker = HostedMosquitto("0.0.0.0", port, self.config.state_dir, accounts, tls)
            log.warning("no broker on the LAN: hosting Mosquitto on port %d%s", port,
                        f" (TLS on {tls[0]})" if tls else "")
        else:
            broker = EmbeddedBroker("0.0.0.0", port, self.config.keepalive, accounts, tls)
            log.warning("no broker on the LAN: hosting one on port %d%s; %s", port,
                        f" (TLS on {tls[0]})" if tls else "", LIMITS_WARNING)
        await broker.__aenter__()
        self._hosted, self._announced = broker, False
        self._sessions_opened = asyncio.Event()
        started = int(time.time() * 1000)
        self._hosted_ad = BrokerAd(f"{self.config.node_id}.{BROKER_SERVICE}",
                                   addresses, port, self.config.node_id, started,
                                   self.config.root, tls[0] if tls else None)
        self._watching = asyncio.create_task(self._announce_and_watch(),
                                             name="hosted-broker")
        return BrokerAddress("127.0.0.1", port), self._hosted_ad

    def _signed_in(self, address: BrokerAddress) -> BrokerAddress:
        """With the mesh's account (`mesh.accounts`), if this device holds the mesh's keys."""
        accounts = Accounts.of_device(self.config.state_dir, self.config.root)
        return accounts.sign_in(address) if accounts is not None else address

    async def _announce_and_watch(self) -> None:
        """While hosting: announce our broker (our node joins it meanwhile), and yield to a
        broker that wins over ours (see `mesh.election`)."""
        lan, mine = self.lan, self._hosted_ad
        assert lan is not None
        assert mine is not None
        # Announced once our node has opened every app's session on it, to hold its inputs
        # (before anything runs there): a sensor that finds the broker then loses nothing it
        # publishes. (At the latest after ANNOUNCE_WAIT_S: our node may fail to join.)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_WAIT_S):
                await self._sessions_opened.wait()
        await lan.advertise_broker(mine.port, mine.started_ms, mine.tls_port)
        self._announced = True
        while True:
            found = await first_answering(election.better_than(mine, lan.brokers.values()))
            if found is not None:
                better = found[0]
                log.warning("the broker of %s wins over ours: closing ours and joining it",
                            better.node or better.name)
                await self._stop_hosting(watcher=False)
                return
            await lan.wait_for_change(5.0)

    async def _stop_hosting(self, *, watcher: bool = True) -> None:
        if watcher and self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        self._watching = None
        if self.lan is not None:
            await self.lan.withdraw(BROKER_SERVICE)
        broker, self._hosted, self._hosted_ad = self._hosted, None, None
        if broker is not None:
            await broker.__aexit__(None, None, None)

    def _public_url(self, address: BrokerAddress) -> str:
        """The broker as other devices reach it (ours is local to us)."""
        if self._hosted_ad is not None:
            return f"mqtt://{self._hosted_ad.hosts[0]}:{self._hosted_ad.port}"
        return str(address)

    def _goodbye(self, node_id: str) -> None:
        if self.node is not None:
            self.node.peer_gone(node_id)

    def _hello(self, node_id: str) -> None:
        if self.node is not None:
            self.node.peer_back(node_id)


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of these coroutines finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
