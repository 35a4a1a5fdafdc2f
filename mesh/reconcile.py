"""What a node should do about each app: the mesh's rules as pure code, in the style of h11.

`decide` takes the mesh as one node sees it (`View`: node records, specs, owner records, the
apps the node runs, the time) and returns the actions that bring the node in line with it;
`plan_leave` does the same for a graceful leave. Nothing here touches the network or a clock:
`Node` gathers the view and carries the actions out, and the simulator in tests/sim runs the
same functions against a model of the broker and thousands of fault schedules.

The rules, for each app with a spec:

- it runs here, but an owner record names another node at the same or a higher epoch: stop it
  at once (`Fence`);
- it runs here on another module than the spec's: stop it and start again (`Replace`);
- it runs here, but the owner record names this node at a higher epoch: the mesh handed it a
  newer incarnation (a handover to this node raced a start here from an older record): stop
  this one and start again for that epoch, from its handover checkpoint (`Replace`);
- it runs here, and placement now picks another node: hand it over (`HandOver`) at the epoch
  after both the app's and its owner record's;
- it does not run here, and its owner record names this node: it was handed to us, or we own
  it since before a restart: start it for that epoch (`Start`);
- it does not run here, placement picks this node, and its owner is not a member (or it has
  none): claim it at the owner's epoch + 1 (`Claim`), from its newest checkpoint; after a lost
  broker, not before `claim_after`, so that a survivor finds its own apps still its own.

An app that runs here without a spec is stopped for good (`Stop`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from mesh.placement import Placement
from mesh.wire import AppSpec, NodeRecord, OwnerRecord

AppState = Literal["starting", "running", "stopped", "failed"]
Version = tuple[int, int]  # a checkpoint's (epoch, seq): a later one is higher


@dataclass(frozen=True, slots=True)
class Running:
    """An app as this node hosts it."""

    epoch: int
    module: str
    state: AppState = "running"


@dataclass(frozen=True, slots=True)
class View:
    """The mesh as one node sees it at one moment."""

    node: str
    members: Mapping[str, NodeRecord]  # live members, this node included (leaving ones too)
    specs: Mapping[str, AppSpec]
    owners: Mapping[str, OwnerRecord]
    hosted: Mapping[str, Running]
    now: float = 0.0
    claim_after: float = 0.0  # after a lost broker: no claims of others' apps before this
    synced: bool = True  # every retained record the broker held when we subscribed is here
    # The newest checkpoint of each app this node holds (all its pieces here or not).
    checkpoints: Mapping[str, Version] = field(default_factory=dict)
    # Apps stopped since they were last deployed (their tombstones on the broker).
    tombstones: frozenset[str] = frozenset()
    # Apps whose state from this device's disk is resumed or dropped after the rejoin grace
    # (`Rebuild.later`): nothing is started or claimed for them before.
    deferred: frozenset[str] = frozenset()

    def placement(self) -> Placement:
        """Placement over the members that are not leaving."""
        return Placement(m for m in self.members.values() if not m.leaving)


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stop:
    """Its spec is gone: stop it here and clear its owner record and checkpoint."""

    app: str


@dataclass(frozen=True, slots=True)
class Fence:
    """Another node owns it at `epoch` >= ours: stop it here now, keeping nothing."""

    app: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Replace:
    """Stop this instance; the next pass starts the right one: the spec names another module,
    or the owner record names this node at a higher epoch than this instance's."""

    app: str


@dataclass(frozen=True, slots=True)
class HandOver:
    """Planned migration to `target`: checkpoint for `epoch`, then name `target` the owner."""

    app: str
    target: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Start:
    """The owner record names this node at `epoch`: start from that epoch's checkpoint."""

    app: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Claim:
    """Take the app: publish ownership at `epoch`, then start from its newest checkpoint."""

    app: str
    epoch: int
    failover: bool  # it had an owner that is gone (else it is a first start)


@dataclass(frozen=True, slots=True)
class Missing:
    """It should start here, but no checkpoint as new as its owner record says it reached is
    to be had: an alarm (the app is failed, with the reason), never a fresh start."""

    app: str
    reason: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Leaving with nowhere to hand it: a last checkpoint, then stop."""

    app: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """No member has everything the spec requires (reported, not acted on)."""

    app: str
    requires: tuple[str, ...]


Action = Stop | Fence | Replace | HandOver | Start | Claim | Missing | Shutdown | Unplaceable


def handover_epoch(running: Running, owner: OwnerRecord | None) -> int:
    """The epoch a handover of `running` names its next owner at: past every one seen."""
    return max(running.epoch, owner.epoch if owner else 0) + 1


def stale_owner(held: OwnerRecord | None, incoming: OwnerRecord) -> bool:
    """An owner record below the epoch of the one held is a claim that landed late (retained
    messages have no compare-and-set): it is refused, and an owner that still runs the app
    publishes its own record again."""
    return held is not None and incoming.epoch < held.epoch


def decide(view: View) -> list[Action]:
    """The actions that bring this node in line with `view`, in the order to take them."""
    actions: list[Action] = [Stop(app) for app in sorted(set(view.hosted) - set(view.specs))]
    placement = view.placement()
    for name, spec in sorted(view.specs.items()):
        target = placement.best(spec)
        if target is None:
            actions.append(Unplaceable(name, spec.requires))
        action = decide_app(view, spec, target)
        if action is not None:
            actions.append(action)
    return actions


def decide_app(view: View, spec: AppSpec, target: str | None) -> Action | None:
    """What this node should do about one app that has a spec, placed at `target`."""
    name = spec.app
    owner = view.owners.get(name)
    running = view.hosted.get(name)
    if running is not None:
        if owner is not None and owner.node != view.node and owner.epoch >= running.epoch:
            return Fence(name, owner.node, owner.epoch)
        if running.module != spec.module:
            return Replace(name)
        if owner is not None and owner.node == view.node and owner.epoch > running.epoch:
            return Replace(name)  # not the incarnation handed here: its state may be older
        if running.state == "running" and target is not None and target != view.node:
            return HandOver(name, target, handover_epoch(running, owner))
        return None
    if not view.synced:
        return None  # an owner record may still be on its way: acting now could lower an epoch
    if name in view.deferred:
        return None  # our state from disk, or a newer one on its way back: after the grace
    mine = owner is not None and owner.node == view.node
    if not mine and not (target == view.node and (owner is None or
                                                 owner.node not in view.members)):
        return None
    if owner is not None and owner.seq > 0:
        held = view.checkpoints.get(name)
        if held is None or held[1] < owner.seq:
            return Missing(name, f"no valid checkpoint: its owner record (node {owner.node}, "
                                 f"epoch {owner.epoch}) says it reached checkpoint {owner.seq}, "
                                 f"and the newest here is "
                                 f"{'none' if held is None else held[1]}; waiting for a node "
                                 f"that holds it (or `mesh restart {name} --fresh`)")
    newest = view.checkpoints.get(name, (0, 0))[0]  # past every epoch seen, record or state
    if mine:
        assert owner is not None
        if newest <= owner.epoch:
            return Start(name, owner.epoch)
        # The record lags the app's state (a resume whose record never landed): running at
        # the record's epoch, its checkpoints would be refused as older. Claim past it.
    elif view.now < view.claim_after:
        # Its owner may still be on its way back from a lost broker: one that lost its store
        # lost the owner records too, so an app with none may have one coming back as well.
        return None
    return Claim(name, max(owner.epoch if owner else 0, newest) + 1, failover=owner is not None)


def plan_leave(view: View) -> list[HandOver | Shutdown]:
    """Leaving gracefully: each running app to the node that should run it next."""
    others = Placement(m for m in view.members.values()
                       if m.id != view.node and not m.leaving)
    plan: list[HandOver | Shutdown] = []
    for name, running in sorted(view.hosted.items()):
        spec = view.specs.get(name)
        target = others.best(spec) if spec is not None else None
        if target is not None and running.state == "running":
            plan.append(HandOver(name, target, handover_epoch(running, view.owners.get(name))))
        else:
            plan.append(Shutdown(name))
    return plan


# --- giving a broker back what it lost ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """What a node held when it lost its broker (or kept on disk through a power cut)."""

    specs: Mapping[str, AppSpec]
    owners: Mapping[str, OwnerRecord]
    suspended: Mapping[str, Version]  # its own apps' state, kept
    copies: Mapping[str, Version] = field(default_factory=dict)  # others' checkpoints it holds
    # Specs and owner records go back only to a broker that lost its store (it has no mesh
    # marker): a broker that kept it is the mesh's memory, and what it lacks was removed on
    # purpose. A node that joins a broker it was given (`--broker`) holds its state this way.
    only_if_lost: bool = False
    # The apps whose `suspended` state came from this device's disk (back from a crash or a
    # power cut): another node may hold a newer state of them, or may have run them since.
    from_disk: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Rebuild:
    """What to give a broker back, in this order."""

    specs: tuple[AppSpec, ...] = ()  # with their modules
    resume: tuple[tuple[str, int], ...] = ()  # own apps: checkpoint + owner record at epoch
    owners: tuple[tuple[str, OwnerRecord], ...] = ()  # others' apps: epochs to go past
    copies: tuple[str, ...] = ()  # others' apps: the checkpoint held, newer than the broker's
    forget: tuple[str, ...] = ()  # own apps' kept state the mesh went on without
    grace: bool = False  # let the other survivors come back before claiming their apps
    later: tuple[str, ...] = ()  # own apps from disk: `plan_resume` after the grace


def copy_wanted(owner: OwnerRecord | None, members: Collection[str], newest: Version | None,
                copy: Version) -> bool:
    """After the grace, is the checkpoint `copy` we hold of an app still to be given back to a
    broker that lost its store? Only if it is the newest we know of (`newest`: ours, or one
    stored meanwhile) and its owner cannot have gone on from a newer state: it is not back, or
    its record is no newer than the copy (it waits for the state the record names; an owner
    back with its own state resumes it at the next epoch). A copy stored over a newer
    checkpoint would be a step back: retained messages have no compare-and-set."""
    if newest is not None and newest > copy:
        return False
    return owner is None or owner.node not in members or (owner.epoch, owner.seq) <= copy


def plan_rebuild(view: View, held: Held, *, lost: bool, remarked: bool = False) -> Rebuild:
    """Joined a broker after losing one (or after a restart): what of `held` to give it, given
    what it has (`view`) and whether it `lost` its store. The newest state wins: an app's state
    kept here goes back unless the broker holds a newer checkpoint or the app moved on.

    `remarked`: it lost the store we held this for, and another node has marked it since (one
    that held nothing, or gave back what it held): the specs it has stand, save that an app
    whose state we hold comes back with its spec. (Another app it lacks may have been stopped
    while we were away.)"""
    give = lost or not held.only_if_lost
    specs = tuple(spec for name, spec in sorted(held.specs.items())
                  if give and name not in view.specs and name not in view.tombstones
                  and (not remarked or name in held.suspended))
    known = set(view.specs) | {spec.app for spec in specs}
    # (An owner that is back gives its own record, at the epoch it resumes at: one given for
    # it could land after that, and put the epoch back.) A record given back names the newest
    # checkpoint we hold of the app (the owner's record named the one it started from), so no
    # one starts the app from an older one, or from nothing, before our copy is back.
    owners = tuple((name, replace(owner, seq=max(owner.seq, held.copies.get(name, (0, 0))[1])))
                   for name, owner in sorted(held.owners.items())
                   if give and name in known and name not in view.owners
                   and name not in held.suspended and owner.node not in view.members)
    resume, forget, later = [], [], []
    for name, version in sorted(held.suspended.items()):
        owner = view.owners.get(name)
        newer = view.checkpoints.get(name)
        if name not in known:
            forget.append(name)  # stopped meanwhile
        elif owner is not None and owner.node != view.node and owner.epoch > version[0]:
            forget.append(name)  # another node took it over meanwhile
        elif newer is not None and newer > version:
            forget.append(name)  # the broker holds a newer state: it goes on from that
        elif owner is not None and owner.seq > version[1]:
            pass  # its record names a newer state than ours: not a step back (kept on disk)
        elif name in held.from_disk and newer != version:
            later.append(name)  # a survivor may hold a newer one, or be on its way back with it
        else:
            resume.append((name, max(version[0], owner.epoch if owner else 0) + 1))
    records = {**view.owners, **dict(owners)}

    def copy_goes_back(name: str, version: Version) -> bool:
        broker = view.checkpoints.get(name) or (-1, -1)
        owner = records.get(name)
        if name not in known or name in held.suspended or broker >= version:
            return False
        # Its owner record names a checkpoint the broker lacks, and this copy is it (or newer).
        gap = owner is not None and broker[1] < owner.seq <= version[1]
        # A broker that kept its store keeps its checkpoints (else a copy given back could
        # land over a newer one stored meanwhile: no compare-and-set), and an owner that is
        # back runs the app from its own state.
        return gap or (lost and (owner is None or owner.node not in view.members))

    copies = tuple(name for name, version in sorted(held.copies.items())
                   if copy_goes_back(name, version))
    # Claims of apps whose owner is not back yet wait a little, whatever was given back: the
    # other survivors of the lost broker come back too, each with its own apps. (A device
    # that held nothing, new or wiped, has no one to wait for.)
    return Rebuild(specs, tuple(resume), owners, copies, tuple(forget),
                   grace=bool(held.specs or held.owners or held.suspended), later=tuple(later))


def plan_resume(view: View, held: Held, names: Collection[str]) -> Rebuild:
    """After the grace: the resumes a rebuild put off (`Rebuild.later`), decided on what the
    broker holds now (the other survivors had their chance to give back what they hold). One
    that runs here meanwhile is left as it is."""
    kept = {name: version for name, version in held.suspended.items()
            if name in names and name not in view.hosted}
    plan = plan_rebuild(view, Held({}, {}, kept), lost=False)
    return Rebuild(resume=plan.resume, forget=plan.forget)
