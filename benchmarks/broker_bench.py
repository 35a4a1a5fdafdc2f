"""What Mosquitto's persistence settings cost the mesh, next to no persistence at all.

    .venv/bin/python benchmarks/broker_bench.py [--quick]

The mesh stores each app's checkpoints as retained messages; with persistence, Mosquitto writes
its whole store at each autosave. This publishes checkpoint-like retained messages (QoS 1, one
at a time, as an app's checkpoints go) into a broker already holding a store of 50 apps'
checkpoints, under each setting, and prints a Markdown table of medians. Needs mosquitto.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import mosquitto  # noqa: E402

BASE = """\
listener {{port}} 127.0.0.1
allow_anonymous true
user root
max_inflight_messages 100
"""
SETTINGS = {
    "no persistence (baseline)": "persistence false\n",
    "autosave_interval 10 (seconds; recommended)":
        "persistence true\npersistence_location {dir}/\nautosave_interval 10\n",
    "autosave_on_changes, every 100 changes":
        "persistence true\npersistence_location {dir}/\nautosave_on_changes true\n"
        "autosave_interval 100\n",
    "autosave_on_changes, every change":
        "persistence true\npersistence_location {dir}/\nautosave_on_changes true\n"
        "autosave_interval 1\n",
}
STORE_APPS = 50
STORE_BYTES = 256 * 1024
CHECKPOINT_BYTES = 64 * 1024


def client(url: str) -> paho.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
    c.connect(host, int(port))
    c.loop_start()
    return c


def checkpoints_per_s(url: str, count: int) -> float:
    c = client(url)
    try:
        for app in range(STORE_APPS):  # the store each autosave writes out again
            c.publish(f"mesh/apps/a{app}/snapshot", os.urandom(STORE_BYTES), qos=1,
                      retain=True).wait_for_publish(30)
        payload = os.urandom(CHECKPOINT_BYTES)
        began = time.perf_counter()
        for i in range(count):
            c.publish(f"mesh/apps/a{i % STORE_APPS}/snapshot", payload, qos=1,
                      retain=True).wait_for_publish(30)
        return count / (time.perf_counter() - began)
    finally:
        c.loop_stop()
        c.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, count = (1, 200) if args.quick else (3, 1000)
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):  # settings alternate within each round: the machine is noisy
        for name, setting in SETTINGS.items():
            with tempfile.TemporaryDirectory() as work:
                conf = (BASE + setting).replace("{dir}", work)
                with mosquitto(Path(work), conf.replace("{{port}}", "{port}")) as url:
                    results[name].append(checkpoints_per_s(url, count))
    base = statistics.median(results["no persistence (baseline)"])
    print(f"| Mosquitto setting ({STORE_APPS} apps' checkpoints of {STORE_BYTES >> 10} KiB "
          f"held) | {CHECKPOINT_BYTES >> 10} KiB checkpoints stored per s | vs baseline |")
    print("|---|---:|---:|")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
