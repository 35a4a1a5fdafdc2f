"""The mesh's decision code (mesh.reconcile) under thousands of simulated fault schedules.

See tests/sim: a deterministic world (virtual time, a Mosquitto model, nodes that carry out
`mesh.reconcile`'s decisions, apps, a publisher) runs each seed's faults and checks the
invariants in tests/sim/invariants.py. Replay a failing seed with
`python -m tests.sim --seed S --trace` (add `--faults ...` and `--mutant ...` as printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.app import SimApp
from tests.sim.faults import DEFAULT_KINDS, Fault
from tests.sim.mutants import MUTANTS
from tests.sim.node import SimNode
from tests.sim.runner import report, run_seed, setup_for, sweep
from tests.sim.world import run

ROOT = Path(__file__).resolve().parent.parent
CI_SEEDS = int(os.environ.get("SIM_SEEDS", "2000"))
JOBS = 2 if (os.cpu_count() or 1) >= 2 else 1

# Seeds each mutant needed to be caught (first failing seed + 1), as measured on the default
# fault kinds; the test allows the whole CI budget.
MUTANT_SEEDS = {"claim-same-epoch": 1, "no-fence": 282, "handover-same-epoch": 1,
                "ack-before-checkpoint": 1, "no-sync": 1}


def test_a_seed_gives_the_same_trace_every_time_and_in_every_process() -> None:
    first, again = run_seed(7), run_seed(7)
    assert first.trace == again.trace
    code = "from tests.sim.runner import run_seed; print(run_seed(7).digest)"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                           capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == first.digest


def test_the_default_sweep_holds_every_invariant() -> None:
    result = sweep(range(CI_SEEDS), DEFAULT_KINDS, jobs=JOBS)
    assert result.seeds == CI_SEEDS
    if result.failing:
        first = run_seed(result.failing[0])
        pytest.fail(f"{len(result.failing)} failing seeds: {result.failing}\n"
                    f"replay: python -m tests.sim --seed {result.failing[0]} --trace\n"
                    f"{report(first)}")


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_mutant_is_caught(name: str) -> None:
    result = sweep(range(CI_SEEDS), DEFAULT_KINDS, name, stop_at_first=True)
    assert result.failing, f"mutant {name} survived {CI_SEEDS} seeds"
    assert result.failing[0] < MUTANT_SEEDS[name] * 3 + 50  # and about as fast as measured


def test_without_the_sync_marker_a_joining_node_lowers_an_epoch() -> None:
    """The bug the sync marker fixed: n2 restarts and joins; its own record's PUBACK overtakes
    the retained owner records still queued behind the window; it claims a1 at epoch 1 over
    n1's epoch 2. With the marker, the same seed holds every invariant."""
    broken = run_seed(20, mutant_name="no-sync")
    assert any("a1: owner epoch went back from 2 to 1 (n2, from mesh-node-n2)" in v
               for v in broken.violations), report(broken)
    assert run_seed(20).ok


def test_a_start_that_raced_a_handover_here_is_replaced_by_the_handed_over_incarnation(
        ) -> None:
    """Fixed in mesh.reconcile: after a broker restart n2 rejoins seeing its own old owner
    record (epoch 1) and starts a2 from it, while n0 (back first) claims a2 at 2 and hands it
    to n2 at 3. n2's instance ran on at epoch 1 under an owner record naming it at 3 (decide
    had no rule for it) and stored checkpoints at epoch 1 after the handover's at 3; when the
    stale start restored an older checkpoint than the handover's, inputs were lost. Now it is
    replaced and started again for epoch 3, from the handover checkpoint."""
    result = run_seed(20026)
    assert result.ok, report(result)
    assert any("decide Replace(a2)" in line for line in result.trace)


# --- known bugs: each one's seed fails until it is fixed (strict xfail) -----------------------


def _fails(seed: int, kinds: tuple[str, ...], drop: tuple[int, ...] = ()) -> None:
    result = run_seed(seed, kinds, drop)
    assert result.ok, report(result)


@pytest.mark.xfail(strict=True, reason=(
    "broker wipe: survivors that rejoin at the same time each see the others' given-back "
    "specs, take the broker for the mesh's memory and forget their own apps' state, which "
    "then start again from zero (a0, a3 here), and give back stale owner records that lower "
    "epochs (a1, a2). Owned by the durability work ('a missing checkpoint is an alarm, not a "
    "reset', 'newest state wins'); fault kind `wipe`, off in the default sweep"))
def test_known_bug_a_wiped_broker_restarts_apps_from_zero() -> None:
    _fails(0, (*DEFAULT_KINDS, "wipe"), drop=(0, 1, 2))


@pytest.mark.xfail(strict=True, reason=(
    "a node that was away while every app was stopped rejoins a broker with no spec, takes "
    "it for one that lost everything and gives the stopped apps back (from its disk or what it "
    "held): plan_rebuild cannot tell 'emptied on purpose' from 'wiped' without a marker on "
    "the broker; fault kind `stop-all`, off in the default sweep"))
def test_known_bug_stopped_apps_come_back() -> None:
    _fails(54, (*DEFAULT_KINDS, "stop-all"))


def test_known_finding_hosted_app_spins_after_a_batch_of_skipped_duplicates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """hosted.py: a batch of only skipped redeliveries sets the checkpoint deadline with
    nothing unacknowledged; once it passes, `wait_for(get(), 0)` spins until the next input.
    Reported by the model as a finding; made a violation here to keep the seed."""
    monkeypatch.setattr(SimApp, "SPIN_IS_VIOLATION", True)
    result = run_seed(1343)
    assert any("would spin" in v for v in result.violations), report(result)


def test_known_finding_a_broker_lost_during_a_leave_kills_the_leave(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """node.py: `leave` indexes `self.hosted[action.app]`, but the broker lost meanwhile
    suspends (and clears) every app: KeyError, and the process dies mid-leave."""
    monkeypatch.setattr(SimNode, "LEAVE_KEYERROR_IS_VIOLATION", True)
    result = run_seed(1771, (*DEFAULT_KINDS, "wipe"))
    assert any("KeyError" in v for v in result.violations), report(result)



@pytest.mark.xfail(strict=True, reason=(
    "a claimer restores the newest checkpoint it has seen, then takes the app's session: an "
    "owner that is alive (n0 crashed and was back in 0.5 s, before n1, on a slow link, saw "
    "its new record) stores a newer checkpoint and acks its inputs meanwhile, and those "
    "inputs are lost (the claim's PUBACK overtakes that checkpoint, queued behind a full "
    "window). Executor fix: take the session (fencing the old owner at the broker) before "
    "choosing the checkpoint, or sync again after the claim. Default fault kinds: about one "
    "seed in 5,000"))
@pytest.mark.parametrize(("seed", "drop"), [(8252, (2, 3)), (25441, (1,)), (12707, ())])
def test_known_bug_a_claim_restores_a_checkpoint_older_than_the_owner_acked(
        seed: int, drop: tuple[int, ...]) -> None:
    """8252: n0 crashes and is back in 0.5 s; 25441: n0 is paused 2 s, its control session
    expires before its app session does, and the app acks once n0 resumes; 12707: n0 back
    from a pause starts its app from its own old record while n2's claim is on the way."""
    _fails(seed, DEFAULT_KINDS, drop)


@pytest.mark.xfail(strict=True, reason=(
    "a handover cut short by a broker restart (the final checkpoint at epoch 2 stored, the "
    "owner record never): n0 starts its own app again for its record's epoch 1 from that "
    "epoch-2 checkpoint, and its checkpoints go back to epoch 1. The state is whole; the "
    "epochs lie. Executor fix: start at least at the restored checkpoint's epoch (or claim "
    "past it). Default fault kinds, rare"))
def test_known_bug_an_interrupted_handover_makes_checkpoint_epochs_go_back() -> None:
    _fails(11389, DEFAULT_KINDS, drop=(4, 5))


@pytest.mark.xfail(strict=True, reason=(
    "rival claims: n2 and n1 both claim a0 at epoch 1 (neither had the other's record); n2's "
    "claim is delayed in the network (jitter, 265 ms) and lands after n1's handover of a0 to "
    "n0 at epoch 2, so the owner epoch goes back to 1, n2 runs a0 at 1 from the epoch-2 "
    "checkpoint and later hands it over at 2 again. "
    "No compare-and-set on retained messages: the executor could start at the restored "
    "checkpoint's epoch, or claim again past an epoch it saw while its claim was out. Fault "
    "kind `jitter` (here from t=0), off in the default sweep"))
def test_known_bug_a_late_rival_claim_sends_the_owner_epoch_back() -> None:
    setup = setup_for(2633)
    setup.faults.insert(0, Fault(0.0, "jitter", "network", 3.0))
    result = run(setup)
    assert result.ok, report(result)
