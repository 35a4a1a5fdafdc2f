"""The `mesh` subcommands that run or drive a mesh: node, broker, demo, deploy, apps, ...

Kept apart from `mesh.cli` so that `mesh run` does not load amqtt and paho. The node, the
embedded broker and the demo are imported by the subcommands that run them, so that the client
commands (deploy, apps, nodes, events, send, stop, migrate) load neither wasmtime nor amqtt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh import keys, pairing, profile, wire
from mesh.accounts import Accounts
from mesh.authority import OPEN_MESH_WARNING, Authority, admitted, keep
from mesh.cli import read_module
from mesh.client import MeshClient, broker_from, find_broker
from mesh.discovery import Discovery
from mesh.errors import MeshError
from mesh.home import OperatorHome
from mesh.mqtt import BrokerAddress, Message
from mesh.trust import Rights

if TYPE_CHECKING:
    from mesh.device import Device

log = logging.getLogger("mesh")


def cmd_demo(args: argparse.Namespace) -> int:
    from mesh.demo import run_demo  # noqa: PLC0415 - loads wasmtime and amqtt: `mesh demo` only

    if not args.verbose:  # the demo narrates; logs would drown it
        logging.getLogger().setLevel(logging.WARNING)
        # amqtt logs a traceback when a client's connection is cut (the demo kills a node),
        # and asyncio one when amqtt drops a client that connected while another subscribed
        # (amqtt 0.12's "dictionary changed size during iteration"; the node connects again)
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return run_demo()


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise MeshError(f"{what} must look like KEY=VALUE, got {value!r}")
        pairs[key] = item
    return pairs


def cmd_node(args: argparse.Namespace) -> int:
    from mesh.device import Device  # noqa: PLC0415 - loads wasmtime and amqtt: `mesh node` only
    from mesh.node import NodeConfig  # noqa: PLC0415 - as above

    kit = profile.load(args.profile) if args.profile else profile.Profile()
    configured = args.id or kit.id
    state_dir = args.state_dir or kit.state_dir or profile.default_state_dir(configured)
    url = args.broker or os.environ.get("MESH_BROKER") or kit.broker
    broker = BrokerAddress.parse(url) if url else None
    if args.embedded_broker and broker is None:
        broker = broker_from(None)
    node_id = profile.identity(state_dir, configured)
    token = args.token or kit.token
    insecure = (args.insecure or kit.insecure) and not args.pair
    if not token and not insecure and not admitted(state_dir):
        asyncio.run(_pair(url, args.root, state_dir, node_id, mdns=not args.no_mdns))
    authority = Authority.load(state_dir, node_id, args.root, token)  # redeems a new token
    if authority.secure:
        if insecure:
            log.warning("--insecure is ignored: this device is admitted to a secure mesh")
        log.info("node %s joins %s", node_id, authority.describe())
        authority.check_caps(node_id, (*kit.caps, *args.cap))  # before the others refuse it
    else:
        log.warning("%s", OPEN_MESH_WARNING)
    config = NodeConfig(node_id=node_id,
                        broker=broker or broker_from(None), state_dir=state_dir, root=args.root,
                        caps=(*kit.caps, *(c for c in args.cap if c not in kit.caps)),
                        labels={**kit.labels, **_pairs(args.label, "--label")},
                        sensors={**kit.sensors, **dict(args.sensor)},
                        keepalive=args.keepalive or kit.keepalive or 5,
                        app_memory_bytes=kit.app_memory_bytes,
                        call_timeout_ms=kit.call_timeout_ms, token=token)
    device = Device(config, broker=broker, mdns=not args.no_mdns,
                    hosted=args.hosted_broker or kit.hosted_broker or "auto")
    return asyncio.run(run_device(device, embedded=args.embedded_broker))


async def _pair(url: str | None, root: str, state_dir: Path, node_id: str, *,
                mdns: bool) -> None:
    """Wait to be admitted (`mesh.pairing`), announced on the LAN too, and keep the
    admission."""
    key = keys.load_or_create(state_dir / "device.key")
    async with contextlib.AsyncExitStack() as stack:
        if mdns:
            lan = await stack.enter_async_context(Discovery(node_id, root))
            await lan.advertise_pending(keys.fingerprint(keys.public_bytes(key)))
        identity, admission, keyring = await pairing.wait_for_admission(
            await find_broker(url, root), node_id, key, root)
    keep(state_dir, identity, admission, keyring)


async def run_device(device: Device, *, embedded: bool) -> int:
    """Run the device until SIGTERM/SIGINT (its apps are handed over first)."""
    from mesh.broker import LIMITS_WARNING, EmbeddedBroker  # noqa: PLC0415 - amqtt, as above

    # Apps run on worker threads that call into wasmtime through ctypes, releasing the GIL on
    # every call; a short switch interval keeps them from waiting 5 ms to get it back.
    sys.setswitchinterval(0.0002)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("node %s, state in %s", device.config.node_id, device.config.state_dir)
    async with contextlib.AsyncExitStack() as stack:
        if embedded:
            address = device.config.broker
            accounts = Accounts.of_device(device.config.state_dir, device.config.root)
            await stack.enter_async_context(EmbeddedBroker(address.host, address.port,
                                                           device.config.keepalive, accounts))
            log.warning("%s", LIMITS_WARNING)
        await device.run(stopping)
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    return asyncio.run(run_broker(broker_from(args.broker)))


async def run_broker(address: BrokerAddress) -> int:
    """Serve the embedded broker alone until SIGTERM/SIGINT."""
    from mesh.broker import LIMITS_WARNING, EmbeddedBroker  # noqa: PLC0415 - amqtt: `mesh broker`

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with EmbeddedBroker(address.host, address.port):
        log.warning("%s", LIMITS_WARNING)
        await stopping.wait()
    return 0


def _spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"app": args.app, "requires": tuple(args.require),
            "prefers": _pairs(args.prefer, "--prefer"), "pin": args.on,
            "tick_ms": args.tick_ms, "checkpoint_ms": args.checkpoint_ms,
            "checkpoint_every": args.checkpoint_every, "timeout_ms": args.timeout_ms,
            "memory_limit": args.memory_mb << 20, "subscriptions": tuple(args.subscribe)}


def cmd_init(args: argparse.Namespace) -> int:
    home = OperatorHome(args.home)
    identity = home.init(args.name)
    print(f"created mesh {identity.id} in {home.path} (keep operator.key secret: it owns the "
          "mesh)\njoin a device: mesh admit --token, then give the token to `mesh node "
          "--token` or put it in the device's profile")
    return 0


def cmd_admit(args: argparse.Namespace) -> int:
    if args.device and args.token:
        raise MeshError("admit a device waiting for it (`mesh admit DEVICE`), or print a join "
                        "token (`mesh admit --token`)")
    if not args.device and not args.token:
        async def waiting() -> list[pairing.Pending]:
            return await pairing.waiting(await _broker(args), args.root)

        found = asyncio.run(waiting())
        for request in found:
            print(f"{request.device}  key {keys.fingerprint(request.key)}")
        if not found:
            print("no device waits to be admitted (a device started with no token waits)")
        return 0
    home = OperatorHome(args.home)
    hours = args.hours
    rights = Rights(caps=tuple(args.cap), may_deploy=not args.no_deploy,
                    expires_ms=int((time.time() + hours * 3600) * 1000) if hours else 0)
    if args.token:
        print(home.join_token(rights, root=args.root))
        return 0

    async def admit() -> str:
        return await pairing.admit(await _broker(args), home, args.device, rights,
                                   root=args.root)

    print(f"admitted {args.device} (key {asyncio.run(admit())}: the device logged the same "
          "when it started)")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    async def grant() -> list[str]:
        return await pairing.grant_all(await _broker(args), OperatorHome(args.home),
                                       root=args.root)

    granted = asyncio.run(grant())
    print(f"granted the mesh's data keys to {', '.join(granted) or 'no device'}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    async def revoke() -> tuple[int, list[str]]:
        return await pairing.revoke(await _broker(args), OperatorHome(args.home), args.device,
                                    root=args.root)

    generation, granted = asyncio.run(revoke())
    print(f"revoked {args.device}: every node refuses its records from now on; app memory is "
          f"sealed with data key {generation} from now on, granted to "
          f"{', '.join(granted) or 'no device'}")
    return 0


def cmd_access(args: argparse.Namespace) -> int:
    home = OperatorHome(args.home)
    if not home.exists():
        raise MeshError(f"no mesh in {home.path}: run `mesh access` where `mesh init` made it")
    broker = asyncio.run(_broker(args))
    if broker.password is None:
        raise MeshError(f"the broker at {broker} is not one a device of this mesh hosts (it "
                        "offers no TLS with the mesh's certificate): give tools the accounts "
                        "it has")
    cafile = None
    if broker.tls and broker.ca is not None:
        args.ca_file.write_text(broker.ca)
        cafile = str(args.ca_file.resolve())
    if args.json:
        print(json.dumps({"broker": str(broker), "host": broker.host, "port": broker.port,
                          "tls": broker.tls, "cafile": cafile, "username": broker.username,
                          "password": broker.password}))
        return 0
    print(f"broker    {broker}" + (f" (TLS: trust {cafile})" if cafile else " (no TLS)"))
    print(f"username  {broker.username}\npassword  {broker.password}")
    print(f"mosquitto_sub -h {broker.host} -p {broker.port}"
          + (f" --cafile {cafile}" if cafile else "")
          + f" -u {broker.username} -P {broker.password} -t '{args.root}/apps/+/out/#'")
    return 0


async def _broker(args: argparse.Namespace) -> BrokerAddress:
    """The mesh's broker, with the mesh's account (`mesh.accounts`) if this machine holds the
    mesh (the broker a device hosts in a secure mesh serves no one else)."""
    broker = await find_broker(args.broker, args.root)
    home = OperatorHome(args.home)
    return Accounts.of(home.keyring(), args.root).sign_in(broker) if home.exists() else broker


def _operator_key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    """The operator's key, to sign commands with, if this machine holds the mesh's."""
    home = OperatorHome(args.home)
    return home.key() if home.exists() else None


def cmd_client(args: argparse.Namespace) -> int:
    return asyncio.run(_client(args))


async def _client(args: argparse.Namespace) -> int:
    async with MeshClient(await _broker(args), args.root, _operator_key(args)) as mesh:
        if args.command == "events":
            async for event in mesh.events():
                print(_event_line(event, as_json=args.json), flush=True)
        if args.command == "watch":
            wire.check_name("app", args.app)
            seen = 0
            async for message in mesh.outputs(args.app):
                print(_output_line(message, args.app, args.root, as_json=args.json),
                      flush=True)
                seen += 1
                if seen == args.count:
                    return 0
        if args.command == "send":
            await mesh.send(args.app, args.payload.encode(), args.topic)
            return 0
        if args.command == "deploy":
            result = await mesh.deploy(_spec_fields(args), read_module(args.file))
        else:
            op = {"stop": "stop", "restart": "restart", "migrate": "migrate", "apps": "apps",
                  "nodes": "nodes"}
            result = await mesh.request(wire.Command(op=op[args.command],
                                                     app=getattr(args, "app", None),
                                                     to=getattr(args, "node", None),
                                                     fresh=getattr(args, "fresh", False)))
    print(json.dumps(result) if args.json or not isinstance(result, list)
          else _table(result))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return "-" if value is None else str(value)


def _clock(ms: int) -> str:
    """HH:MM:SS.mmm, local time."""
    return f"{time.strftime('%H:%M:%S', time.localtime(ms / 1000))}.{ms % 1000:03d}"


def _output_line(message: Message, app: str, root: str, *, as_json: bool) -> str:
    """One message an app published: when it came, its topic under `out/`, its payload (as
    text if it is UTF-8, else hex)."""
    now_ms = int(time.time() * 1000)
    sub = message.topic.removeprefix(f"{root}/apps/{app}/out").lstrip("/")
    payload = bytes(message.payload)
    try:
        text, is_text = payload.decode(), True
    except UnicodeDecodeError:
        text, is_text = payload.hex(), False
    if as_json:
        return json.dumps({"ts_ms": now_ms, "app": app, "topic": sub,
                           "payload" if is_text else "payload_hex": text})
    return f"{_clock(now_ms)} {sub or '-'} {text}"


def _event_line(event: wire.Event, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(wire.to_plain(event))
    parts = [_clock(event.ts_ms), event.node or "-", event.event]
    if event.app:
        parts.append(event.app)
    if event.reason:
        parts.append(f"({event.reason})")
    parts += [f"{k}={v}" for k, v in event.detail.items()]
    return " ".join(parts)


