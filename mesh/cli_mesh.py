"""The `mesh` subcommands that run or drive a mesh: node, broker, demo, deploy, apps, ...

Kept apart from `mesh.cli` so that `mesh run` does not load amqtt and paho.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mesh import wire
from mesh.broker import LIMITS_WARNING, EmbeddedBroker
from mesh.cli import read_module
from mesh.client import MeshClient, broker_from
from mesh.demo import run_demo
from mesh.errors import BrokerError, MeshError
from mesh.mqtt import BrokerAddress
from mesh.node import Node, NodeConfig

log = logging.getLogger("mesh")


def default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])
    return name.strip("-_.")[:64] or "node"


def default_state_dir(node_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "liquid-mesh" / node_id


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.verbose:  # the demo narrates; logs would drown it
        logging.getLogger().setLevel(logging.WARNING)
        # amqtt logs a traceback when a client's connection is cut (the demo kills a node)
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
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
    node_id = args.id or default_node_id()
    config = NodeConfig(node_id=node_id, broker=broker_from(args.broker),
                        state_dir=args.state_dir or default_state_dir(node_id),
                        root=args.root, caps=tuple(args.cap),
                        labels=_pairs(args.label, "--label"),
                        sensors=dict(args.sensor), keepalive=args.keepalive)
    return asyncio.run(run_node(config, embedded=args.embedded_broker))


async def run_node(config: NodeConfig, *, embedded: bool) -> int:
    # Apps run on worker threads that call into wasmtime through ctypes, releasing the GIL on
    # every call; a short switch interval keeps them from waiting 5 ms to get it back.
    sys.setswitchinterval(0.0002)
    async with contextlib.AsyncExitStack() as stack:
        if embedded:
            await stack.enter_async_context(EmbeddedBroker(config.broker.host,
                                                           config.broker.port))
            log.warning("%s", LIMITS_WARNING)
        await _serve(config)
    return 0


async def _serve(config: NodeConfig) -> None:
    """Run the node until SIGTERM/SIGINT; when the broker is lost or absent, join again."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    current: list[Node] = []
    leaving: list[asyncio.Task[None]] = []

    def stop() -> None:
        stopping.set()
        leaving.extend(loop.create_task(node.leave()) for node in current)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    backoff = 1.0
    while not stopping.is_set():
        try:
            async with Node(config) as node:
                current[:] = [node]
                backoff = 1.0
                await node.stopped.wait()
        except BrokerError as exc:
            log.warning("%s; trying again in %.0f s", exc, backoff)
        current.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), backoff)
        backoff = min(backoff * 2, 30.0)


def cmd_broker(args: argparse.Namespace) -> int:
    return asyncio.run(run_broker(broker_from(args.broker)))


async def run_broker(address: BrokerAddress) -> int:
    """Serve the embedded broker alone until SIGTERM/SIGINT."""
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
            "checkpoint_every": args.checkpoint_every,
            "subscriptions": tuple(args.subscribe)}


def cmd_client(args: argparse.Namespace) -> int:
    return asyncio.run(_client(args))


async def _client(args: argparse.Namespace) -> int:
    async with MeshClient(broker_from(args.broker), args.root) as mesh:
        if args.command == "events":
            async for event in mesh.events():
                print(_event_line(event, as_json=args.json), flush=True)
        if args.command == "send":
            await mesh.send(args.app, args.payload.encode(), args.topic)
            return 0
        if args.command == "deploy":
            result = await mesh.deploy(_spec_fields(args), read_module(args.file))
        else:
            op = {"stop": "stop", "migrate": "migrate", "apps": "apps", "nodes": "nodes"}
            result = await mesh.request(wire.Command(op=op[args.command],
                                                     app=getattr(args, "app", None),
                                                     to=getattr(args, "node", None)))
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


def _event_line(event: wire.Event, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(wire.to_plain(event))
    when = time.strftime("%H:%M:%S", time.localtime(event.ts_ms / 1000))
    parts = [f"{when}.{event.ts_ms % 1000:03d}", event.node or "-", event.event]
    if event.app:
        parts.append(event.app)
    if event.reason:
        parts.append(f"({event.reason})")
    parts += [f"{k}={v}" for k, v in event.detail.items()]
    return " ".join(parts)


