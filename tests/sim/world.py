"""One simulated world: a broker, devices, the outside world; run a `Setup` and check it.

`run(setup)` builds everything on one `Loop` (randomness from the seed only: one stream for
the network, one for the nodes' work), deploys the setup's apps, boots the nodes, sends the
inputs, applies the faults at their times, runs until `setup.end` and checks the invariants.
The same setup always gives the same trace (`Result.digest`).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, replace

from mesh.errors import BrokerError, MeshError
from mesh.wire import AppSpec
from tests.sim.broker import Broker
from tests.sim.client import Fabric
from tests.sim.device import Device
from tests.sim.faults import Fault, Setup, module_hash
from tests.sim.invariants import Ledger
from tests.sim.loop import Cancelled, Loop, expect
from tests.sim.net import Network
from tests.sim.outside import Outside

expect(MeshError, Cancelled)  # the mesh's own errors may end a task (as they end its coroutines)
assert issubclass(BrokerError, MeshError)


@dataclass
class Result:
    setup: Setup
    violations: list[str]
    trace: list[str]
    events: int
    digest: str

    @property
    def ok(self) -> bool:
        return not self.violations


class World:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.root = "mesh"
        self.loop = Loop()
        self.rng = random.Random(f"nodes-{setup.seed}")
        self.net = Network(self.loop, random.Random(f"net-{setup.seed}"))
        self.broker = Broker(self.loop, self.net, setup.window)
        self.fabric = Fabric(self.loop, self.net, self.broker)
        self.lines: list[str] = []
        self.ledger = Ledger(self)
        self.broker.on_retained = self.ledger.stored
        self.broker.on_routed = self.ledger.routed
        self.chunks = setup.chunks
        self.devices = {n.id: Device(self, n.id, n.caps, n.labels, setup.keepalive)
                        for n in setup.nodes}
        self.specs: dict[str, AppSpec] = {}
        self.stopped: set[str] = set()  # apps whose tombstone the operator has set
        self.all_apps = sorted({a.app for a in setup.apps} | set(setup.apps_later))
        self.outside = Outside(self)
        self._tokens = 0
        self.findings: list[str] = []

    def token(self) -> int:
        self._tokens += 1
        return self._tokens

    def trace(self, who: str, what: str) -> None:
        self.lines.append(f"{self.loop.now:9.4f} {who:<7} {what}")

    def violation(self, text: str) -> None:
        self.ledger.violation(text)

    def finding(self, text: str, violation: bool) -> None:
        """Something the real code does wrong that the model steps around."""
        if violation:
            self.violation(text)
        else:
            self.trace("CHECK", f"finding: {text}")
            self.findings.append(text)

    def run(self) -> Result:
        setup, loop = self.setup, self.loop
        for spec in setup.apps:
            self._set_spec(spec)
        for node in setup.nodes:
            if node.boot_at is not None:
                loop.call_at(node.boot_at, self.devices[node.id].boot)
        for index, (when, app) in enumerate(setup.inputs):
            loop.call_at(when, functools.partial(self.outside.send, app, index + 1))
        for fault in setup.faults:
            loop.call_at(fault.at, functools.partial(self.apply, fault))
        loop.run(setup.end)
        self.trace("CHECK", "end of the run")
        self.ledger.final()
        digest = hashlib.sha256("\n".join(self.lines).encode()).hexdigest()[:16]
        return Result(setup, self.ledger.violations, self.lines, loop.events, digest)

    def _set_spec(self, spec: AppSpec | None, app: str = "") -> None:
        name = spec.app if spec else app
        if spec is None:  # commands.py: a tombstone, then the spec cleared
            self.specs.pop(name, None)
            self.ledger.stopped_before_wipe.discard(name)
            self.outside.command(f"{self.root}/apps/{name}/stopped", ("stopped", name))
        elif name in self.stopped:  # deployed again: the tombstone cleared first
            self.outside.command(f"{self.root}/apps/{name}/stopped", None)
        if spec is not None:
            self.specs[name] = spec
        self.outside.command(f"{self.root}/apps/{name}/spec", spec)
        if spec is None:
            self.stopped.add(name)
        else:
            self.stopped.discard(name)

    def apply(self, fault: Fault) -> None:
        self.trace("FAULT", fault.describe())
        loop, broker = self.loop, self.broker
        device = self.devices.get(fault.target)
        later = fault.duration
        match fault.kind:
            case "crash":
                assert device is not None
                device.crash()
                loop.call_later(later, device.boot)
            case "pause":
                assert device is not None
                device.pause()
                loop.call_later(later, device.resume)
            case "partition":
                assert device is not None
                device.cut()
                loop.call_later(later, device.heal)
            case "restart":
                broker.stop(wills=True)
                loop.call_later(later, lambda: broker.start(wipe=False))
            case "wipe":
                self.ledger.wiped()
                broker.stop(wills=False)
                loop.call_later(later, lambda: broker.start(wipe=True))
            case "join":
                assert device is not None
                device.boot()
            case "leave":
                assert device is not None
                device.leave()
                loop.call_later(later, lambda: self._boot_when_gone(device))
            case "slow":
                self.net.slow_until[fault.target] = loop.now + later
            case "jitter":
                self.net.jitter_until = loop.now + later
            case "migrate" | "upgrade" if fault.target in self.specs:
                spec = self.specs[fault.target]
                if fault.kind == "migrate":
                    self._set_spec(replace(spec, pin=fault.arg))
                else:
                    version = self.ledger.upgraded_to.get(spec.app, 1) + 1
                    self.ledger.upgraded_to[spec.app] = version
                    self._set_spec(replace(spec, module=module_hash(spec.app, version)))
            case "stop":
                self._set_spec(None, fault.target)
            case "deploy":
                self._set_spec(self.setup.apps_later[fault.target])

    def _boot_when_gone(self, device: Device) -> None:
        if device.gone:
            device.boot()
        else:
            self.loop.call_later(0.5, lambda: self._boot_when_gone(device))


def run(setup: Setup) -> Result:
    return World(setup).run()
