"""`python -m tests.sim`: sweep seeds, or replay one with its trace.

    python -m tests.sim --seeds 2000 [--start 0] [--faults crash,pause,...|all] [--jobs 2]
    python -m tests.sim --seeds 2000 --mutant no-sync        # stops at the first caught seed
    python -m tests.sim --seed 17 --trace [--drop 1,3] [--lines 200]
    python -m tests.sim --seed 17 --shrink                    # the smallest failing schedule
"""

from __future__ import annotations

import argparse
import sys

from tests.sim.faults import DEFAULT_KINDS, KINDS
from tests.sim.mutants import MUTANTS
from tests.sim.runner import report, run_seed, shrink, sweep


def _kinds(text: str) -> tuple[str, ...]:
    if text == "all":
        return KINDS
    if text == "default":
        return DEFAULT_KINDS
    kinds = tuple(k for k in text.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {KINDS}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=0, help="how many seeds to sweep")
    parser.add_argument("--start", type=int, default=0, help="the first seed of the sweep")
    parser.add_argument("--faults", type=_kinds, default=DEFAULT_KINDS,
                        help=f"fault kinds, comma-separated, or all / default "
                             f"(default: {','.join(DEFAULT_KINDS)})")
    parser.add_argument("--mutant", choices=sorted(MUTANTS), help="a deliberate bug")
    parser.add_argument("--jobs", type=int, default=1, help="processes for a sweep")
    parser.add_argument("--seed", type=int, help="run one seed")
    parser.add_argument("--trace", action="store_true", help="print its whole trace")
    parser.add_argument("--drop", default="", help="fault indices to leave out, e.g. 0,2")
    parser.add_argument("--shrink", action="store_true", help="drop the faults not needed")
    parser.add_argument("--lines", type=int, default=60, help="trace lines in a report")
    args = parser.parse_args(argv)
    if args.seed is not None:
        return _one(args)
    if args.seeds <= 0:
        parser.error("give --seeds N or --seed S")
    seeds = range(args.start, args.start + args.seeds)
    result = sweep(seeds, args.faults, args.mutant, stop_at_first=bool(args.mutant),
                   jobs=args.jobs)
    print(f"{result.seeds} seeds in {result.seconds:.1f} s ({result.rate:.1f} seeds/s, "
          f"{result.events / max(result.seeds, 1):.0f} events/seed), faults "
          f"{','.join(args.faults)}{f', mutant {args.mutant}' if args.mutant else ''}")
    if not result.failing:
        print("no failing seed")
        return 0
    print(f"failing seeds: {' '.join(map(str, result.failing))}")
    first = result.failing[0]
    faults = ",".join(args.faults)
    mutant = f" --mutant {args.mutant}" if args.mutant else ""
    print(f"replay: python -m tests.sim --seed {first} --faults {faults}{mutant} --trace")
    print(report(run_seed(first, args.faults, (), args.mutant), lines=args.lines))
    return 1


def _one(args: argparse.Namespace) -> int:
    drop = [int(i) for i in args.drop.split(",") if i]
    if args.shrink:
        drop, result = shrink(args.seed, args.faults, args.mutant)
    else:
        result = run_seed(args.seed, args.faults, drop, args.mutant)
    if args.trace:
        print("\n".join(result.setup.describe()))
        print("\n".join(result.trace))
    lines = 0 if args.trace else args.lines
    if not result.ok or args.shrink:
        print(report(result, lines=lines, dropped=drop))
    print(f"seed {args.seed}: {'ok' if result.ok else 'FAILED'} "
          f"({result.events} events, trace digest {result.digest})")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
