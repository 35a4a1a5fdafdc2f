"""The MQTT topic tree (DESIGN.md, "MQTT topic tree"), under a configurable root. Pure code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    root: str = "mesh"

    @property
    def mesh(self) -> str:
        """The mesh's marker: a broker without it has lost its store."""
        return f"{self.root}/mesh"

    def node(self, node: str) -> str:
        return f"{self.root}/nodes/{node}"

    def node_cmd(self, node: str) -> str:
        return f"{self.root}/nodes/{node}/cmd"

    def node_sync(self, node: str) -> str:
        """Where a joining node sends itself a marker: back, it has every retained record."""
        return f"{self.root}/nodes/{node}/sync"

    def module(self, sha256: str) -> str:
        return f"{self.root}/modules/{sha256}"

    def app(self, app: str, part: str) -> str:
        """`spec`, `owner`, `snapshot`, `in` or `out/...` of one app."""
        return f"{self.root}/apps/{app}/{part}"

    @property
    def cmd(self) -> str:
        return f"{self.root}/cmd"

    def reply(self, request: str) -> str:
        return f"{self.root}/replies/{request}"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    def app_session(self, app: str, secret: str = "") -> str:
        """The MQTT client id of an app's own session: the same on whichever node runs it
        (with a `secret` only the mesh's devices can derive, in a secure mesh)."""
        return f"{self.root}-app-{app}" + (f"-{secret}" if secret else "")

    def parse(self, topic: str) -> tuple[str, ...]:
        """The parts after the root, e.g. ('apps', 'counter', 'spec'); () if not ours."""
        prefix = self.root + "/"
        return tuple(topic[len(prefix):].split("/")) if topic.startswith(prefix) else ()
