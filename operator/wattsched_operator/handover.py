"""Make-before-break moves of a service's replicas, as pure functions of pods, plan and budgets.

A replica has two pod names, `<workload>-<replica>` and `<workload>-<replica>-h`. When the plan
moves a Ready replica of an Inference workload (not a gang) to another node or variant, its
replacement is created under the other name, annotated `wattsched.io/replaces: <old pod>`, while
the old pod keeps serving at its power limit; the old pod is evicted once the replacement is Ready.
Both carry the workload label, so a Service selecting it keeps Ready endpoints throughout.

The pods of a replica that spans nodes (a rank label, `replica_groups`) are never handed over:
such a replica moves whole, break-before-make, like a gang's.

A hand-over needs, for the time both pods exist:
- free GPUs on the target node now: the node's GPUs the plan may use, less those held by the
  operator's live or terminating pods there and by every pod the round creates there;
- room in every budget whose scope holds the old pod's node for the old pod's GPUs at its limit
  rather than at the idle limit the plan counts them at (the plan's `allocated_cap_watts` against
  the cap). The old pod's limit stays in its node's profile (`keep_limits`), so the budget-safe
  order of `transition.power_steps` keeps it; the replacement is raised in the raising step.
Otherwise the move is break-before-make, as for gangs, and says why (`fallbacks`).

A hand-over in progress survives rounds: `snapshot` counts the old pod in its node's GPUs the plan
does not control (`GpuNode.unmanaged_*`, at its limit) and the replacement as the replica's running
pod. A replacement that is not Ready `REPLACEMENT_READY_TIMEOUT_SECONDS` after its creation is given
up (deleted; the old pod stays). A budget that no longer has room for both (over its cap with the
old pod counted) evicts the old pod at once. This module talks to no API server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from wattsched_api.meta import read_timestamp
from wattsched_api.vocabulary import (
    GPU_RESOURCE,
    NODE_ANNOTATION,
    POD_FINISHED_PHASES,
    POWER_LIMIT_ANNOTATION,
    RANK_LABEL,
    REPLACES_ANNOTATION,
    REPLICA_LABEL,
    VARIANT_ANNOTATION,
    WORKLOAD_LABEL,
)
from wattsched_operator import replica_groups
from wattsched_operator.transition import PodKey
from wattsched_optimizer.problem import Placement

__all__ = ["REPLACES_ANNOTATION"]

# A replacement pod not Ready this long after its creation is given up (the old pod stays).
REPLACEMENT_READY_TIMEOUT_SECONDS = 600.0
REPLACEMENT_SUFFIX = "-h"

ReplicaKey = tuple[str, int]  # (workload key `namespace/name`, replica index)
Pod = Mapping[str, object]


def pod_name(workload_name: str, replica: int) -> str:
    """A replica's first pod name (its replacement in a hand-over takes the other one): the
    leader's name, as `desired.pod_name` gives rank 0."""
    return replica_groups.leader_name(workload_name, replica)


def replacement_name(current_name: str, workload_name: str, replica: int) -> str:
    """The name a replacement gets: the one of the replica's two names the current pod lacks.

    Replica names end in a digit, `-h` names in `h` and workers' (`<leader>-w<rank>`) in a digit
    after `w`, so no workload's names collide.
    """
    first = pod_name(workload_name, replica)
    return first + REPLACEMENT_SUFFIX if current_name == first else first


def _meta(pod: Pod) -> Mapping[str, object]:
    meta = pod.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _field(pod: Pod, section: str, name: str) -> object:
    part = _meta(pod).get(section)
    return part.get(name) if isinstance(part, Mapping) else None


def _key(pod: Pod) -> PodKey:
    meta = _meta(pod)
    return (str(meta.get("namespace")), str(meta.get("name")))


def _managed(pod: Pod) -> bool:
    workload = _field(pod, "labels", WORKLOAD_LABEL)
    return isinstance(workload, str) and bool(workload)


def _replica(pod: Pod) -> ReplicaKey | None:
    """The replica a pod that may be handed over belongs to: None for pods of replicas that span
    nodes (a rank label) and for unreadable labels."""
    workload, replica = _field(pod, "labels", WORKLOAD_LABEL), _field(pod, "labels", REPLICA_LABEL)
    if not isinstance(workload, str) or not workload:
        return None
    if _field(pod, "labels", RANK_LABEL) is not None:
        return None
    if not isinstance(replica, str) or not replica.isascii() or not replica.isdigit():
        return None
    return (f"{_meta(pod).get('namespace')}/{workload}", int(replica))


def _status(pod: Pod) -> Mapping[str, object]:
    status = pod.get("status")
    return status if isinstance(status, Mapping) else {}


def _finished(pod: Pod) -> bool:
    return _status(pod).get("phase") in POD_FINISHED_PHASES


def _deleting(pod: Pod) -> bool:
    return bool(_meta(pod).get("deletionTimestamp"))


def _live(pod: Pod) -> bool:
    return not _finished(pod) and not _deleting(pod)


def is_ready(pod: Pod) -> bool:
    """The pod's Ready condition is True and it is not being deleted."""
    conditions = _status(pod).get("conditions")
    return (
        not _deleting(pod)
        and isinstance(conditions, list)
        and any(
            isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
            for c in conditions
        )
    )


def pod_node(pod: Pod) -> str | None:
    """The node a pod is bound to, else the node the operator planned it on."""
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    node = node or _field(pod, "annotations", NODE_ANNOTATION)
    return str(node) if node else None


def pod_gpus(pod: Pod) -> int:
    """`nvidia.com/gpu` a pod's containers ask for (limits first); 0 when unreadable."""
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    total = 0
    for container in containers if isinstance(containers, list) else []:
        resources = container.get("resources") if isinstance(container, Mapping) else None
        if not isinstance(resources, Mapping):
            continue
        for section in ("limits", "requests"):
            amounts = resources.get(section)
            amount = amounts.get(GPU_RESOURCE) if isinstance(amounts, Mapping) else None
            if amount is not None:
                text = str(amount)
                total += int(text) if text.isascii() and text.isdigit() else 0
                break
    return total


def pod_limit_watts(pod: Pod) -> float | None:
    """The per-GPU power limit the operator gave a pod (its annotation); None when unreadable."""
    text = _field(pod, "annotations", POWER_LIMIT_ANNOTATION)
    try:
        watts = float(str(text))
    except ValueError:
        return None
    return watts if math.isfinite(watts) and watts >= 0 else None


@dataclass(frozen=True)
class HandOver:
    """A make-before-break move in progress: both pods exist, neither finished nor deleting."""

    replica: ReplicaKey
    old: PodKey
    new: PodKey
    old_node: str
    old_gpus: int
    old_limit_watts: float
    new_ready: bool
    new_created: datetime | None


def pending_handovers(pods: Iterable[Pod]) -> dict[PodKey, HandOver]:
    """Hand-overs in progress, by old pod: a live replacement naming a live pod of the same
    replica in its `wattsched.io/replaces` annotation. An old pod whose node or limit cannot be
    read is not handed over (it is an ordinary pod again)."""
    pods = list(pods)
    by_key = {_key(p): p for p in pods}
    found: dict[PodKey, HandOver] = {}
    for new in pods:
        replaces = _field(new, "annotations", REPLACES_ANNOTATION)
        replica = _replica(new)
        if not isinstance(replaces, str) or replica is None or not _live(new):
            continue
        old_key = (_key(new)[0], replaces)
        old = by_key.get(old_key)
        if old is None or old_key == _key(new) or not _live(old) or _replica(old) != replica:
            continue
        node, limit = pod_node(old), pod_limit_watts(old)
        if node is None or limit is None:
            continue
        found[old_key] = HandOver(
            replica=replica,
            old=old_key,
            new=_key(new),
            old_node=node,
            old_gpus=pod_gpus(old),
            old_limit_watts=limit,
            new_ready=is_ready(new),
            new_created=read_timestamp(_meta(new).get("creationTimestamp")),
        )
    return found


def leaving_by_node(pods: Iterable[Pod]) -> dict[str, tuple[int, float]]:
    """Node -> (GPUs, watts) held by old pods of hand-overs in progress: the plan neither offers
    those GPUs nor counts them as idle; budgets count them at the old pods' limits."""
    leaving: dict[str, tuple[int, float]] = {}
    for handover in pending_handovers(pods).values():
        gpus, watts = leaving.get(handover.old_node, (0, 0.0))
        leaving[handover.old_node] = (
            gpus + handover.old_gpus,
            watts + handover.old_gpus * handover.old_limit_watts,
        )
    return leaving


def replica_pods(pods: Iterable[Pod]) -> dict[ReplicaKey, Pod]:
    """Each replica's current pod: the replacement of a hand-over in progress, else a live pod,
    else a finished one, else one being deleted (its name is reused, as before the move)."""
    pods = list(pods)
    leaving = set(pending_handovers(pods))
    chosen: dict[ReplicaKey, Pod] = {}

    def rank(pod: Pod) -> int:
        return 0 if _live(pod) else 1 if not _deleting(pod) else 2

    for pod in sorted(pods, key=lambda p: (rank(p), _key(p))):
        replica = _replica(pod)
        if replica is not None and _key(pod) not in leaving:
            chosen.setdefault(replica, pod)
    return chosen


@dataclass(frozen=True)
class BudgetRoom:
    """A budget's room for hand-overs: its cap less what the plan counts in scope (W)."""

    name: str
    headroom_watts: float
    node_names: frozenset[str]


@dataclass(frozen=True)
class Decision:
    """What a round does about make-before-break moves."""

    # Replica -> the name its pod has in this round's plan (absent: `pod_name`).
    names: Mapping[ReplicaKey, str] = field(default_factory=dict)
    # Replica -> the old pod its replacement created this round replaces (its annotation).
    replaces: Mapping[ReplicaKey, str] = field(default_factory=dict)
    # Old pods that stay this round, and their limits per node, kept in the node's profile.
    keep: frozenset[PodKey] = frozenset()
    keep_limits: Mapping[str, Mapping[PodKey, float]] = field(default_factory=dict)
    # Workload -> "<old>: <node> -> <node> (<new> first)" for each hand-over started this round.
    started: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Old pods that go before their replacement is Ready, and why (the `Moved` Event says so).
    fallbacks: Mapping[PodKey, str] = field(default_factory=dict)
    # Old pods whose replacement is Ready: evicted now (not a move of their own).
    finished: frozenset[PodKey] = frozenset()
    # Replacements given up (deleted; their old pod stays), with why.
    given_up: Mapping[PodKey, str] = field(default_factory=dict)


def decide(
    pods: Iterable[Pod],
    placements: Iterable[Placement],
    *,
    services: frozenset[str],
    lost_nodes: frozenset[str],
    node_gpus: Mapping[str, int],
    idle_watts: Mapping[str, float],
    budgets: Sequence[BudgetRoom],
    now: datetime,
    timeout_seconds: float = REPLACEMENT_READY_TIMEOUT_SECONDS,
) -> Decision:
    """Which moves of this round are make-before-break, and what hand-overs in progress do.

    `pods`: the operator's pods; `placements`: the plan's; `services`: keys of Inference workloads
    that are not gangs; `lost_nodes`: nodes whose pods serve nothing (gone, NotReady, NoExecute);
    `node_gpus`: GPUs the plan may use per node (`GpuNode.gpu_count`); `idle_watts`: the plan's
    idle limit per node; `budgets`: room per budget as the plan counts it.
    """
    pods = list(pods)
    handovers = pending_handovers(pods)
    current = replica_pods(pods)
    names = {replica: str(_meta(pod).get("name")) for replica, pod in current.items()}
    rooms = {b.name: b for b in budgets}
    headroom = {b.name: b.headroom_watts for b in budgets}
    keep: set[PodKey] = set()
    keep_limits: dict[str, dict[PodKey, float]] = {}
    finished: set[PodKey] = set()
    fallbacks: dict[PodKey, str] = {}
    given_up: dict[PodKey, str] = {}

    def over_budget(node: str) -> str | None:
        return next(
            (n for n, room in sorted(rooms.items()) if node in room.node_names and headroom[n] < 0),
            None,
        )

    for old, handover in sorted(handovers.items()):
        over = over_budget(handover.old_node)
        age = None if handover.new_created is None else (now - handover.new_created).total_seconds()
        if handover.new_ready:
            finished.add(old)
        elif over is not None:
            fallbacks[old] = (
                f"moved before its replacement was ready: budget {over} has no room for both"
            )
        elif age is not None and age > timeout_seconds:
            given_up[handover.new] = (
                f"replacement {handover.new[1]} of {old[1]} not Ready {age:.0f} s after its "
                f"creation (limit {timeout_seconds:.0f} s): given up, {old[1]} stays"
            )
            keep.add(old)
        else:
            keep.add(old)
        if old in keep or old in finished:
            keep_limits.setdefault(handover.old_node, {})[old] = handover.old_limit_watts

    # GPUs free on each node now: live and terminating pods hold theirs (leaving pods are not in
    # `node_gpus`), and so does every pod the round creates.
    free = dict(node_gpus)
    for held in pods:
        node = pod_node(held)
        if node in free and _managed(held) and not _finished(held) and _key(held) not in handovers:
            free[node] -= pod_gpus(held)
    candidates: list[tuple[Placement, Pod, str, float]] = []
    for placement in sorted(placements, key=lambda p: (p.workload, p.replica)):
        pod: Pod | None = current.get((placement.workload, placement.replica))
        if pod is not None and not _live(pod):
            pod = None  # finished or deleting: its replacement comes after it (name reused)
        if pod is not None and (
            pod_node(pod) == placement.node
            and _field(pod, "annotations", VARIANT_ANNOTATION) == placement.variant
        ):
            continue  # stays
        old_node = None if pod is None else pod_node(pod)
        limit = None if pod is None else pod_limit_watts(pod)
        if (
            pod is None
            or old_node is None
            or limit is None
            or placement.workload not in services
            or placement.nodes_per_replica > 1
            or not is_ready(pod)
            or old_node in lost_nodes
        ):
            # A new replica, a gang member (it moves whole) or a pod that serves nothing (it goes
            # first, as before): created when its name and GPUs are free.
            if placement.node in free:
                free[placement.node] -= placement.gpus
            continue
        candidates.append((placement, pod, old_node, limit))

    replaces: dict[ReplicaKey, str] = {}
    started: dict[str, list[str]] = {}
    for placement, pod, old_node, limit in candidates:
        old = _key(pod)
        gpus = pod_gpus(pod) or placement.gpus
        # The plan counts the old pod's GPUs at the idle limit (or gives them to another pod that
        # cannot start before it goes); during the hand-over they draw up to the old limit.
        extra = gpus * max(0.0, limit - idle_watts.get(old_node, 0.0))
        short = [
            n
            for n, room in sorted(rooms.items())
            if old_node in room.node_names and headroom[n] < extra
        ]
        fits = free.get(placement.node, 0) >= placement.gpus
        if placement.node in free:
            free[placement.node] -= placement.gpus
        if not fits:
            fallbacks[old] = (
                f"moved before its replacement was ready: no free GPUs on {placement.node} for both"
            )
            continue
        if short:
            fallbacks[old] = (
                f"moved before its replacement was ready: no room in budget {', '.join(short)} "
                "for both"
            )
            continue
        for n, room in rooms.items():
            if old_node in room.node_names:
                headroom[n] -= extra
        workload_name = placement.workload.partition("/")[2]
        new_name = replacement_name(old[1], workload_name, placement.replica)
        replica = (placement.workload, placement.replica)
        names[replica] = new_name
        replaces[replica] = old[1]
        keep.add(old)
        keep_limits.setdefault(old_node, {})[old] = limit
        started.setdefault(placement.workload, []).append(
            f"{old[1]}: {old_node} -> {placement.node} ({new_name} first)"
        )
    return Decision(
        names=names,
        replaces=replaces,
        keep=frozenset(keep),
        keep_limits=keep_limits,
        started={k: tuple(v) for k, v in started.items()},
        fallbacks=fallbacks,
        finished=frozenset(finished),
        given_up=given_up,
    )
