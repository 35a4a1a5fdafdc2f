"""Devices on a LAN (network namespaces, real multicast): how fast the mesh sees them come and go.

    sudo .venv/bin/python benchmarks/lan_bench.py [--quick] [--hosted-broker KIND]

- join: a device booting on a LAN with a mesh, from `mesh node` starting to its record being
  visible to the others;
- leave: SIGTERM of a device until the others see it leaving (its record), and until its mDNS
  goodbye reaches them;
- crash: kill -9 of a device, and its cable pulled, until its record is cleared (Last Will);
- broker lost: kill -9 of the device hosting the broker until apps on the survivors, and the
  lost device's own app, answer again.

Every node uses keepalive K = 2 s. Prints Markdown tables of medians. Needs root.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.home import OperatorHome  # noqa: E402
from tests.conftest import COUNTER_WAT  # noqa: E402
from tests.harness import Observer, count_of, wait_until  # noqa: E402
from tests.lan import Lan, can_build_lans  # noqa: E402
from tests.test_lan import boot, cli, discovered_broker, feed, observing  # noqa: E402

KEEPALIVE_S = 2
HOSTED: list[str] = []  # `--hosted-broker KIND` for every device, if given


def timed(condition: Callable[[], object], began: float, timeout: float = 30) -> float:
    wait_until(condition, timeout, "the condition")
    return time.monotonic() - began


def present(obs: Observer, name: str) -> bool:
    return name in obs.nodes


def gone(obs: Observer, name: str) -> bool:
    return name not in obs.nodes


def leaving(obs: Observer, name: str) -> bool:
    record = obs.nodes.get(name)
    return record is None or record.leaving


def said_goodbye(obs: Observer, name: str) -> bool:
    return any(e.event == "peer-left" and e.detail.get("peer") == name for e in list(obs.events))


def bench_join_leave_crash(work: Path, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"join": [], "leave": [], "goodbye": [], "kill": [],
                                       "unplug": []}
    with Lan() as lan:
        viewer = lan.plug("laptop")
        boot(lan, work, "host", "--id", "host", *HOSTED)
        with observing(viewer, {"host"}, work):
            pass
        with observing(viewer, {"host"}, work) as obs:
            for i in range(rounds):
                name = f"dev{i}"
                began = time.monotonic()
                device = boot(lan, work, name, "--id", name, *HOSTED)
                results["join"].append(timed(partial(present, obs, name), began))
                time.sleep(2)  # its mDNS announcement settles
                began = time.monotonic()
                device.procs[-1].send_signal(signal.SIGTERM)
                results["leave"].append(timed(partial(leaving, obs, name), began))
                results["goodbye"].append(timed(partial(said_goodbye, obs, name), began))
                device.procs[-1].wait(30)
                for how in ("kill", "unplug"):
                    name = f"{how}{i}"
                    device = boot(lan, work, name, "--id", name, *HOSTED)
                    wait_until(partial(present, obs, name), 30)
                    began = time.monotonic()
                    if how == "kill":
                        device.procs[-1].send_signal(signal.SIGKILL)
                    else:
                        device.unplug()
                    results[how].append(timed(partial(gone, obs, name), began))
    return results


def bench_broker_lost(work: Path) -> tuple[float, float]:
    """Seconds until the survivor's app, and the lost device's app, answer again."""
    with Lan() as lan:
        viewer = lan.plug("laptop")
        host = boot(lan, work, "host", "--id", "host", *HOSTED)
        with observing(viewer, {"host"}, work):
            pass
        boot(lan, work, "hall", "--id", "hall", *HOSTED)
        boot(lan, work, "garage", "--id", "garage", *HOSTED)
        with observing(viewer, {"host", "hall", "garage"}, work) as obs:
            cli(viewer, "deploy", "survivor", str(COUNTER_WAT), "--on", "hall")
            cli(viewer, "deploy", "orphan", str(COUNTER_WAT), "--on", "host",
                "--checkpoint-every", "1")
            wait_until(lambda: obs.running("survivor") and obs.running("orphan"), 30)
            feed(obs, "survivor", [b"a"])
            feed(obs, "orphan", [b"a"])
            wait_until(lambda: count_of(obs.last_output("orphan")) == 1, 10)
        began = time.monotonic()
        host.procs[0].send_signal(signal.SIGKILL)
        answered: dict[str, float] = {}
        while len(answered) < 2 and time.monotonic() - began < 60:
            try:
                with viewer.inside():
                    obs = Observer(discovered_broker(viewer)).__enter__()
            except OSError:
                continue
            try:
                deadline = time.monotonic() + 1
                while len(answered) < 2 and time.monotonic() < deadline:
                    for app in ("survivor", "orphan"):
                        if app not in answered:
                            feed(obs, app, [b"b"])
                    time.sleep(0.1)
                    for app in ("survivor", "orphan"):
                        if app not in answered and count_of(obs.last_output(app)) >= 2:
                            answered[app] = time.monotonic() - began
            except RuntimeError:  # that broker went away (it lost an election): look again
                pass
            finally:
                obs.__exit__()
        return answered.get("survivor", float("nan")), answered.get("orphan", float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round of each")
    parser.add_argument("--hosted-broker", choices=("auto", "mosquitto", "amqtt"),
                        help="the broker the first device hosts (default auto: Mosquitto if "
                        "installed)")
    args = parser.parse_args()
    if args.hosted_broker:
        HOSTED.extend(("--hosted-broker", args.hosted_broker))
    reason = can_build_lans()
    if reason:
        print(f"lan_bench: {reason}", file=sys.stderr)
        return 2
    rounds = 1 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["MESH_HOME"] = str(work / "operator")  # a secure mesh: devices join with
        OperatorHome().init("bench")  # tokens, the mesh commands are signed
        for sub in ("devices", "lost0", "lost1", "lost2"):
            (work / sub).mkdir()
        found = bench_join_leave_crash(work / "devices", rounds)
        lost = [bench_broker_lost(work / f"lost{i}") for i in range(1 if args.quick else 3)]
    med = {name: statistics.median(values) for name, values in found.items()}
    print(f"| device event (keepalive K = {KEEPALIVE_S} s, median of {rounds}) | seen by "
          "the others after, s | target |")
    print("|---|---:|---:|")
    print(f"| boots on a LAN with a mesh: its record visible | {med['join']:.2f} | 3 |")
    print(f"| leaves (SIGTERM): marked leaving | {med['leave']:.2f} | 1 |")
    print(f"| leaves (SIGTERM): its mDNS goodbye | {med['goodbye']:.2f} | 1 |")
    print(f"| crashes (kill -9): record cleared | {med['kill']:.2f} | {1.5 * KEEPALIVE_S:g} |")
    print(f"| cable pulled: record cleared | {med['unplug']:.2f} | {1.5 * KEEPALIVE_S:g} |")
    print(f"\n| broker's device killed (median of {len(lost)}) | apps answering again after, s "
          "| target |")
    print("|---|---:|---:|")
    print(f"| an app on a surviving device | {statistics.median(s for s, _ in lost):.2f} | 10 |")
    print(f"| the lost device's app (from its newest checkpoint) | "
          f"{statistics.median(o for _, o in lost):.2f} | 10 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
