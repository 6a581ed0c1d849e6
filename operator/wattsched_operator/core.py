"""The decision core: what one planning round decides, from what is observed at `now`. Read
this file to know what a round decides, in order; each step's body is in the module it names.

`decide(observed, now) -> Round` is pure: no kopf, Kubernetes, HTTP or Prometheus client, no
clock (the wall-clock `now` and a monotonic reading come in), no writes. In order, a round:
1. runs the workloads' lifecycles: completion, failure counting and backoff, refused pods
   (`lifecycle`), and builds the optimizer's input from the objects (`snapshot`): `prepare`;
2. calibrates the model from the readings (`learning`), before planning: the last plan's
   placements are compared with the model through the corrections they were planned with;
3. sizes services for their forecast demand (`demand`) and plans the budgets over time
   (`budget_horizon`, with the same calibrated model: deferred work is left out of the solve),
   then solves (the injected plan function);
4. records the services' measured demand (`learning`);
5. decides which pods to keep, evict, delete and create and which power limits to lower and
   raise (`pod_changes`, with `desired`, `handover`, `transition`);
6. advances energy, carbon and job progress (`bookkeeping`, with `accounting`, `progress`);
7. writes every status and Event as data (`status_writes`, with `statuses`).
What it returns is a `Round` (`rounds`): everything the shell must do, in the order it must do
it, and the controller's memory for the next round.

The shell (`loop` waits, debounces, follows leadership, resyncs and reads telemetry; `apply`
executes a Round in the budget-safe order) does the I/O. The simulator calls the same functions
with a simulated cluster and simulated readings.

Four more entry points share the memory: `telemetry_requests` (what the shell must read before
`decide`), `account` (a round between plans: energy, progress and statuses only),
`check_demand` (between plans: a reading of the services' tokens/s and queues, and whether one
needs a plan now) and `failed_round` (a round whose plan failed: every waiting object says why);
`after_apply` folds what the apply step saw (agents that did not confirm, raises in flight, pods
refused or accepted) into the memory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from wattsched_api.energybudget import EnergyBudget
from wattsched_api.vocabulary import (
    TERMINAL_PHASES,
    ConditionType,
    EventReason,
    Phase,
    Reason,
)
from wattsched_operator import (
    bookkeeping,
    budget_horizon,
    demand,
    learning,
    lifecycle,
    pod_changes,
    snapshot,
    status_writes,
    transition,
)
from wattsched_operator.readings import (
    Calibrator,
)
from wattsched_operator.rounds import (
    BUDGET_KIND,
    POD_KIND,
    WORKLOAD_KIND,
    Applied,
    Body,
    ClusterView,
    Deletion,
    Disruptions,
    Event,
    Eviction,
    InputBuilder,
    LastRound,
    Memory,
    MetricsUpdate,
    ObjectRef,
    Observed,
    PlanFigures,
    PlanFunction,
    PlannedInput,
    PodRejection,
    RaiseInFlight,
    Readings,
    Round,
    Settings,
    StatusWrite,
    TelemetryRequests,
    WorkloadStatus,
    backoff_seconds,
    fresh_memory,
    is_deleting,
    pod_id,
    pod_workload_key,
    running,
)
from wattsched_optimizer.model import (
    products_in_scope,
)
from wattsched_optimizer.planner import plan as optimizer_plan
from wattsched_optimizer.problem import (
    PlanInput,
    WorkloadType,
)

# The round's types (`rounds`) are part of this module's interface: the shell and the simulator
# read them from here.
__all__ = [
    "BUDGET_KIND",
    "POD_KIND",
    "WORKLOAD_KIND",
    "Applied",
    "Body",
    "ClusterView",
    "Deletion",
    "Disruptions",
    "Event",
    "Eviction",
    "InputBuilder",
    "Memory",
    "ObjectRef",
    "Observed",
    "PlanFunction",
    "PlannedInput",
    "Prepared",
    "RaiseInFlight",
    "Readings",
    "Round",
    "Settings",
    "StatusWrite",
    "TelemetryRequests",
    "WorkloadStatus",
    "account",
    "after_apply",
    "build_input_function",
    "check_demand",
    "decide",
    "failed_round",
    "fresh_memory",
    "pod_id",
    "pod_workload_key",
    "prepare",
    "running",
    "services_short_of_demand",
    "succeeded",
    "telemetry_requests",
]

logger = logging.getLogger("wattsched.operator")


def build_input_function(heartbeat_timeout_seconds: float) -> InputBuilder:
    """The snapshot reader that turns the observed objects into the optimizer's input.

    Bad objects are left out (and reported) rather than stopping the plan for the others: bad
    LLMWorkloads and EnergyBudgets, unreadable profiles and pods, GPU nodes the plan cannot use.
    """

    def build(
        view: ClusterView, unconfirmed: frozenset[str], raising: Mapping[str, int], now: datetime
    ) -> PlannedInput:
        objects = snapshot.ClusterObjects(
            nodes=tuple(view.nodes.values()),
            workloads=tuple(view.workloads.values()),
            budgets=tuple(view.budgets.values()),
            profiles=tuple(view.profiles.values()),
            pods=tuple(view.pods.values()),
        )
        result = snapshot.build_snapshot(
            objects,
            now=now,
            strict=False,
            # A node with no NodePowerProfile yet has no agent that confirmed anything: it counts
            # at maximum power until its agent reports (the budget guarantee).
            agents_required=True,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
            unconfirmed_nodes=unconfirmed,
            raises_in_flight=raising,
        )
        rejected = {error.name: str(error) for error in result.rejected}
        jobs = {
            key: terms
            for key, workload in result.workloads.items()
            if (terms := snapshot.job_terms(workload)) is not None
        }
        return PlannedInput(
            plan_input=result.plan_input,
            rejected=rejected,
            excluded_nodes={node.name: node.reason for node in result.excluded_nodes},
            silent_together=result.silent_together,
            invalid_budgets={
                item.key: item.message for item in result.ignored if item.kind == "EnergyBudget"
            },
            ignored={
                f"{item.kind} {item.key}": item.message
                for item in result.ignored
                if item.kind != "EnergyBudget"
            },
            jobs=jobs,
            budgets=dict(result.budgets),
        )

    return build


def _pods_by_workload(view: ClusterView) -> dict[str, list[Body]]:
    pods_by_workload: dict[str, list[Body]] = {}
    for pod in view.pods.values():
        pods_by_workload.setdefault(pod_workload_key(pod), []).append(pod)
    return pods_by_workload


def _fork(memory: Memory) -> tuple[Calibrator, demand.DemandHistory]:
    """Copies of the memory's mutable learners, for the next memory (the input stays as it was)."""
    return copy.deepcopy(memory.calibrator), copy.deepcopy(memory.demand)


def _left_out(
    view: ClusterView, built: PlannedInput, reported: Mapping[str, str]
) -> tuple[list[Event], dict[str, str]]:
    """Log what the snapshot left out and the agents silent together, and an Event on each GPU
    node the plan cannot use, whenever its reason changes (budgets in its scope say so in
    `NodesPlanned`). Returns the Events and what is now reported."""
    events = []
    for key, message in built.ignored.items():
        if reported.get(key) != message:
            logger.warning("left out of planning: %s: %s", key, message)
    for name, reason in built.excluded_nodes.items():
        key = f"Node {name}"
        if reported.get(key) != reason:
            logger.warning("node %s takes no work: %s", name, reason)
            node = view.nodes.get(name) or {"metadata": {"name": name}}
            events.append(
                Event(ObjectRef.of("Node", node), "Warning", EventReason.NODE_EXCLUDED, reason)
            )
    silent = ""
    if built.silent_together:
        count = len(built.silent_together)
        silent = (
            f"the agents of {count} GPU node(s) are silent at once "
            f"({', '.join(built.silent_together[:10])}{', ...' if count > 10 else ''}): taken "
            "as a fault between the operator and the agents, not in the nodes; their replicas "
            "stay, they take no new work and count at maximum power until their agents report"
        )
        if reported.get(SILENT_TOGETHER_KEY) != silent:
            logger.warning("%s", silent)
    return events, {
        **built.ignored,
        **{f"Node {name}": reason for name, reason in built.excluded_nodes.items()},
        **({SILENT_TOGETHER_KEY: silent} if silent else {}),
    }


# `_left_out`'s key for the agents silent together (logged when they change).
SILENT_TOGETHER_KEY = "Agents silent together"


@dataclass
class Prepared:
    """A round's facts before the solve."""

    now: datetime
    pods_by_workload: dict[str, list[Body]]
    life: lifecycle.Lifecycle
    built: PlannedInput
    plan_input: PlanInput
    active: dict[str, Body]
    refused: dict[str, str]
    rejections: dict[str, PodRejection]


def _live_raises(memory: Memory, monotonic: float) -> dict[str, RaiseInFlight]:
    """The raises in `memory` whose confirmation is not overdue at `monotonic`, by node."""
    return {node: r for node, r in memory.raises.items() if monotonic < r.deadline}


def raises_in_flight(memory: Memory, monotonic: float) -> dict[str, int]:
    """The raises a node counts as ready at before its agent confirms them (node -> the profile's
    generation the raise wrote): those whose confirmation is not overdue at `monotonic`."""
    return {node: r.generation for node, r in _live_raises(memory, monotonic).items()}


def prepare(
    observed: Observed, now: datetime, *, build_input: InputBuilder | None = None
) -> Prepared:
    """Step 1 of a round: the lifecycles and the optimizer's input. Computed once per round: the
    shell passes it to `telemetry_requests` and `decide` (telemetry does not change it).
    `build_input` turns the objects into the optimizer's input (the snapshot reader with the
    settings' heartbeat timeout unless injected)."""
    build_input = build_input or build_input_function(observed.settings.heartbeat_timeout_seconds)
    view = observed.view
    pods_by_workload = _pods_by_workload(view)
    life = lifecycle.advance(view, pods_by_workload, now, observed.monotonic, observed.settings)
    active = {
        key: body
        for key, body in view.workloads.items()
        if not is_deleting(body)
        and (body.get("status") or {}).get("phase") not in TERMINAL_PHASES
        and key not in life.succeeded
        and key not in life.failed
    }
    active_view = dataclasses.replace(view, workloads=active)
    built = build_input(
        active_view,
        observed.memory.unconfirmed,
        raises_in_flight(observed.memory, observed.monotonic),
        now,
    )
    rejections = dict(observed.memory.pod_rejections)
    refused = lifecycle.refused_pods(active, rejections, observed.monotonic)
    active = {k: v for k, v in active.items() if k not in built.rejected and k not in refused}
    plan_input = dataclasses.replace(
        built.plan_input,
        workloads=tuple(w for w in built.plan_input.workloads if w.key not in refused),
    )
    return Prepared(now, pods_by_workload, life, built, plan_input, active, refused, rejections)


def telemetry_requests(
    observed: Observed,
    now: datetime,
    *,
    prepared: Prepared | None = None,
    between_plans: bool = False,
) -> TelemetryRequests:
    """What the shell must read for `decide(observed, now, prepared=prepared)` (or `account` when
    `between_plans`, without `prepared`): the snapshot of the planned nodes and running pods, the
    energy of what accounting finds due, the budgets' carbon intensity queries and the due jobs'
    progress queries."""
    view = observed.view
    last = observed.memory.last_round
    if between_plans:
        if last is None:
            return TelemetryRequests()
        plan_input, jobs, active = last.plan_input, last.built.jobs, _still_active(view, last)
        forecasts = {}
        pods = _pods_by_workload(view)
    else:
        prepared = _checked(prepared or prepare(observed, now), now)
        plan_input, jobs, active = prepared.plan_input, prepared.built.jobs, prepared.active
        forecasts = _forecast_queries(prepared.built.budgets, observed.settings)
        pods = prepared.pods_by_workload
    due = bookkeeping.find_due(
        view,
        active=active,
        pods_by_workload=pods,
        plan_input=plan_input,
        settings=observed.settings,
        now=now,
    )
    return TelemetryRequests(
        nodes=tuple(node.name for node in plan_input.nodes),
        pods=tuple(pod_id(pod) for pod in view.pods.values() if running(pod)),
        end=due.now,
        energy={
            start: (tuple(sorted(nodes)), tuple(sorted(pod_keys)))
            for start, (nodes, pod_keys) in due.groups.items()
        },
        intensity_queries={
            name: t.intensity_query for name, t in due.terms.items() if t.intensity_query
        },
        progress_queries={
            key: terms.prometheus_query
            for key in due.workload_starts
            if (terms := jobs.get(key)) is not None and terms.prometheus_query is not None
        },
        forecast_queries=forecasts,
    )


def _checked(prepared: Prepared, now: datetime) -> Prepared:
    if prepared.now != now:
        raise ValueError(f"prepared for {prepared.now.isoformat()}, not this round ({now})")
    return prepared


def _forecast_queries(budgets: Mapping[str, EnergyBudget], settings: Settings) -> dict[str, str]:
    """Each budget's carbon forecast query, when the horizon plans over time."""
    if settings.horizon_hours <= 0 or not budget_horizon.plans_over_time(budgets.values()):
        return {}
    return {
        name: budget.spec.carbon.forecast_prometheus_query
        for name, budget in sorted(budgets.items())
        if budget.spec.carbon is not None and budget.spec.carbon.forecast_prometheus_query
    }


def decide(
    observed: Observed,
    now: datetime,
    *,
    plan_function: PlanFunction = optimizer_plan,
    build_input: InputBuilder | None = None,
    prepared: Prepared | None = None,
) -> Round:
    """One planning round: what the shell must do, in data, and the next memory.

    `plan_function` solves (the optimizer's `plan` unless a caller injects another, e.g. a stub
    in tests); `prepared` is this round's `prepare(observed, now)` where the shell already has it
    (for `telemetry_requests`), else `build_input` is passed to `prepare`. Raises what the solve
    raises (the shell then reports a failed round: `failed_round`).
    """
    prepared = _checked(prepared or prepare(observed, now, build_input=build_input), now)
    # Products the catalogue lacks (as their nodes describe them) are known for this round.
    with products_in_scope(prepared.plan_input.products):
        return _decide(observed, prepared, plan_function)


def _decide(observed: Observed, prepared: Prepared, plan_function: PlanFunction) -> Round:
    view, now, memory = observed.view, prepared.now, observed.memory
    built, plan_input, active, life = (
        prepared.built,
        prepared.plan_input,
        prepared.active,
        prepared.life,
    )
    readings = observed.telemetry
    telemetry = readings.snapshot if readings is not None else None
    calibrator, history = _fork(memory)
    hourly = copy.deepcopy(memory.hourly_demand)
    # Wake for the next retry: a failed replica's backoff, or a refused pod's.
    wakes = [r.retry_at for r in prepared.rejections.values() if r.retry_at > observed.monotonic]
    if life.wake_at is not None:
        wakes.append(life.wake_at)
    left_out, reported = _left_out(view, built, memory.reported)
    early = lifecycle.rejected_statuses(view, built.rejected, now, reason=Reason.INVALID_SPEC)
    early += lifecycle.rejected_statuses(view, prepared.refused, now, reason=Reason.POD_REJECTED)

    # Learn before planning: the applied placements were planned with the corrections the
    # calibrator holds now (the last round's, after its learning), and their samples are
    # compared with the model through those; the plan then uses what this reading taught.
    calibrated_at = memory.calibrated_at
    corrections = None
    learned = learning.calibrate(
        calibrator,
        memory=memory,
        plan_input=plan_input,
        view=view,
        readings=readings,
        monotonic=observed.monotonic,
        settings=observed.settings,
    )
    if learned is not None:
        calibrated_at = observed.monotonic
    if learned:
        corrections = calibrator.corrections()
    model = calibrator.model()

    # Services are sized for their forecast demand (measured tokens/s with headroom), or
    # their declared spec.slo.tokensPerSecond until there are readings.
    history.forget(active)
    sized = dataclasses.replace(
        plan_input,
        workloads=demand.with_forecast_demand(plan_input.workloads, history, observed.monotonic),
    )
    demands = {w.key: w.tokens_per_second for w in sized.workloads if w.tokens_per_second}
    # Budgets with an allowance, a cap schedule or a carbon forecast: the horizon plans the next
    # hours and this round applies its first slot (deferred work is left out of the solve).
    hourly.forget(active)
    running = {c.workload for c in plan_input.current}
    overdue, kept_starts = budget_horizon.overdue_work(
        memory.planned_starts,
        memory.last_round.planned_at if memory.last_round is not None else None,
        waiting=(key for key in active if key not in running),
    )
    timed = budget_horizon.plan_over_time(
        sized,
        built.budgets,
        now,
        horizon_hours=observed.settings.horizon_hours,
        forecasts=readings.carbon_forecasts if readings is not None else None,
        hourly_demand=hourly,
        declared_tokens_per_second={
            w.key: w.tokens_per_second for w in plan_input.workloads if w.tokens_per_second
        },
        overdue=overdue,
        model=model,
    )
    plan = plan_function(timed.plan_input, model)
    logger.info(
        "plan %s: %d placements, %d unplaced, %d workloads",
        plan.status,
        len(plan.placements),
        len(plan.unplaced),
        len(active),
    )

    # One reading of the services' tokens/s and queues, for the demand history and the hours.
    measured = learning.measured_services(plan_input, prepared.pods_by_workload, telemetry)
    learning.record_demand(history, measured, observed.monotonic)
    learning.record_hourly(hourly, measured, now)

    # Deferred work reaches the pod round and the statuses one way: without a place, reason
    # Deferred (a deferred job's evicted pods say until when and why).
    unplaced = status_writes.unplaced_of(plan, timed.deferred)
    changes = pod_changes.pod_round(
        view, active, plan, life, now, plan_input=plan_input, unplaced=unplaced
    )
    accounts, energy_counts, budget_counts = bookkeeping.account(
        view,
        active=active,
        plan=plan,
        plan_input=plan_input,
        jobs=built.jobs,
        pods_by_workload=prepared.pods_by_workload,
        readings=readings,
        settings=observed.settings,
        now=now,
    )
    workload_statuses, known = status_writes.workload_statuses(
        view,
        active=active,
        plan=plan,
        life=life,
        pods_by_workload=prepared.pods_by_workload,
        now=now,
        accounts=accounts,
        telemetry=telemetry,
        demands=demands,
        unplaced=unplaced,
    )
    budget_statuses, budget_reported, budget_metrics = status_writes.budget_statuses(
        view,
        plan,
        plan_input,
        now,
        telemetry,
        accounts=accounts,
        built=built,
        reported=memory.budget_reported,
        allowances=timed.allowances,
    )
    next_memory = dataclasses.replace(
        memory,
        pod_rejections=prepared.rejections,
        calibrator=calibrator,
        applied_placements=plan.placements,
        applied_since=learning.applied_since(memory, plan.placements, now),
        calibrated_at=calibrated_at,
        demand=history,
        hourly_demand=hourly,
        last_round=LastRound(
            plan=plan,
            plan_input=plan_input,
            active=frozenset(active),
            planned_at=now,
            built=built,
            demands=demands,
            over_time=timed,
        ),
        planned_starts={
            **timed.planned_starts,
            **{k: min(t, timed.planned_starts.get(k, t)) for k, t in kept_starts.items()},
        },
        ready_agents=frozenset(n.name for n in plan_input.nodes if n.agent_ready),
        budget_reported=budget_reported,
        reported=reported,
    )
    return dataclasses.replace(
        changes,
        memory=next_memory,
        plan=plan,
        patches=tuple(life.patches),
        events=tuple(life.events) + tuple(left_out),
        early_statuses=tuple(early),
        open_profiles={
            name: transition.NodeLimits(idle_watts=None)
            for name in sorted(built.excluded_nodes)
            if name not in view.profiles and name in view.nodes
        },
        workload_statuses=tuple(workload_statuses),
        budget_statuses=tuple(budget_statuses),
        metrics=MetricsUpdate(
            plan=PlanFigures(str(plan.status), plan.solve_seconds, plan.gap),
            corrections=corrections,
            workload_energy=energy_counts,
            budget_energy=budget_counts,
            workloads=known,
            budgets=budget_metrics,
        ),
        wake_at=min(wakes) if wakes else None,
    )


def _still_active(view: ClusterView, last: LastRound) -> dict[str, Body]:
    return {
        key: body
        for key, body in view.workloads.items()
        if key in last.active
        and not is_deleting(body)
        and (body.get("status") or {}).get("phase") not in TERMINAL_PHASES
    }


def account(observed: Observed, now: datetime) -> Round:
    """A round between plans, with nothing changed since the last one: bring the energy,
    carbon, progress and measured figures in statuses up to date against the last plan. Moves
    no pod and no limit. (Nothing to do without a last plan.)"""
    memory = observed.memory
    last = memory.last_round
    if last is None:
        return Round(memory=memory)
    view = observed.view
    readings = observed.telemetry
    telemetry = readings.snapshot if readings is not None else None
    pods_by_workload = _pods_by_workload(view)
    active = _still_active(view, last)
    calibrator, history = _fork(memory)
    hourly = copy.deepcopy(memory.hourly_demand)
    measured = learning.measured_services(last.plan_input, pods_by_workload, telemetry)
    learning.record_demand(history, measured, observed.monotonic)
    learning.record_hourly(hourly, measured, now)
    accounts, energy_counts, budget_counts = bookkeeping.account(
        view,
        active=active,
        plan=last.plan,
        plan_input=last.plan_input,
        jobs=last.built.jobs,
        pods_by_workload=pods_by_workload,
        readings=readings,
        settings=observed.settings,
        now=now,
    )
    workload_statuses, known = status_writes.workload_statuses(
        view,
        active=active,
        plan=last.plan,
        life=lifecycle.Lifecycle(),
        pods_by_workload=pods_by_workload,
        now=now,
        accounts=accounts,
        telemetry=telemetry,
        demands=last.demands,
        unplaced=status_writes.unplaced_of(
            last.plan, last.over_time.deferred if last.over_time is not None else ()
        ),
    )
    budget_statuses, budget_reported, budget_metrics = status_writes.budget_statuses(
        view,
        last.plan,
        last.plan_input,
        now,
        telemetry,
        accounts=accounts,
        built=last.built,
        planned_at=last.planned_at,
        reported=memory.budget_reported,
        allowances=last.over_time.allowances if last.over_time is not None else None,
    )
    return Round(
        memory=dataclasses.replace(
            memory,
            calibrator=calibrator,
            demand=history,
            hourly_demand=hourly,
            budget_reported=budget_reported,
        ),
        workload_statuses=tuple(workload_statuses),
        budget_statuses=tuple(budget_statuses),
        metrics=MetricsUpdate(
            workload_energy=energy_counts,
            budget_energy=budget_counts,
            workloads=known,
            budgets=budget_metrics,
        ),
    )


def check_demand(observed: Observed) -> Round:
    """Between plans: fold a fresh reading of the services' served tokens/s and queues into the
    demand history, and ask for a re-plan now (`replan_soon`) when a service's demand exceeds
    what the last plan gave it (`demand.exceeds_plan`), rather than at the periodic re-plan.
    Moves nothing and writes no status. Bounded: one re-plan per reading at most, and a service
    asks again only once its demand is above what the newer plan was sized for."""
    memory = observed.memory
    last = memory.last_round
    telemetry = observed.telemetry.snapshot if observed.telemetry is not None else None
    if last is None or telemetry is None or telemetry.stale:
        return Round(memory=memory)
    history = copy.deepcopy(memory.demand)
    measured = learning.measured_services(
        last.plan_input, _pods_by_workload(observed.view), telemetry
    )
    learning.record_demand(history, measured, observed.monotonic)
    short = services_short_of_demand(last, history, observed.monotonic)
    if short:
        logger.info("demand above the plan's capacity for %s: re-planning", ", ".join(short))
    return Round(memory=dataclasses.replace(memory, demand=history), replan_soon=bool(short))


def services_short_of_demand(
    last: LastRound, history: demand.DemandHistory, monotonic: float
) -> list[str]:
    """The services of the last plan whose newest reading shows more demand than the plan's
    capacity for them and than the demand it sized them for, by key."""
    capacity: dict[str, float] = {}
    for placement in last.plan.placements:
        capacity[placement.workload] = (
            capacity.get(placement.workload, 0.0) + placement.expected_throughput
        )
    return sorted(
        w.key
        for w in last.plan_input.workloads
        if w.type is WorkloadType.INFERENCE
        and demand.exceeds_plan(
            history,
            w.key,
            monotonic,
            sized_for=last.demands.get(w.key),
            capacity=capacity.get(w.key, 0.0),
        )
    )


def failed_round(observed: Observed, error: BaseException, now: datetime) -> Round:
    """A round that could not plan at all: every budget and every waiting workload says why (a
    condition, and one Event per object and cause; what was said is in the memory until a round
    succeeds: `succeeded`)."""
    cause = f"the planning round failed: {type(error).__name__}: {error}"[:900]
    view = observed.view
    said = dict(observed.memory.failure_reported)
    writes: list[StatusWrite] = []
    for body in view.budgets.values():
        if not is_deleting(body):
            write = status_writes.mark_failed(
                BUDGET_KIND, body, ConditionType.READY, cause, now=now, said=said
            )
            writes += [write] if write else []
    for body in view.workloads.values():
        phase = (body.get("status") or {}).get("phase")
        waiting = phase in (None, Phase.PENDING, Phase.PREEMPTED)
        if waiting and not is_deleting(body):
            write = status_writes.mark_failed(
                WORKLOAD_KIND, body, ConditionType.SCHEDULABLE, cause, now=now, said=said
            )
            writes += [write] if write else []
    return Round(
        memory=dataclasses.replace(observed.memory, failure_reported=said),
        early_statuses=tuple(writes),
    )


def succeeded(memory: Memory) -> Memory:
    """The memory after a round that planned: failed rounds are reported afresh."""
    return dataclasses.replace(memory, failure_reported={})


def after_apply(
    round_: Round,
    applied: Applied,
    *,
    view: ClusterView,
    monotonic: float,
    settings: Settings,
) -> Memory:
    """The round's memory with what the apply step saw: the agents that did not confirm (they
    count at maximum next round), the raises it wrote (the next rounds count their nodes as ready
    at them until their deadline; a raise written again replaces one, and a raise past its
    deadline is forgotten), and each refused pod's workload with its backoff (doubling
    with each refusal of the same generation, at most MAX_BACKOFF_SECONDS); an accepted pod ends
    its workload's refusals."""
    rejections = dict(round_.memory.pod_rejections)
    for key, message in applied.refused.items():
        body = view.workloads.get(key) or {"metadata": {}}
        generation = int(body["metadata"].get("generation") or 1)
        before = rejections.get(key)
        refusals = before.refusals + 1 if before and before.generation == generation else 1
        delay = backoff_seconds(refusals, settings.backoff_seconds)
        rejections[key] = PodRejection(generation, message, refusals, monotonic + delay)
    for key in applied.accepted - set(applied.refused):
        rejections.pop(key, None)
    raises = _live_raises(round_.memory, monotonic) | dict(applied.raised)
    return dataclasses.replace(
        round_.memory,
        unconfirmed=applied.unconfirmed,
        raises=raises,
        pod_rejections=rejections,
    )
