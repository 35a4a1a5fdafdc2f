"""Mesh benchmarks on a real Mosquitto with nodes as processes, next to bare paho baselines.

    .venv/bin/python benchmarks/mesh_bench.py [--quick] [--only NAME] [--sizes MIB ...]
                                              [--insecure]

- migration downtime (last input applied on the source -> first applied on the target) for
  1, 16 and 64 MiB of app memory, next to moving the same bytes with bare paho publish/subscribe
  through the same broker;
- failover: kill -9 of the owner, and a silent owner (SIGSTOP), until the app answers again;
- input throughput into a wasm app through a node, next to a bare paho subscriber;
- placement of 1000 apps on 100 nodes, and how many apps a join moves;
- brokers: migration downtime (16 MiB) and input throughput on Mosquitto configured as a device
  hosts it, and on the embedded amqtt, each next to bare paho through the same broker.

Prints Markdown tables of medians. Needs mosquitto (Debian package). The mesh is a secure one,
as by default (`mesh init`, nodes joined with join tokens, every command, spec, record and
checkpoint header signed and checked, app memory encrypted); `--insecure` runs the same on an
open mesh, to set next to it.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.placement import assign  # noqa: E402
from mesh.wire import AppSpec, NodeRecord  # noqa: E402
from tests.harness import (  # noqa: E402
    Cluster,
    Observer,
    ballast_wasm,
    embedded_broker,
    hosted_mosquitto,
    mosquitto,
    wait_until,
)

MIB = 1 << 20
BENCHES = ("migration", "failover", "throughput", "placement", "brokers")
CHUNK = 1_900_000 - 1024

SECURE: dict[str, Path] = {}  # "home": the operator's home (none with --insecure)


def mesh(*args: str, broker: str) -> None:
    home = ("--home", str(SECURE["home"])) if SECURE else ()
    subprocess.run([sys.executable, "-m", "mesh", "-q", *args, "--broker", broker, *home],
                   check=True, capture_output=True, timeout=120)


def start(cluster: Cluster, node: str, broker: str) -> None:
    """A node of an open mesh, or joined with a new join token to a secure one."""
    if not SECURE:
        cluster.start(node, broker, "--insecure")
        return
    token = subprocess.run([sys.executable, "-m", "mesh", "-q", "admit", "--token", "--home",
                            str(SECURE["home"])], check=True, capture_output=True, text=True,
                           timeout=60).stdout.strip()
    cluster.start(node, broker, "--token", token)


def app_file(work: Path, size: int) -> Path:
    path = work / f"ballast-{size // MIB}.wasm"
    path.write_bytes(ballast_wasm(size // 65536))
    return path


def bare_client(broker: str, client_id: str, subscribe: str | None = None,
                on_message: paho.CallbackOnMessage | None = None) -> paho.Client:
    """A plain paho client on its own thread: the baseline the mesh is compared with."""
    host, port = broker.removeprefix("mqtt://").split(":")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_message = on_message
    client.connect(host, int(port))
    if subscribe:
        client.subscribe(subscribe, 1)
    client.loop_start()
    if subscribe:
        time.sleep(0.3)  # let the subscription settle before timing
    return client


def bare_transfer_ms(broker: str, size: int, rounds: int) -> float:
    """Baseline: the same bytes, chunked like a snapshot, from one paho client to another."""
    received = threading.Event()
    got = [0]

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        got[0] += len(message.payload)
        if got[0] >= size:
            received.set()

    sub = bare_client(broker, "bench-sub", "bench/blob/#", on_message)
    pub = bare_client(broker, "bench-pub")
    blob = bytes(size)
    times = []
    for _ in range(rounds):
        got[0] = 0
        received.clear()
        began = time.perf_counter()
        infos = [pub.publish(f"bench/blob/{i}", blob[at:at + CHUNK], qos=1)
                 for i, at in enumerate(range(0, size, CHUNK))]
        received.wait(60)
        for info in infos:
            info.wait_for_publish(60)
        times.append((time.perf_counter() - began) * 1000)
    for client in (sub, pub):
        client.loop_stop()
        client.disconnect()
    return statistics.median(times)


def output_times(obs: Observer, app: str) -> list[float]:
    return list(obs.output_times.get(app, []))


@contextmanager
def feeding(obs: Observer, app: str, every_s: float) -> Iterator[None]:
    """Publish a QoS 1 input to `app` every `every_s` seconds while the block runs."""
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            obs.client.publish(f"mesh/apps/{app}/in", b"x", qos=1)
            stop.wait(every_s)

    feeder = threading.Thread(target=feed, name="feeder")
    feeder.start()
    try:
        yield
    finally:
        stop.set()
        feeder.join()


def runs_on(obs: Observer, app: str, node: str) -> bool:
    return obs.running(app) == node


def answered_more(obs: Observer, app: str, count: int) -> bool:
    return len(output_times(obs, app)) > count


Serve = Callable[[Path], AbstractContextManager[str]]


@contextmanager
def two_nodes(work: Path, serve: Serve = mosquitto) -> Iterator[tuple[str, Observer, Cluster]]:
    """A broker (Mosquitto unless `serve` says), an observer, and nodes alpha and beta."""
    with serve(work) as broker, Observer(broker) as obs:
        cluster = Cluster(work)
        try:
            for node in ("alpha", "beta"):
                start(cluster, node, broker)
            wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 30, "nodes")
            yield broker, obs, cluster
        finally:
            cluster.stop_all()


def migration_downtime_ms(obs: Observer, broker: str, app: str, nodes: tuple[str, str],
                          rounds: int) -> float:
    """Inputs every 2 ms; downtime is the gap in the app's answers around each migration."""
    gaps = []
    with feeding(obs, app, 0.002):
        for i in range(rounds):
            target = nodes[(i + 1) % 2]
            wait_until(lambda: len(output_times(obs, app)) > 20, 60, "answers")
            before = len(output_times(obs, app))
            mesh("migrate", app, target, broker=broker)
            wait_until(partial(runs_on, obs, app, target), 120, f"{app} on {target}")
            wait_until(partial(answered_more, obs, app, before + 20), 60, "answers")
            times = output_times(obs, app)[before - 5:]
            gaps.append(max(b - a for a, b in itertools.pairwise(times)) * 1000)
    return statistics.median(gaps)


def bench_migration(work: Path, quick: bool, mib: list[int] | None = None) -> None:
    sizes = [m * MIB for m in mib or ([1, 16] if quick else [1, 16, 64])]
    rounds = 2 if quick else 5
    print("| app memory | migration downtime ms | bare paho transfer ms | ratio |")
    print("|---|---:|---:|---:|")
    for size in sizes:
        downtime, bare = migration(work, size, rounds, mosquitto)
        print(f"| {size // MIB} MiB | {downtime:.0f} | {bare:.0f} | {downtime / bare:.2f}x |",
              flush=True)


def migration(work: Path, size: int, rounds: int, serve: Serve) -> tuple[float, float]:
    """Median migration downtime of an app of `size` bytes, and of the bare transfer, in ms."""
    with two_nodes(work, serve) as (broker, obs, _):
        app = f"ballast{size // MIB}"
        mesh("deploy", app, str(app_file(work, size)), "--on", "alpha",
             "--checkpoint-ms", "60000", "--checkpoint-every", "100000", broker=broker)
        wait_until(partial(runs_on, obs, app, "alpha"), 60, "deploy")
        downtime = migration_downtime_ms(obs, broker, app, ("alpha", "beta"), rounds)
        return downtime, bare_transfer_ms(broker, size, rounds)


def bench_failover(work: Path, quick: bool) -> None:
    keepalive = 2
    rounds = 1 if quick else 3
    print(f"\n| failover (keepalive K = {keepalive} s) | app answering again after, s "
          "| target 1.5 K + 0.5 s |")
    print("|---|---:|---:|")
    for how, signum in (("kill -9 of the owner", signal.SIGKILL),
                        ("owner silent (SIGSTOP)", signal.SIGSTOP)):
        times = []
        for round_ in range(rounds):
            # New devices each round: state kept from an earlier round's mesh would make them
            # wait a rejoin grace before taking over another's app.
            fresh = work / f"failover-{signum}-{round_}"
            fresh.mkdir()
            with two_nodes(fresh) as (broker, obs, cluster):
                try:
                    mesh("deploy", "counter", str(ROOT / "mesh/apps/counter.wat"), "--on",
                         "alpha", "--checkpoint-every", "1", broker=broker)
                    wait_until(lambda: obs.running("counter") == "alpha", 60, "deploy")
                    with feeding(obs, "counter", 0.01):
                        wait_until(partial(answered_more, obs, "counter", 10), 30, "answers")
                        began = time.monotonic()
                        cluster["alpha"].signal(signum)
                        wait_until(partial(runs_on, obs, "counter", "beta"), 60, "failover")
                        seen = len(output_times(obs, "counter"))
                        wait_until(partial(answered_more, obs, "counter", seen), 30,
                                   "answers from beta")
                        times.append(obs.output_times["counter"][seen] - began)
                finally:
                    if signum == signal.SIGSTOP:
                        cluster["alpha"].signal(signal.SIGCONT)
        print(f"| {how} | {statistics.median(times):.2f} | {1.5 * keepalive + 0.5:.1f} |",
              flush=True)


def bench_throughput(work: Path, quick: bool) -> None:
    count = 2000 if quick else 10000
    rounds = 1 if quick else 3
    mesh_rates, bare_rates = throughput(work, count, rounds, mosquitto)
    ratios = sorted(m / b for m, b in zip(mesh_rates, bare_rates, strict=True))
    print(f"\n| input throughput ({count} QoS 1 messages, median of {rounds}) | msg/s |")
    print("|---|---:|")
    print(f"| bare paho subscriber | {statistics.median(bare_rates):.0f} |")
    print(f"| into the wasm counter through a node (it publishes an answer to each) "
          f"| {statistics.median(mesh_rates):.0f} |")
    print(f"| **ratio node / bare**, median of the rounds' ratios (target >= 0.5) "
          f"| **{statistics.median(ratios):.2f}** ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")


def throughput(work: Path, count: int, rounds: int, serve: Serve
               ) -> tuple[list[float], list[float]]:
    """Rates (msg/s) of `count` QoS 1 inputs into the counter through a node, and to a bare
    paho subscriber, alternating for `rounds` rounds so that both see the same machine."""
    mesh_rates, bare_rates = [], []
    with serve(work) as broker, Observer(broker) as obs:
        cluster = Cluster(work)
        try:
            start(cluster, "alpha", broker)
            wait_until(lambda: "alpha" in obs.nodes, 30, "node")
            mesh("deploy", "counter", str(ROOT / "mesh/apps/counter.wat"),
                 "--checkpoint-every", "100", broker=broker)
            wait_until(lambda: obs.running("counter") == "alpha", 60, "deploy")
            publisher = bare_client(broker, "bench-pub")
            got = threading.Event()
            seen = [0]

            def on_message(_c: object, _u: object, _m: paho.MQTTMessage) -> None:
                seen[0] += 1
                if seen[0] >= count:
                    got.set()

            bare = bare_client(broker, "bench-bare", "bench/in", on_message)

            def blast(topic: str) -> float:
                began = time.perf_counter()
                infos = [publisher.publish(topic, b"reading", qos=1) for _ in range(count)]
                for info in infos:
                    info.wait_for_publish(120)
                return began

            for done in range(1, rounds + 1):
                began = blast("mesh/apps/counter/in")
                wait_until(partial(answered_more, obs, "counter", done * count - 1), 300,
                           "all applied")
                mesh_rates.append(count / (obs.output_times["counter"][-1] - began))
                seen[0] = 0
                got.clear()
                began = blast("bench/in")
                got.wait(300)
                bare_rates.append(count / (time.perf_counter() - began))
            bare.loop_stop()
            publisher.loop_stop()
        finally:
            cluster.stop_all()
    return mesh_rates, bare_rates


def bench_brokers(work: Path, quick: bool) -> None:
    """The zero-config brokers side by side: what a device hosts when it has Mosquitto, and
    the embedded amqtt it hosts when it has not."""
    size, rounds = 16 * MIB, (2 if quick else 3)
    count = 2000 if quick else 5000
    print(f"\n| broker a device hosts | migration downtime 16 MiB ms | bare paho transfer ms "
          f"| ratio | node msg/s ({count} QoS 1) | bare paho msg/s | ratio node / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, serve in (("Mosquitto (hosted configuration)", hosted_mosquitto),
                        ("embedded amqtt", embedded_broker)):
        place = work / f"brokers-{serve.__name__}"
        for part in ("migration", "throughput"):
            (place / part).mkdir(parents=True)
        downtime, bare = migration(place / "migration", size, rounds, serve)
        mesh_rates, bare_rates = throughput(place / "throughput", count, rounds, serve)
        ratio = statistics.median(m / b for m, b in zip(mesh_rates, bare_rates, strict=True))
        print(f"| {name} | {downtime:.0f} | {bare:.0f} | {downtime / bare:.2f}x "
              f"| {statistics.median(mesh_rates):.0f} | {statistics.median(bare_rates):.0f} "
              f"| {ratio:.2f} |", flush=True)


def bench_placement() -> None:
    members = [NodeRecord(id=f"node{i}") for i in range(100)]
    specs = [AppSpec(app=f"app{i}", module="0" * 64) for i in range(1000)]
    times = []
    for _ in range(9):
        began = time.perf_counter()
        before = assign(members, specs)
        times.append((time.perf_counter() - began) * 1000)
    after = assign([*members, NodeRecord(id="newcomer")], specs)
    moved = sum(1 for app in before if before[app] != after[app])
    print("\n| placement, 100 nodes x 1000 apps | value | target |")
    print("|---|---:|---:|")
    print(f"| compute the assignment (median of 9), ms | {statistics.median(times):.1f} "
          "| <= 50 |")
    print(f"| apps moved by a join | {moved} | <= {1.5 * 1000 / 100:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    parser.add_argument("--only", choices=BENCHES, action="append",
                        help="run just this benchmark (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", metavar="MIB",
                        help="app memory sizes for the migration benchmark")
    parser.add_argument("--insecure", action="store_true",
                        help="on an open mesh (nothing signed, nothing encrypted)")
    args = parser.parse_args()
    chosen = args.only or BENCHES
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.insecure:
            print("(an open mesh: nothing signed, nothing encrypted)\n")
        else:
            SECURE["home"] = work / "operator"
            subprocess.run([sys.executable, "-m", "mesh", "-q", "init", "--home",
                            str(SECURE["home"])], check=True, capture_output=True, timeout=60)
            print("(a secure mesh: commands, specs, records and checkpoints signed, app memory "
                  "encrypted)\n")
        if "migration" in chosen:
            bench_migration(work, args.quick, args.sizes)
        if "failover" in chosen:
            bench_failover(work, args.quick)
        if "throughput" in chosen:
            bench_throughput(work, args.quick)
        if "brokers" in chosen:
            bench_brokers(work, args.quick)
    if "placement" in chosen:
        bench_placement()
    return 0


if __name__ == "__main__":
    sys.exit(main())
