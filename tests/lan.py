"""A LAN of devices on one machine: network namespaces joined by a bridge (as root).

The bridge lives in a namespace of its own and every device is a namespace with one veth link
to it, an address in a private /24 and real multicast (mDNS works as on a home LAN). Nothing
touches the host's own interfaces; everything is removed when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_count = itertools.count(1)


@functools.cache
def can_build_lans() -> str | None:
    """Why this machine cannot run LAN tests, or None if it can."""
    if os.geteuid() != 0:
        return "needs root, to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs the ip command (Debian package iproute2)"
    probe = f"lmprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot create network namespaces here ({exc})"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Device:
    """One device on the LAN: a namespace, its address, and the processes run in it."""

    lan: Lan
    name: str
    netns: str
    address: str
    port: str  # its link's end on the bridge
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *argv: str, log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Run a command inside this device, its output going to `log`."""
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv],
                                    stdout=out, stderr=out,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def unplug(self) -> None:
        """Pull the cable: the link goes down, the device's processes keep running."""
        _ip("-n", self.lan.switch, "link", "set", self.port, "down")

    def plug_back(self) -> None:
        _ip("-n", self.lan.switch, "link", "set", self.port, "up")

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Sockets this thread creates in the block belong to this device's network."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into " + self.netns)
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
            os.close(target)
            os.close(home)


class Lan:
    """`with Lan() as lan: dev = lan.plug("kitchen")` builds a LAN and tears it down."""

    def __init__(self) -> None:
        number = next(_count)
        self.tag = f"lm{os.getpid() % 100000}x{number}"
        self.switch = f"{self.tag}-sw"
        self.subnet = f"10.{200 + os.getpid() % 50}.{number % 250}"
        self.devices: dict[str, Device] = {}

    def __enter__(self) -> Lan:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def plug(self, name: str) -> Device:
        """A new device with a link to the bridge, up and addressed."""
        index = len(self.devices) + 1
        netns, port, address = f"{self.tag}-{name}", f"p{index}", f"{self.subnet}.{index}"
        _ip("netns", "add", netns)
        _ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        device = self.devices[name] = Device(self, name, netns, address, port)
        return device

    def __exit__(self, *exc: object) -> None:
        for device in self.devices.values():
            for proc in device.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for netns in [*(d.netns for d in self.devices.values()), self.switch]:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", netns)
