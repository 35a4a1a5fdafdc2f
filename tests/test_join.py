"""A node joining a mesh acts only once it has every record the broker held.

Mosquitto sends a subscriber its retained messages a bounded window at a time, and the
acknowledgement of the node's own publish can overtake the ones still queued: a node that took
"my record is acknowledged" for "I have everything" claimed apps at epoch 1 before their owner
records arrived, and an epoch went backwards (which defeats fencing by epoch). Here the broker's
window is 2, the mesh holds many apps whose owner (a node that is gone) reached epoch 7, and a
node joins: every claim it makes must be at epoch 8.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from mesh import wire
from tests.conftest import COUNTER_WAT, require_tool, wat
from tests.harness import Cluster, Observer, mosquitto, wait_until

APPS = 40
GONE_EPOCH = 7

NARROW_WINDOW = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 2
max_queued_messages 100000
"""


@pytest.fixture
def narrow_broker(tmp_path: Path) -> Iterator[str]:
    """Mosquitto sending at most two unacknowledged messages to a client at a time."""
    require_tool("mosquitto")
    with mosquitto(tmp_path, NARROW_WINDOW) as url:
        yield url


class OwnerLog:
    """Every owner record published, in order (the observer keeps only the newest)."""

    def __init__(self, obs: Observer) -> None:
        self.records: list[tuple[str, wire.OwnerRecord]] = []
        self._lock = threading.Lock()
        chained = obs.client.on_message

        def on_message(client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
            parts = message.topic.split("/")
            if len(parts) == 4 and parts[3] == "owner" and message.payload:
                with self._lock:
                    self.records.append(
                        (parts[2], wire.decode(wire.OwnerRecord, bytes(message.payload))))
            if chained is not None:
                chained(client, userdata, message)

        obs.client.on_message = on_message

    def by(self, node: str) -> list[tuple[str, int]]:
        with self._lock:
            return [(app, record.epoch) for app, record in self.records if record.node == node]


def test_a_joining_node_claims_past_every_epoch_the_broker_holds(
        narrow_broker: str, tmp_path: Path) -> None:
    wasm = wat(COUNTER_WAT.read_text())
    sha256 = hashlib.sha256(wasm).hexdigest()
    cluster = Cluster(tmp_path)
    with Observer(narrow_broker) as obs:
        owners = OwnerLog(obs)
        obs.publish(f"mesh/modules/{sha256}", wasm, retain=True)
        for index in range(APPS):
            app = f"app{index:02d}"
            obs.publish(f"mesh/apps/{app}/spec",
                        wire.encode(wire.AppSpec(app=app, module=sha256)), retain=True)
            obs.publish(f"mesh/apps/{app}/owner",
                        wire.encode(wire.OwnerRecord("gone", GONE_EPOCH)), retain=True)
        try:
            cluster.start("alpha", narrow_broker, "--insecure")  # records made by hand
            wait_until(lambda: len({app for app, _ in owners.by("alpha")}) == APPS, 60,
                       f"alpha to claim all {APPS} apps")
            wait_until(lambda: (record := obs.nodes.get("alpha")) is not None
                       and len(record.apps) == APPS, 60, "every app to run on alpha")
        finally:
            cluster.stop_all()
            print(cluster.logs())
        claims = owners.by("alpha")
        assert {epoch for _, epoch in claims} == {GONE_EPOCH + 1}, claims
