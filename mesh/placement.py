"""Where each app runs: weighted rendezvous hashing, computed alike by every node.

Every node runs the same pure function on the same retained state (membership and specs), so
they agree on an assignment without a leader. For each app, the nodes that have all of its
required capabilities are ranked by a per-(node, app) hash, weighted by how many of the app's
preferences they match; a pin to an eligible node wins outright. When a node joins, only the apps
it now ranks first for move to it; when one leaves, only its apps move.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

from mesh.wire import AppSpec, NodeRecord

PREFERENCE_WEIGHT = 10.0
_MASK = (1 << 64) - 1
_MIX = 0xBF58476D1CE4E5B9


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def eligible(node: NodeRecord, spec: AppSpec) -> bool:
    return all(cap in node.caps for cap in spec.requires)


def weight(node: NodeRecord, spec: AppSpec) -> float:
    matched = sum(1 for key, value in spec.prefers.items() if node.labels.get(key) == value)
    return PREFERENCE_WEIGHT ** matched


def _weighted(mixed: int, node_weight: float) -> float:
    """Weighted rendezvous: -w / ln(u) for u uniform in (0, 1]; higher wins."""
    u = (mixed + 1) / (1 << 64)
    return math.inf if u >= 1.0 else -node_weight / math.log(u)


class Placement:
    """Rankings and assignments for one membership; hashes and eligibility are computed once."""

    def __init__(self, nodes: Iterable[NodeRecord]) -> None:
        self.nodes = {node.id: node for node in nodes}
        self._table = [(node, _hash64(node.id)) for node in self.nodes.values()]
        self._candidates_by_need: dict[object, list[tuple[str, int, float]]] = {}

    def _candidates(self, spec: AppSpec) -> list[tuple[str, int, float]]:
        """(node id, node hash, weight) of the nodes eligible for `spec`."""
        need = (spec.requires, tuple(sorted(spec.prefers.items())))
        found = self._candidates_by_need.get(need)
        if found is None:
            found = [(node.id, node_hash, weight(node, spec)) for node, node_hash in self._table
                     if eligible(node, spec)]
            self._candidates_by_need[need] = found
        return found

    def _scores(self, spec: AppSpec) -> list[tuple[float, str]]:
        app_hash = _hash64(spec.app)
        scores = []
        for node_id, node_hash, node_weight in self._candidates(spec):
            # One multiply-xorshift round spreads node-hash XOR app-hash over all 64 bits.
            x = ((node_hash ^ app_hash) * _MIX) & _MASK
            x ^= x >> 31
            scores.append((_weighted(x, node_weight) if spec.prefers else float(x), node_id))
        return scores

    def _pinned(self, spec: AppSpec) -> str | None:
        node = self.nodes.get(spec.pin) if spec.pin else None
        return node.id if node is not None and eligible(node, spec) else None

    def ranking(self, spec: AppSpec) -> list[str]:
        """Eligible node ids, best first: the pin if eligible, then by score."""
        order = [node_id for _, node_id in sorted(self._scores(spec), reverse=True)]
        pinned = self._pinned(spec)
        if pinned:
            order.remove(pinned)
            order.insert(0, pinned)
        return order

    def best(self, spec: AppSpec) -> str | None:
        """The node that should run `spec`, or None when no node is eligible; `ranking()[0]`."""
        pinned = self._pinned(spec)
        if pinned:
            return pinned
        if spec.prefers:
            scores = self._scores(spec)
            return max(scores)[1] if scores else None
        app_hash = _hash64(spec.app)  # equal weights: the largest mixed hash wins; no floats
        best_id, best_x = None, -1
        for node_id, node_hash, _ in self._candidates(spec):
            x = ((node_hash ^ app_hash) * _MIX) & _MASK
            x ^= x >> 31
            if x > best_x:
                best_id, best_x = node_id, x
        return best_id


def ranking(nodes: Iterable[NodeRecord], spec: AppSpec) -> list[str]:
    return Placement(nodes).ranking(spec)


def assign(nodes: Iterable[NodeRecord], specs: Iterable[AppSpec]) -> Mapping[str, str | None]:
    """App name -> the node that should run it (None: no node can)."""
    placement = Placement(nodes)
    return {spec.app: placement.best(spec) for spec in specs}
