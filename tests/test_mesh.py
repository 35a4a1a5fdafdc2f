"""The mesh end to end: real brokers, every node its own OS process, commands from the CLI.

Scenarios: deploy and run; live migration under a steady QoS 1 stream; kill -9 of the owner
mid-stream; a node joining and winning apps; a graceful leave; a stale owner coming back after
SIGSTOP; commands from plain `mosquitto_pub`; bad commands and inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import wasmtime

from mesh import trust, wire
from mesh.home import OperatorHome
from tests.conftest import COUNTER_WAT, require_tool
from tests.harness import (
    Cluster,
    Observer,
    assert_exactly_once,
    ballast_wasm,
    count_of,
    counter_hash,
    mesh_cli,
    stream,
    wait_count,
    wait_until,
)

IN = "mesh/apps/{}/in"


def deploy(broker: str, app: str, *args: str) -> None:
    result = mesh_cli("deploy", app, str(COUNTER_WAT), *args, broker=broker)
    assert result.returncode == 0, result.stderr


def mesh_of(obs: Observer, cluster: Cluster, broker: str, *ids: str,
            args: tuple[str, ...] = ()) -> None:
    for node_id in ids:
        cluster.start(node_id, broker, *args)
    wait_until(lambda: set(ids) <= set(obs.nodes), 20, f"nodes {ids} to join")


def test_deploy_and_run(any_broker: str, cluster: Cluster) -> None:
    with Observer(any_broker) as obs:
        mesh_of(obs, cluster, any_broker, "alpha", "beta")
        deploy(any_broker, "counter")
        host = wait_until(lambda: obs.running("counter"), 20, "counter to run")
        payloads = [f"m{i}".encode() for i in range(5)]
        for payload in payloads:
            obs.publish(IN.format("counter"), payload)
        assert wait_count(obs, "counter", 5) == f"5 {counter_hash(payloads)}".encode()
        apps = json.loads(mesh_cli("apps", "--json", broker=any_broker).stdout)
        assert apps == [{"app": "counter", "node": host, "state": "running", "epoch": 1,
                         "module": hashlib.sha256(_wasm()).hexdigest(), "reason": None}]
        nodes = json.loads(mesh_cli("nodes", "--json", broker=any_broker).stdout)
        assert {n["id"] for n in nodes} == {"alpha", "beta"}
        assert obs.has_event("started", app="counter", node=host)


def _wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(COUNTER_WAT.read_text()))


def test_live_migration_under_a_stream_loses_and_duplicates_nothing(
        any_broker: str, cluster: Cluster) -> None:
    with Observer(any_broker) as obs:
        mesh_of(obs, cluster, any_broker, "alpha", "beta")
        deploy(any_broker, "counter", "--on", "alpha")
        wait_until(lambda: obs.running("counter") == "alpha", 20, "counter on alpha")
        payloads, publisher = stream(obs, "counter", 400)
        wait_count(obs, "counter", 100)
        result = mesh_cli("migrate", "counter", "beta", broker=any_broker)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: obs.running("counter") == "beta", 20, "counter on beta")
        publisher.join()
        assert_exactly_once(obs, "counter", payloads)
        counts = [count_of(out) for out in obs.outputs["counter"]]
        assert counts == list(range(1, len(payloads) + 1)), "outputs out of order or repeated"
        assert obs.has_event("migrated", app="counter", node="beta")


def test_kill_9_of_the_owner_mid_stream_applies_every_input_once(
        any_broker: str, cluster: Cluster) -> None:
    with Observer(any_broker) as obs:
        mesh_of(obs, cluster, any_broker, "alpha", "beta")
        deploy(any_broker, "counter", "--on", "alpha", "--checkpoint-every", "7")
        wait_until(lambda: obs.running("counter") == "alpha", 20, "counter on alpha")
        payloads, publisher = stream(obs, "counter", 300)
        wait_count(obs, "counter", 120)
        cluster["alpha"].signal(signal.SIGKILL)
        wait_until(lambda: obs.running("counter") == "beta", 30, "failover to beta")
        publisher.join()
        assert_exactly_once(obs, "counter", payloads)
        assert obs.has_event("failed-over", app="counter", node="beta")
        assert obs.owners["counter"].node == "beta"


def test_a_joining_node_wins_its_share_and_apps_move_live(
        broker: str, cluster: Cluster) -> None:
    apps = [f"app{i}" for i in range(8)]
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha")
        for app in apps:
            deploy(broker, app)
        wait_until(lambda: all(obs.running(app) == "alpha" for app in apps), 30, "all on alpha")
        for app in apps:
            for i in range(3):
                obs.publish(IN.format(app), f"{app}-{i}".encode())
        for app in apps:
            wait_count(obs, app, 3)
        cluster.start("beta", broker)
        wait_until(lambda: obs.has_event("migrated", node="beta"), 30, "a move to beta")
        moved = wait_until(lambda: [a for a in apps if obs.running(a) == "beta"], 30, "moves")
        assert 0 < len(moved) < len(apps)
        wait_until(lambda: all(obs.running(app) for app in apps), 30, "every app running")
        for app in apps:
            obs.publish(IN.format(app), b"after")
        for app in apps:
            expected = [f"{app}-{i}".encode() for i in range(3)] + [b"after"]
            assert wait_count(obs, app, 4) == f"4 {counter_hash(expected)}".encode()


def test_a_graceful_leave_hands_every_app_over(broker: str, cluster: Cluster) -> None:
    apps = [f"app{i}" for i in range(4)]
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha", "beta")
        for app in apps:
            deploy(broker, app, "--on", "alpha")
        wait_until(lambda: all(obs.running(app) == "alpha" for app in apps), 30, "on alpha")
        for app in apps:
            obs.publish(IN.format(app), b"before")
        for app in apps:
            wait_count(obs, app, 1)
        assert cluster["alpha"].stop() == 0
        wait_until(lambda: "alpha" not in obs.nodes, 10, "alpha's record to go")
        wait_until(lambda: all(obs.running(app) == "beta" for app in apps), 30, "all on beta")
        for app in apps:
            obs.publish(IN.format(app), b"after")
        for app in apps:
            assert wait_count(obs, app, 2) == \
                f"2 {counter_hash([b'before', b'after'])}".encode()


def test_a_stale_owner_back_from_a_pause_does_not_run_the_app(
        any_broker: str, cluster: Cluster) -> None:
    with Observer(any_broker) as obs:
        mesh_of(obs, cluster, any_broker, "alpha", "beta")
        deploy(any_broker, "counter", "--on", "alpha", "--checkpoint-every", "1")
        wait_until(lambda: obs.running("counter") == "alpha", 20, "counter on alpha")
        sent = [b"one", b"two"]
        for payload in sent:
            obs.publish(IN.format("counter"), payload)
        wait_count(obs, "counter", 2)
        alpha = cluster["alpha"]
        alpha.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: obs.running("counter") == "beta", 30, "failover to beta")
            obs.publish(IN.format("counter"), b"three")
            sent.append(b"three")
            wait_count(obs, "counter", 3)
        finally:
            alpha.signal(signal.SIGCONT)
        seen = len(obs.outputs["counter"])
        wait_until(lambda: "lost the broker" in alpha.log() or "stopping it here" in alpha.log(),
                   20, "alpha to notice it lost the app")
        obs.publish(IN.format("counter"), b"four")
        sent.append(b"four")
        assert wait_count(obs, "counter", 4) == f"4 {counter_hash(sent)}".encode()
        assert [count_of(o) for o in obs.outputs["counter"][seen:]] == [4]
        # alpha joins again and, the app being pinned there, gets it back by a live handover
        wait_until(lambda: "alpha" in obs.nodes and obs.running("counter") == "alpha", 30,
                   "alpha to rejoin and get its pinned app back")
        obs.publish(IN.format("counter"), b"five")
        sent.append(b"five")
        assert wait_count(obs, "counter", 5) == f"5 {counter_hash(sent)}".encode()


def test_commands_from_plain_mosquitto_pub(broker: str, cluster: Cluster) -> None:
    require_tool("mosquitto_pub")
    port = broker.rsplit(":", 1)[1]

    def pub(topic: str, message: str) -> None:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1",
                        "-t", topic, "-m", message], check=True, timeout=10)

    with Observer(broker) as obs:  # an open mesh: any tool may steer it
        mesh_of(obs, cluster, broker, "alpha", "beta", args=("--insecure",))
        deploy(broker, "counter", "--on", "alpha")
        wait_until(lambda: obs.running("counter") == "alpha", 20, "counter on alpha")
        pub("mesh/apps/counter/in", "hello")
        wait_count(obs, "counter", 1)
        pub("mesh/cmd", '{"op":"migrate","app":"counter","to":"beta","id":"r1"}')
        reply = json.loads(wait_until(lambda: obs.replies.get("r1"), 20, "reply r1"))
        assert reply["ok"] is True
        assert reply["result"] == {"app": "counter", "to": "beta"}
        wait_until(lambda: obs.running("counter") == "beta", 20, "counter on beta")
        pub("mesh/cmd", '{"op":"migrate","app":"nope","to":"beta","id":"r2"}')
        reply = json.loads(wait_until(lambda: obs.replies.get("r2"), 20, "reply r2"))
        assert reply == {"v": 1, "kind": "reply", "id": "r2", "ok": False,
                         "error": "no app 'nope' is deployed", "result": None}
        pub("mesh/cmd", "{not json")
        wait_until(lambda: obs.has_event("rejected"), 20, "a rejected event")
        pub("mesh/apps/counter/in", "again")
        assert wait_count(obs, "counter", 2) == f"2 {counter_hash([b'hello', b'again'])}".encode()


def test_bad_requests_are_refused_with_reasons(broker: str, cluster: Cluster,
                                               operator: OperatorHome) -> None:
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha")
        deploy(broker, "counter")
        wait_until(lambda: obs.running("counter"), 20, "counter running")
        missing = mesh_cli("deploy", "ghost", str(COUNTER_WAT), "--on", "nobody", broker=broker)
        assert missing.returncode == 1
        assert missing.stderr.strip() == "mesh: error: no node 'nobody' in the mesh"
        unable = mesh_cli("deploy", "camera", str(COUNTER_WAT), "--require", "camera",
                          "--json", broker=broker)
        assert unable.returncode == 0, unable.stderr
        assert json.loads(unable.stdout)["state"] == "pending"
        wait_until(lambda: obs.has_event("unplaceable", app="camera"), 20, "unplaceable")
        fake = "ab" * 32
        obs.publish(f"mesh/modules/{fake}", b"\0asm\x01\0\0\0", retain=True)
        command = wire.Command(op="deploy", id="bad", spec=wire.AppSpec(app="bad", module=fake))
        obs.publish("mesh/cmd", trust.seal(operator.key(), trust.OPERATOR, "mesh/cmd",
                                           wire.encode(command),
                                           issued_ms=int(time.time() * 1000)))
        reply = wire.decode(wire.Reply, wait_until(lambda: obs.replies.get("bad"), 20,
                                                   "reply bad"))
        assert "does not match its hash" in (reply.error or "")
        obs.publish(IN.format("counter"), b"x" * (300 * 1024))
        wait_until(lambda: obs.has_event("rejected", app="counter"), 20, "rejected input")
        obs.publish("mesh/nodes/evil", b"\xa1garbage", retain=True)
        obs.publish("mesh/nodes/ghost", wire.encode(wire.NodeRecord(id="other")), retain=True)
        wait_until(lambda: sum(e.event == "rejected" for e in obs.events) >= 4, 20,
                   "hostile node records rejected")
        obs.publish(IN.format("counter"), b"fine")
        assert wait_count(obs, "counter", 1) == f"1 {counter_hash([b'fine'])}".encode()
        nodes = json.loads(mesh_cli("nodes", "--json", broker=broker).stdout)
        assert [n["id"] for n in nodes] == ["alpha"]
        assert "Traceback" not in cluster["alpha"].log()


def test_apps_receive_the_topics_their_spec_subscribes_to(broker: str,
                                                          cluster: Cluster) -> None:
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha")
        deploy(broker, "counter", "--subscribe", "sensors/+/temperature")
        wait_until(lambda: obs.running("counter"), 20, "counter running")
        obs.publish("sensors/kitchen/temperature", b"21.5")
        obs.publish("sensors/kitchen/humidity", b"40")  # not subscribed
        obs.publish(IN.format("counter"), b"direct")
        assert wait_count(obs, "counter", 2) == \
            f"2 {counter_hash([b'21.5', b'direct'])}".encode()


def test_a_large_memory_moves_in_chunks_intact(broker: str, cluster: Cluster,
                                               tmp_path: Path) -> None:
    app = tmp_path / "ballast.wasm"
    app.write_bytes(ballast_wasm(64, checksum_end=4 << 20))
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha", "beta")
        result = mesh_cli("deploy", "ballast", str(app), "--on", "alpha", broker=broker)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: obs.running("ballast") == "alpha", 30, "ballast on alpha")
        obs.publish(IN.format("ballast"), b"x")
        first = wait_until(lambda: obs.last_output("ballast"), 30, "an answer")
        assert mesh_cli("migrate", "ballast", "beta", broker=broker).returncode == 0
        wait_until(lambda: obs.running("ballast") == "beta", 60, "ballast on beta")
        obs.publish(IN.format("ballast"), b"y")
        wait_until(lambda: len(obs.outputs["ballast"]) == 2, 30, "a second answer")
        second = obs.outputs["ballast"][1]
        assert int.from_bytes(second[:8], "little") == 2
        assert second[8:] == first[8:], "memory changed on the way"


def test_watch_follows_what_an_app_publishes(broker: str, cluster: Cluster) -> None:
    """`mesh watch APP` prints each message the app publishes, from the moment it listens;
    `--count N` ends it after N (for scripts)."""
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha")
        deploy(broker, "counter")
        wait_until(lambda: obs.running("counter"), 20, "counter running")
        watch = subprocess.Popen([sys.executable, "-m", "mesh", "-q", "watch", "counter",
                                  "--json", "--count", "2", "--broker", broker],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            sent = 0
            while watch.poll() is None and sent < 100:  # until it listens, and has seen two
                obs.publish(IN.format("counter"), b"tick")
                sent += 1
                with contextlib.suppress(subprocess.TimeoutExpired):
                    watch.wait(0.3)
            out, err = watch.communicate(timeout=10)
        finally:
            watch.kill()
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [(line["app"], line["topic"]) for line in lines] == [("counter", "count")] * 2
        counts = [int(line["payload"].split()[0]) for line in lines]
        assert counts[1] == counts[0] + 1, lines


def test_events_stream_and_stop(broker: str, cluster: Cluster) -> None:
    with Observer(broker) as obs:
        mesh_of(obs, cluster, broker, "alpha")
        events = subprocess.Popen([sys.executable, "-m", "mesh", "-q", "events", "--json",
                                   "--broker", broker], stdout=subprocess.PIPE, text=True)
        lines: list[dict[str, object]] = []
        reader = threading.Thread(target=lambda: lines.extend(
            json.loads(line) for line in events.stdout or ()), daemon=True)
        reader.start()

        def subscribed() -> bool:  # a bad command makes an event; once one shows, we listen
            obs.publish("mesh/cmd", b"not a command")
            return any(line["event"] == "rejected" for line in lines)

        try:
            wait_until(subscribed, 20, "mesh events to print an event")
            deploy(broker, "counter")
            wait_until(lambda: obs.running("counter"), 20, "counter running")
            stopped = mesh_cli("stop", "counter", broker=broker)
            assert stopped.returncode == 0, stopped.stderr
            assert json.loads(stopped.stdout) == {"app": "counter", "state": "stopping"}
            wait_until(lambda: not obs.running("counter"), 20, "counter gone")
            assert json.loads(mesh_cli("apps", "--json", broker=broker).stdout) == []
            wait_until(lambda: any(line["event"] == "stopped" for line in lines), 20,
                       "the stopped event")
        finally:
            events.terminate()
            events.wait(10)
            reader.join(10)
            if events.stdout:
                events.stdout.close()
        kinds = [line["event"] for line in lines if line["event"] != "rejected"]
        assert kinds == ["deployed", "started", "stopped"]
        assert all(line["node"] == "alpha" and line["kind"] == "event" for line in lines)
