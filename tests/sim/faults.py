"""A world and its fault schedule, drawn from a seed (and nothing else).

`generate(seed, kinds)` picks the mesh (2-5 nodes, sometimes a spare that joins later, their
capabilities and labels; 1-4 apps, their checkpoint policies and sizes; keepalive; the
broker's in-flight window), the inputs, and up to 7 faults of the given kinds before
`fault_end`; then the world settles (every fault healed, every node up) until `end`.

Fault kinds: crash (kill -9, restarted later), pause (SIGSTOP, shorter or longer than 1.5 x
keepalive), partition (cut off from the broker, healed later), restart (the broker stops in
order and comes back with everything), wipe (the broker is killed and comes back empty), join
(a spare node boots), leave (a graceful leave; the node boots again later), migrate (the spec's
pin set to a node), stop (the spec cleared for good; never the last app left), stop-all (the same,
any app, even the last one), deploy (a new app), upgrade (a new module
for an app), slow (a node's link gets 0.1-1.5 s slower for a while), jitter (for a while one
packet in 20, on any link, takes 50-300 ms).
Node faults never overlap on one node and leave at least half the nodes (at least one) up; no
node crashes around a wipe (what a wipe may lose is judged by what the survivors hold).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from mesh.wire import AppSpec

KINDS = ("crash", "pause", "partition", "restart", "wipe", "join", "leave", "migrate", "stop",
         "stop-all", "deploy", "upgrade", "slow", "jitter")
# Known bugs that the default sweep steps around (see tests/test_sim.py): after a broker wipe
# the survivors give back stale owner records that lower epochs; a claim delayed in the network
# lands after a rival's claim and handover (an epoch goes back). `stop-all` (a node that rejoined
# a broker whose apps were all stopped gave them back) is fixed since 43836f7 (the mesh's marker)
# but stays out, so that the default sweep's seeds keep their worlds. `--faults all`, or a list
# naming them, puts them in.
KNOWN_BUGS = ("wipe", "stop-all", "jitter")
DEFAULT_KINDS = tuple(k for k in KINDS if k not in KNOWN_BUGS)
NODE_DOWN = ("crash", "pause", "partition", "leave")


def module_hash(app: str, version: int) -> str:
    return hashlib.sha256(f"{app}-v{version}".encode()).hexdigest()


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: str = ""  # a node or an app
    duration: float = 0.0
    arg: str = ""

    def describe(self) -> str:
        extra = f" for {self.duration:.2f}s" if self.duration else ""
        arg = f" -> {self.arg}" if self.arg else ""
        return f"t={self.at:7.3f} {self.kind} {self.target}{arg}{extra}".replace("  ", " ")


@dataclass(frozen=True)
class NodeSetup:
    id: str
    caps: tuple[str, ...]
    labels: dict[str, str]
    boot_at: float | None  # None: a spare, booted by a join fault


@dataclass
class Setup:
    seed: int
    keepalive: float
    window: int
    nodes: list[NodeSetup]
    apps: list[AppSpec]  # deployed at t=0
    chunks: dict[str, int]
    faults: list[Fault]
    fault_end: float
    end: float
    inputs: list[tuple[float, str]] = field(default_factory=list)  # (when, app)
    apps_later: dict[str, AppSpec] = field(default_factory=dict)  # deployed by faults

    def describe(self) -> list[str]:
        lines = [f"seed {self.seed}: keepalive {self.keepalive:g}s, window {self.window}, "
                 f"nodes {[(n.id, n.caps) for n in self.nodes]}, apps "
                 f"{[(a.app, a.requires, a.checkpoint_every) for a in self.apps]}, "
                 f"{len(self.inputs)} inputs, faults until {self.fault_end:.1f}s, "
                 f"end {self.end:.1f}s"]
        lines += [f"  [{i}] {fault.describe()}" for i, fault in enumerate(self.faults)]
        return lines


def generate(seed: int, kinds: tuple[str, ...] = DEFAULT_KINDS) -> Setup:
    rng = random.Random(f"liquid-mesh-sim-{seed}")
    count = rng.choice((2, 3, 3, 4, 5))
    spare = 1 if "join" in kinds and rng.random() < 0.6 else 0
    nodes = []
    for index in range(count + spare):
        caps = tuple(c for c in ("gpio", "temp") if rng.random() < 0.5)
        labels = {"room": rng.choice(("hall", "kitchen"))} if rng.random() < 0.3 else {}
        nodes.append(NodeSetup(f"n{index}", caps, labels,
                               rng.uniform(0.05, 0.6) if index < count else None))
    every_cap = {c for n in nodes[:count] for c in n.caps}
    apps, chunks = [], {}
    for index in range(rng.randint(1, 4)):
        apps.append(_spec(rng, f"a{index}", every_cap))
        chunks[f"a{index}"] = rng.choice((0, 0, 3, 12))
    keepalive = rng.choice((2.0, 3.0, 5.0))
    fault_end = rng.uniform(20.0, 35.0)
    setup = Setup(seed, keepalive, rng.choice((20, 20, 10)), nodes, apps, chunks, [],
                  fault_end, 0.0)
    _Planner(rng, setup, count, every_cap).plan(kinds)
    last = max([fault_end, *(f.at + f.duration for f in setup.faults)])
    setup.end = last + 30.0 + 2 * keepalive
    lifetimes = {a.app: [0.5, fault_end] for a in apps}
    for fault in setup.faults:
        if fault.kind == "deploy":
            lifetimes[fault.target] = [fault.at + 0.5, fault_end]
        elif fault.kind == "stop":
            lifetimes[fault.target][1] = fault.at - 0.01
    for app, (start, stop) in lifetimes.items():
        if stop > start:
            setup.inputs += [(rng.uniform(start, stop), app) for _ in range(rng.randint(4, 25))]
    setup.inputs.sort()
    return setup


def _spec(rng: random.Random, app: str, caps: set[str]) -> AppSpec:
    requires = (rng.choice(sorted(caps)),) if caps and rng.random() < 0.3 else ()
    prefers = {"room": "kitchen"} if rng.random() < 0.2 else {}
    return AppSpec(app=app, module=module_hash(app, 1), requires=requires, prefers=prefers,
                   checkpoint_every=rng.choice((1, 3, 20)),
                   checkpoint_ms=rng.choice((100, 300, 1000)))


class _Planner:
    """Draws faults in time order, keeping the rules in the module docstring."""

    def __init__(self, rng: random.Random, setup: Setup, count: int, caps: set[str]) -> None:
        self.rng, self.setup, self.caps = rng, setup, caps
        self.down: dict[str, list[tuple[float, float]]] = {n.id: [] for n in setup.nodes}
        self.present = [n.id for n in setup.nodes[:count]]
        self.spares = [n.id for n in setup.nodes[count:]]
        self.apps = [a.app for a in setup.apps]
        self.stopped: set[str] = set()
        self.wipes: list[tuple[float, float]] = []
        self.crashes: list[float] = []
        self.broker_back = 0.0  # when the broker is back from its last fault

    def plan(self, kinds: tuple[str, ...]) -> None:
        rng, setup = self.rng, self.setup
        if not kinds:
            return
        times = sorted(round(rng.uniform(1.0, setup.fault_end), 3)
                       for _ in range(rng.randint(0, 7)))
        for at in times:
            kind = rng.choice(kinds)
            if kind in NODE_DOWN:
                fault = self._node_down(at, kind)
            elif kind in ("restart", "wipe"):
                fault = self._broker(at, kind)
            elif kind == "join" and self.spares:
                node = self.spares.pop(0)
                self.present.append(node)
                fault = Fault(at, kind, node)
            elif kind == "slow":
                fault = Fault(at, kind, rng.choice(self.present), round(rng.uniform(1.0, 6.0), 3))
            elif kind == "jitter":
                fault = Fault(at, kind, "network", round(rng.uniform(2.0, 15.0), 3))
            else:
                fault = self._app(at, kind)
            if fault is not None:
                setup.faults.append(fault)

    def _node_down(self, at: float, kind: str) -> Fault | None:
        rng, k = self.rng, self.setup.keepalive
        node = rng.choice(self.present)
        length = {"crash": rng.uniform(0.2, 12.0), "leave": rng.uniform(2.0, 12.0),
                  "pause": rng.choice((rng.uniform(0.2, 1.2), rng.uniform(1.6, 3.0))) * k,
                  "partition": rng.choice((rng.uniform(0.2, 0.9), rng.uniform(1.6, 3.0)))
                  * k}[kind]
        span = (at, at + length + 1.0)
        if kind == "crash" and any(s - 1 <= at <= e + 15 for s, e in self.wipes):
            return None
        if any(_overlaps(span, other) for other in self.down[node]):
            return None
        busy = sum(1 for n in self.present for s in self.down[n] if _overlaps(span, s))
        if busy + 1 > len(self.present) - max(1, (len(self.present) + 1) // 2):
            return None
        self.down[node].append(span)
        if kind == "crash":
            self.crashes.append(at)
        return Fault(at, kind, node, round(length, 3))

    def _broker(self, at: float, kind: str) -> Fault | None:
        length = round(self.rng.uniform(0.2, 5.0), 3)
        if at <= self.broker_back + 1.0:
            return None
        self.broker_back = at + length
        if kind == "wipe":
            if any(at - 1 <= c <= at + length + 15 for c in self.crashes):
                return None
            self.wipes.append((at, at + length))
        return Fault(at, kind, "broker", length)

    def _app(self, at: float, kind: str) -> Fault | None:
        rng, live = self.rng, sorted(set(self.apps) - self.stopped)
        if kind == "deploy":
            app = f"a{len(self.apps)}"
            self.apps.append(app)
            self.setup.chunks[app] = rng.choice((0, 3))
            self.setup.apps_later[app] = _spec(rng, app, self.caps)
            return Fault(at, kind, app)
        if kind not in ("migrate", "stop", "stop-all", "upgrade") or not live:
            return None
        app = rng.choice(live)
        if kind == "stop" and len(live) < 2:
            return None
        if kind.startswith("stop"):
            self.stopped.add(app)
            return Fault(at, "stop", app)
        return Fault(at, kind, app, arg=rng.choice(self.present) if kind == "migrate" else "")


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
