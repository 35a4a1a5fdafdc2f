"""Finding the mesh on a LAN with mDNS (python-zeroconf, asyncio API).

Every node advertises `<id>._liquid-mesh._tcp.local.` with its id, capabilities and broker in
TXT records; brokers are `_mqtt._tcp.local.` services, as Mosquitto/Avahi setups announce them.
A node hosting a broker announces it there with TXT `mesh=<root>`, `node=<id>`,
`started=<ms>` (see `mesh.election`) and, in a secure mesh, `tls=<port>` (`mesh.tls`).
Leaving sends mDNS goodbyes, which peers see at once.

What others announce is untrusted: records that do not parse (garbage TXT, a bad port, an id that
is not an id) are logged once and ignored; a broker that is announced but does not answer is
skipped by whoever tries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh import election
from mesh.election import BrokerAd
from mesh.errors import WireError
from mesh.profile import NODE_ID

log = logging.getLogger(__name__)

NODE_SERVICE = "_liquid-mesh._tcp.local."
PENDING_SERVICE = "_mesh-pending._tcp.local."  # a device waiting to be admitted
BROKER_SERVICE = "_mqtt._tcp.local."
RESOLVE_MS = 3000
MAX_TXT_VALUE = 255


@dataclass(frozen=True, slots=True)
class PeerAd:
    """A mesh node seen on the LAN."""

    name: str
    node: str

    @property
    def genuine(self) -> bool:
        """Whether it is announced under its own id's name (what a goodbye must come from)."""
        return self.name == f"{self.node}.{NODE_SERVICE}"


def local_addresses() -> list[str]:
    """This device's IPv4 addresses on its networks; loopback only when it has no other."""
    found = [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if ip.is_IPv4 and not str(ip.ip).startswith("127.")]
    return found or ["127.0.0.1"]


def parse_broker(name: str, addresses: list[str], port: int | None,
                 txt: Mapping[bytes, bytes | None]) -> BrokerAd:
    """A `_mqtt._tcp` record as a BrokerAd; WireError when it makes no sense."""
    fields = _text(txt)
    if not addresses:
        raise WireError("no address")
    if port is None or not 0 < port < 65536:
        raise WireError(f"bad port {port!r}")
    node = fields.get("node")
    if node is not None and not NODE_ID.fullmatch(node):
        raise WireError(f"bad node id {node[:40]!r}")
    started = fields.get("started", "0")
    if not started.isascii() or not started.isdigit() or len(started) > 16:
        raise WireError(f"bad start time {started[:40]!r}")
    tls = fields.get("tls")
    if tls is not None and not (tls.isascii() and tls.isdigit() and len(tls) <= 5
                                and 0 < int(tls) < 65536):
        raise WireError(f"bad TLS port {tls[:40]!r}")
    return BrokerAd(name, tuple(addresses), port, node, int(started), fields.get("mesh"),
                    int(tls) if tls is not None else None)


def parse_peer(name: str, txt: Mapping[bytes, bytes | None]) -> PeerAd:
    """A `_liquid-mesh._tcp` record as a PeerAd; WireError when it makes no sense."""
    node = _text(txt).get("id", "")
    if not NODE_ID.fullmatch(node):
        raise WireError(f"bad node id {node[:40]!r}")
    return PeerAd(name, node)


def _text(txt: Mapping[bytes, bytes | None]) -> dict[str, str]:
    fields = {}
    for key, value in txt.items():
        try:
            fields[key.decode("ascii")] = (value or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("TXT record is not text") from None
    return fields


class Discovery:
    """`async with Discovery(node_id, root) as lan:` advertises and browses until the block ends.

    `brokers` and `peers` hold what is announced now (this node's own records excluded; so
    are brokers of a mesh with another topic root);
    `changed` is set whenever they change; `on_goodbye(node_id)` is called when a peer's
    record goes away (an mDNS goodbye, or its records expired), `on_hello(node_id)` when one
    is announced.
    """

    def __init__(self, node_id: str, root: str = "mesh", *,
                 on_goodbye: Callable[[str], None] | None = None,
                 on_hello: Callable[[str], None] | None = None) -> None:
        self.node_id = node_id
        self.root = root
        self.on_goodbye = on_goodbye
        self.on_hello = on_hello
        self.brokers: dict[str, BrokerAd] = {}
        self.peers: dict[str, PeerAd] = {}
        self.changed = asyncio.Event()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._ads: dict[str, AsyncServiceInfo] = {}  # ours, by service type
        self._resolving: set[asyncio.Task[None]] = set()
        self._refused: set[str] = set()  # names already logged as malformed

    async def __aenter__(self) -> Discovery:
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [NODE_SERVICE, BROKER_SERVICE],
                                            handlers=[self._on_change])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._resolving:
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_unregister_all_services()  # goodbyes
            await self._zc.async_close()

    @property
    def zc(self) -> AsyncZeroconf:
        assert self._zc is not None, "use Discovery as an async context manager"
        return self._zc

    # --- what this node announces -----------------------------------------------------------

    async def advertise_node(self, caps: tuple[str, ...], broker: str) -> None:
        """Announce this node (again, with fresh TXT, if it already is)."""
        await self._advertise(NODE_SERVICE, 1883, {
            "id": self.node_id, "caps": ",".join(caps)[:MAX_TXT_VALUE], "broker": broker,
            "v": "1"})

    async def advertise_pending(self, fingerprint: str) -> None:
        """Announce that this device waits to be admitted (`mesh admit DEVICE`), with its key's
        fingerprint."""
        await self._advertise(PENDING_SERVICE, 1883, {"id": self.node_id, "key": fingerprint,
                                                      "mesh": self.root})

    async def advertise_broker(self, port: int, started_ms: int,
                               tls_port: int | None = None) -> None:
        """Announce the broker this node hosts (and the port of its TLS listener)."""
        txt = {"mesh": self.root, "node": self.node_id, "started": str(started_ms)}
        await self._advertise(BROKER_SERVICE, port,
                              txt if tls_port is None else {**txt, "tls": str(tls_port)})

    async def withdraw(self, service: str) -> None:
        """Stop announcing one of our services (peers get a goodbye)."""
        info = self._ads.pop(service, None)
        if info is not None:
            await self.zc.async_unregister_service(info)

    async def _advertise(self, service: str, port: int, txt: dict[str, str]) -> None:
        info = AsyncServiceInfo(service, f"{self.node_id}.{service}", port=port,
                                properties=txt, server=f"{self.node_id}.local.",
                                parsed_addresses=local_addresses())
        old = self._ads.get(service)
        if old is not None:
            if old.properties == info.properties and old.port == port:
                return
            await self.zc.async_update_service(info)
        else:
            try:
                await (await self.zc.async_register_service(info, allow_name_change=False))
            except NonUniqueNameException:
                log.error("another device on the LAN announces %s: two devices share the id "
                          "%r; give one of them another id", info.name, self.node_id)
                return
        self._ads[service] = info

    # --- what others announce ---------------------------------------------------------------

    async def answering_broker(self, skip: BrokerAd | None = None) -> tuple[BrokerAd,
                                                                            str] | None:
        """The best announced broker (see `mesh.election`) that answers, and its address."""
        return await first_answering(election.ranked(
            ad for ad in self.brokers.values() if ad != skip))

    async def wait_for_change(self, timeout: float) -> None:
        """Until what is announced changes, or `timeout` passes. A change since the last wait
        ended counts: one that came while the caller looked at what was announced is not
        missed (it then returns at once)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self.changed.wait()
        self.changed.clear()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if name == f"{self.node_id}.{service_type}":
            return  # our own
        if state_change is ServiceStateChange.Removed:
            self._forget(service_type, name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zc.zeroconf, RESOLVE_MS):
            return
        try:
            if service_type == BROKER_SERVICE:
                broker = parse_broker(name, info.parsed_addresses(IPVersion.V4Only), info.port,
                                      info.properties)
                if broker.root not in (None, self.root):
                    return  # another mesh's
                self.brokers[name] = broker
            else:
                peer = parse_peer(name, info.properties)
                if peer.node == self.node_id:
                    log.error("another device on the LAN calls itself %r, as this one does",
                              peer.node)
                    return
                self.peers[name] = peer
                if peer.genuine and self.on_hello is not None:
                    self.on_hello(peer.node)
        except WireError as exc:
            if name not in self._refused:
                self._refused.add(name)
                log.warning("ignoring the mDNS record %s: %s", name, exc)
            return
        self._refused.discard(name)
        self.changed.set()

    def _forget(self, service_type: str, name: str) -> None:
        broker = self.brokers.pop(name, None)
        peer = self.peers.pop(name, None)
        if broker or peer:
            self.changed.set()
        if peer is not None and peer.genuine and self.on_goodbye is not None:
            self.on_goodbye(peer.node)


async def answers(address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an MQTT broker at address:port accepts an anonymous client within `timeout`
    (a broker that wants a password is not one this device can use without being told)."""
    client_id = f"mesh-probe-{secrets.token_hex(4)}".encode()
    connect = (b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big")
               + client_id)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port)
            try:
                writer.write(bytes([0x10, len(connect)]) + connect)
                reply = await reader.readexactly(4)
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return reply[:2] == b"\x20\x02" and reply[3] == 0


async def first_answering(ads: list[BrokerAd], timeout: float = 1.0) -> tuple[BrokerAd,
                                                                              str] | None:
    """The first broker (in the given order) with an address that answers, and that address.

    All are asked at once, so a silent one costs `timeout` once, not once per broker.
    """
    tried = [(ad, host) for ad in ads for host in ad.hosts]
    answered = await asyncio.gather(*(answers(host, ad.port, timeout) for ad, host in tried))
    return next((pair for pair, ok in zip(tried, answered, strict=True) if ok), None)


def free_port(host: str = "0.0.0.0", preferred: int = 1883) -> int:
    """`preferred` if nothing listens there, else a free port the system picks.

    Probed as brokers bind (asyncio's servers and Mosquitto set SO_REUSEADDR): a broker this
    device just closed leaves its connections in TIME_WAIT on that port, which takes nothing
    from a new listener; probed without it, the port looked taken and the next broker came up
    on another one."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free port")
