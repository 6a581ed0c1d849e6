"""A round's pod and power-limit changes from a plan: which pods to keep, evict (with their cause),
delete and create, which make-before-break hand-overs start or finish (`handover`), which limits
to lower first and raise last (`transition`). Pure: returns a Round without memory that
`core.decide` completes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from wattsched_api.energybudget import parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_api.vocabulary import (
    ConditionType,
    Phase,
    Reason,
)
from wattsched_operator import (
    desired,
    handover,
    lifecycle,
    replica_groups,
    services,
    snapshot,
    statuses,
    transition,
)
from wattsched_operator.rounds import (
    WORKLOAD_KIND,
    Body,
    ClusterView,
    Deletion,
    Disruptions,
    Eviction,
    Memory,
    ObjectRef,
    Round,
    StatusWrite,
    finished,
    is_deleting,
    is_gang,
    pod_id,
    pod_workload_key,
    preemption_cause,
    workload_object,
)
from wattsched_optimizer.problem import (
    MoveReason,
    Plan,
    PlanInput,
    Unplaced,
    WorkloadType,
)


def unmanaged_gpu_caps(
    budgets: Iterable[Mapping[str, Any]], nodes: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Node name -> the per-GPU limit (W) for GPUs held by other teams' pods: the lowest
    `spec.unmanagedGpus.powerLimitWatts` of the valid, live EnergyBudgets selecting the node.
    Nodes no such budget selects are absent (their other teams' GPUs are left alone)."""
    caps: dict[str, float] = {}
    for body in budgets:
        if is_deleting(body):
            continue
        try:
            spec = parse_energybudget(body).spec
        except ApiValidationError:
            continue  # an invalid budget is reported as such and plans nothing
        if spec.unmanaged_gpu_limit_watts is None:
            continue
        for node in nodes:
            meta = node.get("metadata") or {}
            if spec.selects(meta.get("labels") or {}):
                name = str(meta.get("name"))
                caps[name] = min(caps.get(name, math.inf), spec.unmanaged_gpu_limit_watts)
    return caps


def pod_round(
    view: ClusterView,
    active: Mapping[str, Body],
    plan: Plan,
    life: lifecycle.Lifecycle,
    now: datetime,
    *,
    plan_input: PlanInput,
    unplaced: Mapping[str, Unplaced],
) -> Round:
    """The pod and power-limit changes of a plan: lower, evict, delete, create, raise (in a
    Round without memory; `core.decide` completes it). A service's replica that moves is handed
    over make-before-break where GPUs and budgets allow (`_handovers`). `unplaced`: the
    workloads without a place this round (`status_writes.unplaced_of`: the plan's and the
    deferred work); a running one is preempted with the cause its constraint names."""
    objects = {key: workload_object(body) for key, body in active.items()}
    lost_nodes = frozenset(
        name for name, body in view.nodes.items() if not snapshot.keeps_running(body)
    ) | frozenset(
        node
        for pod in view.pods.values()
        if (node := (pod.get("spec") or {}).get("nodeName")) and node not in view.nodes
    )
    handovers = _handovers(view, active, plan, plan_input, lost_nodes=lost_nodes, now=now)
    want = desired.desired_pods(
        objects, plan.placements, names=handovers.names, replaces=handovers.replaces
    )
    changes = desired.pod_changes(
        view.pods.values(), want, frozenset(life.keep_pods) | handovers.keep
    )
    # The pods of a replica that spans nodes are deleted (and so moved) together.
    changes = dataclasses.replace(
        changes,
        delete=replica_groups.whole_replica_deletions(changes.delete, view.pods.values()),
    )
    # A replica that spans nodes restarts whole when one of its pods fails.
    restart = replica_groups.group_restarts(view.pods.values(), want)
    caps = unmanaged_gpu_caps(view.budgets.values(), view.nodes.values())
    planned = {
        node: dataclasses.replace(limits, unmanaged_watts=caps.get(node))
        for node, limits in desired.planned_limits(
            plan, names=handovers.names, kept=handovers.keep_limits
        ).items()
    }
    current = {
        node: transition.NodePowerState.from_profile(view.profiles.get(node)) for node in planned
    }
    steps = transition.power_steps(current, planned)

    # Preempted and moved pods are evicted (Eviction API: PodDisruptionBudgets hold), a
    # service's moves one replica at a time unless a budget forces them.
    pods_by_name = {pod_id(p): p for p in view.pods.values()}
    paced = desired.pace_deletions(
        changes.delete,
        pods_by_name,
        want,
        services=frozenset(key for key, body in active.items() if not is_gang(body)),
        forced=frozenset(
            key for key, cause in plan.move_reasons.items() if cause is MoveReason.BUDGET
        ),
        lost_nodes=lost_nodes,
    )
    placed_keys = {p.workload for p in plan.placements}

    def gone(namespace: str, name: str) -> bool:
        node = (pods_by_name.get((namespace, name), {}).get("spec") or {}).get("nodeName")
        return bool(node) and node not in view.nodes

    def cause(pod: Mapping[str, Any]) -> MoveReason | None:
        key = pod_workload_key(pod)
        if key not in active or finished(pod):
            return None
        if pod_id(pod) in want:  # the replica is wanted elsewhere: it moves
            return plan.move_reasons.get(key, MoveReason.SPEC)
        if pod_id(pod) in handovers.finished or pod_id(pod) in handovers.fallbacks:
            # The old pod of a make-before-break move (its replacement has the other name).
            return plan.move_reasons.get(key, MoveReason.SPEC)
        if key not in placed_keys:  # its workload lost its place (or runs later): preempted
            return preemption_cause(unplaced[key].constraint if key in unplaced else "")
        return None  # scaled down

    evict = tuple(
        Eviction(
            ns,
            name,
            pod_workload_key(pods_by_name[(ns, name)]),
            gone(ns, name),
            cause(pods_by_name[(ns, name)]),
        )
        if (ns, name) in pods_by_name
        else Eviction(ns, name, "", False)
        for ns, name in paced.now
    )
    # New pods (a name still held by a terminating pod is retried next round).
    deleting = (
        set(changes.delete)
        | life.delete_pods
        | restart.delete
        | restart.hold
        | {pod_id(p) for p in view.pods.values() if is_deleting(p)}
    )
    # A replacement given up is deleted (its old pod stays).
    delete_now = sorted(life.delete_pods | restart.delete | set(handovers.given_up))
    creatable = tuple(
        p for p in changes.create if pod_id(p) not in deleting and pod_id(p) not in life.keep_pods
    )
    return Round(
        memory=Memory(),
        lower=steps.lower,
        # An old pod whose replacement is Ready goes without its workload leaving Running.
        moving=tuple(
            _moving_statuses(
                view,
                active,
                placed_keys,
                [k for k in paced.now if k not in handovers.finished],
                now,
            )
        ),
        evict=evict,
        delete=tuple(Deletion(ns, name, gone(ns, name)) for ns, name in delete_now),
        create=creatable,
        services=services.desired_from_plan(active, plan.placements, view.pods.values()),
        relabel=dict(changes.relabel_power),
        raise_=steps.raise_,
        disruptions=Disruptions(
            move_reasons=dict(plan.move_reasons),
            unplaced=dict(unplaced),
            placed={(p.workload, p.replica): p.node for p in plan.placements},
            pods=pods_by_name,
            want=want,
            workloads={key: ObjectRef.of(WORKLOAD_KIND, body) for key, body in active.items()},
            gangs=frozenset(key for key, body in active.items() if is_gang(body)),
            handovers=handovers,
        ),
        replan_soon=bool(paced.later) or len(creatable) < len(changes.create),
    )


def _handovers(
    view: ClusterView,
    active: Mapping[str, Body],
    plan: Plan,
    plan_input: PlanInput,
    *,
    lost_nodes: frozenset[str],
    now: datetime,
) -> handover.Decision:
    """Which of the plan's moves are make-before-break, and what hand-overs in progress do
    (`handover.decide`): GPUs from the planned nodes, room from the plan's budgets. Gangs and
    replicas that span nodes move whole, break-before-make."""
    allocated = {b.name: b.allocated_cap_watts for b in plan.budgets}
    return handover.decide(
        view.pods.values(),
        plan.placements,
        services=frozenset(
            key
            for key, body in active.items()
            if not is_gang(body)
            and (body.get("spec") or {}).get("type", "Inference") == WorkloadType.INFERENCE.value
        ),
        lost_nodes=lost_nodes,
        node_gpus={n.name: n.gpu_count for n in plan_input.nodes},
        idle_watts=plan.node_idle_limits_watts,
        budgets=[
            handover.BudgetRoom(
                b.name, b.power_cap_watts - allocated.get(b.name, math.inf), b.node_names
            )
            for b in plan_input.budgets
        ],
        now=now,
    )


def _moving_statuses(
    view: ClusterView,
    active: Mapping[str, Body],
    placed_keys: set[str],
    to_delete: Iterable[tuple[str, str]],
    now: datetime,
) -> list[StatusWrite]:
    """Before the pods of a Running workload that stays placed are deleted (they move), its
    status says Placed: it is never Running with a replica's pod gone (the round's status
    write then says where they go)."""
    moving: dict[str, list[str]] = {}
    for namespace, name in to_delete:
        pod = view.pods.get(f"{namespace}/{name}")
        key = pod_workload_key(pod) if pod is not None else ""
        if key in placed_keys and key in active:
            moving.setdefault(key, []).append(name)
    writes = []
    for key, names in sorted(moving.items()):
        body = active[key]
        previous = body.get("status") or {}
        if previous.get("phase") != Phase.RUNNING:
            continue
        message = f"pod(s) {', '.join(sorted(names))} move: waiting for their replacements"
        ready = statuses.condition(
            previous.get("conditions") or [],
            ConditionType.READY,
            False,
            Reason.MOVING,
            message,
            now=now,
        )
        conditions = [
            c for c in previous.get("conditions") or [] if c.get("type") != ConditionType.READY
        ] + [ready]
        status = {"phase": Phase.PLACED, "message": message, "conditions": conditions}
        writes.append(StatusWrite(ObjectRef.of(WORKLOAD_KIND, body), status))
    return writes
