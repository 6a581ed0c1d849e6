"""What a round reads and what it returns: the types of the decision core.

`Observed` (the objects, the controller's memory, telemetry readings, settings) goes into
`core.decide`; a `Round` (limits to lower, pods to evict, delete and create, limits to raise,
statuses and Events, metrics, the next memory) comes out, and the shell (`apply`) executes it.
Also the small readers of observed objects every part of the core shares (`pod_id`, `running`,
`is_gang`...) and `Disruptions`, which turns the pods that went into `Moved`/`Preempted` Events.
Pure: no I/O (an import-linter contract).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wattsched_api.energybudget import EnergyBudget
from wattsched_api.meta import read_timestamp
from wattsched_api.vocabulary import (
    POD_FINISHED_PHASES,
    EventReason,
    PodPhase,
)
from wattsched_operator import (
    budget_horizon,
    demand,
    desired,
    handover,
    progress,
    statuses,
    transition,
)
from wattsched_operator.readings import (
    Calibrator,
    EnergyReading,
    PodKey,
    TelemetrySnapshot,
)
from wattsched_operator.services import WantedServices
from wattsched_optimizer.model import (
    Calibration,
    PerformanceModel,
)
from wattsched_optimizer.problem import (
    MoveReason,
    Placement,
    Plan,
    PlanInput,
    Unplaced,
    WorkloadType,
)

Body = dict[str, Any]


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
    # Nodes whose agents fell silent together with too many others: their replicas stay
    # (`snapshot.lost_agents`).
    silent_together: tuple[str, ...] = ()
    # Training/FineTuning/BatchInference workloads: their total and progress query, by key.
    jobs: Mapping[str, progress.JobTerms] = dataclasses.field(default_factory=dict)
    # The readable budgets, parsed (their allowances, cap schedules and forecasts: the horizon).
    budgets: Mapping[str, EnergyBudget] = dataclasses.field(default_factory=dict)


# (view, nodes whose lowered limits were not confirmed, raises in flight: node -> the profile's
# generation the raise wrote, now) -> the optimizer's input (`core.build_input_function`).
InputBuilder = Callable[[ClusterView, frozenset[str], Mapping[str, int], datetime], PlannedInput]


@dataclass(frozen=True)
class RaiseInFlight:
    """Limits the raising step wrote that the node's agent had not confirmed when its round ended:
    the profile's `metadata.generation` the raise made, and until when (monotonic seconds) the node
    counts as ready at them without the agent's confirmation (`snapshot.raise_on_its_way`); after
    that, as before any raise, only a confirmation makes it ready (else it counts at maximum)."""

    generation: int
    deadline: float


# An agent silent for longer is lost (`wattsched operator --heartbeat-timeout-seconds`' default,
# read by `wattsched status` and `wattsched plan --from-cluster` too): three missed reports at the
# agent's default 10 s interval.
HEARTBEAT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Settings:
    """The controller's settings that decisions depend on (the shell's own are in the loop)."""

    # Failed replica pods retried this many times (with doubling backoff) before Failed.
    backoff_limit: int = 3
    backoff_seconds: float = 10.0
    # How often energy, carbon, progress and the measured figures in statuses advance.
    accounting_seconds: float = 60.0
    # An agent silent for longer is lost: its node counts at maximum and takes no work.
    heartbeat_timeout_seconds: float = HEARTBEAT_TIMEOUT_SECONDS
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
    raises: the raises written that no agent had confirmed when their round ended, by node (the
    next rounds do not wait for them: `RaiseInFlight`).
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
    raises: Mapping[str, RaiseInFlight] = field(default_factory=dict)
    pod_rejections: Mapping[str, PodRejection] = field(default_factory=dict)
    calibrator: Calibrator = field(default_factory=Calibrator)
    applied_placements: tuple[Placement, ...] = ()
    applied_since: Mapping[tuple[str, int], datetime] = field(default_factory=dict)
    calibrated_at: float | None = None
    # (before `demand`: that field's name hides the module in the class body)
    hourly_demand: demand.HourlyDemand = field(default_factory=demand.HourlyDemand)
    demand: demand.DemandHistory = field(default_factory=demand.DemandHistory)
    last_round: LastRound | None = None
    # The earliest start the horizon planned for each waiting workload of whole-node pods
    # (`budget_horizon.overdue_work`).
    planned_starts: Mapping[str, datetime] = field(default_factory=dict)
    ready_agents: frozenset[str] = frozenset()
    budget_reported: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    reported: Mapping[str, str] = field(default_factory=dict)
    failure_reported: Mapping[str, str] = field(default_factory=dict)


def fresh_memory(replan_seconds: float, headroom: float = demand.HEADROOM) -> Memory:
    """The Memory a controller starts from when it re-plans every `replan_seconds` (the
    operator's `--replan-seconds`, the simulator's re-plan interval): a service's queue is sized
    to drain within one interval (`demand.DemandHistory`). The operator's loop and the
    simulator's controller both start from it, so that the simulator evaluates the controller
    the operator runs. `headroom`: the forecast's (another value is a what-if)."""
    return Memory(demand=demand.DemandHistory(headroom=headroom, interval_seconds=replan_seconds))


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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Event:
    """A core/v1 Event to post on `object` (type Normal or Warning)."""

    object: ObjectRef
    type: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
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


# A workload's status write against the status it has now (None: nothing would change).
BuildStatus = Callable[[Mapping[str, Any]], "StatusWrite | None"]
# A key of everything that decides a workload's status, given its object as it is now (None: it
# cannot say, e.g. an object without a resourceVersion).
StatusInputs = Callable[[Mapping[str, Any]], "int | None"]


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """A handled workload's status this round: its phase and SLOMet for metrics, the phase and
    SLOMet it had (kept when a pod of the workload is refused in this round: the next round
    reports that), and how to build its write (`build`, None for a workload the round does not
    handle). The write is built when it is written, against the status the object has then
    (`writer.StatusWriter.submit_lazily`): a round never holds its thousands of statuses built
    at once; `inputs` lets the writer skip, before building, a status it found unchanged with the
    same inputs before. `write` builds it against the status the round saw."""

    key: str
    phase: str
    slo_met: bool | None
    previous_phase: str
    previous_slo_met: bool | None
    ref: ObjectRef | None = None
    build: BuildStatus | None = None
    inputs: StatusInputs | None = None
    seen: Mapping[str, Any] = field(default_factory=dict)
    # The round counted energy for it (running pods, accounting due): its write is built at
    # once, so the next round's accounting starts where this one's ended.
    counted: bool = False

    @property
    def write(self) -> StatusWrite | None:
        """The status write against the status the round saw (None when nothing changes)."""
        return None if self.build is None else self.build(self.seen)


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
    """One EnergyBudget's figures after a plan, as its gauges show them (`metrics.set_budgets`)."""

    cap_watts: float
    allocated_cap_watts: float
    expected_watts: float
    # Measured draw in scope (None when not measured), energy used this period (GPU energy x PUE)
    # and the period's allowance (None without spec.energy).
    measured_watts: float | None = None
    energy_used_kwh: float | None = None
    energy_allowance_kwh: float | None = None


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
            if key in self.workloads and key not in placed_keys and not finished(pod):
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
                    EventReason.MOVED,
                    f"{len(moved)} replica(s), cause {cause.value}: {MOVE_CAUSES[cause]}{forced}; "
                    f"{shown}",
                )
            )
        for key, count in preempted.items():
            unplaced = self.unplaced.get(key)
            reason = unplaced.reason if unplaced else "the plan no longer places it"
            cause = preemption_cause(unplaced.constraint if unplaced else "")
            preemptions[cause.value] = preemptions.get(cause.value, 0) + count
            events.append(
                Event(
                    self.workloads[key],
                    "Warning",
                    EventReason.PREEMPTED,
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
                    EventReason.MOVED,
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
                    Event(
                        self.workloads[key],
                        "Warning",
                        EventReason.REPLACEMENT_NOT_READY,
                        f"{name}: {why}",
                    )
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
                        EventReason.MOVED,
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
            if pod is None or finished(pod) or not (pod.get("spec") or {}).get("nodeName"):
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
                    EventReason.GANG_RESTART,
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
    4. `raise_` the limits, only when every lowering was confirmed (the round does not wait for
       the agents to confirm them: `Applied.raised`, `Memory.raises`);
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
    services: WantedServices | None = None
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
    """What the apply step saw: agents that did not confirm lowered limits, the raises it wrote
    (not waited for), pods that went, workloads whose pod the API server refused (key -> message)
    or accepted."""

    unconfirmed: frozenset[str] = frozenset()
    raised: Mapping[str, RaiseInFlight] = field(default_factory=dict)
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


def backoff_seconds(
    failures: int, base_seconds: float, max_seconds: float = MAX_BACKOFF_SECONDS
) -> float:
    """Seconds before a retry after the `failures`-th failure: `base_seconds`, doubling with each
    failure, at most `max_seconds` (a replica's: 5 min)."""
    return float(min(base_seconds * 2 ** max(failures - 1, 0), max_seconds))


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


def is_deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def pod_id(pod: Mapping[str, Any]) -> tuple[str, str]:
    return (pod["metadata"]["namespace"], pod["metadata"]["name"])


def running(pod: Mapping[str, Any]) -> bool:
    """A pod bound to a node and running: the ones telemetry can attribute GPU draw to."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (
        (pod.get("status") or {}).get("phase") == PodPhase.RUNNING
    )


def pod_started(pod: Mapping[str, Any]) -> datetime | None:
    return read_timestamp((pod.get("status") or {}).get("startTime"))


def finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in POD_FINISHED_PHASES


def preemption_cause(constraint: str) -> MoveReason:
    """Why a workload that lost its place was preempted, from the constraint that binds it."""
    if constraint == statuses.DEFERRED_CONSTRAINT:
        return MoveReason.DEFERRED
    return MoveReason.BUDGET if constraint.startswith("budget:") else MoveReason.PRIORITY
