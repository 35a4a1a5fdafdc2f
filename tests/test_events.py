"""Bad input reported at a bounded rate, and checkpoint pieces no app needs dropped."""

from __future__ import annotations

import time

from mesh import wire
from mesh.events import Limiter
from mesh.topics import Topics
from mesh.transfer import MAX_PACKET, STALE_S, Inbox


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_report_of_each_source_goes_out_then_one_per_interval_with_a_count() -> None:
    clock = Clock()
    limiter = Limiter(every_s=10, burst=100, clock=clock)
    assert limiter.admit("a") == 0
    assert limiter.admit("b") == 0
    assert [limiter.admit("a") for _ in range(5)] == [None] * 5
    clock.now += 10
    assert limiter.admit("a") == 5  # the five held back, told with the next one
    assert limiter.admit("a") is None
    assert limiter.held == 6


def test_a_flood_over_many_sources_is_capped_as_a_whole() -> None:
    clock = Clock()
    limiter = Limiter(every_s=10, burst=20, clock=clock)
    told = [limiter.admit(f"topic/{i}") for i in range(10_000)]
    assert sum(t is not None for t in told) == 20
    assert limiter.held == 9_980
    clock.now += 10
    assert limiter.admit("topic/9999") == 1


def test_limiter_remembers_a_bounded_number_of_sources() -> None:
    limiter = Limiter(burst=10**9, max_sources=100, clock=Clock())
    for i in range(1000):
        limiter.admit(f"s{i}")
    assert len(limiter._sources) == 100


def test_pieces_of_checkpoints_of_no_app_are_dropped_once_stale() -> None:
    inbox = Inbox(Topics())
    for i in range(50):
        inbox.snapshot("made-up", str(i), b"x" * 100_000)
    spec = wire.AppSpec(app="real", module="a" * 64)
    inbox.snapshot("real", "0", b"y" * 1000)
    now = time.monotonic()
    assert inbox.prune({"real": spec}, now) == 0  # not stale yet: its spec may be on its way
    assert inbox.prune({"real": spec}, now + STALE_S) == 5_000_000
    assert inbox.retained.size("mesh/apps/made-up/snapshot") == 0
    assert inbox.retained.size("mesh/apps/real/snapshot") == 1000


def test_an_apps_chunks_beyond_what_its_memory_can_fill_are_dropped() -> None:
    inbox = Inbox(Topics())
    spec = wire.AppSpec(app="small", module="a" * 64, memory_limit=65536)
    for i in range(8):  # 8 chunks of a packet each: far more than two 64 KiB checkpoints
        inbox.snapshot("small", str(i), b"z" * MAX_PACKET)
    assert inbox.prune({"small": spec}, time.monotonic()) == 8 * MAX_PACKET
