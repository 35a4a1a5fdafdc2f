"""The node's decisions (mesh.reconcile), as pure functions: no broker, no clock."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from mesh.placement import Placement
from mesh.reconcile import (
    Claim,
    Fence,
    HandOver,
    Held,
    Missing,
    Rebuild,
    Replace,
    Running,
    Shutdown,
    Start,
    Stop,
    Unplaceable,
    View,
    copy_wanted,
    decide,
    plan_leave,
    plan_rebuild,
    plan_resume,
    stale_owner,
)
from mesh.wire import AppSpec, NodeRecord, OwnerRecord

MODULE = "a" * 64
OTHER_MODULE = "b" * 64


def spec(app: str = "app", **kw: object) -> AppSpec:
    return AppSpec(app=app, module=MODULE, **kw)  # type: ignore[arg-type]


def members(*ids: str, leaving: tuple[str, ...] = ()) -> dict[str, NodeRecord]:
    return {i: NodeRecord(id=i, leaving=i in leaving) for i in ids}


def view(node: str = "a", nodes: tuple[str, ...] = ("a", "b"), *,
         specs: tuple[AppSpec, ...] = (), owners: dict[str, OwnerRecord] | None = None,
         hosted: dict[str, Running] | None = None, **kw: object) -> View:
    return View(node=node, members=members(*nodes), specs={s.app: s for s in specs},
                owners=owners or {}, hosted=hosted or {}, **kw)  # type: ignore[arg-type]


def pinned(app: str, node: str) -> AppSpec:
    return spec(app, pin=node)


def test_an_app_placed_here_with_no_owner_is_claimed_at_epoch_1() -> None:
    assert decide(view(specs=(pinned("app", "a"),))) == [Claim("app", 1, failover=False)]


def test_an_app_whose_owner_is_gone_is_claimed_past_its_epoch() -> None:
    owners = {"app": OwnerRecord("gone", 7)}
    assert decide(view(specs=(pinned("app", "a"),), owners=owners)) == [
        Claim("app", 8, failover=True)]


def test_an_owner_record_below_the_epoch_held_is_stale() -> None:
    held = OwnerRecord("a", 3)
    assert stale_owner(held, OwnerRecord("b", 2))  # a claim that landed late
    assert not stale_owner(held, OwnerRecord("b", 3))  # a rival at the same epoch: fenced
    assert not stale_owner(held, OwnerRecord("b", 4))
    assert not stale_owner(None, OwnerRecord("b", 1))


def test_an_owner_record_lagging_its_apps_checkpoint_is_claimed_past_again() -> None:
    owners = {"app": OwnerRecord("a", 1)}  # a resume at 2 stored its checkpoint, not its record
    assert decide(view(specs=(pinned("app", "a"),), owners=owners,
                       checkpoints={"app": (2, 3)})) == [Claim("app", 3, failover=True)]


def test_a_claim_goes_past_the_epoch_of_the_newest_checkpoint_too() -> None:
    owners = {"app": OwnerRecord("gone", 2)}  # a record that went back: its state did not
    assert decide(view(specs=(pinned("app", "a"),), owners=owners,
                       checkpoints={"app": (3, 9)})) == [Claim("app", 4, failover=True)]


def test_an_app_whose_owner_is_a_member_is_not_claimed_even_while_it_leaves() -> None:
    v = View(node="a", members=members("a", "b", leaving=("b",)), specs={"app": pinned("app", "a")},
             owners={"app": OwnerRecord("b", 3)}, hosted={})
    assert decide(v) == []


def test_an_app_placed_elsewhere_is_left_alone() -> None:
    assert decide(view(specs=(pinned("app", "b"),))) == []


def test_an_owner_record_naming_this_node_starts_the_app_for_its_epoch() -> None:
    owners = {"app": OwnerRecord("a", 4)}
    assert decide(view(specs=(pinned("app", "b"),), owners=owners)) == [Start("app", 4)]


def test_a_higher_or_equal_epoch_elsewhere_fences_the_app_here() -> None:
    hosted = {"app": Running(3, MODULE)}
    for epoch in (3, 4):
        owners = {"app": OwnerRecord("b", epoch)}
        assert decide(view(specs=(pinned("app", "a"),), owners=owners, hosted=hosted)) == [
            Fence("app", "b", epoch)]


def test_an_older_epoch_elsewhere_does_not_fence() -> None:
    owners = {"app": OwnerRecord("b", 2)}
    hosted = {"app": Running(3, MODULE)}
    assert decide(view(specs=(pinned("app", "a"),), owners=owners, hosted=hosted)) == []


def test_a_new_module_replaces_the_running_instance() -> None:
    hosted = {"app": Running(1, OTHER_MODULE)}
    owners = {"app": OwnerRecord("a", 1)}
    assert decide(view(specs=(pinned("app", "a"),), owners=owners, hosted=hosted)) == [
        Replace("app")]


def test_an_app_placed_elsewhere_is_handed_over_past_every_epoch_seen() -> None:
    hosted = {"app": Running(5, MODULE)}
    owners = {"app": OwnerRecord("a", 5)}
    assert decide(view(specs=(pinned("app", "b"),), owners=owners, hosted=hosted)) == [
        HandOver("app", "b", 6)]


def test_an_instance_older_than_the_owner_record_naming_this_node_is_replaced() -> None:
    hosted = {"app": Running(2, MODULE)}  # started from an old record; a handover here at 5
    owners = {"app": OwnerRecord("a", 5)}
    for pin in ("a", "b"):  # ... wherever placement puts it next
        assert decide(view(specs=(pinned("app", pin),), owners=owners, hosted=hosted)) == [
            Replace("app")]


def test_a_failed_app_is_not_handed_over() -> None:
    hosted = {"app": Running(2, MODULE, "failed")}
    owners = {"app": OwnerRecord("a", 2)}
    assert decide(view(specs=(pinned("app", "b"),), owners=owners, hosted=hosted)) == []


def test_an_app_without_a_spec_is_stopped() -> None:
    assert decide(view(hosted={"gone": Running(1, MODULE)})) == [Stop("gone")]


def test_nothing_is_claimed_or_started_before_the_node_has_every_record() -> None:
    owners = {"mine": OwnerRecord("a", 2), "orphan": OwnerRecord("gone", 2),
              "held": OwnerRecord("b", 9)}
    hosted = {"held": Running(3, MODULE)}
    v = view(specs=(pinned("mine", "b"), pinned("orphan", "a"), pinned("new", "a"),
                    pinned("held", "a")), owners=owners, hosted=hosted, synced=False)
    assert decide(v) == [Fence("held", "b", 9)]  # fencing never waits


def test_after_a_lost_broker_no_app_is_claimed_within_the_grace() -> None:
    # A broker that lost its store lost the owner records too: an app without one may have an
    # owner on its way back with its state, like an app whose owner is gone.
    v = view(specs=(pinned("orphan", "a"), pinned("unowned", "a")),
             owners={"orphan": OwnerRecord("gone", 2)}, now=10.0, claim_after=12.0)
    assert decide(v) == []
    later = replace(v, now=12.0)
    assert decide(later) == [Claim("orphan", 3, failover=True),
                             Claim("unowned", 1, failover=False)]


def test_a_copy_goes_back_unless_something_newer_may_exist() -> None:
    members = {"a", "b"}
    assert copy_wanted(None, members, None, (2, 5))
    assert copy_wanted(OwnerRecord("gone", 3, 9), members, (2, 5), (2, 5))  # owner not back
    assert not copy_wanted(None, members, (2, 6), (2, 5))  # a newer one was stored meanwhile
    # The owner is back: its record names the state it waits for, or one it went on from.
    assert copy_wanted(OwnerRecord("b", 2, 5), members, (2, 5), (2, 5))
    assert not copy_wanted(OwnerRecord("b", 3, 6), members, (2, 5), (2, 5))


def test_an_app_no_member_can_run_is_reported() -> None:
    assert decide(view(specs=(spec("hot", requires=("heater",)),))) == [
        Unplaceable("hot", ("heater",))]


def test_leaving_hands_each_running_app_to_the_next_node_and_shuts_down_the_rest() -> None:
    hosted = {"one": Running(1, MODULE), "broken": Running(1, MODULE, "failed"),
              "lonely": Running(2, MODULE)}
    v = View(node="a", members=members("a", "b"),
             specs={"one": spec("one"), "broken": spec("broken"),
                    "lonely": spec("lonely", requires=("heater",))},
             owners={"one": OwnerRecord("a", 4)}, hosted=hosted)
    assert plan_leave(v) == [Shutdown("broken"), Shutdown("lonely"), HandOver("one", "b", 5)]


def test_a_rebuild_gives_a_broker_that_lost_its_store_what_it_lacks() -> None:
    held = Held(specs={"mine": spec("mine"), "theirs": spec("theirs"), "known": spec("known")},
                owners={"mine": OwnerRecord("a", 3), "theirs": OwnerRecord("c", 6),
                        "known": OwnerRecord("c", 1)},
                suspended={"mine": (3, 10)}, copies={"theirs": (6, 4), "known": (2, 9)})
    broker = view(specs=(spec("known"),), owners={"known": OwnerRecord("c", 2)},
                  checkpoints={"known": (2, 9)})
    assert plan_rebuild(broker, held, lost=True) == Rebuild(
        specs=(spec("mine"), spec("theirs")), resume=(("mine", 4),),
        # The record given back names the checkpoint held, not just the one it started from.
        owners=(("theirs", OwnerRecord("c", 6, seq=4)),), copies=("theirs",), grace=True)


def test_a_checkpoint_held_goes_back_only_where_it_is_newer_and_no_member_runs_the_app() -> None:
    held = Held(specs={}, owners={}, suspended={},
                copies={"older": (2, 5), "newer": (2, 9), "running": (2, 9), "gone": (2, 9)})
    broker = view(nodes=("a", "b"), specs=tuple(spec(n) for n in ("older", "newer", "running")),
                  owners={"running": OwnerRecord("b", 2), "newer": OwnerRecord("c", 2)},
                  checkpoints={"older": (2, 7), "newer": (2, 8), "running": (2, 8)})
    assert plan_rebuild(broker, held, lost=True).copies == ("newer",)
    assert plan_rebuild(broker, held, lost=False).copies == ()  # it keeps its own


def test_a_rebuild_resumes_own_state_only_where_it_is_the_newest() -> None:
    held = Held(specs={"mine": spec("mine")}, owners={"mine": OwnerRecord("a", 3)},
                suspended={"mine": (3, 10)}, only_if_lost=True)
    cases = [  # (owner record, broker's checkpoint) -> resumed at
        (OwnerRecord("a", 3), (3, 7), 4),  # an older autosave: ours goes on
        (OwnerRecord("a", 3), (3, 10), 4),  # the same: ours holds inputs not yet acked too
        (OwnerRecord("a", 3), None, 4),  # the checkpoint is lost: ours goes on
        (OwnerRecord("a", 3), (3, 11), None),  # the broker's is newer: it goes on from that
        (OwnerRecord("b", 4), (3, 7), None),  # taken over meanwhile
        (OwnerRecord("a", 5), (5, 12), None),  # handed back here meanwhile
        (OwnerRecord("b", 2), (2, 3), 4),  # a stale record: ours is newer
    ]
    for owner, checkpoint, epoch in cases:
        broker = view(specs=(spec("mine"),), owners={"mine": owner},
                      checkpoints={"mine": checkpoint} if checkpoint else {})
        plan = plan_rebuild(broker, held, lost=False)
        assert plan.resume == ((("mine", epoch),) if epoch else ()), (owner, checkpoint)
        assert plan.forget == (() if epoch else ("mine",))


def test_state_from_disk_waits_for_the_survivors_unless_the_broker_holds_it() -> None:
    # A device back from a crash: what its disk holds may be older than a survivor's copy, or
    # the app may have run elsewhere since. Resumed at once only where the broker holds the
    # same state; else decided again after the grace, on what came back meanwhile.
    held = Held(specs={"app": spec("app")}, owners={"app": OwnerRecord("a", 1, 1)},
                suspended={"app": (1, 1)}, only_if_lost=True, from_disk=frozenset({"app"}))
    empty = view(specs=(spec("app"),))
    plan = plan_rebuild(empty, held, lost=True)
    assert (plan.resume, plan.later) == ((), ("app",))
    same = replace(empty, checkpoints={"app": (1, 1)})
    assert plan_rebuild(same, held, lost=False).resume == (("app", 2),)
    # Nothing starts it while it waits, though its owner record names this node.
    waiting = replace(empty, owners={"app": OwnerRecord("a", 1)}, deferred=frozenset({"app"}))
    assert decide(waiting) == []
    # After the grace: a survivor gave back a newer copy, or ran it on since, or neither.
    newer = replace(empty, checkpoints={"app": (1, 2)})
    assert plan_resume(newer, held, {"app"}) == Rebuild(forget=("app",))
    moved = replace(empty, owners={"app": OwnerRecord("b", 2)}, checkpoints={"app": (2, 2)})
    assert plan_resume(moved, held, {"app"}) == Rebuild(forget=("app",))
    assert plan_resume(empty, held, {"app"}) == Rebuild(resume=(("app", 2),))
    running = replace(empty, hosted={"app": Running(1, MODULE)})
    assert plan_resume(running, held, {"app"}) == Rebuild()


def test_a_broker_emptied_on_purpose_gets_nothing_back() -> None:
    held = Held(specs={"stopped": spec("stopped")}, owners={"stopped": OwnerRecord("a", 3)},
                suspended={"stopped": (3, 4)}, only_if_lost=True)
    assert plan_rebuild(view(), held, lost=False) == Rebuild(forget=("stopped",), grace=True)
    wiped = plan_rebuild(view(), held, lost=True)
    assert wiped.specs == (spec("stopped"),)
    assert wiped.resume == (("stopped", 4),)
    assert wiped.grace


def test_no_checkpoint_as_new_as_the_owner_record_says_is_an_alarm_not_a_fresh_start() -> None:
    owners = {"app": OwnerRecord("gone", 4, seq=12)}
    for checkpoints in ({}, {"app": (4, 11)}):
        actions = decide(view(specs=(pinned("app", "a"),), owners=owners,
                              checkpoints=checkpoints))
        assert len(actions) == 1
        assert isinstance(actions[0], Missing)
        assert "checkpoint 12" in actions[0].reason
    assert decide(view(specs=(pinned("app", "a"),), owners=owners,
                       checkpoints={"app": (4, 12)})) == [Claim("app", 5, failover=True)]
    mine = {"app": OwnerRecord("a", 4, seq=12)}
    assert isinstance(decide(view(specs=(pinned("app", "a"),), owners=mine))[0], Missing)


# --- properties over many views -----------------------------------------------------------

NODES = st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True)


@st.composite
def meshes(draw: st.DrawFn) -> tuple[list[str], list[AppSpec], dict[str, OwnerRecord]]:
    nodes = draw(NODES)
    apps = draw(st.lists(st.sampled_from(["w", "x", "y", "z"]), unique=True, max_size=4))
    specs = [spec(app, pin=draw(st.none() | st.sampled_from("abcdefg")),
                  requires=draw(st.sampled_from([(), ("cap",)]))) for app in apps]
    owners = {app: OwnerRecord(draw(st.sampled_from("abcdefg")), draw(st.integers(1, 2**40)))
              for app in apps if draw(st.booleans())}
    return nodes, specs, owners


def _records(nodes: list[str]) -> dict[str, NodeRecord]:
    return {n: NodeRecord(id=n, caps=("cap",) if n in "ace" else ()) for n in nodes}


@given(meshes())
def test_at_most_one_node_takes_an_app_and_never_below_its_epoch(
        mesh: tuple[list[str], list[AppSpec], dict[str, OwnerRecord]]) -> None:
    nodes, specs, owners = mesh
    records = _records(nodes)
    taking: dict[str, list[str]] = {}
    for node in nodes:
        v = View(node=node, members=records, specs={s.app: s for s in specs},
                 owners=owners, hosted={})
        for action in decide(v):
            if isinstance(action, Claim | Start):
                taking.setdefault(action.app, []).append(node)
                owner = owners.get(action.app)
                if isinstance(action, Claim):
                    assert action.epoch == (owner.epoch if owner else 0) + 1
                    assert owner is None or owner.node not in records
                else:
                    assert owner == OwnerRecord(node, action.epoch)
    for app, takers in taking.items():
        assert len(takers) == 1, (app, takers)
        owner = owners.get(app)
        if owner is None or owner.node not in records:  # a claim: by placement's pick
            best = Placement(records.values()).best(next(s for s in specs if s.app == app))
            assert takers == [best]


@given(meshes(), st.sampled_from("abcdef"), st.integers(1, 2**40))
def test_a_node_running_an_app_fences_or_moves_it_only_past_every_epoch(
        mesh: tuple[list[str], list[AppSpec], dict[str, OwnerRecord]], node: str,
        epoch: int) -> None:
    nodes, specs, owners = mesh
    records = _records([*nodes, node])
    hosted = {s.app: Running(epoch, MODULE) for s in specs}
    v = View(node=node, members=records, specs={s.app: s for s in specs}, owners=owners,
             hosted=hosted)
    for action in decide(v):
        owner = owners.get(action.app)
        if isinstance(action, Fence):
            assert owner is not None
            assert owner.node != node
            assert owner.epoch >= epoch
        elif isinstance(action, HandOver):
            assert action.epoch > max(epoch, owner.epoch if owner else 0)
            assert action.target != node
        else:
            assert not isinstance(action, Claim | Start | Stop)
