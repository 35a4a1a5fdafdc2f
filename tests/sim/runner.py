"""Running seeds: one (optionally without some faults), a sweep, shrinking, and reports."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.sim.faults import DEFAULT_KINDS, Setup, generate
from tests.sim.mutants import mutant
from tests.sim.world import Result, run

# Trace lines a failure report leaves out (there are many, and they are seldom the story).
_NOISE = ("outside set",)


def setup_for(seed: int, kinds: tuple[str, ...] = DEFAULT_KINDS,
              drop: Iterable[int] = ()) -> Setup:
    """The world of `seed`, without the faults at the indices in `drop`."""
    setup = generate(seed, kinds)
    gone = set(drop)
    setup.faults = [f for i, f in enumerate(setup.faults) if i not in gone]
    return setup


def run_seed(seed: int, kinds: tuple[str, ...] = DEFAULT_KINDS, drop: Iterable[int] = (),
             mutant_name: str | None = None) -> Result:
    with mutant(mutant_name):
        return run(setup_for(seed, kinds, drop))


def shrink(seed: int, kinds: tuple[str, ...], mutant_name: str | None = None
           ) -> tuple[list[int], Result]:
    """Drop faults one at a time while the seed still fails: the smallest schedule found."""
    dropped: list[int] = []
    result = run_seed(seed, kinds, (), mutant_name)
    for index in range(len(result.setup.faults)):
        attempt = run_seed(seed, kinds, [*dropped, index], mutant_name)
        if not attempt.ok:
            dropped.append(index)
            result = attempt
    return dropped, result


def report(result: Result, *, lines: int = 60, dropped: Sequence[int] = ()) -> str:
    setup = result.setup
    out = setup.describe()
    if dropped:
        out.append(f"  (faults {list(dropped)} of the full schedule dropped: they are not "
                   "needed to fail)")
    out += [f"VIOLATION {v}" for v in result.violations]
    relevant = [line for line in result.trace if not any(n in line for n in _NOISE)]
    out.append(f"--- last {min(lines, len(relevant))} of {len(relevant)} trace lines ---")
    out += relevant[-lines:]
    return "\n".join(out)


@dataclass
class Sweep:
    seeds: int = 0
    failing: list[int] = field(default_factory=list)
    seconds: float = 0.0
    events: int = 0

    @property
    def rate(self) -> float:
        return self.seeds / self.seconds if self.seconds else 0.0


def _one(job: tuple[int, tuple[str, ...], str | None]) -> tuple[int, bool, int]:
    seed, kinds, mutant_name = job
    result = run_seed(seed, kinds, (), mutant_name)
    return seed, result.ok, result.events


def sweep(seeds: Iterable[int], kinds: tuple[str, ...] = DEFAULT_KINDS,
          mutant_name: str | None = None, *, stop_at_first: bool = False,
          jobs: int = 1) -> Sweep:
    """Run every seed; the failing ones, in order."""
    out = Sweep()
    began = time.perf_counter()
    todo = [(seed, kinds, mutant_name) for seed in seeds]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results: Iterable[tuple[int, bool, int]] = pool.imap(_one, todo, chunksize=8)
            out = _collect(results, stop_at_first)
    else:
        out = _collect(map(_one, todo), stop_at_first)
    out.seconds = time.perf_counter() - began
    return out


def _collect(results: Iterable[tuple[int, bool, int]], stop_at_first: bool) -> Sweep:
    out = Sweep()
    for seed, ok, events in results:
        out.seeds += 1
        out.events += events
        if not ok:
            out.failing.append(seed)
            if stop_at_first:
                break
    return out
