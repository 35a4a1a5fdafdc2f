"""Which broker a mesh uses: pure rules, the same on every device (no I/O here).

Brokers are seen on the LAN as `_mqtt._tcp` services. A broker that is not a mesh node's
embedded one (Mosquitto announced by Avahi, say) comes first: someone set it up on purpose.
Among embedded brokers the one started first wins, then the lowest node id: two devices that
boot at the same moment and both start one agree which of them shuts its own and joins.

When the device hosting the broker is lost, the survivors elect a new host without one: the
lowest node id among the members they last knew goes first; every other waits a little longer
the further down the order it is, so that a host that is lost too is stood in for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

STAGGER_S = 2.0  # how much longer each survivor down the order waits before it hosts


@dataclass(frozen=True, slots=True)
class BrokerAd:
    """A broker seen on the LAN."""

    name: str  # the mDNS service instance name
    hosts: tuple[str, ...]  # its addresses
    port: int
    node: str | None = None  # the mesh node whose embedded broker this is, if one is
    started_ms: int = 0  # when that node started it
    root: str | None = None  # the topic root of the mesh it serves, if it says
    tls_port: int | None = None  # the port of its TLS listener, if it has one

    def key(self) -> tuple[int, int, str, str]:
        """Smaller wins."""
        return (0 if self.node is None else 1, self.started_ms, self.node or "", self.name)


def ranked(ads: Iterable[BrokerAd]) -> list[BrokerAd]:
    """Brokers in the order a device should try them."""
    return sorted(ads, key=BrokerAd.key)


def better_than(mine: BrokerAd, ads: Iterable[BrokerAd]) -> list[BrokerAd]:
    """The brokers that win over `mine`, best first: if one of them answers, `mine` yields."""
    return ranked(ad for ad in ads if ad.key() < mine.key() and ad.name != mine.name)


def host_wait_s(me: str, members: Iterable[str], lost: str | None) -> float:
    """How long `me` looks for a new broker before starting its own, the old one being lost.

    `members` are the node ids this device last knew; `lost` the one that hosted the broker.
    """
    survivors = sorted({*members, me} - {lost})
    if me not in survivors:  # our own broker lost (we yielded it): another one is coming
        return (len(survivors) + 1) * STAGGER_S
    return survivors.index(me) * STAGGER_S
