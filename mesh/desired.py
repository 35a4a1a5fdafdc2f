"""The mesh's desired state as one node holds it: app specs and the tombstones of stopped apps.

In a secure mesh both are signed (`mesh.authority`) by the operator or a device allowed to
deploy, and a node takes one only if it is no older than what it holds: a spec issued before
the app's tombstone, or before the spec held, is a replay and is refused. A stop is a signed
tombstone newer than the spec (the spec's retained message is cleared too, but a bare clear
changes nothing: anyone can publish one). In an open mesh a clear removes the spec.

The bytes of each spec are kept as they came, signature and all, to give back to a broker
that lost its store (`mesh.recovery`) and to keep on disk (`mesh.store`).
"""

from __future__ import annotations

from mesh import wire
from mesh.authority import Authority
from mesh.errors import TrustError, WireError
from mesh.store import StateStore
from mesh.topics import Topics


class DesiredState:
    def __init__(self, authority: Authority, topics: Topics, store: StateStore) -> None:
        self.authority = authority
        self.topics = topics
        self.store = store
        self.specs: dict[str, wire.AppSpec] = {}
        self.payloads: dict[str, bytes] = {}  # each spec as it came (signed, in a secure mesh)
        self.tombstones: set[str] = set()  # apps stopped since they were last deployed
        self._issued: dict[str, int] = {}  # when the spec held was signed
        self._stopped: dict[str, int] = {}  # when the newest tombstone was signed

    def spec(self, app: str, payload: bytes) -> None:
        """A message at `<root>/apps/<app>/spec`; WireError or TrustError if refused."""
        secure = self.authority.secure
        if not payload:
            if not secure:
                self._drop(app)
            elif app in self.specs:
                raise TrustError(f"the spec of {app} cleared without its signed tombstone: "
                                 "kept")
            return
        body, issued = self.authority.open_steering(self.topics.app(app, "spec"), payload)
        if secure and issued <= self._stopped.get(app, -1):
            raise TrustError(f"a spec of {app} signed before its stop (replayed)")
        if secure and issued < self._issued.get(app, -1):
            raise TrustError(f"a spec of {app} older than the one held (replayed)")
        spec = wire.decode(wire.AppSpec, body)
        if spec.app != app:
            raise WireError(f"a spec for {spec.app!r} published under {app!r}")
        self.specs[app] = spec
        self.payloads[app] = payload
        self._issued[app] = issued
        self.store.save_spec(app, payload)

    def tombstone(self, app: str, payload: bytes) -> None:
        """A message at `<root>/apps/<app>/stopped`."""
        if not payload:  # deployed again
            self.tombstones.discard(app)
            return
        body, issued = self.authority.open_steering(self.topics.app(app, "stopped"), payload)
        if wire.decode(wire.Tombstone, body).app != app:
            raise WireError(f"a tombstone of another app published as {app!r}'s")
        self.tombstones.add(app)
        if self.authority.secure:
            self._stopped[app] = max(issued, self._stopped.get(app, -1))
            if issued > self._issued.get(app, -1):
                self._drop(app)

    def latest(self, app: str) -> int:
        """When the newest spec or tombstone of `app` held was signed: a new one is signed
        after it, whatever the signing device's clock says."""
        return max(self._issued.get(app, -1), self._stopped.get(app, -1))

    def _drop(self, app: str) -> None:
        self.specs.pop(app, None)
        self.payloads.pop(app, None)
        self._issued.pop(app, None)
        self.store.forget_spec(app)
