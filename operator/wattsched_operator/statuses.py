"""Pure functions that compute LLMWorkload and EnergyBudget status from a plan and the pods.

The phase machine (Pending -> Placed -> Running -> Succeeded/Failed, Preempted when placed work
loses its place), the standard conditions keyed by type (lastTransitionTime kept while the status
does not change), the budget figures, and the measured figures a telemetry reading adds (or leaves
out). Nothing here writes to the API server or reads Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wattsched_api.meta import format_time
from wattsched_api.vocabulary import (
    RANK_LABEL,
    REPLICA_LABEL,
    TERMINAL_PHASES,
    ConditionType,
    Phase,
    PodPhase,
    Reason,
    Source,
)
from wattsched_operator.readings import PodKey, TelemetrySnapshot
from wattsched_optimizer.options import key_label
from wattsched_optimizer.planner import held_budget_reason
from wattsched_optimizer.problem import BudgetAllocation, Placement, Plan, Unplaced


def condition(
    previous: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    *,
    now: datetime,
    observed_generation: int | None = None,
) -> dict[str, Any]:
    """A metav1.Condition; its lastTransitionTime moves only when its status changes."""
    status_text = "Unknown" if status is None else ("True" if status else "False")
    before = next((c for c in previous if c.get("type") == type_), None)
    transition = format_time(now)
    if (
        before is not None
        and before.get("status") == status_text
        and before.get("lastTransitionTime")
    ):
        transition = str(before["lastTransitionTime"])
    result: dict[str, Any] = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        result["observedGeneration"] = observed_generation
    return result


def replica_index(pod: Mapping[str, Any]) -> int:
    """A pod's `wattsched.io/replica` label as a number; -1 when absent or not a whole number
    (a pod someone else labelled: it stands for no replica)."""
    text = ((pod.get("metadata") or {}).get("labels") or {}).get(REPLICA_LABEL)
    return int(text) if isinstance(text, str) and text.isdigit() and text.isascii() else -1


def rank_index(pod: Mapping[str, Any]) -> int:
    """A pod's `wattsched.io/rank` label as a number (its place in a replica that spans nodes);
    0 when absent, -1 when not a whole number."""
    text = ((pod.get("metadata") or {}).get("labels") or {}).get(RANK_LABEL, "0")
    return int(text) if isinstance(text, str) and text.isdigit() and text.isascii() else -1


@dataclass(frozen=True)
class PodView:
    """The parts of one of the operator's pods that status needs."""

    replica: int
    node: str | None
    phase: str  # Pending/Running/Succeeded/Failed/Unknown
    ready: bool
    deleting: bool = False
    # Its place in a replica that spans nodes (0: the leader, and every single-node pod).
    rank: int = 0

    def serves(self, placement: Placement) -> bool:
        """Whether this pod runs, ready, where the plan places its replica (and stays)."""
        return (
            self.replica == placement.replica
            and self.rank == placement.rank
            and self.node == placement.node
            and self.phase == PodPhase.RUNNING
            and self.ready
            and not self.deleting
        )

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        return cls(
            replica=replica_index(pod),
            node=(pod.get("spec") or {}).get("nodeName"),
            phase=str(status.get("phase") or PodPhase.PENDING),
            ready=ready,
            deleting=bool(meta.get("deletionTimestamp")),
            rank=rank_index(pod),
        )


def succeeded_replicas(pods: Iterable[PodView]) -> set[int]:
    """Replicas whose work is done: their (leader) pod succeeded."""
    return {p.replica for p in pods if p.phase == PodPhase.SUCCEEDED and p.rank == 0}


def replica_count(placements: Iterable[Placement]) -> int:
    """Planned replicas (a replica that spans nodes has a placement per pod)."""
    return len({p.replica for p in placements})


def served_replicas(placements: Sequence[Placement], pods: Sequence[PodView]) -> int:
    """Planned replicas every pod of which is served (running, ready, in place)."""
    replicas: dict[int, bool] = {}
    for placement in placements:
        served = any(p.serves(placement) for p in pods)
        replicas[placement.replica] = replicas.get(placement.replica, True) and served
    return sum(replicas.values())


def find_condition(conditions: Iterable[Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == type_), None)


def next_phase(
    previous_phase: str | None,
    *,
    is_gang: bool,
    gang_size: int,
    placements: Sequence[Placement],
    pods: Sequence[PodView],
    failed_permanently: bool,
) -> str:
    """The workload's phase after this plan.

    Terminal phases stay. A gang whose every replica's pod succeeded is Succeeded. Failed pods
    beyond the retry limit make it Failed. Planned replicas whose pods all run, ready, on the
    planned node and not being deleted make it Running, otherwise Placed (a replica that moves
    is not running until its new pod is). With no planned replica, work that had a place (it ran,
    or it was placed and has pods) is Preempted and anything else is Pending.
    """
    if previous_phase in TERMINAL_PHASES:
        return previous_phase
    if failed_permanently:
        return Phase.FAILED
    succeeded = succeeded_replicas(pods)
    if is_gang and gang_size > 0 and len(succeeded) >= gang_size:
        return Phase.SUCCEEDED
    if not placements:
        # Preempted only if it had a place to lose: it ran, or it was placed and has pods. A
        # status that says Placed with no pod behind it (a refused or never-created pod, then an
        # operator restart) goes back to Pending.
        had_place = previous_phase in {Phase.RUNNING, Phase.PREEMPTED} or (
            previous_phase == Phase.PLACED and pods
        )
        return Phase.PREEMPTED if had_place else Phase.PENDING
    running = all(any(pod.serves(pl) for pod in pods) for pl in placements)
    return Phase.RUNNING if running else Phase.PLACED


def workload_status(
    previous: Mapping[str, Any],
    *,
    generation: int,
    is_gang: bool,
    gang_size: int,
    placements: Sequence[Placement],
    unplaced: Unplaced | None,
    pods: Sequence[PodView],
    failure_message: str | None,
    now: datetime,
    measured_watts: float | None = None,
    energy: Mapping[str, Any] | None = None,
    objective: SloObjective | None = None,
    telemetry: TelemetryFreshness | None = None,
) -> dict[str, Any]:
    """The LLMWorkload status this plan leads to (the fields the operator owns).

    `measured_watts` is the workload's draw from telemetry (None: unknown, left out; a merge patch
    with None removes an earlier figure); `energy` is `status.energy` as `accounting` advanced it
    (None: none yet, `source: modelled`). `telemetry` (the operator reads Prometheus; see
    `workload_telemetry`) adds the `TelemetryFresh` condition.
    """
    previous_phase = previous.get("phase")
    phase = next_phase(
        previous_phase,
        is_gang=is_gang,
        gang_size=gang_size,
        placements=placements,
        pods=pods,
        failed_permanently=failure_message is not None,
    )
    conditions_before: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    # Ready replicas: pods serving a placement (or, with none planned, running and ready).
    if placements and phase not in TERMINAL_PHASES:
        ready_count = served_replicas(placements, pods)
    else:
        ready_count = sum(
            1
            for p in pods
            if p.phase == PodPhase.RUNNING and p.ready and not p.deleting and p.rank == 0
        )
    placed_count = replica_count(placements)
    desired = gang_size if is_gang else max(placed_count, 1)
    expected_watts = sum(p.expected_watts_per_gpu * p.gpus for p in placements)
    cap_watts = sum(p.power_limit_watts * p.gpus for p in placements)
    if phase in TERMINAL_PHASES:
        message = failure_message or previous.get("message") or f"workload {phase.lower()}"
    elif unplaced is not None:
        message = own_reason(unplaced)
    elif placements:
        nodes = ", ".join(sorted({p.node for p in placements}))
        message = f"{placed_count} replica(s) on {nodes}"
    else:
        message = "waiting for a plan"

    def cond(type_: str, status: bool | None, reason: str, text: str) -> dict[str, Any]:
        return condition(
            conditions_before, type_, status, reason, text, now=now, observed_generation=generation
        )

    if phase in TERMINAL_PHASES:
        schedulable = cond(ConditionType.SCHEDULABLE, True, phase, message)
        placed = cond(ConditionType.PLACED, False, phase, message)
    elif unplaced is not None and not placements:
        why_not = own_reason(unplaced)
        schedulable = cond(ConditionType.SCHEDULABLE, False, unplaced.reason_name, why_not)
        placed = cond(ConditionType.PLACED, False, Reason.UNPLACED, why_not)
    else:
        schedulable = cond(
            ConditionType.SCHEDULABLE, True, Reason.PLANNED, "the optimizer found a place"
        )
        placed = cond(
            ConditionType.PLACED,
            bool(placements),
            Reason.PLANNED if placements else Reason.WAITING,
            message,
        )
    budget_limited = unplaced is not None and unplaced.constraint.startswith("budget")
    conditions = [
        cond(ConditionType.ADMITTED, True, Reason.ACCEPTED, "the operator read the spec"),
        schedulable,
        placed,
        cond(
            ConditionType.READY,
            phase == Phase.RUNNING,
            phase,
            f"{ready_count}/{desired} replica(s) ready",
        ),
        cond(
            ConditionType.BUDGET_LIMITED,
            budget_limited,
            unplaced.reason_name if budget_limited and unplaced else Reason.WITHIN_BUDGET,
            own_reason(unplaced)
            if budget_limited and unplaced
            else "no budget holds this workload back",
        ),
    ]
    if objective is not None and objective.declared:
        met, reason, text = slo_met(objective, phase, placements, unplaced)
        conditions.append(cond(ConditionType.SLO_MET, met, reason, text))
    if telemetry is not None:
        conditions.append(cond(ConditionType.TELEMETRY_FRESH, *telemetry))
    variants = sorted({p.variant for p in placements})
    return {
        "phase": phase,
        "observedGeneration": generation,
        "replicas": {"desired": desired, "placed": placed_count, "ready": ready_count},
        "variant": ",".join(variants),
        "nodes": ",".join(sorted({p.node for p in placements})),
        "placements": [
            {
                "replica": p.replica,
                "rank": p.rank,
                "node": p.node,
                "gpus": p.gpus,
                "variant": p.variant,
                "powerLimitWatts": round(p.power_limit_watts, 1),
            }
            for p in sorted(placements, key=lambda p: (p.replica, p.rank))
        ],
        "power": {
            "capWatts": round(cap_watts, 1),
            "expectedWatts": round(expected_watts, 1),
            "measuredWatts": None if measured_watts is None else round(measured_watts, 1),
        },
        "energy": dict(energy) if energy else {"source": Source.MODELLED},
        "conditions": conditions,
        "message": message,
    }


def own_reason(unplaced: Unplaced) -> str:
    """Why a workload is not placed (or served in part), as its own status says it: without the
    `LLMWorkload <namespace>/<name>: ` the optimizer's reasons name it with (the status is on the
    object), so the thousands of workloads one reason holds back write the same messages and
    conditions, which the operator's cache keeps once (`cache.SharedValues`)."""
    return unplaced.reason.replace(f"{key_label(unplaced.workload)}: ", "")


@dataclass(frozen=True)
class SloObjective:
    """What a workload's `spec.slo` promises: Inference demand in tokens/s, or a deadline."""

    tokens_per_second: float | None = None
    deadline: str | None = None

    @property
    def declared(self) -> bool:
        return self.tokens_per_second is not None or self.deadline is not None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], demand: float | None = None) -> SloObjective:
        """The objective `spec` declares; an Inference service's `demand` (the tokens/s it was
        sized for: its forecast from measurements) replaces the declared tokensPerSecond."""
        slo = spec.get("slo") or {}
        declared = (
            slo.get("tokensPerSecond") if spec.get("type", "Inference") == "Inference" else None
        )
        if declared is not None and demand is not None:
            declared = demand
        return cls(
            tokens_per_second=None if declared is None else float(declared),
            deadline=slo.get("deadline") or None,
        )


# The binding constraint of work the horizon plan defers (`Unplaced.constraint`; its reason name,
# `Deferred`, is the Schedulable condition's reason).
DEFERRED_CONSTRAINT = "deferred"


def slo_met(
    objective: SloObjective, phase: str, placements: Sequence[Placement], unplaced: Unplaced | None
) -> tuple[bool | None, str, str]:
    """(met, reason, message) of the `SLOMet` condition, by the plan (calibrated model).

    Inference: the planned replicas' throughput covers the declared tokens/s; placed replicas
    that serve less with `unplaced` saying why (a plan's shortfall) are `BudgetLimited` when a
    budget binds, else `BelowDemand`, with the share served. A deadline: the gang runs (the
    optimizer only places a gang where it finishes in time) or has finished; a job the horizon
    defers is Unknown, reason `Deferred` (the plan runs it later: whether the deadline holds is the
    later rounds' to say).
    """
    if phase == Phase.SUCCEEDED:
        return True, Reason.SUCCEEDED, "the work finished"
    if phase == Phase.FAILED:
        return False, Reason.FAILED, "the workload failed"
    why_not = own_reason(unplaced) if unplaced is not None else "no replica is placed"
    if objective.tokens_per_second is not None:
        demand = objective.tokens_per_second
        planned = sum(p.expected_throughput for p in placements)
        text = f"planned {planned:.0f} tokens/s for a demand of {demand:.0f} tokens/s"
        if not placements:
            return False, Reason.NOT_PLACED, f"{text}: {why_not}"
        if planned + 1e-6 < demand:
            text += f" ({planned / demand:.1%} served)"
            if unplaced is None:
                return False, Reason.BELOW_DEMAND, text
            limited = unplaced.constraint.startswith("budget")
            reason = Reason.BUDGET_LIMITED if limited else Reason.BELOW_DEMAND
            return False, reason, f"{text}: {why_not}"
        return True, Reason.PLANNED, text
    if placements:
        return True, Reason.ON_TRACK, f"placed to finish before the deadline {objective.deadline}"
    if unplaced is not None and unplaced.constraint == "deadline_passed":
        return False, Reason.DEADLINE_PASSED, f"deadline {objective.deadline} passed: {why_not}"
    if unplaced is not None and unplaced.constraint == DEFERRED_CONSTRAINT:
        return None, Reason.DEFERRED, f"deadline {objective.deadline}: {why_not}"
    return False, Reason.NOT_PLACED, f"deadline {objective.deadline} at risk: {why_not}"


# EnergyBudget condition: the GPUs wattsched does not control fit in the cap on their own.


def budget_status(
    previous: Mapping[str, Any],
    *,
    generation: int,
    allocation: BudgetAllocation | None,
    cap_watts: float,
    node_count: int,
    plan: Plan,
    now: datetime,
    telemetry: TelemetrySnapshot | None = None,
    scope_nodes: Iterable[str] = (),
    unready_nodes: Sequence[str] = (),
    excluded_nodes: Mapping[str, str] | None = None,
    invalid: str | None = None,
    planned_at: datetime | None = None,
) -> dict[str, Any]:
    """An EnergyBudget's status after a plan: allocated cap, expected watts, headroom, last plan.

    `planned_at` is when `plan` was made (default `now`: a status written right after planning;
    an accounting round between plans passes the plan's own time).

    `Ready` is True when the planned limits in scope sum to at most the cap (`CapEnforced`). It
    is False with reason `CapBelowFloor` when no plan can meet the cap (the allocation is held:
    the message says why, naming the `unready_nodes` in scope counted at their maximum), and
    `InvalidSpec` when the spec cannot be read (`invalid`: the error; the budget is not planned).
    `NodesPlanned` names the `excluded_nodes` in scope (node -> why) counted as they may draw.
    `UnmanagedWithinCap` is False (`UnmanagedOverCap`) when the GPUs in scope held by pods
    wattsched did not create already run at limits summing to more than the cap: wattsched leaves
    them alone, so no plan of its own can bring the budget within its cap.
    With a telemetry reading (the operator has `--prometheus-url`), `measuredWatts` is the measured
    draw of the nodes in `scope_nodes` (None, i.e. left out, unless every one was measured) and
    `TelemetryFresh` says whether it could be measured (see `budget_telemetry`).
    """
    allocated = allocation.allocated_cap_watts if allocation else 0.0
    expected = allocation.expected_watts if allocation else 0.0
    within = allocated <= cap_watts + 1e-6
    conditions_before: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    reason: str = Reason.CAP_ENFORCED if within else Reason.OVER_CAP
    message = f"limits in scope sum to {allocated:.0f} W of {cap_watts:.0f} W"
    if invalid is not None:
        within, reason, message = False, Reason.INVALID_SPEC, f"not planned: {invalid}"
    elif allocation is not None and allocation.held:
        reason = Reason.CAP_BELOW_FLOOR
        message = (
            f"{held_budget_reason(cap_watts, allocated)}; its {node_count} node(s) take no work "
            "and are held at their minimum limits"
        )
        if unready_nodes:
            message += (
                f"; counted at their maximum until their agent confirms: {', '.join(unready_nodes)}"
            )
    conditions = [
        condition(
            conditions_before,
            ConditionType.READY,
            within,
            reason,
            message,
            now=now,
            observed_generation=generation,
        )
    ]
    unmanaged = allocation.unmanaged_watts if allocation else 0.0
    unmanaged_within = unmanaged <= cap_watts + 1e-6
    conditions.append(
        condition(
            conditions_before,
            ConditionType.UNMANAGED_WITHIN_CAP,
            unmanaged_within,
            Reason.WITHIN_CAP if unmanaged_within else Reason.UNMANAGED_OVER_CAP,
            f"GPUs held by pods wattsched did not create run at limits summing to "
            f"{unmanaged:.0f} W of the {cap_watts:.0f} W cap"
            + (
                ""
                if unmanaged_within
                else "; wattsched leaves them alone: lower their limits, or raise the cap"
            ),
            now=now,
            observed_generation=generation,
        )
    )
    excluded = dict(sorted((excluded_nodes or {}).items()))
    conditions.append(
        condition(
            conditions_before,
            ConditionType.NODES_PLANNED,
            not excluded,
            Reason.NODE_EXCLUDED if excluded else Reason.ALL_PLANNED,
            "; ".join(excluded.values())
            if excluded
            else "every GPU node the selector matches is planned",
            now=now,
            observed_generation=generation,
        )
    )
    measured_watts: float | None = None
    if telemetry is not None:
        measured_watts, fresh, reason, message = budget_telemetry(telemetry, scope_nodes)
        conditions.append(
            condition(
                conditions_before,
                ConditionType.TELEMETRY_FRESH,
                fresh,
                reason,
                message,
                now=now,
                observed_generation=generation,
            )
        )
    return {
        "observedGeneration": generation,
        "nodes": node_count,
        "measuredWatts": None if measured_watts is None else round(measured_watts, 1),
        "allocatedCapWatts": round(allocated, 1),
        "unmanagedWatts": round(unmanaged, 1),
        "expectedWatts": round(expected, 1),
        "headroomWatts": round(cap_watts - allocated, 1),
        "lastPlan": {
            "time": format_time(planned_at or now),
            "seconds": round(plan.solve_seconds, 3),
            "status": str(plan.status),
            "gap": round(plan.gap, 6),
        },
        "conditions": conditions,
    }


def budget_telemetry(
    telemetry: TelemetrySnapshot, scope_nodes: Iterable[str]
) -> tuple[float | None, bool, str, str]:
    """(measured watts in scope or None, fresh, reason, message) for an EnergyBudget.

    Fresh (`TelemetryFresh` True, reason `Measured`) only when the reading is not stale and every
    node in scope has a measured draw; otherwise the figure is left out and the reason is
    `PrometheusUnavailable` (Prometheus did not answer) or `NoSamples` (no fresh series).
    """
    nodes = sorted(set(scope_nodes))
    if telemetry.stale:
        reason = Reason.PROMETHEUS_UNAVAILABLE if telemetry.unavailable else Reason.NO_SAMPLES
        return None, False, reason, f"planning on the model: {telemetry.reason}"
    if not nodes:
        return None, False, Reason.NO_SAMPLES, "no GPU nodes in scope to measure"
    missing = [n for n in nodes if n not in telemetry.node_watts]
    if missing:
        return (
            None,
            False,
            Reason.NO_SAMPLES,
            f"no fresh GPU power series for {len(missing)} of {len(nodes)} node(s) in scope "
            f"({', '.join(missing[:5])}); measuredWatts left out",
        )
    total = sum(telemetry.node_watts[n].value for n in nodes)
    metrics = sorted({telemetry.node_watts[n].metric for n in nodes})
    return (
        total,
        True,
        Reason.MEASURED,
        f"{total:.0f} W measured on {len(nodes)} node(s) ({', '.join(metrics)})",
    )


TelemetryFreshness = tuple[bool | None, str, str]  # (status, reason, message) of TelemetryFresh


def workload_telemetry(telemetry: TelemetrySnapshot, pods: Iterable[PodKey]) -> TelemetryFreshness:
    """(status, reason, message) of an LLMWorkload's `TelemetryFresh` condition.

    `pods` are the workload's running pods. False when the reading is stale (reason
    `PrometheusUnavailable` or `NoSamples`, with the reader's reason, as on an EnergyBudget) or a
    running pod has no fresh power series (`NoSamples`); True (`Measured`) when every running pod
    was measured; Unknown (`NotRunning`) while no pod runs and Prometheus answers.
    """
    keys = sorted(set(pods))
    if telemetry.stale:
        reason = Reason.PROMETHEUS_UNAVAILABLE if telemetry.unavailable else Reason.NO_SAMPLES
        return False, reason, f"figures are modelled: {telemetry.reason}"
    if not keys:
        return None, Reason.NOT_RUNNING, "no running pod to measure"
    missing = [
        f"{namespace}/{name}"
        for namespace, name in keys
        if (namespace, name) not in telemetry.pod_watts
    ]
    if missing:
        return (
            False,
            Reason.NO_SAMPLES,
            f"no fresh GPU power series for {len(missing)} of {len(keys)} running pod(s) "
            f"({', '.join(missing[:5])}); measuredWatts left out",
        )
    metrics = sorted({telemetry.pod_watts[key].metric for key in keys})
    return True, Reason.MEASURED, f"{len(keys)} running pod(s) measured ({', '.join(metrics)})"


def workload_measured_watts(
    telemetry: TelemetrySnapshot | None, pods: Iterable[PodKey]
) -> float | None:
    """A workload's measured draw: the sum over its pods, when the reading is fresh and every
    pod was measured; None (unknown) otherwise, or when it has no pods."""
    keys = list(pods)
    if telemetry is None or telemetry.stale or not keys:
        return None
    if any(key not in telemetry.pod_watts for key in keys):
        return None
    return sum(telemetry.pod_watts[key].value for key in keys)


def without_nones(value: Any) -> Any:
    """A status with the None fields (merge-patch deletions) dropped, as the server stores it."""
    if isinstance(value, Mapping):
        return {k: without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nones(v) for v in value]
    return value


def phase_counts(phases: Iterable[str]) -> dict[str, int]:
    counts = {phase.value: 0 for phase in Phase}
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    return counts
