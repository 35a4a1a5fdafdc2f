"""Commands to the mesh and their replies (the RPC on `<root>/cmd`), and the app table.

A command on `<root>/cmd` is answered by one node, the live member with the lowest id (every
node knows which); one on `<root>/nodes/<id>/cmd` by that node. The reply goes to
`<root>/replies/<id>`, as JSON if the command came as JSON.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mesh import actions, wire
from mesh.errors import MeshError, TrustError, WireError
from mesh.placement import Placement

if TYPE_CHECKING:
    from mesh.node import Node

log = logging.getLogger(__name__)

DEPLOY_MODULE_WAIT_S = 3.0
# Commands that change the mesh: refused while the broker lacks the mesh's marker (a stop taken
# there would be undone by a survivor giving the broker back what it held).
STEERING = frozenset({"deploy", "stop", "migrate", "restart"})
MARKER_WAIT_S = 2.0  # how long such a command waits for the marker (a node just joining)


def receive(node: Node, payload: bytes, *, everyone: bool) -> None:
    """A command arrived; answer it in the background if it is this node's to answer."""
    if everyone and min(node.live_members()) != node.id:
        return  # the node with the lowest id answers commands to everyone
    topic = node.topics.cmd if everyone else node.topics.node_cmd(node.id)
    try:
        body, signer = node.authority.command(topic, payload)
        command, as_json = wire.decode_command(body)
    except (WireError, TrustError) as exc:
        node.event("rejected", reason=f"command: {exc}", detail={"source": "cmd"})
        return
    node.spawn(_answer(node, command, as_json, signer), f"command-{command.op}")


async def _answer(node: Node, command: wire.Command, as_json: bool,
                  signer: str | None = None) -> None:
    try:
        if command.op in STEERING and not node.authority.may_steer(signer):
            raise MeshError(f"{command.op} changes the mesh: it must be signed by the operator "
                            "(`mesh init` on the machine it is sent from) or by a device "
                            f"allowed to deploy{'' if signer is None else f', not {signer}'}")
        reply = wire.Reply(id=command.id or "-", ok=True, result=await _perform(node, command))
    except MeshError as exc:
        reply = wire.Reply(id=command.id or "-", ok=False, error=str(exc))
        node.event("rejected", app=command.app, reason=f"{command.op}: {exc}")
    except Exception:
        log.exception("command %s failed", command.op)
        reply = wire.Reply(id=command.id or "-", ok=False,
                           error=f"{command.op} failed inside the node; see its log")
    if command.id:
        data = wire.encode_json(reply) if as_json else wire.encode(reply)
        await node.control.publish(node.topics.reply(command.id), data)


async def _perform(node: Node, command: wire.Command) -> Any:
    control, topics = node.control, node.topics
    if command.op in STEERING and not await node.until_marked(MARKER_WAIT_S):
        raise MeshError("the broker lost its store and the mesh is giving it back what it "
                        "held; try again in a moment")
    match command.op:
        case "ping":
            return {"node": node.id}
        case "nodes":
            return [{"id": m.id, "caps": list(m.caps), "labels": m.labels,
                     "apps": list(m.apps), "online": True}
                    for m in sorted(node.live_members().values(), key=lambda m: m.id)]
        case "apps":
            return app_table(node)
        case "deploy":
            assert command.spec is not None
            return await _deploy(node, command.spec)
        case "stop":
            name = _known_app(node, command)
            tombstone = wire.Tombstone(name, int(time.time() * 1000))
            topic = topics.app(name, "stopped")
            await control.publish(topic, node.authority.sign_record(
                topic, wire.encode(tombstone), after_ms=node.desired.latest(name)), retain=True)
            await control.publish(topics.app(name, "spec"), b"", retain=True)
            return {"app": name, "state": "stopping"}
        case "migrate":
            name = _known_app(node, command)
            target = command.to
            if target not in node.live_members():
                raise MeshError(f"no node {target!r} in the mesh")
            spec = replace(node.specs[name], pin=target)
            topic = topics.app(name, "spec")
            await control.publish(topic, node.authority.sign_record(
                topic, wire.encode(spec), after_ms=node.desired.latest(name)), retain=True)
            return {"app": name, "to": target}
        case "restart":
            name = _known_app(node, command)
            owner = node.owners.get(name)
            if command.fresh:
                return await _start_over(node, name)
            if owner is not None and owner.node == node.id:
                return await restart(node, name)
            if owner is None or owner.node not in node.live_members():
                raise MeshError(f"app {name!r} has no owner in the mesh to restart it from its "
                                "newest checkpoint; `mesh restart --fresh` starts it over")
            # Its owner restarts it; the reply is ours.
            topic = topics.node_cmd(owner.node)
            await control.publish(topic, node.authority.sign_command(
                topic, wire.encode(replace(command, id=None))))
            return {"app": name, "node": owner.node, "state": "restarting"}
        case "send":
            name = _known_app(node, command)
            topic = topics.app(name, "in" + (f"/{command.topic}" if command.topic else ""))
            await control.publish(topic, command.payload or b"")
            return {"app": name}
    raise MeshError(f"op {command.op!r} is not supported")  # pragma: no cover


async def restart(node: Node, name: str) -> dict[str, Any]:
    """Start a failed app here again, from its newest checkpoint."""
    hosted = node.hosted.get(name)
    if hosted is None or hosted.state != "failed":
        raise MeshError(f"app {name!r} has not failed; nothing to restart")
    node.hosted.pop(name)
    await hosted.close()
    node.event("restarted", app=name, reason=hosted.failure)
    node.changed()
    return {"app": name, "node": node.id, "state": "restarting"}


async def _start_over(node: Node, name: str) -> dict[str, Any]:
    """The operator's way to start an app over: its checkpoint dropped, then ownership taken
    here at the next epoch with no checkpoint to go on from (the owner, if any, is fenced)."""
    owner = node.owners.get(name)
    topics = node.topics
    for topic in (*node.inbox.snapshot_parts(name), topics.app(name, "snapshot")):
        await node.control.publish(topic, b"", retain=True)
    record = wire.OwnerRecord(node.id, (owner.epoch if owner else 0) + 1)
    node.owners[name] = record
    await node.publish_record(topics.app(name, "owner"), record)
    node.event("restarted", app=name, reason="started over (--fresh): its state dropped")
    node.changed()
    return {"app": name, "node": node.id, "state": "restarting", "fresh": True}


def _known_app(node: Node, command: wire.Command) -> str:
    name = command.app
    if name is None or name not in node.specs:
        raise MeshError(f"no app {name!r} is deployed")
    return name


async def _deploy(node: Node, spec: wire.AppSpec) -> dict[str, Any]:
    try:
        await actions.module(node, spec.module, wait=DEPLOY_MODULE_WAIT_S)
    except MeshError as exc:
        raise MeshError(f"cannot deploy {spec.app}: {exc}") from None
    members = node.live_members()
    if spec.pin and spec.pin not in members:
        raise MeshError(f"no node {spec.pin!r} in the mesh")
    if spec.app in node.tombstones:  # deployed again after a stop
        await node.control.publish(node.topics.app(spec.app, "stopped"), b"", retain=True)
    topic = node.topics.app(spec.app, "spec")
    await node.control.publish(topic, node.authority.sign_record(
        topic, wire.encode(spec), after_ms=node.desired.latest(spec.app)), retain=True)
    target = Placement(members.values()).best(spec)
    node.event("deployed", app=spec.app, detail={"module": spec.module, "node": target})
    if target is None:
        return {"app": spec.app, "state": "pending",
                "reason": f"no node has all of: {', '.join(spec.requires)}"}
    return {"app": spec.app, "node": target, "state": "pending"}


def app_table(node: Node) -> list[dict[str, Any]]:
    """[{app, node, state, epoch, module, reason}] as `mesh apps --json` prints it; `reason`
    says why an app failed (None otherwise)."""
    members = node.live_members()
    placement = Placement(members.values())
    rows = []
    for name, spec in sorted(node.specs.items()):
        owner = node.owners.get(name)
        owner_id = owner.node if owner else None
        host = members.get(owner_id) if owner_id else None
        reason = None
        if owner_id == node.id and name in node.hosted:
            hosted = node.hosted[name]
            state = "failed" if hosted.state == "failed" else "running"
            reason = hosted.failure
        elif failed := [m.failed[name] for m in members.values() if name in m.failed]:
            state, reason = "failed", failed[0]  # where it failed, or could not start
        elif host is not None and name in host.apps:
            state = "running"
        else:
            state = "pending"
        if state == "running" and placement.best(spec) not in (None, owner_id):
            state = "migrating"
        rows.append({"app": name, "node": owner_id, "state": state,
                     "epoch": owner.epoch if owner else 0, "module": spec.module,
                     "reason": reason})
    return rows
