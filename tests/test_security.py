"""A secure mesh (`mesh init`, devices joined with `mesh admit --token`) on Mosquitto, node
processes for real: only the operator, or a device allowed to deploy, steers it."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from functools import partial
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from mesh import keys, trust, wire
from mesh.errors import WireError
from mesh.privacy import HEADER_INDEX, Keyring, MissingKey, Opener
from tests.conftest import COUNTER_WAT, mesh
from tests.harness import (
    Cluster,
    NodeProcess,
    Observer,
    ballast_wasm,
    counter_hash,
    mesh_cli,
    read_checkpoint,
    sniffing,
    wait_count,
    wait_until,
)


def _init(home: Path) -> list[str]:
    created = mesh("init", "--home", home, "--name", "test")
    assert created.returncode == 0, created.stderr
    assert "created mesh m" in created.stdout
    again = mesh("init", "--home", home)
    assert again.returncode == 1
    assert "already holds a mesh" in again.stderr
    tokens = []
    for _ in range(3):
        admitted = mesh("admit", "--token", "--home", home)
        assert admitted.returncode == 0, admitted.stderr
        tokens.append(admitted.stdout.strip())
    return tokens


def _signed(key: Ed25519PrivateKey, signer: str, command: wire.Command,
            topic: str = "mesh/cmd") -> bytes:
    return trust.seal(key, signer, topic, wire.encode(command),
                      issued_ms=int(time.time() * 1000))


def _reply(obs: Observer, request: str) -> wire.Reply:
    data = wait_until(lambda: obs.replies.get(request), 15, f"the reply to {request}")
    return wire.decode(wire.Reply, data) if data[:1] != b"{" else wire.Reply(**{
        k: v for k, v in json.loads(data).items() if k in ("id", "ok", "result", "error")})


def _secure_pair(broker: str, cluster: Cluster, tmp_path: Path) -> Path:
    """A secure mesh of alpha and beta, joined with tokens; the operator's home."""
    home = tmp_path / "operator"
    token_a, token_b, _ = _init(home)
    cluster.start("alpha", broker, "--token", token_a)
    cluster.start("beta", broker, "--token", token_b)
    return home


def _deploy_counter(obs: Observer, broker: str, cluster: Cluster, home: Path,
                    *options: str) -> str:
    """Deploy the counter app, signed by the operator; the node it runs on."""
    wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 20, "both nodes to join")
    deployed = mesh_cli("deploy", "counter", str(COUNTER_WAT), *options, "--home", str(home),
                        broker=broker)
    assert deployed.returncode == 0, deployed.stderr + cluster.logs()
    host: str = wait_until(lambda: obs.running("counter"), 20, "counter to run")
    return host


def test_only_the_operator_or_an_admitted_device_steers_a_secure_mesh(
        any_broker: str, cluster: Cluster, tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    with Observer(any_broker) as obs:
        _deploy_counter(obs, any_broker, cluster, home)
        obs.publish("mesh/apps/counter/in", b"one")
        wait_count(obs, "counter", 1)

        # Anyone can publish a command; without the operator's signature it changes nothing.
        obs.publish("mesh/cmd", b'{"op":"stop","app":"counter","id":"anon-stop"}')
        reply = _reply(obs, "anon-stop")
        assert not reply.ok
        assert "must be signed by the operator" in (reply.error or "")
        anonymous = mesh_cli("stop", "counter", "--home", str(tmp_path / "nowhere"),
                             broker=any_broker)
        assert anonymous.returncode == 1
        assert "must be signed by the operator" in anonymous.stderr
        # Nor does a module anyone uploads, with a plain deploy command: it runs nowhere.
        uploaded = mesh_cli("deploy", "intruder", str(COUNTER_WAT), "--home",
                            str(tmp_path / "nowhere"), broker=any_broker)
        assert uploaded.returncode == 1
        assert "must be signed by the operator" in uploaded.stderr

        # Commands are taken in order: once a later, genuine one is answered, an earlier one
        # that got no answer was refused.
        operator = keys.load(home / "operator.key")

        def answered_after(request: str) -> bool:
            after = f"after-{request}"
            obs.publish("mesh/cmd", _signed(operator, trust.OPERATOR, wire.Command(
                op="restart", app="counter", id=after)))
            assert "has not failed" in (_reply(obs, after).error or "")  # past the check
            return request in obs.replies

        # A key that is not the operator's, calling itself the operator, gets no answer at all.
        rogue = keys.generate()
        obs.publish("mesh/cmd", _signed(rogue, trust.OPERATOR,
                                        wire.Command(op="stop", app="counter", id="rogue")))
        assert not answered_after("rogue")
        assert any("not signed by the operator" in (e.reason or "") for e in obs.events)

        # A command the operator signed is taken once; the same bytes again are a replay.
        restart = _signed(operator, trust.OPERATOR,
                          wire.Command(op="restart", app="counter", id="replayed"))
        obs.publish("mesh/cmd", restart)
        assert "has not failed" in (_reply(obs, "replayed").error or "")
        del obs.replies["replayed"]
        obs.publish("mesh/cmd", restart)
        assert not answered_after("replayed")  # the same bytes: refused as a replay

        # An admitted device may steer (it was allowed to deploy) until it is revoked.
        beta_key = keys.load(tmp_path / "beta" / "device.key")
        obs.publish("mesh/cmd", _signed(beta_key, "beta",
                                        wire.Command(op="restart", app="counter", id="b1")))
        assert "has not failed" in (_reply(obs, "b1").error or "")
        revoked = mesh_cli("revoke", "beta", "--home", str(home), broker=any_broker)
        assert revoked.returncode == 0, revoked.stderr
        # The broker passes the revocation on before any command published after it.
        obs.publish("mesh/cmd", _signed(beta_key, "beta",
                                        wire.Command(op="restart", app="counter", id="b2")))
        assert not answered_after("b2")  # as b1, but after the revocation

        obs.publish("mesh/apps/counter/in", b"two")
        assert wait_count(obs, "counter", 2).startswith(b"2 ")
        listed = mesh_cli("apps", "--json", broker=any_broker)
        assert listed.returncode == 0, listed.stderr
        assert [row["app"] for row in json.loads(listed.stdout)] == ["counter"]
    assert cluster["alpha"].proc is not None
    assert cluster["alpha"].proc.poll() is None


def test_a_join_token_admits_one_device_only(broker: str, cluster: Cluster,
                                             tmp_path: Path) -> None:
    token, _, _ = _init(tmp_path / "operator")
    cluster.start("alpha", broker, "--token", token)
    with Observer(broker) as obs:
        wait_until(lambda: "alpha" in obs.nodes, 20, "alpha to join")
        cluster.start("intruder", broker, "--token", token)
        wait_until(lambda: any("was used already, by 'alpha'" in (e.reason or "")
                               for e in obs.events), 20, "the second use to be refused")


def test_a_node_with_no_admission_waits_for_one_unless_told_to_run_an_open_mesh(
        broker: str, cluster: Cluster) -> None:
    with Observer(broker) as obs:
        waiting = NodeProcess("newcomer", broker, cluster.workdir).start()
        cluster.nodes["newcomer"] = waiting
        wait_until(lambda: "waits to be admitted" in waiting.log(), 20, "it to wait")
        plain = cluster.start("plain", broker, "--insecure")
        wait_until(lambda: "OPEN mesh (--insecure)" in plain.log(), 20, "the warning")
        wait_until(lambda: "plain" in obs.nodes, 20, "the open node to join")
        assert "newcomer" not in obs.nodes  # it runs nothing until admitted


def test_a_secure_mesh_runs_only_specs_signed_by_whom_may_deploy(
        any_broker: str, cluster: Cluster, tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    kept = tmp_path / "alpha" / "specs"  # the specs alpha took, as it took them

    def apps() -> list[str]:
        """Answered by alpha (the lowest id) once it took every message published before."""
        listed = mesh_cli("apps", "--json", broker=any_broker)
        assert listed.returncode == 0, listed.stderr
        return [row["app"] for row in json.loads(listed.stdout)]

    with Observer(any_broker) as obs:
        assert _deploy_counter(obs, any_broker, cluster, home, "--on", "alpha") == "alpha"
        obs.publish("mesh/apps/counter/in", b"one")
        wait_count(obs, "counter", 1)
        pinned_to_alpha = (kept / "counter.cbor").read_bytes()
        module = wire.decode(wire.AppSpec, trust.plain(pinned_to_alpha)).module

        # A spec anyone publishes, plain or signed by a key the mesh does not know: not run.
        plain = wire.AppSpec(app="intruder", module=module)
        obs.publish("mesh/apps/intruder/spec", wire.encode(plain), retain=True)
        rogue = keys.generate()
        obs.publish("mesh/apps/rogue/spec", trust.seal(
            rogue, trust.OPERATOR, "mesh/apps/rogue/spec",
            wire.encode(wire.AppSpec(app="rogue", module=module)),
            issued_ms=int(time.time() * 1000)), retain=True)
        # A bare clear of a spec stops nothing (a stop is a signed tombstone).
        obs.publish("mesh/apps/counter/spec", b"", retain=True)
        assert apps() == ["counter"]
        assert sorted(path.name for path in kept.iterdir()) == ["counter.cbor"]

        # The operator moves the app; the old spec replayed does not move it back.
        moved = mesh_cli("migrate", "counter", "beta", "--home", str(home), broker=any_broker)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        wait_until(lambda: obs.running("counter") == "beta", 20, "counter on beta")
        pinned_to_beta = (kept / "counter.cbor").read_bytes()
        assert wire.decode(wire.AppSpec, trust.plain(pinned_to_beta)).pin == "beta"
        obs.publish("mesh/apps/counter/spec", pinned_to_alpha, retain=True)
        assert apps() == ["counter"]
        assert (kept / "counter.cbor").read_bytes() == pinned_to_beta
        obs.publish("mesh/apps/counter/in", b"two")
        assert wait_count(obs, "counter", 2).startswith(b"2 ")
        assert obs.running("counter") == "beta"

        stopped = mesh_cli("stop", "counter", "--home", str(home), broker=any_broker)
        assert stopped.returncode == 0, stopped.stderr
        wait_until(lambda: obs.running("counter") is None, 20, "counter stopped")
        assert apps() == []
        # The spec signed before the stop, replayed, does not bring the app back.
        obs.publish("mesh/apps/counter/spec", pinned_to_beta, retain=True)
        assert apps() == []


def test_a_forged_node_or_owner_record_moves_nothing(any_broker: str, cluster: Cluster,
                                                      tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    with Observer(any_broker) as obs:
        host = _deploy_counter(obs, any_broker, cluster, home)
        obs.publish("mesh/apps/counter/in", b"one")
        wait_count(obs, "counter", 1)
        owner = obs.owners["counter"]

        # Members that are not admitted devices: placement would pick them (more caps, made-up
        # ids that win by hash), but no node counts them.
        rogue = keys.generate()
        for fake in ("zz-attacker", "aa-attacker", "00", "beta"):
            record = wire.NodeRecord(id=fake, caps=("gpio", "temp"))
            topic = f"mesh/nodes/{fake}"
            if fake != "beta":
                obs.publish(topic, wire.encode(record), retain=True)
            obs.publish(topic, trust.seal(rogue, fake, topic, wire.encode(record),
                                          issued_ms=int(time.time() * 1000)), retain=True)
        # An owner record naming an attacker at a higher epoch: plain, and signed by a stranger.
        forged = wire.OwnerRecord("zz-attacker", owner.epoch + 5, owner.seq)
        obs.publish("mesh/apps/counter/owner", wire.encode(forged), retain=True)
        obs.publish("mesh/apps/counter/owner", trust.seal(
            rogue, "zz-attacker", "mesh/apps/counter/owner", wire.encode(forged),
            issued_ms=int(time.time() * 1000)), retain=True)

        # Refused for its signature (not merely overwritten again by beta), and beta puts
        # back its own record over the forged one.
        wait_until(lambda: any("mesh/nodes/beta: a record at mesh/nodes/beta not signed by "
                               "beta" in (e.reason or "") for e in obs.events), 15,
                   "the forged record of beta to be refused")
        wait_until(lambda: obs.nodes["beta"].started_ms > 0, 15, "beta's own record back")
        listed = mesh_cli("nodes", "--json", broker=any_broker)  # answered after all of the above
        assert listed.returncode == 0, listed.stderr
        assert sorted(row["id"] for row in json.loads(listed.stdout)) == ["alpha", "beta"]
        for n in range(2, 6):
            obs.publish("mesh/apps/counter/in", f"in-{n}".encode())
        assert wait_count(obs, "counter", 5).startswith(b"5 ")
        assert obs.running("counter") == host
        assert not obs.has_event("migrating", "counter")
        assert not obs.has_event("fenced", "counter")


def test_a_forged_checkpoint_is_never_restored(any_broker: str, cluster: Cluster,
                                               tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    with Observer(any_broker) as obs:
        host = _deploy_counter(obs, any_broker, cluster, home, "--checkpoint-every", "1")
        for n in range(3):
            obs.publish("mesh/apps/counter/in", f"in-{n}".encode())
        wait_count(obs, "counter", 3)
        owner = obs.owners["counter"]
        # An old checkpoint that claims to be the newest, unsigned and signed by a stranger:
        # every node refuses it, so the failover below cannot take it.
        forged = _forged_checkpoint(tmp_path / host, owner.epoch + 3, owner.seq + 50)
        topic = "mesh/apps/counter/snapshot"
        obs.publish(topic, wire.encode(forged), retain=True)
        obs.publish(topic, trust.seal(keys.generate(), host, topic, wire.encode(forged),
                                      issued_ms=int(time.time() * 1000)), retain=True)
        # Nor does clearing the checkpoint and the owner record (which no one can sign):
        # gone from the broker, but not from the nodes.
        obs.publish(topic, b"", retain=True)
        obs.publish("mesh/apps/counter/owner", b"", retain=True)
        listed = mesh_cli("apps", "--json", broker=any_broker)  # answered after the forgeries
        assert listed.returncode == 0, listed.stderr
        cluster[host].proc.kill()  # type: ignore[union-attr]
        other = "beta" if host == "alpha" else "alpha"
        wait_until(lambda: obs.running("counter") == other, 30, "the failover")
        obs.publish("mesh/apps/counter/in", b"in-3")
        assert wait_count(obs, "counter", 4).startswith(b"4 ")  # from the genuine state


def _forged_checkpoint(state_dir: Path, epoch: int, seq: int) -> wire.Snapshot:
    """The app's first checkpoint (kept on the host's disk), claiming to be a newer one."""
    kept = wire.decode(wire.Snapshot, (state_dir / "apps" / "counter.cbor").read_bytes())
    return dataclasses.replace(kept, epoch=epoch, seq=seq)


def test_a_device_acts_only_within_its_admission(broker: str, cluster: Cluster,
                                                 tmp_path: Path) -> None:
    home = tmp_path / "operator"
    token, _, _ = _init(home)
    narrow = mesh("admit", "--token", "--cap", "gpio", "--home", home).stdout.strip()
    brief = mesh("admit", "--token", "--hours", "0.002", "--home", home).stdout.strip()
    cluster.start("alpha", broker, "--token", token)
    with Observer(broker) as obs:
        wait_until(lambda: "alpha" in obs.nodes, 20, "alpha to join")
        # A device admitted for gpio that claims more: it refuses to start, saying why.
        refused = mesh("node", "--id", "greedy", "--broker", broker, "--no-mdns",
                       "--state-dir", tmp_path / "greedy", "--token", narrow, "--cap", "gpio",
                       "--cap", "camera", timeout=30)
        assert refused.returncode == 1
        assert "not admitted with: camera" in refused.stderr
        # An admission that expires (after 7.2 s): the device acts until then, not after.
        cluster.start("brief", broker, "--token", brief)
        wait_until(lambda: "brief" in obs.nodes, 20, "brief to join")
        key = keys.load(tmp_path / "brief" / "device.key")
        operator = keys.load(home / "operator.key")

        def answered(request: str) -> bool:
            obs.publish("mesh/cmd", _signed(key, "brief", wire.Command(op="apps", id=request)))
            after = f"after-{request}"  # commands are taken in order: a barrier
            obs.publish("mesh/cmd", _signed(operator, trust.OPERATOR,
                                            wire.Command(op="apps", id=after)))
            _reply(obs, after)
            return request in obs.replies

        signed = _signed(key, "brief", wire.Command(op="restart", app="nothing", id="early"))
        obs.publish("mesh/cmd", signed)
        assert "no app 'nothing'" in (_reply(obs, "early").error or "")  # past the check
        wait_until(lambda: not answered(f"late-{time.monotonic_ns()}"), 20,
                   "brief's admission to expire")


def test_a_device_waiting_to_be_admitted_joins_when_the_operator_admits_it(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    home = tmp_path / "operator"
    token, _, _ = _init(home)
    cluster.start("alpha", broker, "--token", token)
    kitchen = cluster.start("kitchen", broker, "--pair")
    with Observer(broker) as obs:
        wait_until(lambda: "alpha" in obs.nodes, 20, "alpha to join")
        shown = wait_until(lambda: _fingerprint(kitchen.log()), 20, "kitchen to wait")
        assert "kitchen" not in obs.nodes  # it runs nothing until admitted
        listed = mesh_cli("admit", "--home", str(home), broker=broker)
        assert listed.returncode == 0, listed.stderr
        assert f"kitchen  key {shown}" in listed.stdout
        nobody = mesh_cli("admit", "garage", "--home", str(home), broker=broker, timeout=30)
        assert nobody.returncode == 1
        assert "no device 'garage' waits to be admitted" in nobody.stderr
        admitted = mesh_cli("admit", "kitchen", "--home", str(home), broker=broker)
        assert admitted.returncode == 0, admitted.stderr
        assert f"key {shown}" in admitted.stdout  # what the operator compares
        wait_until(lambda: "kitchen" in obs.nodes, 20, f"kitchen to join\n{cluster.logs()}")
        deployed = mesh_cli("deploy", "counter", str(COUNTER_WAT), "--on", "kitchen",
                            "--home", str(home), broker=broker)
        assert deployed.returncode == 0, deployed.stderr
        wait_until(lambda: obs.running("counter") == "kitchen", 20, "counter on kitchen")


def _runs_on(obs: Observer, node: str) -> bool:
    return obs.running("counter") == node


def _fingerprint(log: str) -> str | None:
    marker = "check that it shows key "
    at = log.find(marker)
    return log[at + len(marker):at + len(marker) + 16] if at >= 0 else None


def test_app_memory_is_sealed_and_a_tampered_chunk_is_refused(any_broker: str, cluster: Cluster,
                                                               tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    app = tmp_path / "ballast.wasm"
    app.write_bytes(ballast_wasm(64, checksum_end=4 << 20))  # 4 MiB of dense memory: chunks
    topic = "mesh/apps/ballast/snapshot"
    opener = Opener(Keyring.load(home / "data-keys.cbor"))
    with Observer(any_broker) as obs, sniffing(any_broker, "mesh/apps/ballast/#") as seen:
        wait_until(lambda: {"alpha", "beta"} <= set(obs.nodes), 20, "both nodes to join")
        deployed = mesh_cli("deploy", "ballast", str(app), "--on", "alpha",
                            "--checkpoint-every", "1", "--home", str(home), broker=any_broker)
        assert deployed.returncode == 0, deployed.stderr + cluster.logs()
        wait_until(lambda: obs.running("ballast") == "alpha", 30, "ballast on alpha")
        obs.publish("mesh/apps/ballast/in", b"x")
        first = wait_until(lambda: obs.last_output("ballast"), 30, "an answer")

        def checkpoint() -> wire.Snapshot | None:  # the one taken after the input
            if topic not in seen:
                return None
            snap = read_checkpoint(topic, seen[topic])
            return snap if snap.host.delivered == 1 else None

        snap = wait_until(checkpoint, 30, "the checkpoint after the input")
        external = snap.memory.external
        assert external is not None
        assert external.count >= 2
        names = [f"{topic}/{external.first + i}" for i in range(external.count)]
        wait_until(lambda: all(name in seen for name in names), 30, "its chunks")

        # What any subscriber gets is ciphertext: neither header nor chunks read as memory;
        # the operator's data keys open them.
        with pytest.raises(WireError):
            wire.decode(wire.Snapshot, trust.plain(seen[topic]))
        index = external.first + 1
        sealed = seen[names[1]]
        plain = opener.piece(topic, index, sealed)
        assert len(plain) > 1 << 20
        assert plain[4096:4160] not in sealed

        # A chunk tampered with on the broker is refused by every node, which keeps its own.
        tampered = bytearray(sealed)
        tampered[len(tampered) // 2] ^= 0xFF
        obs.publish(names[1], bytes(tampered), retain=True)
        wait_until(lambda: any(f"{names[1]}: a checkpoint piece at {topic} does not decrypt"
                               in (e.reason or "") for e in obs.events), 15,
                   "the tampered chunk to be refused")

        cluster["alpha"].proc.kill()  # type: ignore[union-attr]
        wait_until(lambda: obs.running("ballast") == "beta", 30, "the failover to beta")
        obs.publish("mesh/apps/ballast/in", b"y")
        wait_until(lambda: len(obs.outputs["ballast"]) >= 2, 30, "a second answer")
        second = obs.outputs["ballast"][-1]
        assert int.from_bytes(second[:8], "little") == 2
        assert second[8:] == first[8:], "memory changed on the way"


def test_a_revoked_device_loses_its_apps_and_cannot_read_what_comes_after(
        broker: str, cluster: Cluster, tmp_path: Path) -> None:
    home = _secure_pair(broker, cluster, tmp_path)
    topic = "mesh/apps/counter/snapshot"
    with Observer(broker) as obs, sniffing(broker, topic) as seen:
        host = _deploy_counter(obs, broker, cluster, home, "--checkpoint-every", "1")
        if host != "beta":
            moved = mesh_cli("migrate", "counter", "beta", "--home", str(home), broker=broker)
            assert moved.returncode == 0, moved.stderr
            wait_until(lambda: obs.running("counter") == "beta", 20, "counter on beta")
        sent = [b"one", b"two"]
        for payload in sent:
            obs.publish("mesh/apps/counter/in", payload)
        wait_count(obs, "counter", 2)
        # A revocation anyone publishes (a bare clear, garbage) takes no one out.
        obs.publish("mesh/revoked/beta", b"", retain=True)
        obs.publish("mesh/revoked/alpha", b"\xa1garbage", retain=True)
        obs.publish("mesh/cmd", b'{"op":"apps","id":"barrier"}')  # after them, on each node
        wait_until(lambda: "barrier" in obs.replies, 20, "the nodes to take them")
        assert obs.running("counter") == "beta"
        assert cluster["beta"].proc is not None
        assert cluster["beta"].proc.poll() is None

        revoked = mesh_cli("revoke", "beta", "--home", str(home), broker=broker)
        assert revoked.returncode == 0, revoked.stderr
        assert "sealed with data key 2 from now on, granted to alpha" in revoked.stdout
        # Its app moves to a device still admitted and goes on from its state.
        wait_until(lambda: obs.running("counter") == "alpha", 30, "counter to leave beta")
        sent.append(b"three")
        obs.publish("mesh/apps/counter/in", b"three")
        assert wait_count(obs, "counter", 3) == f"3 {counter_hash(sent)}".encode()

        # What is checkpointed now is sealed with the new key: alpha was given it, beta not.
        def sealed_with(generation: int) -> bool:
            header = trust.plain(seen.get(topic, b""))
            return header[4:8] == generation.to_bytes(4, "big")

        wait_until(lambda: sealed_with(2), 20, "a checkpoint sealed with data key 2")
        assert Keyring.load(tmp_path / "alpha" / "data-keys.cbor").newest == 2
        beta_keys = Keyring.load(tmp_path / "beta" / "data-keys.cbor")
        assert beta_keys.newest == 1
        with pytest.raises(MissingKey):
            Opener(beta_keys).piece(topic, HEADER_INDEX, trust.plain(seen[topic]))


def test_a_replayed_handover_or_old_owner_record_changes_nothing(
        any_broker: str, cluster: Cluster, tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    owner_topic, snap_topic = "mesh/apps/counter/owner", "mesh/apps/counter/snapshot"
    with Observer(any_broker) as obs, sniffing(any_broker, "mesh/apps/counter/#") as seen:
        first = _deploy_counter(obs, any_broker, cluster, home, "--checkpoint-every", "1")
        other = "beta" if first == "alpha" else "alpha"
        sent: list[bytes] = []
        recorded: dict[int, tuple[bytes, bytes]] = {}  # epoch -> its owner record, checkpoint

        def feed_and_record(payload: bytes) -> None:
            sent.append(payload)
            obs.publish("mesh/apps/counter/in", payload)
            wait_count(obs, "counter", len(sent))
            epoch = obs.owners["counter"].epoch

            def stored() -> bool:
                if snap_topic not in seen:
                    return False
                snap = read_checkpoint(snap_topic, seen[snap_topic])
                return (snap.epoch, snap.host.delivered) == (epoch, len(sent))

            wait_until(stored, 20, f"checkpoint {len(sent)} at epoch {epoch}")
            recorded[epoch] = (seen[owner_topic], seen[snap_topic])

        feed_and_record(b"one")
        for target in (other, first):  # a handover there, and back
            moved = mesh_cli("migrate", "counter", target, broker=any_broker)
            assert moved.returncode == 0, moved.stderr
            wait_until(partial(_runs_on, obs, target), 20, f"counter on {target}")
            feed_and_record(f"after the move to {target}".encode())
        assert sorted(recorded) == [1, 2, 3]

        # Replayed as they were: the first owner record, and the handover to the other node.
        for epoch in (1, 2):
            owner, snap = recorded[epoch]
            obs.publish(snap_topic, snap, retain=True)
            obs.publish(owner_topic, owner, retain=True)
        obs.publish("mesh/cmd", b'{"op":"apps","id":"barrier"}')  # after them, on each node
        wait_until(lambda: "barrier" in obs.replies, 20, "the nodes to take the replays")
        assert obs.running("counter") == first
        feed_and_record(b"four")
        assert not obs.has_event("fenced", "counter")

        # The node left running it goes on from the genuine newest state, at a newer epoch.
        cluster[first].proc.kill()  # type: ignore[union-attr]
        wait_until(lambda: obs.running("counter") == other, 30, "the failover")
        sent.append(b"five")
        obs.publish("mesh/apps/counter/in", b"five")
        assert wait_count(obs, "counter", 5) == f"5 {counter_hash(sent)}".encode()
        assert obs.owners["counter"].epoch == 4


def test_an_apps_session_cannot_be_taken_with_its_client_id(any_broker: str, cluster: Cluster,
                                                           tmp_path: Path) -> None:
    home = _secure_pair(any_broker, cluster, tmp_path)
    with Observer(any_broker) as obs:
        host = _deploy_counter(obs, any_broker, cluster, home)
        sent = [b"one"]
        obs.publish("mesh/apps/counter/in", b"one")
        wait_count(obs, "counter", 1)
        # A stranger connects as the app's session would be named in an open mesh, keeping
        # the session: a resumed session gets its queued inputs without subscribing.
        stolen: list[bytes] = []
        connected = threading.Event()
        host_name, port = any_broker.removeprefix("mqtt://").split(":")
        thief = paho.Client(CallbackAPIVersion.VERSION2, client_id="mesh-app-counter",
                            clean_session=False)
        thief.on_message = lambda _c, _u, message: stolen.append(bytes(message.payload))
        thief.on_connect = lambda *_: connected.set()
        thief.connect(host_name, int(port))
        thief.loop_start()
        try:
            wait_until(connected.is_set, 10, "the stranger to connect")
            for n in range(2, 6):
                sent.append(f"in-{n}".encode())
                obs.publish("mesh/apps/counter/in", sent[-1])
            assert wait_count(obs, "counter", 5) == f"5 {counter_hash(sent)}".encode()
        finally:
            thief.loop_stop()
            thief.disconnect()
        assert stolen == []
        assert obs.running("counter") == host
