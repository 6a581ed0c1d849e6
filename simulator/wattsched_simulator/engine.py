"""The simulation core: advance a cluster in fixed steps, apply a policy's decisions, account.

Each step (default 1 s) the engine
1. admits jobs that arrive, and asks the policy for a decision when one is due (every
   `replan_interval_seconds`, after events: a job arrives or finishes, and when a policy that
   reads telemetry between decisions asks for one: `DemandChecking`);
2. serves each inference service's demand from a FIFO backlog with the capacity of its ready
   replicas (a fluid model: tokens, not requests). A token counts as on time when it is served
   within `latency_target_seconds` of arriving;
3. advances every gang job whose replicas are all ready, at the pace of its slowest replica;
4. computes the true draw of every GPU from the ground truth (busy, starting or idle; never above
   its power limit), integrates energy, and checks every budget's cap against true draw and
   against the sum of power limits;
5. closes a telemetry sample every scrape interval.

Replicas take `startup_seconds` to become ready after they are placed (pull + load weights);
replicas placed by the very first decision start ready (the run begins on a warm cluster).
Energy is the rectangle-rule integral of per-step power. Not for: deciding anything (`policies`)
or presenting results (`report`).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from wattsched_optimizer.problem import WorkloadType

from .carbon import CarbonIntensity
from .cluster import SimBudget, SimNode
from .telemetry import Telemetry, TelemetryConfig
from .truth import GroundTruth
from .workloads import JobSpec, ServiceSpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
JOULES_PER_KWH = 3.6e6


class SimulationError(RuntimeError):
    """A policy produced a decision the cluster cannot carry out (a bug in that policy)."""


@dataclass(frozen=True)
class ReplicaAssignment:
    """One replica a policy wants to exist: where, with which variant, per-GPU power limit and
    locked SM clock (None: left to the driver)."""

    workload: str
    node: str
    gpus: int
    variant: str
    power_limit_watts: float
    sm_clock_mhz: int | None = None


@dataclass(frozen=True)
class Decision:
    """The whole desired state: every replica, and the power limit of idle GPUs per node.

    check_interval_seconds: how often the policy wants to read telemetry between decisions
    (`DemandChecking.check`; None: never).

    `handovers`: replicas whose move the policy began make-before-break in this decision (the
    replacement is among `replicas` next to the old one, which a later decision drops): counted as
    migrations, which the engine cannot tell from a scale-up followed by a scale-down."""

    replicas: tuple[ReplicaAssignment, ...]
    idle_power_limit_watts: Mapping[str, float]
    plan_seconds: float
    status: str = "ok"
    check_interval_seconds: float | None = None
    handovers: int = 0


@dataclass
class RunningReplica:
    workload: str
    node: str
    gpus: int
    variant: str
    power_limit_watts: float  # as planned
    ready_at_seconds: float
    sm_clock_mhz: int | None = None  # locked SM clock; None: unlocked
    # During a service's hand-over (see `Simulation.apply`): the higher limit still applied, or
    # True for a replica the plan removed that keeps serving until its replacement is ready.
    held_limit_watts: float | None = None
    draining: bool = False
    handover_until_seconds: float = 0.0

    @property
    def effective_limit_watts(self) -> float:
        return self.power_limit_watts if self.held_limit_watts is None else self.held_limit_watts


@dataclass
class JobState:
    spec: JobSpec
    remaining_tokens: float
    finished_at_seconds: float | None = None
    ever_placed: bool = False


@dataclass(frozen=True)
class Scenario:
    nodes: tuple[SimNode, ...]
    budgets: tuple[SimBudget, ...]
    services: tuple[ServiceSpec, ...]
    jobs: tuple[JobSpec, ...]
    duration_seconds: float
    carbon: CarbonIntensity
    pue: float = 1.0
    # The hourly curve planners see as their carbon forecast (None: `carbon` itself, a perfect
    # forecast); see `CarbonIntensity.with_forecast_error`.
    carbon_forecast: CarbonIntensity | None = None
    step_seconds: float = 1.0
    replan_interval_seconds: float = 60.0
    # Minimum spacing of event-triggered decisions (arrivals and completions in a burst coalesce).
    event_debounce_seconds: float = 5.0
    startup_seconds: float = 60.0
    latency_target_seconds: float = 5.0
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    seed: int = 0

    @property
    def steps(self) -> int:
        return max(1, round(self.duration_seconds / self.step_seconds))

    @property
    def forecast_carbon(self) -> CarbonIntensity:
        """The curve planners see as their forecast (the engine accounts with `carbon`)."""
        return self.carbon_forecast or self.carbon


@dataclass(frozen=True)
class View:
    """What a policy is shown when it decides.

    Placement state (`replicas`) is known exactly, as the operator knows where its pods are; all
    rates and progress come from `telemetry`. `jobs` carries the specs of jobs that have arrived
    and not finished (what an LLMWorkload's spec says); their true remaining work is not in it.
    """

    now_seconds: float
    scenario: Scenario
    jobs: tuple[JobSpec, ...]
    replicas: tuple[RunningReplica, ...]
    telemetry: Telemetry
    reasons: tuple[str, ...]
    # Replicas the last decision removed that still serve until their replacements are ready
    # (the pods a real cluster still runs during a hand-over; their readings are in telemetry).
    draining: tuple[RunningReplica, ...] = ()
    # The engine's true state, for the oracle only: a deployable policy must not read these.
    true_backlog_tokens: Mapping[str, float] = field(default_factory=dict)
    true_remaining_tokens: Mapping[str, float] = field(default_factory=dict)


class Policy(Protocol):
    name: str

    def decide(self, view: View) -> Decision:
        """The desired state of the cluster now."""
        ...


@runtime_checkable
class DemandChecking(Protocol):
    """A policy that reads telemetry between decisions (every `check_interval_seconds` of its
    last decision) and may ask for a decision now."""

    def check(self, view: View) -> bool:
        """Read what is visible now; True: decide now (not at the next periodic decision)."""
        ...


@dataclass
class PolicyResult:
    """Everything measured in one run of one policy."""

    policy: str
    step_seconds: float
    gpu_energy_joules: float
    node_energy_joules: dict[str, float]
    facility_energy_joules: float
    carbon_grams: float
    inference_tokens_served: float
    job_tokens_processed: float
    # Energy drawn by the GPUs of inference replicas (serving or starting); idle GPUs excluded.
    inference_energy_joules: float
    # The same for job replicas (running or starting), and its carbon (x PUE x the intensity of
    # the hour it was drawn in).
    job_energy_joules: float
    job_carbon_grams: float
    on_time_tokens: dict[str, float]
    judged_tokens: dict[str, float]
    deadline_misses: int
    jobs_finished: int
    jobs_with_deadline: int
    seconds_over_budget: float
    seconds_limits_over_budget: float
    preemptions: int
    migrations: int
    plan_seconds: list[float]
    decision_statuses: dict[str, int]
    # Per step: true GPU draw of the whole cluster, and per budget draw and sum of power limits.
    cluster_power_watts: FloatArray
    budget_power_watts: dict[str, FloatArray]
    budget_limits_watts: dict[str, FloatArray]
    # Per step: capacity (tokens/s) of ready replicas and demand (tokens/s), per service.
    service_capacity_tokens_per_second: dict[str, FloatArray]
    wall_seconds: float

    @property
    def slo_attainment(self) -> float:
        judged = float(sum(self.judged_tokens.values()))
        return 1.0 if judged <= 0 else float(sum(self.on_time_tokens.values())) / judged


class _ServiceQueue:
    """FIFO backlog of decode-equivalent tokens, with on-time accounting."""

    def __init__(self) -> None:
        self.items: deque[list[float]] = deque()  # [arrival_seconds, tokens]
        self.backlog_tokens = 0.0
        self.on_time_tokens = 0.0
        self.judged_tokens = 0.0

    def serve(self, now: float, arriving: float, capacity: float, latency_target: float) -> float:
        if arriving > 0:
            self.items.append([now, arriving])
            self.backlog_tokens += arriving
        served = 0.0
        while self.items and capacity - served > 1e-12:
            item = self.items[0]
            portion = min(item[1], capacity - served)
            served += portion
            self.judged_tokens += portion
            if now - item[0] <= latency_target + 1e-9:
                self.on_time_tokens += portion
            item[1] -= portion
            if item[1] <= 1e-12:
                self.items.popleft()
        self.backlog_tokens = max(0.0, self.backlog_tokens - served)
        return served

    def close(self, end: float, latency_target: float) -> None:
        """Tokens still waiting at the end: late if their target already passed, else unjudged."""
        for arrival, tokens in self.items:
            if end - arrival > latency_target:
                self.judged_tokens += tokens


def _variant_throughput(spec: ServiceSpec | JobSpec, variant: str) -> float:
    for candidate in spec.variants:
        if candidate.name == variant:
            return candidate.relative_throughput
    raise SimulationError(f"{spec.key}: decision uses unknown variant {variant!r}")


def _history_rate(
    service: ServiceSpec, start: float, end: float, step_seconds: float, fallback: float
) -> float:
    """The service's mean demand (tokens/s) over [start, end) before t = 0, from its trace's
    history; `fallback` where the history does not reach back to `start`."""
    history = service.trace.history_tokens
    first = round(start / step_seconds) + len(history)
    last = round(end / step_seconds) + len(history)
    if first < 0 or last > len(history) or last <= first:
        return fallback
    return float(history[first:last].sum()) / ((last - first) * step_seconds)


class Simulation:
    """One run of one policy over one scenario against one ground truth."""

    def __init__(
        self,
        scenario: Scenario,
        truth: GroundTruth,
        policy: Policy,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.truth = truth
        self.policy = policy
        self.on_step = on_step
        self.node_index = {node.name: i for i, node in enumerate(scenario.nodes)}
        self.services = list(scenario.services)
        self.service_index = {s.key: i for i, s in enumerate(self.services)}
        self.job_states: dict[str, JobState] = {}
        self.active_jobs: dict[str, JobState] = {}
        self.replicas: list[RunningReplica] = []
        self.queues = [_ServiceQueue() for _ in self.services]
        seeds = np.random.SeedSequence(scenario.seed).spawn(3)
        self.power_rng = np.random.default_rng(seeds[0])
        node_rng = np.random.default_rng(seeds[1])
        self.telemetry = Telemetry(scenario.telemetry, int(seeds[2].generate_state(1)[0]))
        spread = truth.node_power_spread
        self.node_factor = 1.0 + spread * node_rng.standard_normal(len(scenario.nodes))
        self.node_gpus = np.array([n.gpu_count for n in scenario.nodes], dtype=np.int64)
        self.idle_watts = np.array(
            [truth.product(n.truth_product).idle_watts for n in scenario.nodes]
        )
        self.node_idle_limit = np.array(
            [truth.product(n.truth_product).max_watts for n in scenario.nodes]
        )
        self.node_limit_sum: FloatArray = self.node_idle_limit * self.node_gpus
        self.budget_matrix = np.zeros((len(scenario.nodes), len(scenario.budgets)))
        for b, budget in enumerate(scenario.budgets):
            for name in budget.node_names:
                self.budget_matrix[self.node_index[name], b] = 1.0
        self.budget_caps = np.array([b.power_cap_watts for b in scenario.budgets])
        self.migrations = 0
        self.preemptions = 0
        self.plan_seconds: list[float] = []
        self.statuses: dict[str, int] = {}
        self._dirty = True
        self._prefill_telemetry()

    def _prefill_telemetry(self) -> None:
        """History before t = 0: the run starts on a cluster that has been serving for a while.

        Five minutes of samples, the newest visible at t = 0, every service's demand served in
        full, with no utilisation (no replica was observed). Each sample's demand is the trace's
        before t = 0 in its window (`ServiceTrace.history_tokens`), where the trace keeps that
        much; else the mean demand of the first five minutes.
        """
        sc = self.scenario
        # The traces start mid-stream (the first minute is partial), so use five minutes.
        first_minutes = max(1, round(300.0 / sc.step_seconds))
        mean = {
            s.key: float(s.trace.demand_tokens[:first_minutes].mean()) / sc.step_seconds
            for s in self.services
        }
        scrape = sc.telemetry.scrape_interval_seconds
        windows = max(1, round(300.0 / scrape))
        for k in range(windows, 0, -1):
            end = -sc.telemetry.delay_seconds - (k - 1) * scrape
            demand = {
                s.key: _history_rate(s, end - scrape, end, sc.step_seconds, mean[s.key])
                for s in self.services
            }
            self.telemetry.record(
                window_end_seconds=end,
                demand_tokens_per_second=demand,
                served_tokens_per_second=demand,
                utilisation={},  # unknown: no replica was observed
                backlog_tokens={key: 0.0 for key in demand},
                job_tokens_done={},
            )

    # -- decisions -------------------------------------------------------------------------

    def _workload_spec(self, key: str) -> ServiceSpec | JobSpec:
        if key in self.service_index:
            return self.services[self.service_index[key]]
        if key in self.active_jobs:
            return self.active_jobs[key].spec
        raise SimulationError(f"decision places {key!r}, which is not an active workload")

    def _clamp(self, node: SimNode, watts: float) -> float:
        spec = self.truth.product(node.truth_product)
        return min(max(watts, spec.min_watts), spec.max_watts)

    def apply(self, decision: Decision, now: float, first: bool) -> None:
        self.plan_seconds.append(decision.plan_seconds)
        self.migrations += decision.handovers
        self.statuses[decision.status] = self.statuses.get(decision.status, 0) + 1
        # A hand-over in progress carries into this decision: draining replicas may keep
        # draining, held limits count as the previous limits (see `_hand_over`).
        still_draining = [r for r in self.replicas if r.draining]
        self.replicas = [r for r in self.replicas if not r.draining]
        used = np.zeros(len(self.scenario.nodes), dtype=np.int64)
        wanted: dict[str, list[ReplicaAssignment]] = {}
        for assignment in decision.replicas:
            if assignment.node not in self.node_index:
                raise SimulationError(f"{assignment.workload}: unknown node {assignment.node!r}")
            spec = self._workload_spec(assignment.workload)
            if assignment.gpus != spec.gpus_per_replica:
                raise SimulationError(
                    f"{assignment.workload}: replica with {assignment.gpus} GPUs, spec says "
                    f"{spec.gpus_per_replica}"
                )
            _variant_throughput(spec, assignment.variant)
            used[self.node_index[assignment.node]] += assignment.gpus
            wanted.setdefault(assignment.workload, []).append(assignment)
        over = np.nonzero(used > self.node_gpus)[0]
        if len(over):
            node = self.scenario.nodes[int(over[0])]
            raise SimulationError(
                f"Node {node.name}: decision uses {used[over[0]]} GPUs, it has {node.gpu_count}"
            )
        current: dict[str, list[RunningReplica]] = {}
        for replica in self.replicas:
            current.setdefault(replica.workload, []).append(replica)
        survivors: list[RunningReplica] = []
        removed: list[RunningReplica] = []
        previous_limit: dict[int, float] = {}
        ready_at = now if first else now + self.scenario.startup_seconds
        for key in sorted(set(wanted) | set(current)):
            old = list(current.get(key, []))
            new = wanted.get(key, [])
            spec = self._workload_spec(key)
            if isinstance(spec, JobSpec) and new and len(new) != spec.pods:
                raise SimulationError(
                    f"{key}: gang of {spec.pods} pods ({spec.replicas} replica(s) of "
                    f"{spec.nodes_per_replica} node(s)), decision places {len(new)}"
                )
            unmatched_new: list[ReplicaAssignment] = []
            for assignment in new:
                node = self.scenario.nodes[self.node_index[assignment.node]]
                match = next(
                    (
                        r
                        for r in old
                        if r.node == assignment.node and r.variant == assignment.variant
                    ),
                    None,
                )
                if match is None:
                    unmatched_new.append(assignment)
                    continue
                old.remove(match)
                previous_limit[id(match)] = match.effective_limit_watts
                match.held_limit_watts = None
                match.handover_until_seconds = 0.0
                match.power_limit_watts = self._clamp(node, assignment.power_limit_watts)
                match.sm_clock_mhz = assignment.sm_clock_mhz
                survivors.append(match)
            if old and unmatched_new:
                self.migrations += min(len(old), len(unmatched_new))
            removed.extend(old)
            if isinstance(spec, JobSpec):
                if current.get(key) and not new:
                    self.preemptions += 1
                if new:
                    self.active_jobs[key].ever_placed = True
            for assignment in unmatched_new:
                node = self.scenario.nodes[self.node_index[assignment.node]]
                survivors.append(
                    RunningReplica(
                        assignment.workload,
                        assignment.node,
                        assignment.gpus,
                        assignment.variant,
                        self._clamp(node, assignment.power_limit_watts),
                        ready_at,
                        assignment.sm_clock_mhz,
                    )
                )
        self.replicas = survivors
        for replica in still_draining:
            replica.draining = False
            replica.handover_until_seconds = 0.0
            removed.append(replica)
        for i, node in enumerate(self.scenario.nodes):
            self.node_idle_limit[i] = self._clamp(
                node,
                decision.idle_power_limit_watts.get(
                    node.name, self.truth.product(node.truth_product).max_watts
                ),
            )
        if not first:
            self._hand_over(now, removed, previous_limit)
        self.node_limit_sum = self._limit_sums(self.replicas)
        self._dirty = True

    def _limit_sums(self, replicas: list[RunningReplica]) -> FloatArray:
        """Sum of the power limits applied on each node (busy GPUs, then idle at the idle limit)."""
        busy = np.zeros(len(self.scenario.nodes))
        busy_gpus = np.zeros(len(self.scenario.nodes))
        for replica in replicas:
            i = self.node_index[replica.node]
            busy[i] += replica.gpus * replica.effective_limit_watts
            busy_gpus[i] += replica.gpus
        sums: FloatArray = busy + (self.node_gpus - busy_gpus) * self.node_idle_limit
        return sums

    def _within_budgets(self, replicas: list[RunningReplica]) -> bool:
        if not len(self.scenario.budgets):
            return True
        limits = self._limit_sums(replicas) @ self.budget_matrix
        return bool(np.all(limits <= self.budget_caps + 1e-6))

    def _hand_over(
        self, now: float, removed: list[RunningReplica], previous_limit: dict[int, float]
    ) -> None:
        """Make-before-break for inference services, where GPUs and every budget allow it.

        While a service's new replicas start, its replicas whose limit the plan lowered keep the
        old limit, and replicas the plan removed keep serving on their (now unplanned) GPUs, until
        the last new replica is ready: a rolling update with surge. A service's hand-over is
        skipped when it would push any budget's sum of limits over its cap, or when the GPUs it
        would keep are planned for something else.
        """
        free = self.node_gpus.copy()
        for replica in self.replicas:
            free[self.node_index[replica.node]] -= replica.gpus
        for service in sorted(self.services, key=lambda s: (-s.priority, s.key)):
            starting = [
                r for r in self.replicas if r.workload == service.key and r.ready_at_seconds > now
            ]
            if not starting:
                continue
            until = max(r.ready_at_seconds for r in starting)
            holds = [
                r
                for r in self.replicas
                if r.workload == service.key
                and previous_limit.get(id(r), r.power_limit_watts) > r.power_limit_watts
            ]
            drains = []
            trial_free = free.copy()
            for replica in removed:
                i = self.node_index[replica.node]
                if replica.workload == service.key and trial_free[i] >= replica.gpus:
                    trial_free[i] -= replica.gpus
                    drains.append(replica)
            for replica in holds:
                replica.held_limit_watts = previous_limit[id(replica)]
                replica.handover_until_seconds = until
            for replica in drains:
                replica.draining = True
                replica.held_limit_watts = None
                replica.handover_until_seconds = until
            if self._within_budgets(self.replicas + drains):
                self.replicas.extend(drains)
                free = trial_free
                continue
            for replica in holds:
                replica.held_limit_watts = None
            for replica in drains:
                replica.draining = False

    def _end_hand_overs(self, now: float) -> None:
        ended = False
        kept = []
        for replica in self.replicas:
            if replica.handover_until_seconds and replica.handover_until_seconds <= now + 1e-9:
                replica.handover_until_seconds = 0.0
                ended = True
                if replica.draining:
                    continue
                replica.held_limit_watts = None
            kept.append(replica)
        if ended:
            self.replicas = kept
            self.node_limit_sum = self._limit_sums(self.replicas)
            self._dirty = True

    # -- per-step physics -------------------------------------------------------------------

    def _rebuild(self) -> None:
        truth = self.truth
        count = len(self.replicas)
        self.r_node = np.zeros(count, dtype=np.int64)
        self.r_gpus = np.zeros(count)
        self.r_limit = np.zeros(count)
        self.r_ready_at = np.zeros(count)
        self.r_service = np.full(count, -1, dtype=np.int64)
        self.r_idle = np.zeros(count)
        self.r_full = np.zeros(count)
        self.r_capacity = np.zeros(count)
        self.r_fraction = np.zeros(count)
        self.r_job_running_key: list[str | None] = []
        # Workload of each replica, as an index into `r_workload_keys` (for power telemetry).
        self.r_workload_keys = sorted({replica.workload for replica in self.replicas})
        index_of = {key: i for i, key in enumerate(self.r_workload_keys)}
        self.r_workload = np.array(
            [index_of[replica.workload] for replica in self.replicas], dtype=np.int64
        )
        self.job_rate: dict[str, float] = {}
        self.job_ready_at: dict[str, float] = {}
        job_replicas: dict[str, list[float]] = {}
        for i, replica in enumerate(self.replicas):
            node = self.scenario.nodes[self.node_index[replica.node]]
            product = node.truth_product
            spec = self._workload_spec(replica.workload)
            workload_type = WorkloadType.INFERENCE if isinstance(spec, ServiceSpec) else spec.type
            capacity = truth.replica_tokens_per_second(
                product=product,
                workload_type=workload_type,
                model_parameters_billions=spec.model_parameters_billions,
                gpus=replica.gpus,
                relative_throughput=_variant_throughput(spec, replica.variant),
                power_limit_watts=replica.effective_limit_watts,
                sm_clock_mhz=replica.sm_clock_mhz,
            )
            kept, full_draw = truth.limit_and_clock_fractions(
                product, workload_type, replica.effective_limit_watts, replica.sm_clock_mhz
            )
            self.r_node[i] = self.node_index[replica.node]
            self.r_gpus[i] = replica.gpus
            self.r_limit[i] = replica.effective_limit_watts
            self.r_ready_at[i] = replica.ready_at_seconds
            self.r_idle[i] = truth.product(product).idle_watts
            # A lock in force: the replica's own full load draws the locked draw; otherwise its
            # load is a share of full-power capacity and the draw is clipped at the limit below.
            locked = full_draw < truth.full_load_watts(product, workload_type)
            self.r_full[i] = full_draw
            self.r_capacity[i] = capacity
            self.r_fraction[i] = 1.0 if locked else kept
            if isinstance(spec, ServiceSpec):
                self.r_service[i] = self.service_index[spec.key]
                self.r_job_running_key.append(None)
            else:
                self.r_job_running_key.append(spec.key)
                job_replicas.setdefault(spec.key, []).append(capacity)
                self.job_ready_at[spec.key] = max(
                    self.job_ready_at.get(spec.key, 0.0), replica.ready_at_seconds
                )
        for key, capacities in job_replicas.items():
            self.job_rate[key] = len(capacities) * min(capacities)
        self.is_service = self.r_service >= 0
        self.r_startup = np.minimum(self.r_limit, self.r_idle * truth.startup_idle_multiple)
        busy_gpus = np.bincount(self.r_node, weights=self.r_gpus, minlength=len(self.node_gpus))
        self.node_idle_draw = (self.node_gpus - busy_gpus) * self.idle_watts * self.node_factor
        self._dirty = False

    # -- the run ----------------------------------------------------------------------------

    def _view(self, now: float, reasons: tuple[str, ...]) -> View:
        return View(
            now_seconds=now,
            scenario=self.scenario,
            jobs=tuple(state.spec for state in self.active_jobs.values()),
            replicas=tuple(r for r in self.replicas if not r.draining),
            draining=tuple(r for r in self.replicas if r.draining),
            telemetry=self.telemetry,
            reasons=reasons,
            true_backlog_tokens={
                s.key: self.queues[i].backlog_tokens for i, s in enumerate(self.services)
            },
            true_remaining_tokens={
                key: state.remaining_tokens for key, state in self.active_jobs.items()
            },
        )

    def run(self) -> PolicyResult:
        started = time.perf_counter()
        sc = self.scenario
        dt = sc.step_seconds
        steps = sc.steps
        node_count = len(sc.nodes)
        node_names = [node.name for node in sc.nodes]
        service_count = len(self.services)
        queues = self.queues
        jobs = sorted(sc.jobs, key=lambda job: (job.arrival_seconds, job.key))
        arrivals = [job.arrival_seconds for job in jobs]
        next_job = 0
        cluster_power = np.zeros(steps)
        budget_power = np.zeros((len(sc.budgets), steps))
        budget_limits = np.zeros((len(sc.budgets), steps))
        capacity_series = np.zeros((service_count, steps))
        node_energy = np.zeros(node_count)
        carbon_grams = 0.0
        seconds_over = 0.0
        seconds_limits_over = 0.0
        inference_served = 0.0
        inference_energy = 0.0
        job_energy = 0.0
        job_carbon = 0.0
        job_tokens = 0.0
        # Telemetry window accumulators.
        window_demand = np.zeros(service_count)
        window_served = np.zeros(service_count)
        window_capacity = np.zeros(service_count)
        window_workload_joules: dict[str, float] = {}
        window_workload_gpu_seconds: dict[str, float] = {}
        window_start = 0.0
        next_plan = 0.0
        last_plan = -np.inf
        # Telemetry checks between decisions, when the policy asks for them.
        check_every: float | None = None
        check_at: float | None = None
        reasons: list[str] = ["start"]
        first = True
        exponent = self.truth.load_power_exponent
        noise = self.truth.power_noise
        for step in range(steps):
            now = step * dt
            grams_per_kwh = sc.carbon.grams_per_kwh_at(now)
            cut = bisect.bisect_right(arrivals, now + 1e-9)
            while next_job < cut:
                job = jobs[next_job]
                state = JobState(job, job.work_tokens)
                self.job_states[job.key] = state
                self.active_jobs[job.key] = state
                reasons.append(f"arrival:{job.key}")
                next_job += 1
            periodic = now >= next_plan - 1e-9
            event = bool(reasons) and now - last_plan >= sc.event_debounce_seconds
            asked = False
            if not (periodic or event or first) and check_at is not None and now >= check_at:
                check_at = now + check_every - 1e-9 if check_every else None
                if isinstance(self.policy, DemandChecking) and self.policy.check(
                    self._view(now, ())
                ):
                    asked = True
                    reasons.append("demand")
            if periodic or event or first or asked:
                if periodic:
                    reasons.append("periodic")
                    next_plan += sc.replan_interval_seconds
                decision = self.policy.decide(self._view(now, tuple(reasons)))
                self.apply(decision, now, first)
                check_every = decision.check_interval_seconds
                check_at = now + check_every - 1e-9 if check_every else None
                first = False
                last_plan = now
                reasons = []
            self._end_hand_overs(now)
            if self._dirty:
                self._rebuild()
            ready = self.r_ready_at <= now + 1e-9
            serving = ready & self.is_service
            capacity = np.bincount(
                self.r_service[serving], weights=self.r_capacity[serving], minlength=service_count
            )
            capacity_series[:, step] = capacity
            utilisation = np.zeros(service_count)
            for s, service in enumerate(self.services):
                arriving = float(service.trace.demand_tokens[step])
                served = queues[s].serve(now, arriving, capacity[s] * dt, sc.latency_target_seconds)
                inference_served += served
                if capacity[s] > 0:
                    utilisation[s] = served / (capacity[s] * dt)
                window_demand[s] += arriving
                window_served[s] += served
                window_capacity[s] += capacity[s] * dt
            # Jobs: progress when the whole gang is ready.
            finished: list[str] = []
            job_running = {}
            for key, rate in self.job_rate.items():
                state = self.active_jobs[key]
                running = self.job_ready_at[key] <= now + 1e-9
                job_running[key] = running
                if not running:
                    continue
                work = min(state.remaining_tokens, rate * dt)
                state.remaining_tokens -= work
                job_tokens += work
                if state.remaining_tokens <= 1e-6:
                    state.remaining_tokens = 0.0
                    state.finished_at_seconds = now + work / rate
                    finished.append(key)
            # Power: service replicas by load, job replicas at full load, starting ones near idle.
            # Index -1 (job replicas) picks the appended 0.
            load = np.where(serving, np.append(utilisation, 0.0)[self.r_service], 0.0)
            load = np.clip(load * self.r_fraction, 0.0, 1.0)
            service_draw = self.r_idle + (self.r_full - self.r_idle) * load**exponent
            job_ready = np.array(
                [key is not None and job_running.get(key, False) for key in self.r_job_running_key],
                dtype=bool,
            )
            draw = np.where(
                serving,
                service_draw,
                np.where(job_ready, self.r_full, self.r_startup),
            )
            if len(draw):
                draw = draw * self.node_factor[self.r_node]
                draw = draw * (1.0 + noise * self.power_rng.standard_normal(len(draw)))
                draw = np.clip(draw, 0.0, self.r_limit)
                replica_joules = draw * self.r_gpus * dt
                inference_energy += float(replica_joules[self.is_service].sum())
                step_job_joules = float(replica_joules[~self.is_service].sum())
                job_energy += step_job_joules
                job_carbon += step_job_joules * sc.pue / JOULES_PER_KWH * grams_per_kwh
                drawing = np.where(serving | job_ready, self.r_gpus, 0.0)
                count = len(self.r_workload_keys)
                joules = np.bincount(self.r_workload, weights=draw * drawing * dt, minlength=count)
                gpu_seconds = np.bincount(self.r_workload, weights=drawing * dt, minlength=count)
                for w in np.nonzero(gpu_seconds)[0]:
                    key = self.r_workload_keys[w]
                    window_workload_joules[key] = window_workload_joules.get(key, 0.0) + joules[w]
                    window_workload_gpu_seconds[key] = (
                        window_workload_gpu_seconds.get(key, 0.0) + gpu_seconds[w]
                    )
            node_draw = (
                np.bincount(self.r_node, weights=draw * self.r_gpus, minlength=node_count)
                + self.node_idle_draw
            )
            node_draw = np.minimum(node_draw, self.node_limit_sum)
            node_energy += node_draw * dt
            total = float(node_draw.sum())
            cluster_power[step] = total
            carbon_grams += total * dt * sc.pue / JOULES_PER_KWH * grams_per_kwh
            if len(sc.budgets):
                in_budget = node_draw @ self.budget_matrix
                limits = self.node_limit_sum @ self.budget_matrix
                budget_power[:, step] = in_budget
                budget_limits[:, step] = limits
                if np.any(in_budget > self.budget_caps + 1e-6):
                    seconds_over += dt
                if np.any(limits > self.budget_caps + 1e-6):
                    seconds_limits_over += dt
            for key in finished:
                del self.active_jobs[key]
                self.replicas = [r for r in self.replicas if r.workload != key]
                self._dirty = True
                reasons.append(f"finished:{key}")
            window_end = now + dt
            if window_end - window_start >= sc.telemetry.scrape_interval_seconds - 1e-9:
                span = window_end - window_start
                keys = [s.key for s in self.services]
                self.telemetry.record(
                    window_end_seconds=window_end,
                    demand_tokens_per_second=dict(zip(keys, window_demand / span, strict=True)),
                    served_tokens_per_second=dict(zip(keys, window_served / span, strict=True)),
                    utilisation={
                        key: (window_served[s] / window_capacity[s] if window_capacity[s] else 0.0)
                        for s, key in enumerate(keys)
                    },
                    backlog_tokens={key: queues[s].backlog_tokens for s, key in enumerate(keys)},
                    job_tokens_done={
                        key: state.spec.work_tokens - state.remaining_tokens
                        for key, state in self.active_jobs.items()
                    },
                    workload_watts_per_gpu={
                        key: joules / window_workload_gpu_seconds[key]
                        for key, joules in window_workload_joules.items()
                    },
                    node_joules=dict(zip(node_names, node_energy.tolist(), strict=True)),
                )
                window_workload_joules.clear()
                window_workload_gpu_seconds.clear()
                window_demand[:] = 0
                window_served[:] = 0
                window_capacity[:] = 0
                window_start = window_end
            if self.on_step is not None:
                self.on_step(step)
        end = steps * dt
        for queue in queues:
            queue.close(end, sc.latency_target_seconds)
        misses = 0
        with_deadline = 0
        for state in self.job_states.values():
            deadline = state.spec.deadline_seconds
            if deadline is None or deadline > end:
                continue
            with_deadline += 1
            if state.finished_at_seconds is None or state.finished_at_seconds > deadline + 1e-6:
                misses += 1
        gpu_energy = float(node_energy.sum())
        return PolicyResult(
            policy=self.policy.name,
            step_seconds=dt,
            gpu_energy_joules=gpu_energy,
            node_energy_joules={
                node.name: float(node_energy[i]) for i, node in enumerate(sc.nodes)
            },
            facility_energy_joules=gpu_energy * sc.pue,
            carbon_grams=carbon_grams,
            inference_tokens_served=float(inference_served),
            inference_energy_joules=inference_energy,
            job_energy_joules=job_energy,
            job_carbon_grams=job_carbon,
            job_tokens_processed=float(job_tokens),
            on_time_tokens={
                s.key: float(queues[i].on_time_tokens) for i, s in enumerate(self.services)
            },
            judged_tokens={
                s.key: float(queues[i].judged_tokens) for i, s in enumerate(self.services)
            },
            deadline_misses=misses,
            jobs_finished=sum(
                1 for s in self.job_states.values() if s.finished_at_seconds is not None
            ),
            jobs_with_deadline=with_deadline,
            seconds_over_budget=seconds_over,
            seconds_limits_over_budget=seconds_limits_over,
            preemptions=self.preemptions,
            migrations=self.migrations,
            plan_seconds=self.plan_seconds,
            decision_statuses=self.statuses,
            cluster_power_watts=cluster_power,
            budget_power_watts={b.name: budget_power[i] for i, b in enumerate(sc.budgets)},
            budget_limits_watts={b.name: budget_limits[i] for i, b in enumerate(sc.budgets)},
            service_capacity_tokens_per_second={
                s.key: capacity_series[i] for i, s in enumerate(self.services)
            },
            wall_seconds=time.perf_counter() - started,
        )


def simulate(
    scenario: Scenario,
    truth: GroundTruth,
    policy: Policy,
    *,
    on_step: Callable[[int], None] | None = None,
) -> PolicyResult:
    """Run one policy; `on_step(step)` is called after every step (progress bars)."""
    return Simulation(scenario, truth, policy, on_step=on_step).run()
