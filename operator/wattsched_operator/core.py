"""The decision core: what one planning round decides, from what is observed at `now`.

`decide(observed, now) -> Round` is pure: no kopf, Kubernetes, HTTP or Prometheus client, no
clock (the wall-clock `now` and a monotonic reading come in), no writes. It runs the workloads'
lifecycles (completion, failure counting and backoff, refused pods), builds the optimizer's input
from the objects (`snapshot`), sizes services for their forecast demand (`demand`), solves (the
injected plan function), calibrates the model from the last placements (`readings`), decides
which pods to keep, evict, delete and create and which power limits to lower and raise
(`desired`, `transition`), advances energy, carbon and job progress (`accounting`, `progress`)
and writes every status and Event as data (`statuses`). What it returns is a `Round`: everything
the shell must do, in the order it must do it, and the controller's memory for the next round.

The shell (`loop` waits, debounces, follows leadership, resyncs and reads telemetry; `apply`
executes a Round in the budget-safe order) does the I/O. The simulator calls the same functions
with a simulated cluster and simulated readings.

Four more entry points share the memory: `telemetry_requests` (what the shell must read before
`decide`), `account` (a round between plans: energy, progress and statuses only),
`check_demand` (between plans: a reading of the services' tokens/s and queues, and whether one
needs a plan now) and `failed_round` (a round whose plan failed: every waiting object says why);
`after_apply` folds
what the apply step saw (agents that did not confirm, pods refused or accepted) into the memory.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from wattsched_api.energybudget import EnergyBudget, parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_api.meta import Source, format_time
from wattsched_operator import (
    accounting,
    budget_horizon,
    demand,
    desired,
    handover,
    progress,
    replica_groups,
    services,
    snapshot,
    statuses,
    transition,
)
from wattsched_operator.readings import (
    Calibrator,
    EnergyReading,
    PodKey,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_optimizer.model import (
    Calibration,
    CatalogueModel,
    PerformanceModel,
    products_in_scope,
)
from wattsched_optimizer.planner import plan as optimizer_plan
from wattsched_optimizer.problem import (
    MoveReason,
    Placement,
    Plan,
    PlanInput,
    Unplaced,
    WorkloadType,
)

logger = logging.getLogger("wattsched.operator")

Body = dict[str, Any]

ANNOTATION_FAILURES = "wattsched.io/failures"
ANNOTATION_RETRY_AFTER = "wattsched.io/retry-after"
ANNOTATION_FAILURE_COUNTED = "wattsched.io/failure-counted"
# Reason of the conditions and Events of a round that could not plan at all.
PLAN_FAILED = "PlanFailed"
BUDGET_KIND = "EnergyBudget"
WORKLOAD_KIND = "LLMWorkload"
POD_KIND = "Pod"
MAX_BACKOFF_SECONDS = 300.0
# What each move cause means, in the `Moved` Event (MoveReason's values are the Event's cause).
MOVE_CAUSES = {
    MoveReason.NODE: "its node is gone, NotReady, being deleted, NoExecute-tainted or its agent "
    "is lost",
    MoveReason.BUDGET: "no power limit in place keeps it inside a budget",
    MoveReason.PRIORITY: "higher-priority work needs its GPUs and it is preemptible",
    MoveReason.SAVINGS: "another product or variant saves more than the churn threshold and "
    "spec.disruption.moveToSaveEnergy allows it",
    MoveReason.SPEC: "its spec no longer allows the product or variant it ran with",
    MoveReason.DEFERRED: "the horizon plan runs it later",
}

PlanFunction = Callable[[PlanInput, PerformanceModel], Plan]


# -- what is observed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """The objects read at one moment, as plain bodies (dicts as the API server returns them),
    by kind and key (`namespace/name` for workloads and pods, `name` for the rest)."""

    workloads: Mapping[str, Body]
    budgets: Mapping[str, Body]
    nodes: Mapping[str, Body]
    profiles: Mapping[str, Body]
    pods: Mapping[str, Body]


@dataclass(frozen=True)
class PlannedInput:
    """The optimizer's input, and what was left out of it and why: workloads (key -> error),
    GPU nodes the plan cannot use (name -> why, and what their budgets count them at), budgets
    that cannot be read (name -> error) and other unreadable objects ("Kind key" -> error)."""

    plan_input: PlanInput
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)
    excluded_nodes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    invalid_budgets: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Training/FineTuning/BatchInference workloads: their total and progress query, by key.
    jobs: Mapping[str, progress.JobTerms] = dataclasses.field(default_factory=dict)
    # The readable budgets, parsed (their allowances, cap schedules and forecasts: the horizon).
    budgets: Mapping[str, EnergyBudget] = dataclasses.field(default_factory=dict)


InputBuilder = Callable[[ClusterView, frozenset[str], datetime], PlannedInput]


def build_input_function(heartbeat_timeout_seconds: float) -> InputBuilder:
    """The snapshot reader that turns the observed objects into the optimizer's input.

    Bad objects are left out (and reported) rather than stopping the plan for the others: bad
    LLMWorkloads and EnergyBudgets, unreadable profiles and pods, GPU nodes the plan cannot use.
    """

    def build(view: ClusterView, unconfirmed: frozenset[str], now: datetime) -> PlannedInput:
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


@dataclass(frozen=True)
class Settings:
    """The controller's settings that decisions depend on (the shell's own are in the loop)."""

    # Failed replica pods retried this many times (with doubling backoff) before Failed.
    backoff_limit: int = 3
    backoff_seconds: float = 10.0
    # How often energy, carbon, progress and the measured figures in statuses advance.
    accounting_seconds: float = 60.0
    # An agent silent for longer is lost: its node counts at maximum and takes no work.
    heartbeat_timeout_seconds: float = 30.0
    # Hours the plan looks ahead for budgets with an allowance, a cap schedule or a carbon
    # forecast (`budget_horizon`); 0: the one-instant planner alone.
    horizon_hours: float = budget_horizon.DEFAULT_HORIZON_HOURS


@dataclass(frozen=True)
class Readings:
    """What telemetry read for this round (see `telemetry_requests` for what to read).

    snapshot: power and token rates of the planned nodes and running pods (stale when Prometheus
    did not answer). energy: energy used from each accounting start until the round's `now`
    (whole seconds), by start; a start that could not be read is absent (modelled). intensities:
    the carbon intensity (gCO2/kWh) each budget's query gave, by budget. progress: the completed
    tokens each job's own progress query gave, by workload key. rate_window_seconds: the window of
    the reader's rates (a pod younger than two windows is not used for calibration).
    carbon_forecasts: what each budget's forecast query gave, gCO2/kWh by hours ahead (a query
    that did not answer: absent; the budget's hourly profile or static intensity stands in).
    """

    snapshot: TelemetrySnapshot | None = None
    energy: Mapping[datetime, EnergyReading] = field(default_factory=dict)
    intensities: Mapping[str, float | None] = field(default_factory=dict)
    progress: Mapping[str, float | None] = field(default_factory=dict)
    rate_window_seconds: float = 0.0
    carbon_forecasts: Mapping[str, Mapping[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PodRejection:
    """The API server refused a workload's replica pod: for which generation, with what message,
    how many times in a row, and when (monotonic seconds) the next try is due."""

    generation: int
    message: str
    refusals: int
    retry_at: float


@dataclass(frozen=True)
class LastRound:
    """The plan last applied, what it was solved from, and the workloads it handled."""

    plan: Plan
    plan_input: PlanInput
    active: frozenset[str]
    planned_at: datetime
    built: PlannedInput
    # The tokens/s each Inference service was sized for (its forecast, or its declared demand).
    demands: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # The horizon's step: what it deferred and each budget's allowance outlook.
    over_time: budget_horizon.OverTime | None = None


@dataclass(frozen=True)
class Memory:
    """What the controller carries from one round to the next (in memory: a restarted operator
    starts from an empty Memory; what must survive a restart is in statuses and annotations).

    unconfirmed: nodes whose agent did not confirm lowered limits (they count at maximum).
    pod_rejections: workloads whose replica pod the API server refused, by key (retried when the
    spec changes, or after a backoff that doubles with each refusal). calibrator: the model's
    corrections from measurements; applied_placements: what they are fitted against (the
    placements in force while telemetry measured); applied_since: since when (the round's `now`)
    each replica has had its applied placement's node, variant, limit and clock (a reading whose
    window saw an earlier limit says nothing about this one); calibrated_at: when (monotonic) it
    last learned. demand: measured tokens/s per service (its forecast); hourly_demand: each
    service's peak per wall-clock hour (the horizon's forecast). last_round: the last applied
    plan (accounting rounds between plans use it). ready_agents: nodes whose agent the last round
    counted as ready (the shell watches their heartbeats). budget_reported, reported,
    failure_reported: what was already said in an Event (one Event per cause, not per round).

    A Memory is never changed in place: each round returns a new one.
    """

    unconfirmed: frozenset[str] = frozenset()
    pod_rejections: Mapping[str, PodRejection] = field(default_factory=dict)
    calibrator: Calibrator = field(default_factory=Calibrator)
    applied_placements: tuple[Placement, ...] = ()
    applied_since: Mapping[tuple[str, int], datetime] = field(default_factory=dict)
    calibrated_at: float | None = None
    # (before `demand`: that field's name hides the module in the class body)
    hourly_demand: demand.HourlyDemand = field(default_factory=demand.HourlyDemand)
    demand: demand.DemandHistory = field(default_factory=demand.DemandHistory)
    last_round: LastRound | None = None
    ready_agents: frozenset[str] = frozenset()
    budget_reported: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    reported: Mapping[str, str] = field(default_factory=dict)
    failure_reported: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    """What a round decides from.

    view: the objects (bodies as dicts); memory: what the previous round left; monotonic: a
    monotonic clock reading taken with `now` (seconds; backoff, demand history and calibration
    pacing use it); settings: the controller's settings; telemetry: this round's readings, or
    None when no Prometheus is configured (everything is modelled).
    """

    view: ClusterView
    memory: Memory = field(default_factory=Memory)
    monotonic: float = 0.0
    settings: Settings = field(default_factory=Settings)
    telemetry: Readings | None = None


# -- what a round does -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRef:
    """The object a write or Event is about (kind: LLMWorkload, EnergyBudget, Node, Pod)."""

    kind: str
    name: str
    namespace: str | None = None
    uid: str = ""

    @property
    def api_version(self) -> str:
        return "v1" if self.kind in {"Node", POD_KIND} else f"{desired.GROUP}/{desired.VERSION}"

    @staticmethod
    def of(kind: str, body: Mapping[str, Any]) -> ObjectRef:
        meta = body.get("metadata") or {}
        return ObjectRef(kind, str(meta["name"]), meta.get("namespace"), str(meta.get("uid", "")))


@dataclass(frozen=True)
class Event:
    """A core/v1 Event to post on `object` (type Normal or Warning)."""

    object: ObjectRef
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class StatusWrite:
    """A merge patch of an object's status subresource, and the Events that go with it (posted
    once the write is done)."""

    object: ObjectRef
    status: Mapping[str, Any]
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class MetadataPatch:
    """A merge patch of an object itself (the failure bookkeeping annotations)."""

    object: ObjectRef
    patch: Mapping[str, Any]


@dataclass(frozen=True)
class Eviction:
    """A pod to evict through the Eviction API (PodDisruptionBudgets hold); on a node that is
    gone it is deleted at once (`node_gone`). `workload`: its workload key. `cause`: why it goes
    when its replica moves (`NodeLost`, `BudgetCut`, `HigherPriority`, `SpecChanged`,
    `SavesEnergy`) or its workload is preempted (`BudgetCut`, `HigherPriority`, `Deferred`);
    None when nothing of its workload is disrupted (scaled down, deleted or finished
    workloads)."""

    namespace: str
    name: str
    workload: str
    node_gone: bool = False
    cause: MoveReason | None = None


@dataclass(frozen=True)
class Deletion:
    """A pod to delete (a failed replica due for its retry); at once when its node is gone."""

    namespace: str
    name: str
    node_gone: bool = False


@dataclass(frozen=True)
class WorkloadStatus:
    """A handled workload's status this round: the write (None when nothing changed), its phase
    and SLOMet for metrics, and the phase and SLOMet it had (kept when a pod of the workload is
    refused in this round: the next round reports that)."""

    key: str
    write: StatusWrite | None
    phase: str
    slo_met: bool | None
    previous_phase: str
    previous_slo_met: bool | None


@dataclass(frozen=True)
class EnergyCount:
    """An increment of an energy counter (joules, grams CO2, measured or modelled)."""

    name: str
    joules: float
    grams: float
    source: str


@dataclass(frozen=True)
class PlanFigures:
    """The solve's status, seconds and gap (for the plan metrics)."""

    status: str
    solve_seconds: float
    gap: float


@dataclass(frozen=True)
class BudgetMetric:
    """A budget's figures for the budget gauges (see `metrics.BudgetFigures`)."""

    cap_watts: float
    allocated_cap_watts: float
    expected_watts: float
    measured_watts: float | None
    energy_used_kwh: float | None
    energy_allowance_kwh: float | None


@dataclass(frozen=True)
class MetricsUpdate:
    """What the round changes in /metrics: the plan's figures, the calibration, energy counters,
    workload phases and SLOs (from `Round.workload_statuses`), the workloads that exist, and the
    budget gauges."""

    plan: PlanFigures | None = None
    corrections: Mapping[tuple[str, WorkloadType], Calibration] | None = None
    workload_energy: tuple[EnergyCount, ...] = ()
    budget_energy: tuple[EnergyCount, ...] = ()
    workloads: frozenset[str] | None = None
    budgets: Mapping[str, BudgetMetric] | None = None


@dataclass(frozen=True)
class Disruptions:
    """What the round's evictions mean, to report them once they happened (`report`): each
    evicted pod's workload moves (the plan places it elsewhere) or is preempted."""

    move_reasons: Mapping[str, MoveReason] = field(default_factory=dict)
    unplaced: Mapping[str, Unplaced] = field(default_factory=dict)
    placed: Mapping[tuple[str, int], str] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Body] = field(default_factory=dict)
    want: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    workloads: Mapping[str, ObjectRef] = field(default_factory=dict)
    gangs: frozenset[str] = frozenset()
    handovers: handover.Decision = field(default_factory=handover.Decision)

    def report(self, evicted: Iterable[tuple[str, str]]) -> DisruptionReport:
        """One `Moved` or `Preempted` Event per workload for the pods that went, naming the
        cause (and why a pod went before its replacement was ready), the counts by cause, a
        `GangRestart` Event per gang whose replicas move, and the make-before-break moves'
        Events (`_handover_events`)."""
        evicted = list(evicted)
        placed_keys = {key for key, _ in self.placed}
        events: list[Event] = []
        moves: dict[str, int] = {}
        preemptions: dict[str, int] = {}
        preempted: dict[str, int] = {}
        for namespace, name in evicted:
            pod = self.pods.get((namespace, name))
            if pod is None:
                continue
            key = pod_workload_key(pod)
            if key in self.workloads and key not in placed_keys and not _finished(pod):
                preempted[key] = preempted.get(key, 0) + 1
        notes = self.handovers.fallbacks
        for key, moved in desired.moved_replicas(self.pods, self.want, evicted, notes).items():
            if key not in self.workloads:
                continue
            cause = self.move_reasons.get(key, MoveReason.SPEC)
            moves[cause.value] = moves.get(cause.value, 0) + len(moved)
            shown = "; ".join(moved[:5]) + ("; ..." if len(moved) > 5 else "")
            forced = ""
            if cause is MoveReason.BUDGET and len(moved) > 1 and key not in self.gangs:
                forced = " (more than one replica at once: the budget forces it)"
            events.append(
                Event(
                    self.workloads[key],
                    "Normal",
                    "Moved",
                    f"{len(moved)} replica(s), cause {cause.value}: {MOVE_CAUSES[cause]}{forced}; "
                    f"{shown}",
                )
            )
        for key, count in preempted.items():
            unplaced = self.unplaced.get(key)
            reason = unplaced.reason if unplaced else "the plan no longer places it"
            cause = _preemption_cause(unplaced.constraint if unplaced else "")
            preemptions[cause.value] = preemptions.get(cause.value, 0) + count
            events.append(
                Event(
                    self.workloads[key],
                    "Warning",
                    "Preempted",
                    f"{count} replica(s), cause {cause.value}: {reason}",
                )
            )
        events.extend(self._gang_restarts(evicted))
        events.extend(self._handover_events(evicted, moves))
        return DisruptionReport(tuple(events), moves, preemptions)

    def _handover_events(
        self, evicted: Iterable[tuple[str, str]], moves: dict[str, int]
    ) -> list[Event]:
        """A `Moved` Event per workload whose make-before-break moves start this round (counted
        in `moves` by cause); a Warning `ReplacementNotReady` for each replacement given up, and
        a Warning `Moved` for each old pod that a budget forced out before its replacement was
        Ready (its replacement is already there, so `moved_replicas` does not see it)."""
        decision = self.handovers
        events: list[Event] = []
        for key, started in sorted(decision.started.items()):
            if key not in self.workloads:
                continue
            cause = self.move_reasons.get(key, MoveReason.SPEC)
            moves[cause.value] = moves.get(cause.value, 0) + len(started)
            events.append(
                Event(
                    self.workloads[key],
                    "Normal",
                    "Moved",
                    f"{len(started)} replica(s), cause {cause.value}: {MOVE_CAUSES[cause]}; "
                    "make-before-break, each old pod stays until its replacement is Ready: "
                    + "; ".join(started),
                )
            )
        for (namespace, name), why in sorted(decision.given_up.items()):
            pod = self.pods.get((namespace, name))
            key = pod_workload_key(pod) if pod is not None else ""
            if key in self.workloads:
                events.append(
                    Event(self.workloads[key], "Warning", "ReplacementNotReady", f"{name}: {why}")
                )
        for namespace, name in sorted(evicted):
            forced = decision.fallbacks.get((namespace, name))
            pod = self.pods.get((namespace, name))
            if forced is None or pod is None or (namespace, name) in self.want:
                continue
            key = pod_workload_key(pod)
            if key in self.workloads:
                cause = self.move_reasons.get(key, MoveReason.SPEC)
                events.append(
                    Event(
                        self.workloads[key],
                        "Warning",
                        "Moved",
                        f"{name}, cause {cause.value}: {forced}",
                    )
                )
        return events

    def _gang_restarts(self, evicted: Iterable[tuple[str, str]]) -> list[Event]:
        """A Warning Event `GangRestart` on each placed gang whose running replicas move: the
        gang restarts (its framework re-forms it); the replicas that stay keep their pods."""
        moving: dict[str, list[tuple[int, str]]] = {}
        for namespace, name in evicted:
            pod = self.pods.get((namespace, name))
            if pod is None or _finished(pod) or not (pod.get("spec") or {}).get("nodeName"):
                continue
            key = pod_workload_key(pod)
            replica = statuses.replica_index(pod)
            if key in self.workloads and key in self.gangs and replica >= 0:
                moving.setdefault(key, []).append((replica, pod["spec"]["nodeName"]))
        events = []
        for key, replicas in sorted(moving.items()):
            moves = [
                (r, n, self.placed[(key, r)])
                for r, n in sorted(replicas)
                if (key, r) in self.placed
            ]
            if not moves:
                continue  # preempted as a whole: the Preempted Event says so
            events.append(
                Event(
                    self.workloads[key],
                    "Warning",
                    "GangRestart",
                    "the gang restarts: "
                    + ", ".join(f"replica {r} moves from {old} to {new}" for r, old, new in moves)
                    + "; the other replicas stay where they run",
                )
            )
        return events


@dataclass(frozen=True)
class DisruptionReport:
    """The Events and the move and preemption counts (by cause) of the pods that went."""

    events: tuple[Event, ...]
    moves: Mapping[str, int]
    preemptions: Mapping[str, int]


@dataclass(frozen=True)
class Round:
    """Everything one round does, in the order the shell applies it (`apply`):

    0. `patches` (failure bookkeeping) and `events` decided before the solve (replica failures,
       nodes left out, workloads not admitted) with `early_statuses` (Admitted=False);
    1. `lower` the power limits and wait for the agents to confirm;
    2. write `moving` statuses, `evict` (Eviction API) and `delete` pods, then report the
       evictions that went (`disruptions.report`);
    3. `create` pods (a workload whose pod is refused is remembered: `after_apply`),
       `relabel` the power limit annotation of kept pods, and make the operator's Services
       match `services` (each Inference workload's, a headless one per replica that spans
       nodes; None: leave them as they are);
    4. `raise_` the limits, only when every lowering was confirmed;
    5. `open_profiles` for excluded GPU nodes without one;
    6. `workload_statuses`, `budget_statuses` with their Events, and `metrics`.

    `plan`: the solve (None for an accounting round); `memory`: the next round's memory (before
    `after_apply`); `wake_at`: when (monotonic) a retry is due; `replan_soon`: the round left
    work for the next (paced moves, names still taken).
    """

    memory: Memory
    plan: Plan | None = None
    patches: tuple[MetadataPatch, ...] = ()
    events: tuple[Event, ...] = ()
    early_statuses: tuple[StatusWrite, ...] = ()
    lower: Mapping[str, transition.NodeLimits] = field(default_factory=dict)
    moving: tuple[StatusWrite, ...] = ()
    evict: tuple[Eviction, ...] = ()
    delete: tuple[Deletion, ...] = ()
    create: tuple[Mapping[str, Any], ...] = ()
    relabel: Mapping[tuple[str, str], str] = field(default_factory=dict)
    services: Mapping[tuple[str, str], Mapping[str, Any]] | None = None
    raise_: Mapping[str, transition.NodeLimits] = field(default_factory=dict)
    open_profiles: Mapping[str, transition.NodeLimits] = field(default_factory=dict)
    workload_statuses: tuple[WorkloadStatus, ...] = ()
    budget_statuses: tuple[StatusWrite, ...] = ()
    metrics: MetricsUpdate = field(default_factory=MetricsUpdate)
    disruptions: Disruptions = field(default_factory=Disruptions)
    wake_at: float | None = None
    replan_soon: bool = False


@dataclass(frozen=True)
class Applied:
    """What the apply step saw: agents that did not confirm lowered limits, pods that went,
    workloads whose pod the API server refused (key -> message) or accepted."""

    unconfirmed: frozenset[str] = frozenset()
    evicted: tuple[tuple[str, str], ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)
    accepted: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TelemetryRequests:
    """What the shell must read before `decide`/`account`: the power and token snapshot of
    `nodes` and `pods`; the energy from each start until `end` of its (nodes, pods); each
    budget's carbon intensity query; each due job's progress query; the carbon forecast query
    of each budget the horizon plans (its samples: `budget_horizon.forecast_by_hours_ahead`)."""

    nodes: tuple[str, ...] = ()
    pods: tuple[PodKey, ...] = ()
    end: datetime | None = None
    energy: Mapping[datetime, tuple[tuple[str, ...], tuple[PodKey, ...]]] = field(
        default_factory=dict
    )
    intensity_queries: Mapping[str, str] = field(default_factory=dict)
    progress_queries: Mapping[str, str] = field(default_factory=dict)
    forecast_queries: Mapping[str, str] = field(default_factory=dict)


# -- small pure helpers ----------------------------------------------------------------------------


def backoff_seconds(failures: int, base_seconds: float) -> float:
    """Seconds before retrying a replica after its `failures`-th failure (doubling, 5 min cap)."""
    return float(min(base_seconds * 2 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS))


def workload_object(body: Mapping[str, Any]) -> desired.WorkloadObject:
    meta = body["metadata"]
    spec = body.get("spec") or {}
    variants = spec.get("variants") or [{"name": "bf16", "precision": "bf16"}]
    return desired.WorkloadObject(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta.get("uid", ""),
        type=WorkloadType(spec.get("type", "Inference")),
        template=spec.get("template") or {},
        precisions={str(v["name"]): str(v.get("precision", "bf16")) for v in variants},
    )


def gang_size(body: Mapping[str, Any]) -> int:
    spec = body.get("spec") or {}
    return int(spec.get("replicas") or 1)


def is_gang(body: Mapping[str, Any]) -> bool:
    """Whether a workload runs as a gang (an unknown type: no; the snapshot rejects it)."""
    try:
        return WorkloadType((body.get("spec") or {}).get("type", "Inference")).is_gang
    except ValueError:
        return False


def pod_workload_key(pod: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{(meta.get('labels') or {}).get(desired.LABEL_WORKLOAD, '')}"


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


def is_deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def pod_id(pod: Mapping[str, Any]) -> tuple[str, str]:
    return (pod["metadata"]["namespace"], pod["metadata"]["name"])


def running(pod: Mapping[str, Any]) -> bool:
    """A pod bound to a node and running: the ones telemetry can attribute GPU draw to."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (
        (pod.get("status") or {}).get("phase") == "Running"
    )


def _pod_started(pod: Mapping[str, Any]) -> datetime | None:
    return accounting.parse_rfc3339((pod.get("status") or {}).get("startTime"))


def _finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}


def _pod_failure(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            return (
                f"container {container.get('name')} exited {terminated.get('exitCode')}"
                f" ({terminated.get('reason') or 'Error'})"
            )
    return str(status.get("reason") or status.get("message") or "pod failed")


def _slo_of(status: Mapping[str, Any]) -> bool | None:
    """Whether a workload's SLOMet condition is True (None: it has none)."""
    condition = next(
        (c for c in status.get("conditions") or [] if c.get("type") == statuses.SLO_MET), None
    )
    if condition is not None and condition.get("status") in {"True", "False"}:
        return bool(condition["status"] == "True")
    return None


def _number(value: Any) -> float:
    """A spec number as the API server stores it (0 when absent or not a number)."""
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _excluded_in_scope(
    budget: Mapping[str, Any], view: ClusterView, excluded: Mapping[str, str]
) -> dict[str, str]:
    """The excluded GPU nodes a budget's selector matches (an unreadable selector: none)."""
    if not excluded:
        return {}
    try:
        spec = parse_energybudget(budget).spec
    except ApiValidationError:
        return {}
    found: dict[str, str] = {}
    for name, reason in excluded.items():
        labels = ((view.nodes.get(name) or {}).get("metadata") or {}).get("labels") or {}
        text = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}
        if spec.selects(text):
            found[name] = reason
    return found


def _pods_by_workload(view: ClusterView) -> dict[str, list[Body]]:
    pods_by_workload: dict[str, list[Body]] = {}
    for pod in view.pods.values():
        pods_by_workload.setdefault(pod_workload_key(pod), []).append(pod)
    return pods_by_workload


def _fork(memory: Memory) -> tuple[Calibrator, demand.DemandHistory]:
    """Copies of the memory's mutable learners, for the next memory (the input stays as it was)."""
    return copy.deepcopy(memory.calibrator), copy.deepcopy(memory.demand)


# -- the lifecycle ---------------------------------------------------------------------------------


@dataclass
class Lifecycle:
    """Per-workload facts gathered before planning: finished, failed for good, waiting to retry,
    and the failure bookkeeping to write (annotations and Events)."""

    succeeded: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    delete_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    wake_at: float | None = None
    patches: list[MetadataPatch] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)


def lifecycle(
    view: ClusterView,
    pods_by_workload: Mapping[str, list[Body]],
    now: datetime,
    monotonic: float,
    settings: Settings,
) -> Lifecycle:
    """Completion and failure handling: retries with backoff, then Failed."""
    life = Lifecycle()
    for key, body in view.workloads.items():
        phase = (body.get("status") or {}).get("phase")
        pods = pods_by_workload.get(key, [])
        if phase in statuses.TERMINAL_PHASES or is_deleting(body):
            life.keep_pods.update(pod_id(p) for p in pods if _finished(p))
            continue
        views = [statuses.PodView.from_pod(p) for p in pods]
        done = statuses.succeeded_replicas(views)
        if is_gang(body) and len(done) >= gang_size(body):
            life.succeeded.add(key)
            life.keep_pods.update(pod_id(p) for p in pods)
            continue
        life.keep_pods.update(
            pod_id(p) for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"
        )
        annotations = body["metadata"].get("annotations") or {}
        # The annotations are the operator's, but anyone who may edit the workload can
        # change them: a value that is not ours counts as none.
        failures_text = str(annotations.get(ANNOTATION_FAILURES, "0"))
        failures = int(failures_text) if failures_text.isdigit() else 0
        retry_after = annotations.get(ANNOTATION_RETRY_AFTER)
        for pod in pods:
            if (pod.get("status") or {}).get("phase") != "Failed":
                continue
            pod_annotations = pod["metadata"].get("annotations") or {}
            if ANNOTATION_FAILURE_COUNTED not in pod_annotations:
                failures += 1
                retry_moment = now + timedelta(
                    seconds=backoff_seconds(failures, settings.backoff_seconds)
                )
                retry_after = format_time(retry_moment)
                _count_failure(life, body, pod, failures, retry_after)
            if failures > settings.backoff_limit:
                life.failed[key] = (
                    f"replica pods failed {failures} times (limit "
                    f"{settings.backoff_limit}); last: {_pod_failure(pod)}"
                )
                break
            due = accounting.parse_rfc3339(retry_after) or now
            if now >= due:
                life.delete_pods.add(pod_id(pod))
            else:
                life.keep_pods.add(pod_id(pod))
                wake = monotonic + (due - now).total_seconds()
                life.wake_at = wake if life.wake_at is None else min(life.wake_at, wake)
    return life


def _count_failure(
    life: Lifecycle, workload: Body, pod: Body, failures: int, retry_after: str
) -> None:
    """Count a failed pod once: the workload's failure count and retry time, a mark on the pod,
    and a `ReplicaFailed` Event."""
    life.patches.append(
        MetadataPatch(
            ObjectRef.of(WORKLOAD_KIND, workload),
            {
                "metadata": {
                    "annotations": {
                        ANNOTATION_FAILURES: str(failures),
                        ANNOTATION_RETRY_AFTER: retry_after,
                    }
                }
            },
        )
    )
    life.patches.append(
        MetadataPatch(
            ObjectRef.of(POD_KIND, pod),
            {"metadata": {"annotations": {ANNOTATION_FAILURE_COUNTED: "true"}}},
        )
    )
    life.events.append(
        Event(
            ObjectRef.of(WORKLOAD_KIND, workload),
            "Warning",
            "ReplicaFailed",
            f"pod {pod['metadata']['name']} failed ({_pod_failure(pod)}); failure {failures}, "
            f"retry after {retry_after}",
        )
    )


def _refused_pods(
    active: Mapping[str, Body], rejections: dict[str, PodRejection], monotonic: float
) -> dict[str, str]:
    """Workloads whose pods the API server refused for their current generation, and whose
    backoff has not yet run out (those due are planned again; they stay in `rejections` until a
    pod of theirs is accepted, so a new refusal doubles the wait). Drops from `rejections` the
    workloads that are gone or whose spec changed."""
    refused: dict[str, str] = {}
    for key, rejection in list(rejections.items()):
        body = active.get(key)
        if body is None or int(body["metadata"].get("generation") or 1) != rejection.generation:
            del rejections[key]  # deleted, or its spec changed: try again
            continue
        if monotonic >= rejection.retry_at:
            continue
        refused[key] = f"the API server refused its replica pod: {rejection.message}"
    return refused


def _rejected_statuses(
    view: ClusterView, rejected: Mapping[str, str], now: datetime, *, reason: str
) -> list[StatusWrite]:
    """Mark workloads that cannot be admitted: Admitted=False with the error, and an Event."""
    writes = []
    for key, message in rejected.items():
        body = view.workloads.get(key)
        if body is None:
            continue
        previous = body.get("status") or {}
        admitted = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == "Admitted"), None
        )
        if admitted is not None and admitted.get("message") == message:
            continue
        condition = statuses.condition(
            previous.get("conditions") or [],
            "Admitted",
            False,
            reason,
            message,
            now=now,
            observed_generation=int(body["metadata"].get("generation") or 1),
        )
        # Pending with nothing placed: a placement written before (the spec changed, the pod
        # was refused) goes, so phase, conditions and placements agree. (Merge patch: None
        # removes a field.)
        status = {
            "phase": statuses.PENDING,
            "conditions": [condition],
            "message": message,
            "placements": None,
            "nodes": None,
            "variant": None,
            "replicas": None,
            "power": None,
        }
        ref = ObjectRef.of(WORKLOAD_KIND, body)
        writes.append(StatusWrite(ref, status, (Event(ref, "Warning", reason, message),)))
    return writes


def _left_out(
    view: ClusterView, built: PlannedInput, reported: Mapping[str, str]
) -> tuple[list[Event], dict[str, str]]:
    """Log what the snapshot left out, and an Event on each GPU node the plan cannot use whenever
    its reason changes (budgets in its scope say so in `NodesPlanned`). Returns the Events and
    what is now reported."""
    events = []
    for key, message in built.ignored.items():
        if reported.get(key) != message:
            logger.warning("left out of planning: %s: %s", key, message)
    for name, reason in built.excluded_nodes.items():
        key = f"Node {name}"
        if reported.get(key) != reason:
            logger.warning("node %s takes no work: %s", name, reason)
            node = view.nodes.get(name) or {"metadata": {"name": name}}
            events.append(Event(ObjectRef.of("Node", node), "Warning", "NodeExcluded", reason))
    return events, {
        **built.ignored,
        **{f"Node {name}": reason for name, reason in built.excluded_nodes.items()},
    }


# -- preparing a round -----------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A round's facts before the solve."""

    now: datetime
    pods_by_workload: dict[str, list[Body]]
    life: Lifecycle
    built: PlannedInput
    plan_input: PlanInput
    active: dict[str, Body]
    refused: dict[str, str]
    rejections: dict[str, PodRejection]


def _prepare(observed: Observed, now: datetime, build_input: InputBuilder) -> _Prepared:
    view = observed.view
    pods_by_workload = _pods_by_workload(view)
    life = lifecycle(view, pods_by_workload, now, observed.monotonic, observed.settings)
    active = {
        key: body
        for key, body in view.workloads.items()
        if not is_deleting(body)
        and (body.get("status") or {}).get("phase") not in statuses.TERMINAL_PHASES
        and key not in life.succeeded
        and key not in life.failed
    }
    active_view = dataclasses.replace(view, workloads=active)
    built = build_input(active_view, observed.memory.unconfirmed, now)
    rejections = dict(observed.memory.pod_rejections)
    refused = _refused_pods(active, rejections, observed.monotonic)
    active = {k: v for k, v in active.items() if k not in built.rejected and k not in refused}
    plan_input = dataclasses.replace(
        built.plan_input,
        workloads=tuple(w for w in built.plan_input.workloads if w.key not in refused),
    )
    return _Prepared(now, pods_by_workload, life, built, plan_input, active, refused, rejections)


def _default_build_input(settings: Settings) -> InputBuilder:
    return build_input_function(settings.heartbeat_timeout_seconds)


def telemetry_requests(
    observed: Observed,
    now: datetime,
    *,
    build_input: InputBuilder | None = None,
    between_plans: bool = False,
) -> TelemetryRequests:
    """What the shell must read for `decide(observed, now)` (or `account` when `between_plans`):
    the snapshot of the planned nodes and running pods, the energy of what accounting finds due,
    the budgets' carbon intensity queries and the due jobs' progress queries."""
    view = observed.view
    last = observed.memory.last_round
    if between_plans:
        if last is None:
            return TelemetryRequests()
        plan_input, jobs, active = last.plan_input, last.built.jobs, _still_active(view, last)
        forecasts = {}
    else:
        prepared = _prepare(observed, now, build_input or _default_build_input(observed.settings))
        plan_input, jobs, active = prepared.plan_input, prepared.built.jobs, prepared.active
        forecasts = _forecast_queries(prepared.built.budgets, observed.settings)
    pods = _pods_by_workload(view)
    due = _due(
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


def _forecast_queries(budgets: Mapping[str, EnergyBudget], settings: Settings) -> dict[str, str]:
    """Each budget's carbon forecast query, when the horizon plans over time."""
    if settings.horizon_hours <= 0 or not budget_horizon.plans_over_time(budgets.values()):
        return {}
    return {
        name: budget.spec.carbon.forecast_prometheus_query
        for name, budget in sorted(budgets.items())
        if budget.spec.carbon is not None and budget.spec.carbon.forecast_prometheus_query
    }


# -- deciding a round ------------------------------------------------------------------------------


def decide(
    observed: Observed,
    now: datetime,
    *,
    plan_function: PlanFunction = optimizer_plan,
    build_input: InputBuilder | None = None,
) -> Round:
    """One planning round: what the shell must do, in data, and the next memory.

    `plan_function` solves (the optimizer's `plan` unless a caller injects another, e.g. a stub
    in tests); `build_input` turns the objects into the optimizer's input (the snapshot reader
    with the settings' heartbeat timeout unless injected). Raises what the solve raises (the
    shell then reports a failed round: `failed_round`).
    """
    prepared = _prepare(observed, now, build_input or _default_build_input(observed.settings))
    # Products the catalogue lacks (as their nodes describe them) are known for this round.
    with products_in_scope(prepared.plan_input.products):
        return _decide(observed, prepared, plan_function)


def _decide(observed: Observed, prepared: _Prepared, plan_function: PlanFunction) -> Round:
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
    early = _rejected_statuses(view, built.rejected, now, reason="InvalidSpec")
    early += _rejected_statuses(view, prepared.refused, now, reason="PodRejected")

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
    timed = budget_horizon.plan_over_time(
        sized,
        built.budgets,
        now,
        horizon_hours=observed.settings.horizon_hours,
        forecasts=readings.carbon_forecasts if readings is not None else None,
        hourly_demand=hourly,
    )
    model = CatalogueModel().calibrated(calibrator.corrections())
    plan = plan_function(timed.plan_input, model)
    logger.info(
        "plan %s: %d placements, %d unplaced, %d workloads",
        plan.status,
        len(plan.placements),
        len(plan.unplaced),
        len(active),
    )

    calibrated_at = memory.calibrated_at
    corrections = None
    learned = _calibrate(
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
    _record_demand(history, plan_input, prepared.pods_by_workload, telemetry, observed.monotonic)
    _record_hourly(hourly, plan_input, prepared.pods_by_workload, telemetry, now)

    changes = _pod_round(
        view,
        active,
        plan,
        life,
        now,
        plan_input=plan_input,
        deferred=frozenset(d.workload for d in timed.deferred),
    )
    if timed.deferred:  # a deferred job's evicted pods say until when and why
        changes = dataclasses.replace(
            changes,
            disruptions=dataclasses.replace(
                changes.disruptions,
                unplaced={**changes.disruptions.unplaced, **_deferred_unplaced(timed.deferred)},
            ),
        )
    accounts, energy_counts, budget_counts = _account(
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
    workload_statuses, known = _workload_statuses(
        view,
        active=active,
        plan=plan,
        life=life,
        pods_by_workload=prepared.pods_by_workload,
        now=now,
        accounts=accounts,
        telemetry=telemetry,
        demands=demands,
        deferred=timed.deferred,
    )
    budget_statuses, budget_reported, budget_metrics = _budget_statuses(
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
        applied_since=_applied_since(memory, plan.placements, now),
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


def _pod_round(
    view: ClusterView,
    active: Mapping[str, Body],
    plan: Plan,
    life: Lifecycle,
    now: datetime,
    *,
    plan_input: PlanInput,
    deferred: frozenset[str] = frozenset(),
) -> Round:
    """The pod and power-limit changes of a plan: lower, evict, delete, create, raise (in a
    Round without memory; `_decide` completes it). A service's replica that moves is handed
    over make-before-break where GPUs and budgets allow (`_handovers`)."""
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

    unplaced = {u.workload: u for u in plan.unplaced}

    def cause(pod: Mapping[str, Any]) -> MoveReason | None:
        key = pod_workload_key(pod)
        if key not in active or _finished(pod):
            return None
        if pod_id(pod) in want:  # the replica is wanted elsewhere: it moves
            return plan.move_reasons.get(key, MoveReason.SPEC)
        if pod_id(pod) in handovers.finished or pod_id(pod) in handovers.fallbacks:
            # The old pod of a make-before-break move (its replacement has the other name).
            return plan.move_reasons.get(key, MoveReason.SPEC)
        if key in deferred:  # the horizon plan runs it later
            return MoveReason.DEFERRED
        if key not in placed_keys:  # its workload lost its place: preempted
            return _preemption_cause(unplaced[key].constraint if key in unplaced else "")
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
        services=services.desired_from_plan(active, plan.placements),
        relabel=dict(changes.relabel_power),
        raise_=steps.raise_,
        disruptions=Disruptions(
            move_reasons=dict(plan.move_reasons),
            unplaced=unplaced,
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
        if previous.get("phase") != statuses.RUNNING:
            continue
        message = f"pod(s) {', '.join(sorted(names))} move: waiting for their replacements"
        ready = statuses.condition(
            previous.get("conditions") or [], "Ready", False, "Moving", message, now=now
        )
        conditions = [c for c in previous.get("conditions") or [] if c.get("type") != "Ready"] + [
            ready
        ]
        status = {"phase": statuses.PLACED, "message": message, "conditions": conditions}
        writes.append(StatusWrite(ObjectRef.of(WORKLOAD_KIND, body), status))
    return writes


# -- learning from telemetry -----------------------------------------------------------------------


def _calibrate(
    calibrator: Calibrator,
    *,
    memory: Memory,
    plan_input: PlanInput,
    view: ClusterView,
    readings: Readings | None,
    monotonic: float,
    settings: Settings,
) -> int | None:
    """Fold a fresh reading of the running replicas into the model's corrections (at most
    once per accounting interval, so one reading is not counted many times). Returns how many
    samples it learned from, None when it was not time to."""
    telemetry = readings.snapshot if readings is not None else None
    if readings is None or telemetry is None or telemetry.stale:
        return None
    if (
        memory.calibrated_at is not None
        and monotonic - memory.calibrated_at < settings.accounting_seconds
    ):
        return None
    nodes = {(p.workload, p.replica): p.node for p in memory.applied_placements}
    # A reading says what a replica draws only if the replica ran for the whole rate window,
    # and the exporter had a window to see its load: a younger pod's reading includes idle.
    # The same holds for a replica whose limit (or node, variant, clock) changed since.
    window = timedelta(seconds=readings.rate_window_seconds)
    settled_by = telemetry.time - 2 * window
    pods: dict[tuple[str, int], PodKey] = {}
    for pod in view.pods.values():
        if not running(pod) or statuses.replica_index(pod) < 0:
            continue
        started = _pod_started(pod)
        if started is None or started > settled_by:
            continue
        replica = (pod_workload_key(pod), statuses.replica_index(pod))
        since = memory.applied_since.get(replica)
        if since is None or since > settled_by:
            continue
        if nodes.get(replica) == pod["spec"]["nodeName"]:  # where the placement says
            pods[replica] = pod_id(pod)
    samples = calibration_samples(
        memory.applied_placements,
        pods=pods,
        products={node.name: node.product for node in plan_input.nodes},
        types={workload.key: workload.type for workload in plan_input.workloads},
        demands={
            workload.key: workload.tokens_per_second
            for workload in plan_input.workloads
            if workload.tokens_per_second is not None
        },
        snapshot=telemetry,
        corrections=calibrator.corrections(),
    )
    for sample in samples:
        calibrator.observe(sample)
    return len(samples)


def _applied_since(
    memory: Memory, placements: Iterable[Placement], now: datetime
) -> dict[tuple[str, int], datetime]:
    """Each placed replica's `applied_since`: kept while its node, variant, limit and clock are
    those of the previous plan, else `now`."""
    before = {(p.workload, p.replica): p for p in memory.applied_placements}
    since: dict[tuple[str, int], datetime] = {}
    for placement in placements:
        key = (placement.workload, placement.replica)
        old = before.get(key)
        same = old is not None and (
            old.node,
            old.variant,
            old.power_limit_watts,
            old.sm_clock_mhz,
        ) == (
            placement.node,
            placement.variant,
            placement.power_limit_watts,
            placement.sm_clock_mhz,
        )
        since[key] = memory.applied_since.get(key, now) if same else now
    return since


def _record_demand(
    history: demand.DemandHistory,
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    telemetry: TelemetrySnapshot | None,
    monotonic: float,
) -> None:
    """Add each service's measured tokens/s to its demand history, with the tokens waiting in
    its queues (`_measured_services`)."""
    for key, (tokens_per_second, backlog_tokens) in _measured_services(
        plan_input, pods_by_workload, telemetry
    ).items():
        history.record(key, monotonic, tokens_per_second, backlog_tokens=backlog_tokens)


def _record_hourly(
    hourly: demand.HourlyDemand,
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    telemetry: TelemetrySnapshot | None,
    now: datetime,
) -> None:
    """Add each service's measured tokens/s to its peak of the wall-clock hour (the horizon's
    forecast for the same hour of later days)."""
    for key, (tokens_per_second, _) in _measured_services(
        plan_input, pods_by_workload, telemetry
    ).items():
        hourly.record(key, now.timestamp(), tokens_per_second)


def _measured_services(
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    telemetry: TelemetrySnapshot | None,
) -> dict[str, tuple[float, float]]:
    """Each service's measured tokens/s and the tokens waiting in its queues: the sums over its
    running pods that a fresh reading measured. A pod's tokens/s is its short-window peak where
    measured (else the rate window's mean); a pod with no reading yet (its server starting, not
    yet scraped) serves nothing that counts, and a pod without a queue figure counts as an empty
    queue. A service none of whose pods has a reading gets none: its earlier readings stand (a
    rolling move, one replica starting after another, must not empty the window and fall back to
    the declared demand)."""
    measured: dict[str, tuple[float, float]] = {}
    if telemetry is None or telemetry.stale:
        return measured
    for workload in plan_input.workloads:
        if workload.type is not WorkloadType.INFERENCE:
            continue
        pods = [pod_id(p) for p in pods_by_workload.get(workload.key, []) if running(p)]
        values = [
            value
            for pod in pods
            if (
                value := telemetry.pod_peak_tokens_per_second.get(
                    pod, telemetry.pod_tokens_per_second.get(pod)
                )
            )
            is not None
        ]
        if values:
            measured[workload.key] = (
                sum(values),
                sum(telemetry.pod_queued_tokens.get(pod, 0.0) for pod in pods),
            )
    return measured


# -- accounting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accounts:
    """This round's energy accounting: the new `status.energy` of the workloads that were due
    (with their measured watts), and the new period figures of the budgets that were due."""

    workload_energy: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    workload_measured_watts: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    budget_figures: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # The new `status.progress` of the jobs that were due.
    workload_progress: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Due:
    """What accounting finds due at `now` (whole seconds)."""

    now: datetime
    running: Mapping[str, list[Body]]
    workload_starts: Mapping[str, datetime]
    terms: Mapping[str, accounting.BudgetTerms]
    budget_starts: Mapping[str, datetime]
    scopes: Mapping[str, Iterable[str]]
    groups: Mapping[datetime, tuple[set[str], set[PodKey]]]


def _due(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    pods_by_workload: Mapping[str, list[Body]],
    plan_input: PlanInput,
    settings: Settings,
    now: datetime,
) -> _Due:
    # Whole seconds: `accountedUntil` is written to the second, and the next increment
    # starts exactly where this one ends.
    now = now.replace(microsecond=0)
    interval = settings.accounting_seconds
    running_pods: dict[str, list[Body]] = {
        key: [p for p in pods_by_workload.get(key, []) if running(p)] for key in active
    }
    # Due, and either never accounted (an empty first total) or with pods that used energy:
    # a workload waiting for a place is not rewritten each interval.
    workload_starts = {
        key: start
        for key, body in active.items()
        if (start := accounting.workload_start(body.get("status") or {}, now, interval))
        and (start == now or running_pods[key])
    }
    terms = {
        name: accounting.BudgetTerms.from_spec(body.get("spec") or {})
        for name, body in view.budgets.items()
        if not is_deleting(body)
    }
    budget_starts = {
        name: start
        for name, body in view.budgets.items()
        if name in terms
        and (
            start := accounting.budget_start(
                body.get("status") or {}, now, terms[name].period, interval
            )
        )
    }
    scopes = {b.name: b.node_names for b in plan_input.budgets}
    groups: dict[datetime, tuple[set[str], set[PodKey]]] = {}
    for key, start in workload_starts.items():
        if start < now:
            groups.setdefault(start, (set(), set()))[1].update(map(pod_id, running_pods[key]))
    for name, start in budget_starts.items():
        if start < now:
            groups.setdefault(start, (set(), set()))[0].update(scopes.get(name, ()))
    return _Due(now, running_pods, workload_starts, terms, budget_starts, scopes, groups)


def _account(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    plan: Plan,
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    readings: Readings | None,
    settings: Settings,
    now: datetime,
    jobs: Mapping[str, progress.JobTerms] | None = None,
) -> tuple[Accounts, tuple[EnergyCount, ...], tuple[EnergyCount, ...]]:
    """Advance the energy and carbon totals that are due (see `accounting`), and the energy
    counters (workloads, budgets).

    Measured increments come from the energy readings (one per distinct start time, normally
    one); a start the shell could not read, or a pod or node it did not measure, makes that
    increment modelled.
    """
    telemetry = readings.snapshot if readings is not None else None
    due = _due(
        view,
        active=active,
        pods_by_workload=pods_by_workload,
        plan_input=plan_input,
        settings=settings,
        now=now,
    )
    now = due.now
    if not due.workload_starts and not due.budget_starts:
        return Accounts(), (), ()
    fresh = telemetry is not None and not telemetry.stale
    initial_source = Source.MEASURED if fresh else Source.MODELLED
    terms, scopes = due.terms, due.scopes
    placements: dict[str, list[Any]] = {}
    for placement in plan.placements:
        placements.setdefault(placement.workload, []).append(placement)
    energy_readings = readings.energy if readings is not None else {}
    intensities = readings.intensities if readings is not None else {}
    carbon = {name: t.intensity(intensities.get(name)) for name, t in terms.items()}

    workload_energy: dict[str, Mapping[str, Any]] = {}
    measured_watts: dict[str, float | None] = {}
    workload_counts: list[EnergyCount] = []
    window = readings.rate_window_seconds if readings is not None else 0
    new_series_since = now - timedelta(seconds=window)
    for key, start in due.workload_starts.items():
        pods = due.running[key]
        pod_keys = [pod_id(p) for p in pods]
        planned = placements.get(key, [])
        expected_watts = sum(p.expected_watts_per_gpu * p.gpus for p in planned)
        added: accounting.Increment | None = None
        if start < now:
            reading = energy_readings.get(start)
            fresh_reading = reading is not None and not reading.stale
            measured = (
                accounting.measured_sum(reading.pod_joules, pod_keys)
                if reading is not None and fresh_reading
                else None
            )
            pod_starts = [_pod_started(p) or start for p in pods]
            if measured is None and fresh_reading and max(pod_starts) > new_series_since:
                continue  # a pod too new for its first samples: measure it next time
            began = max(start, min(pod_starts))
            added = accounting.increment(measured, expected_watts, (now - began).total_seconds())
        budget = next(
            (
                name
                for name in sorted(terms)
                if carbon[name] is not None and any(p.node in scopes.get(name, ()) for p in planned)
            ),
            None,
        )
        previous = (view.workloads[key].get("status") or {}).get("energy") or {}
        if added is not None:
            intensity = carbon[budget] if budget else None
            pue = terms[budget].pue if budget else 1.0
            workload_counts.append(
                EnergyCount(
                    key,
                    added.joules,
                    added.joules / accounting.JOULES_PER_KWH * pue * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    added.source,
                )
            )
        workload_energy[key] = accounting.workload_energy(
            previous,
            added,
            now=now,
            initial_source=initial_source,
            pue=terms[budget].pue if budget else 1.0,
            carbon=carbon[budget] if budget else None,
            efficiency=accounting.tokens_per_joule(
                telemetry,
                pod_keys,
                sum(p.expected_throughput for p in planned),
                expected_watts,
            ),
        )
        measured_watts[key] = statuses.workload_measured_watts(telemetry, pod_keys)

    allocations = {a.name: a for a in plan.budgets}
    budget_figures: dict[str, Mapping[str, Any]] = {}
    budget_counts: list[EnergyCount] = []
    for name, start in due.budget_starts.items():
        budget_added: accounting.Increment | None = None
        if start < now:
            reading = energy_readings.get(start)
            measured = (
                accounting.measured_sum(reading.node_joules, scopes.get(name, ()))
                if reading is not None and not reading.stale
                else None
            )
            allocation = allocations.get(name)
            budget_added = accounting.increment(
                measured,
                allocation.expected_watts if allocation else 0.0,
                (now - start).total_seconds(),
            )
            facility_joules = budget_added.joules * terms[name].pue
            intensity = carbon[name]
            budget_counts.append(
                EnergyCount(
                    name,
                    facility_joules,
                    facility_joules / accounting.JOULES_PER_KWH * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    budget_added.source,
                )
            )
        budget_figures[name] = accounting.budget_energy(
            view.budgets[name].get("status") or {},
            budget_added,
            now=now,
            terms=terms[name],
            carbon=carbon[name],
            initial_source=initial_source,
        )
    job_progress = _advance_progress(
        view,
        jobs or {},
        starts=due.workload_starts,
        running=due.running,
        placements=placements,
        measured=readings.progress if readings is not None else {},
        now=now,
    )
    return (
        Accounts(workload_energy, measured_watts, budget_figures, job_progress),
        tuple(workload_counts),
        tuple(budget_counts),
    )


def _advance_progress(
    view: ClusterView,
    jobs: Mapping[str, progress.JobTerms],
    *,
    starts: Mapping[str, datetime],
    running: Mapping[str, list[Body]],
    placements: Mapping[str, list[Any]],
    measured: Mapping[str, float | None],
    now: datetime,
) -> dict[str, Mapping[str, Any]]:
    """The new `status.progress` of the jobs due for accounting (see `progress`): measured
    from the job's `spec.progress.prometheusQuery` when it answered (`measured`), else the plan's
    rate (calibrated model) over the seconds the whole gang ran since the last update."""
    advanced: dict[str, Mapping[str, Any]] = {}
    for key, start in starts.items():
        terms = jobs.get(key)
        if terms is None:
            continue
        status = view.workloads[key].get("status") or {}
        previous = progress.read_status(status.get("progress"))
        planned = placements.get(key, [])
        pods = running.get(key, [])
        seconds = 0.0
        if pods and len(pods) >= len(planned) > 0:
            began = max(
                [start, *(_pod_started(p) or start for p in pods)]
                + ([previous.updated_at] if previous else [])
            )
            seconds = max(0.0, (now - began).total_seconds())
        advanced[key] = progress.advance(
            previous,
            now=now,
            running_seconds=seconds,
            rate_tokens_per_second=sum(p.expected_throughput for p in planned),
            total=terms.total_tokens,
            measured_tokens=measured.get(key),
        ).to_status()
    return advanced


# -- statuses --------------------------------------------------------------------------------------


def _workload_statuses(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    plan: Plan,
    life: Lifecycle,
    pods_by_workload: Mapping[str, list[Body]],
    now: datetime,
    accounts: Accounts,
    telemetry: TelemetrySnapshot | None = None,
    demands: Mapping[str, float] | None = None,
    deferred: Iterable[budget_horizon.DeferredWork] = (),
) -> tuple[list[WorkloadStatus], frozenset[str]]:
    """Each handled workload's status and its Events; with `telemetry` (Prometheus configured)
    also its `TelemetryFresh` condition from this round's reading of its running pods. `demands`
    are the tokens/s each service was sized for (SLOMet compares the plan with them); `deferred`
    the work the horizon holds back now (neither placed nor unplaced: Schedulable=False with
    reason Deferred, and until when and why). Returns them and the workloads that exist (for
    metrics)."""
    placements_by_workload: dict[str, list[Any]] = {}
    for placement in plan.placements:
        placements_by_workload.setdefault(placement.workload, []).append(placement)
    unplaced = {u.workload: u for u in plan.unplaced}
    # A service served in part is placed, with its shortfall saying what binds.
    unplaced.update(
        {s.workload: Unplaced(s.workload, s.reason, s.constraint) for s in plan.shortfalls}
    )
    unplaced.update(_deferred_unplaced(deferred))
    results: list[WorkloadStatus] = []
    for key, body in view.workloads.items():
        if is_deleting(body):
            continue
        previous = body.get("status") or {}
        previous_phase = str(previous.get("phase") or statuses.PENDING)
        if key not in active and key not in life.succeeded and key not in life.failed:
            results.append(
                WorkloadStatus(
                    key, None, previous_phase, _slo_of(previous), previous_phase, _slo_of(previous)
                )
            )
            continue
        pods = [statuses.PodView.from_pod(p) for p in pods_by_workload.get(key, [])]
        if key in accounts.workload_energy:
            energy = accounts.workload_energy[key]
            measured_watts = accounts.workload_measured_watts.get(key)
        else:  # not due: the figures stay as they are (no draw without a running pod)
            energy = previous.get("energy") or {}
            measured_watts = (previous.get("power") or {}).get("measuredWatts")
            if not any(running(p) for p in pods_by_workload.get(key, [])):
                measured_watts = None
        new = statuses.workload_status(
            previous,
            generation=int(body["metadata"].get("generation") or 1),
            is_gang=is_gang(body),
            gang_size=gang_size(body),
            placements=placements_by_workload.get(key, []) if key in active else [],
            unplaced=unplaced.get(key),
            pods=pods,
            failure_message=life.failed.get(key),
            now=now,
            measured_watts=measured_watts,
            energy=energy,
            objective=statuses.SloObjective.from_spec(
                body.get("spec") or {}, demand=(demands or {}).get(key)
            ),
            telemetry=None
            if telemetry is None
            else statuses.workload_telemetry(
                telemetry,
                [pod_id(p) for p in pods_by_workload.get(key, []) if running(p)],
            ),
        )
        if key in accounts.workload_progress:
            new["progress"] = accounts.workload_progress[key]
        if (service := services.status_service(body)) is not None:
            new["service"] = service
        owned = {k: previous.get(k) for k in new}
        write = None
        if owned != statuses.without_nones(new):
            ref = ObjectRef.of(WORKLOAD_KIND, body)
            write = StatusWrite(ref, new, _workload_events(ref, previous, new))
        results.append(
            WorkloadStatus(
                key, write, new["phase"], _slo_of(new), previous_phase, _slo_of(previous)
            )
        )
    return results, frozenset(view.workloads)


def _preemption_cause(constraint: str) -> MoveReason:
    """Why a workload that lost its place was preempted, from the constraint that binds it."""
    if constraint == statuses.DEFERRED_CONSTRAINT:
        return MoveReason.DEFERRED
    return MoveReason.BUDGET if constraint.startswith("budget:") else MoveReason.PRIORITY


def _deferred_unplaced(deferred: Iterable[budget_horizon.DeferredWork]) -> dict[str, Unplaced]:
    """Deferred work as the status writer shows it: not placed now, reason Deferred."""
    return {
        d.workload: Unplaced(d.workload, d.message, statuses.DEFERRED_CONSTRAINT) for d in deferred
    }


def _workload_events(
    ref: ObjectRef, previous: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[Event, ...]:
    """The Events of a workload's status change."""
    before_phase = previous.get("phase")
    phase = new["phase"]
    schedulable = next(c for c in new["conditions"] if c["type"] == "Schedulable")
    before_schedulable = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == "Schedulable"), None
    )
    events: list[tuple[str, str, str]] = []
    # One Event when the workload becomes unschedulable or the binding constraint changes; a
    # reason whose figures move every plan does not post an Event each time. Work the horizon
    # defers gets one Deferred Event per deferral (its message says until when and why).
    if schedulable["status"] == "False" and (
        before_schedulable is None
        or before_schedulable.get("status") != "False"
        or before_schedulable.get("reason") != schedulable["reason"]
    ):
        if schedulable["reason"] == budget_horizon.DEFERRED_REASON:
            events.append(("Normal", budget_horizon.DEFERRED_REASON, schedulable["message"]))
        else:
            events.append(("Warning", "Unschedulable", schedulable["message"]))
    # Running is in the status (phase, Ready condition) but gets no Event: one API write per
    # workload less when a burst of pods starts.
    # A workload placed as it is admitted gets the Placed Event only (it says both); one that
    # waits gets Admitted now and Placed later.
    if before_phase is None and phase != statuses.PLACED:
        events.append(("Normal", "Admitted", "the operator accepted the workload"))
    slo = next((c for c in new["conditions"] if c["type"] == statuses.SLO_MET), None)
    before_slo = next(
        (c for c in previous.get("conditions") or [] if c.get("type") == statuses.SLO_MET), None
    )
    # An objective that was met and no longer is (preempted, a budget cut, a lost node).
    if slo is not None and slo["status"] == "False" and (before_slo or {}).get("status") == "True":
        events.append(("Warning", "SLORisk", slo["message"]))
    if phase != before_phase and phase == statuses.PLACED:
        events.append(("Normal", "Placed", new["message"]))
    elif phase != before_phase and phase == statuses.SUCCEEDED:
        events.append(("Normal", "Succeeded", "every replica finished"))
    elif phase != before_phase and phase == statuses.FAILED:
        events.append(("Warning", "Failed", new["message"]))
    return tuple(Event(ref, *event) for event in events)


def _budget_statuses(
    view: ClusterView,
    plan: Plan,
    plan_input: PlanInput,
    now: datetime,
    telemetry: TelemetrySnapshot | None = None,
    *,
    accounts: Accounts | None = None,
    built: PlannedInput | None = None,
    planned_at: datetime | None = None,
    reported: Mapping[str, tuple[str, str]],
    allowances: Mapping[str, budget_horizon.AllowanceOutlook] | None = None,
) -> tuple[list[StatusWrite], dict[str, tuple[str, str]], dict[str, BudgetMetric]]:
    """Budget statuses, with the period's energy and carbon where accounting was due and the
    horizon's `allowances` (remaining and projected figures, the `AllowanceExhausted`
    condition); an Event where a budget becomes held, unreadable, loses a node from planning or
    has no allowance left for all its flexible work.
    `planned_at`: when `plan` was made, if not `now`. Returns the writes, what Events have now
    been posted about, and the budgets' gauges."""
    built = built or PlannedInput(plan_input)
    allocations = {a.name: a for a in plan.budgets}
    scopes = {b.name: b.node_names for b in plan_input.budgets}
    unready = sorted(n.name for n in plan_input.nodes if not n.agent_ready)
    writes: list[StatusWrite] = []
    figures: dict[str, BudgetMetric] = {}
    posted = dict(reported)
    for name, body in view.budgets.items():
        if is_deleting(body):
            continue
        cap = _number((body.get("spec") or {}).get("powerCapWatts"))
        previous = body.get("status") or {}
        new = statuses.budget_status(
            previous,
            generation=int(body["metadata"].get("generation") or 1),
            allocation=allocations.get(name),
            cap_watts=cap,
            node_count=len(scopes.get(name, ())),
            plan=plan,
            now=now,
            telemetry=telemetry,
            scope_nodes=scopes.get(name, ()),
            unready_nodes=[n for n in unready if n in scopes.get(name, ())],
            excluded_nodes=_excluded_in_scope(body, view, built.excluded_nodes),
            invalid=built.invalid_budgets.get(name),
            planned_at=planned_at,
        )
        outlook = (allowances or {}).get(name)
        if outlook is not None:
            new.update(outlook.status_fields())
            new["conditions"] = [
                *new["conditions"],
                statuses.condition(
                    previous.get("conditions") or [],
                    budget_horizon.CONDITION_TYPE,
                    outlook.exhausted,
                    outlook.reason,
                    outlook.message,
                    now=now,
                    observed_generation=int(body["metadata"].get("generation") or 1),
                ),
            ]
        ref = ObjectRef.of(BUDGET_KIND, body)
        events = _budget_events(ref, previous, new, posted)
        if accounts is not None:
            new.update(accounts.budget_figures.get(name, {}))
        allowance = ((body.get("spec") or {}).get("energy") or {}).get("kilowattHours")
        if outlook is not None and accounts is not None and name in accounts.budget_figures:
            # What is left moves with the energy accounted this round (between plans too).
            new.update(_remaining(body, accounts.budget_figures[name]))
        used = new.get("energyUsedKilowattHours", previous.get("energyUsedKilowattHours"))
        figures[name] = BudgetMetric(
            cap_watts=cap,
            allocated_cap_watts=new["allocatedCapWatts"],
            expected_watts=new["expectedWatts"],
            measured_watts=new.get("measuredWatts"),
            energy_used_kwh=None if used is None else float(used),
            energy_allowance_kwh=None if allowance is None else float(allowance),
        )
        writes.append(StatusWrite(ref, new, events))
    return writes, posted, figures


def _remaining(body: Body, figures: Mapping[str, Any]) -> dict[str, float]:
    """The allowance left after the period's figures accounting just wrote
    (`remainingKilowattHours`, `remainingCarbonKg`, as the horizon's outlook words them)."""
    spec = body.get("spec") or {}
    allowed_kwh = (spec.get("energy") or {}).get("kilowattHours")
    allowed_kg = (spec.get("carbon") or {}).get("maxKgPerPeriod")
    out = {}
    if allowed_kwh is not None and figures.get("energyUsedKilowattHours") is not None:
        out["remainingKilowattHours"] = round(
            float(allowed_kwh) - float(figures["energyUsedKilowattHours"]), 3
        )
    if allowed_kg is not None and figures.get("carbonKg") is not None:
        out["remainingCarbonKg"] = round(float(allowed_kg) - float(figures["carbonKg"]), 3)
    return out


def _budget_events(
    ref: ObjectRef,
    previous: Mapping[str, Any],
    new: Mapping[str, Any],
    posted: dict[str, tuple[str, str]],
) -> tuple[Event, ...]:
    """A Warning Event when a budget's `Ready` or `NodesPlanned` condition turns False with a
    new reason, or `NodesPlanned` names other nodes. What was posted is remembered in `posted`
    (the cache may not show this round's status write yet); after a restart the status stands
    in."""
    events = []
    for type_ in ("Ready", statuses.NODES_PLANNED):
        after = statuses.find_condition(new.get("conditions") or [], type_)
        key = f"EnergyBudget {ref.name} {type_}"
        if after is None or after["status"] != "False":
            posted.pop(key, None)
            continue
        seen = (after["reason"], after["message"] if type_ == statuses.NODES_PLANNED else "")
        if key not in posted:
            before = statuses.find_condition(previous.get("conditions") or [], type_) or {}
            if before.get("status") == "False":
                posted[key] = (
                    str(before.get("reason")),
                    str(before.get("message")) if type_ == statuses.NODES_PLANNED else "",
                )
        if posted.get(key) != seen:
            posted[key] = seen
            events.append(Event(ref, "Warning", after["reason"], after["message"]))
    # An allowance that has no room for all flexible work: one Event each time it runs short
    # (or for another allowance), none while it stays short.
    exhausted = statuses.find_condition(new.get("conditions") or [], budget_horizon.CONDITION_TYPE)
    key = f"EnergyBudget {ref.name} {budget_horizon.CONDITION_TYPE}"
    if exhausted is None or exhausted["status"] != "True":
        posted.pop(key, None)
    else:
        was = statuses.find_condition(
            previous.get("conditions") or [], budget_horizon.CONDITION_TYPE
        )
        if key not in posted and was is not None and was.get("status") == "True":
            posted[key] = (str(was.get("reason")), "")
        if posted.get(key) != (exhausted["reason"], ""):
            posted[key] = (exhausted["reason"], "")
            events.append(
                Event(ref, "Warning", budget_horizon.CONDITION_TYPE, exhausted["message"])
            )
    return tuple(events)


# -- the other rounds ------------------------------------------------------------------------------


def _still_active(view: ClusterView, last: LastRound) -> dict[str, Body]:
    return {
        key: body
        for key, body in view.workloads.items()
        if key in last.active
        and not is_deleting(body)
        and (body.get("status") or {}).get("phase") not in statuses.TERMINAL_PHASES
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
    _record_demand(history, last.plan_input, pods_by_workload, telemetry, observed.monotonic)
    _record_hourly(hourly, last.plan_input, pods_by_workload, telemetry, now)
    accounts, energy_counts, budget_counts = _account(
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
    workload_statuses, known = _workload_statuses(
        view,
        active=active,
        plan=last.plan,
        life=Lifecycle(),
        pods_by_workload=pods_by_workload,
        now=now,
        accounts=accounts,
        telemetry=telemetry,
        demands=last.demands,
        deferred=last.over_time.deferred if last.over_time is not None else (),
    )
    budget_statuses, budget_reported, budget_metrics = _budget_statuses(
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
    _record_demand(
        history, last.plan_input, _pods_by_workload(observed.view), telemetry, observed.monotonic
    )
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
            write = _mark_failed(BUDGET_KIND, body, "Ready", cause, now=now, said=said)
            writes += [write] if write else []
    for body in view.workloads.values():
        phase = (body.get("status") or {}).get("phase")
        waiting = phase in (None, statuses.PENDING, statuses.PREEMPTED)
        if waiting and not is_deleting(body):
            write = _mark_failed(WORKLOAD_KIND, body, "Schedulable", cause, now=now, said=said)
            writes += [write] if write else []
    return Round(
        memory=dataclasses.replace(observed.memory, failure_reported=said),
        early_statuses=tuple(writes),
    )


def succeeded(memory: Memory) -> Memory:
    """The memory after a round that planned: failed rounds are reported afresh."""
    return dataclasses.replace(memory, failure_reported={})


def _mark_failed(
    kind: str, body: Body, type_: str, cause: str, *, now: datetime, said: dict[str, str]
) -> StatusWrite | None:
    meta = body["metadata"]
    key = f"{kind} {meta.get('namespace', '')}/{meta['name']}"
    if said.get(key) == cause:
        return None  # already says so (the watch may not have shown it yet): no write, no Event
    previous = body.get("status") or {}
    marked = statuses.condition(
        previous.get("conditions") or [],
        type_,
        False if type_ == "Ready" else None,
        PLAN_FAILED,
        cause,
        now=now,
        observed_generation=int(meta.get("generation") or 1),
    )
    conditions = [c for c in previous.get("conditions") or [] if c.get("type") != type_] + [marked]
    status: dict[str, Any] = {"conditions": conditions}
    if kind == WORKLOAD_KIND:  # it waits, and says why
        status |= {"phase": previous.get("phase") or statuses.PENDING, "message": cause}
    said[key] = cause
    ref = ObjectRef.of(kind, body)
    return StatusWrite(ref, status, (Event(ref, "Warning", PLAN_FAILED, cause),))


def after_apply(
    round_: Round,
    applied: Applied,
    *,
    view: ClusterView,
    monotonic: float,
    settings: Settings,
) -> Memory:
    """The round's memory with what the apply step saw: the agents that did not confirm (they
    count at maximum next round), and each refused pod's workload with its backoff (doubling
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
    return dataclasses.replace(
        round_.memory, unconfirmed=applied.unconfirmed, pod_rejections=rejections
    )
