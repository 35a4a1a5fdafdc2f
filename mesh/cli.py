"""The `mesh` command line. Each subcommand fails with a one-line reason and a non-zero status.

Only what a subcommand needs is loaded when it runs: wasmtime for `mesh run` (and for reading a
`.wat` file), the mesh (`mesh.cli_mesh`) for the others. The client commands load no wasmtime.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh import profile, wire
from mesh.abi import Limits, LocalIO
from mesh.errors import MeshError, ModuleError

if TYPE_CHECKING:
    from mesh.runtime import App

log = logging.getLogger("mesh")


def default_cache_dir() -> Path:
    if "MESH_CACHE_DIR" in os.environ:
        return Path(os.environ["MESH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "liquid-mesh" / "modules"


def read_module(path: Path) -> bytes:
    """The module bytes of a `.wasm` file, or of a `.wat` file compiled to binary."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MeshError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix == ".wat":
        import wasmtime  # noqa: PLC0415 - only .wat needs it; client commands must not load it

        try:
            return bytes(wasmtime.wat2wasm(data.decode()))
        except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
            raise ModuleError(f"{path}: invalid WebAssembly text: {first}") from None
    return data


def format_publication(topic: str, payload: bytes) -> str:
    """`<topic> <payload>` on one line; bytes that are not text, and line breaks, are escaped."""
    text = payload.decode("utf-8", "backslashreplace")
    return f"{topic} {text}".replace("\n", "\\n").replace("\r", "\\r")


def _sensor(spec: str) -> tuple[str, Callable[[], bytes]]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {spec!r}")
    raw = value.encode()
    return name, lambda: raw


class PrintingIO(LocalIO):
    """Prints every publication as it happens."""

    def publish(self, topic: str, payload: bytes) -> None:
        print(format_publication(topic, payload), flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from mesh.runtime import App, Runtime  # noqa: PLC0415 - wasmtime loads for `mesh run` only

    wasm = read_module(args.file)
    limits = Limits(memory_bytes=args.memory_limit, timeout_s=args.timeout)
    io = PrintingIO(app=args.app, sensors=dict(args.sensor))
    with Runtime(cache_dir=args.cache_dir) as runtime:
        module = runtime.load(wasm)
        with App(runtime, module, name=args.app, io=io, limits=limits) as app:
            _drive(app, args, io)
    return 0


def _drive(app: App, args: argparse.Namespace, io: LocalIO) -> None:
    if args.restore:
        app.restore(_read_snapshot(args.restore))
        log.info("restored %s from %s (%d messages delivered before)", args.app,
                 args.restore, app.delivered)
    else:
        app.start()
    for payload in args.inputs:
        app.deliver(args.topic, payload.encode())
    for _ in range(args.ticks):
        app.tick(io.now_ms())
    if args.snapshot_out:
        _write_snapshot(args.snapshot_out, app)


def _read_snapshot(path: Path) -> wire.Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MeshError(f"cannot read snapshot {path}: {exc.strerror}") from None
    try:
        return wire.decode(wire.Snapshot, data)
    except MeshError as exc:
        raise MeshError(f"{path} is not a valid snapshot: {exc}") from None


def _write_snapshot(path: Path, app: App) -> None:
    data = wire.encode(app.snapshot())
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        raise MeshError(f"cannot write snapshot {path}: {exc.strerror}") from None
    log.info("wrote snapshot of %s to %s (%d bytes)", app.name, path, len(data))


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand of the mesh itself: its module (amqtt, paho) loads only when it runs."""
    def run(args: argparse.Namespace) -> int:
        from mesh import cli_mesh  # noqa: PLC0415 - `mesh run` should not pay for the mesh
        command: Callable[[argparse.Namespace], int] = getattr(cli_mesh, name)
        return command(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run(sub)
    demo = sub.add_parser("demo", help="a mesh of three nodes on this machine, narrated")
    demo.set_defaults(func=_lazy("cmd_demo"))
    _add_node(sub)
    _add_clients(sub)
    _add_trust(sub)
    return parser


Subparsers = Any  # argparse's _SubParsersAction is private


def _add_run(sub: Subparsers) -> None:
    run = sub.add_parser("run", help="run an app locally, without a broker",
                         description="Run an app locally with no broker: print each "
                         "publication as '<topic> <payload>' on stdout, logs on stderr.")
    run.add_argument("file", type=Path, metavar="FILE.wasm", help="the module (.wasm or .wat)")
    run.add_argument("--in", dest="inputs", action="append", default=[], metavar="PAYLOAD",
                     help="deliver this payload as one message (repeatable, in order)")
    run.add_argument("--topic", default="", metavar="SUB",
                     help="sub-topic the inputs arrive on (after .../in/)")
    run.add_argument("--ticks", type=int, default=0, metavar="N",
                     help="call mesh_on_tick N times after the inputs")
    run.add_argument("--snapshot-out", type=Path, metavar="FILE",
                     help="write the app's state here at the end")
    run.add_argument("--restore", type=Path, metavar="FILE",
                     help="continue from this snapshot instead of starting fresh")
    run.add_argument("--sensor", type=_sensor, action="append", default=[],
                     metavar="NAME=VALUE", help="a capability mesh.read returns (repeatable)")
    run.add_argument("--app", default="app", help="the app's name (default: app)")
    run.add_argument("--memory-limit", type=int, default=Limits().memory_bytes, metavar="BYTES")
    run.add_argument("--timeout", type=float, default=Limits().timeout_s, metavar="SECONDS",
                     help="longest a single call into the app may run")
    run.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                     help="compiled-module cache (default: ~/.cache/liquid-mesh/modules)")
    run.set_defaults(func=cmd_run)


def _add_node(sub: Subparsers) -> None:
    node = sub.add_parser("node", help="run a mesh node on this device",
                          description="Run this device's mesh node. With no arguments it "
                          "finds the mesh's broker on the LAN (mDNS), or hosts one if there "
                          "is none, and keeps its identity in its state directory.")
    node.add_argument("--id", help="this node's id (default: from the profile, else one "
                      "chosen on the first start and kept in the state directory)")
    node.add_argument("--profile", type=Path, metavar="FILE.toml",
                      help="device profile: id, caps, labels, sensors, limits (see devices/)")
    node.add_argument("--state-dir", type=Path, help="identity, modules and compiled code "
                      "(default: $MESH_STATE_DIR, /var/lib/liquid-mesh as root, else "
                      "~/.local/state/liquid-mesh; then /ID or /device)")
    node.add_argument("--keepalive", type=int, metavar="S",
                      help="MQTT keepalive, default 5; a crash is noticed within 1.5x this")
    node.add_argument("--embedded-broker", action="store_true",
                      help="serve MQTT in-process (amqtt) at the --broker address")
    node.add_argument("--hosted-broker", choices=profile.HOSTED_BROKERS,
                      help="the broker this device hosts when the LAN has none (default auto: "
                      "Mosquitto if installed, else the embedded amqtt)")
    node.add_argument("--no-mdns", action="store_true",
                      help="neither announce this node nor look for brokers on the LAN")
    node.add_argument("--cap", action="append", default=[], help="a capability (repeatable)")
    node.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                      help="a label apps can prefer (repeatable)")
    node.add_argument("--sensor", type=_sensor, action="append", default=[],
                      metavar="NAME=VALUE", help="a fixed reading for mesh.read (repeatable)")
    node.add_argument("--token", metavar="TOKEN", help="join the mesh with this token "
                      "(`mesh admit --token`; redeemed on the first start)")
    node.add_argument("--pair", action="store_true", help="with no admission yet: wait to "
                      "be admitted (`mesh admit DEVICE` where the mesh was created); what a "
                      "node with neither a token nor an admission does anyway")
    node.add_argument("--insecure", action="store_true", help="with no admission: run an "
                      "OPEN mesh, which anyone who reaches the broker can steer (profile key "
                      "`insecure = true`)")
    node.set_defaults(func=_lazy("cmd_node"))
    _add_broker_options(node)
    broker = sub.add_parser("broker", help="serve the embedded MQTT broker alone",
                            description="Serve the embedded broker (amqtt) at the --broker "
                            "address, for devices without Mosquitto.")
    broker.set_defaults(func=_lazy("cmd_broker"))
    _add_broker_options(broker)


def _add_broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL",
                        help="mqtt://host:port (default: $MESH_BROKER, else found on the LAN "
                        "with mDNS, else mqtt://127.0.0.1:1883)")
    parser.add_argument("--root", default="mesh", help=argparse.SUPPRESS)


def _add_clients(sub: Subparsers) -> None:
    deploy = sub.add_parser("deploy", help="run an app on the mesh")
    deploy.add_argument("app")
    deploy.add_argument("file", type=Path, metavar="FILE.wasm")
    deploy.add_argument("--require", action="append", default=[], metavar="CAP")
    deploy.add_argument("--prefer", action="append", default=[], metavar="LABEL=VALUE")
    deploy.add_argument("--on", metavar="NODE", help="pin the app to this node")
    deploy.add_argument("--tick-ms", type=int, default=0, metavar="N")
    deploy.add_argument("--checkpoint-ms", type=int, default=0, metavar="N")
    deploy.add_argument("--checkpoint-every", type=int, default=0, metavar="N")
    deploy.add_argument("--timeout-ms", type=int, default=1000, metavar="N",
                        help="how long one call into the app may take (default 1000, at most "
                        "60000; a device may allow less)")
    deploy.add_argument("--memory-mb", type=int, default=64, metavar="N",
                        help="the app's memory limit (default 64; a device may allow less)")
    deploy.add_argument("--subscribe", action="append", default=[], metavar="FILTER",
                        help="also deliver messages on these topics, with their full topic")
    stop = sub.add_parser("stop", help="stop an app everywhere")
    stop.add_argument("app")
    restart = sub.add_parser("restart", help="start a failed app again from its newest "
                             "checkpoint")
    restart.add_argument("app")
    restart.add_argument("--fresh", action="store_true",
                         help="start it over from its first start, dropping its state")
    migrate = sub.add_parser("migrate", help="move a running app, with its state, to a node")
    migrate.add_argument("app")
    migrate.add_argument("node")
    send = sub.add_parser("send", help="send one input message to an app")
    send.add_argument("app")
    send.add_argument("payload")
    send.add_argument("--topic", default="", metavar="SUB")
    apps = sub.add_parser("apps", help="list apps: where they run, their state and epoch")
    nodes = sub.add_parser("nodes", help="list the nodes of the mesh")
    events = sub.add_parser("events", help="follow the event stream")
    watch = sub.add_parser("watch", help="follow what an app publishes",
                           description="Print each message the app publishes (at "
                           "<root>/apps/APP/out/...), as it comes: the time, the topic under "
                           "out/, and the payload (text, else hex).")
    watch.add_argument("app")
    watch.add_argument("--count", type=int, default=0, metavar="N",
                       help="stop after N messages (default: follow until interrupted)")
    for client in (deploy, stop, restart, migrate, send, apps, nodes, events, watch):
        client.add_argument("--json", action="store_true", help="JSON output for scripts")
        client.set_defaults(func=_lazy("cmd_client"))
        _add_broker_options(client)
        _add_home(client)


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", type=Path, metavar="DIR", help="the mesh's operator key "
                        "and identity (default: $MESH_HOME, else ~/.config/liquid-mesh)")


def _add_trust(sub: Subparsers) -> None:
    init = sub.add_parser("init", help="create a mesh: the operator's key and identity",
                          description="Create a mesh on this machine: an Ed25519 operator "
                          "key (whoever holds it owns the mesh) and the mesh's identity.")
    init.add_argument("--name", default="", help="a name for the mesh")
    init.set_defaults(func=_lazy("cmd_init"))
    admit = sub.add_parser("admit", help="admit a device to the mesh",
                           description="Admit a device waiting for it (`mesh node` with "
                           "no token), or print a one-time join token for one (give it as "
                           "`mesh node --token` or the profile's `token`). With neither: list "
                           "the devices waiting, with their keys' fingerprints.")
    admit.add_argument("device", nargs="?", help="the device waiting to be admitted")
    admit.add_argument("--token", action="store_true", help="print a one-time join token")
    admit.add_argument("--cap", action="append", default=[], metavar="CAP",
                       help="capabilities the device may announce (default: any)")
    admit.add_argument("--no-deploy", action="store_true",
                       help="the device may not deploy, stop or move apps")
    admit.add_argument("--hours", type=float, default=0, metavar="N",
                       help="the admission expires after N hours (default: never)")
    admit.set_defaults(func=_lazy("cmd_admit"))
    _add_broker_options(admit)
    revoke = sub.add_parser("revoke", help="take a device out of the mesh for good")
    revoke.add_argument("device")
    revoke.set_defaults(func=_lazy("cmd_revoke"))
    _add_broker_options(revoke)
    grant = sub.add_parser("grant", help="hand the mesh's data keys to every device admitted "
                           "(one joined with a token made before a `mesh revoke` lacks the "
                           "newest)")
    grant.set_defaults(func=_lazy("cmd_grant"))
    _add_broker_options(grant)
    access = sub.add_parser("access", help="what a plain MQTT tool needs to use the mesh's "
                            "broker", description="Write the mesh's broker CA to a file and "
                            "print the broker's address and the mesh's account, with a "
                            "mosquitto_sub line that uses them: the broker a device hosts in a "
                            "secure mesh serves no one else, over TLS. The password reads and "
                            "writes every app's inputs and outputs: give it to tools you trust.")
    access.add_argument("--ca-file", type=Path, default=Path("mesh-ca.crt"), metavar="FILE",
                        help="where to write the CA (default: mesh-ca.crt)")
    access.add_argument("--json", action="store_true", help="JSON output for scripts")
    access.set_defaults(func=_lazy("cmd_access"))
    _add_broker_options(access)
    for command in (init, admit, revoke, grant, access):
        _add_home(command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(levelname)-5s %(message)s",
                        datefmt="%H:%M:%S")
    for chatty in ("amqtt", "transitions"):  # the embedded broker narrates every connection
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))
    started = time.monotonic()
    try:
        status: int = args.func(args)
    except MeshError as exc:
        print(f"mesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    log.debug("done in %.3fs", time.monotonic() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
