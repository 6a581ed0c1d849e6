"""wattsched and the oracle as simulator policies: telemetry -> PlanInput -> optimizer -> Decision.

`wattsched` is what the operator does, with the same optimizer code (`wattsched_optimizer.planner
.plan`) and the default catalogue model as its prior. Its inputs come from telemetry only:
- inference demand target = the highest 15-s demand seen in the last 5 minutes x `headroom`, plus
  the current backlog spread over one re-plan interval (the operator's forecast,
  `wattsched_operator.demand`), divided by the service's calibration
  factor (measured capacity / modelled capacity of its ready replicas, from served tokens/s over
  utilisation in windows that measured the replicas running now, smoothed);
- job remaining work = spec work - tokens done at the last visible sample - modelled progress
  since (the operator's own arithmetic, `wattsched_operator.progress`), divided by the job's
  calibration factor (measured / modelled rate);
- deadlines in seconds from now, less the start-up time for jobs not yet running; a job that
  cannot make its deadline even at full speed (by the model) gets the deadline that asks for 80%
  of the fastest modelled rate, so it still runs, and runs fast.
`oracle` gets what no real system has: the future demand over the next interval (the highest
latency-window average), the current true backlog and remaining work, and the ground truth as its
performance model. It is a reference point, not a policy one could deploy, and not a proven lower
bound on energy: it runs the same interval-by-interval optimizer (the same churn threshold and
start-up costs), so on some runs it uses more energy or serves less on time than `wattsched`
(it moves replicas that `wattsched` leaves in place, and sizes for the next interval's peak with no
margin). What it is held to by construction is what `wattsched` is held to: every budget's cap.
Not for: baselines (`baselines`) or physics (`engine`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from wattsched_operator import demand as demand_forecast
from wattsched_operator import progress
from wattsched_optimizer import model as prior
from wattsched_optimizer import planner
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    Plan,
    PlanInput,
    PlanOptions,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

from .engine import Decision, ReplicaAssignment, RunningReplica, Scenario, View
from .truth import GroundTruth
from .workloads import JobSpec, ServiceSpec

# A job that can no longer make its deadline is asked to run at least this share of its fastest
# modelled rate.
BEHIND_SCHEDULE_SPEED = 0.8


@dataclass(frozen=True)
class TruthModel:
    """The ground truth behind the optimizer's `PerformanceModel` interface (oracle only)."""

    truth: GroundTruth
    # Optimizer product name -> ground-truth product name, from the scenario's nodes.
    products: Mapping[str, str]

    def throughput_tokens_per_second(  # noqa: PLR0917 (PerformanceModel's signature)
        self,
        product: str,
        workload_type: WorkloadType,
        params_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
    ) -> float:
        return self.truth.replica_tokens_per_second(
            product=self.products[product],
            workload_type=workload_type,
            model_parameters_billions=params_billions,
            gpus=gpus,
            relative_throughput=relative_throughput,
            power_limit_watts=power_limit_watts,
        )

    def expected_power_watts(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        full = self.truth.full_load_watts(self.products[product], workload_type)
        return min(power_limit_watts, full)

    def idle_power_watts(self, product: str) -> float:
        return self.truth.product(self.products[product]).idle_watts


@dataclass(frozen=True)
class OracleKnowledge:
    """What only the oracle knows: the truth and the whole future of demand."""

    truth: GroundTruth


def _service_workload(
    service: ServiceSpec, tokens_per_second: float, policy: EnergyPolicy
) -> Workload:
    return Workload(
        key=service.key,
        type=WorkloadType.INFERENCE,
        model_parameters_billions=service.model_parameters_billions,
        gpus_per_replica=service.gpus_per_replica,
        variants=service.variants,
        replicas=service.min_replicas,
        min_replicas=service.min_replicas,
        max_replicas=service.max_replicas,
        min_quality=service.min_quality,
        priority=service.priority,
        policy=policy,
        tokens_per_second=tokens_per_second,
    )


@dataclass
class PlannerPolicy:
    name: str
    options: PlanOptions = field(default_factory=PlanOptions)
    energy_policy: EnergyPolicy = EnergyPolicy.BALANCED
    headroom: float = 1.4
    forecast_window_seconds: float = 300.0
    deadline_margin: float = 0.9
    oracle: OracleKnowledge | None = None
    # Ablation: offer the planner only each workload's highest-quality variant.
    best_variant_only: bool = False
    _calibration: dict[str, float] = field(default_factory=dict)
    # Per service: its replica set (node, GPUs, variant, effective limit, clock) at the last
    # decision, and when that set last changed (a removed replica or a new limit changes the
    # capacity a telemetry window measured, as much as a new replica does).
    _replica_sets: dict[str, tuple[tuple[object, ...], ...]] = field(default_factory=dict)
    _replicas_changed_at: dict[str, float] = field(default_factory=dict)
    _model: prior.PerformanceModel = field(default_factory=prior.CatalogueModel)

    # -- model ------------------------------------------------------------------------------

    def _model_for(self, scenario: Scenario) -> prior.PerformanceModel:
        if self.oracle is None:
            return self._model
        products = {node.planner_product: node.truth_product for node in scenario.nodes}
        return TruthModel(self.oracle.truth, products)

    def _replica_rate(
        self,
        model: prior.PerformanceModel,
        products: Mapping[str, str],
        spec: ServiceSpec | JobSpec,
        replica: RunningReplica,
    ) -> float:
        variant = next(v for v in spec.variants if v.name == replica.variant)
        workload_type = WorkloadType.INFERENCE if isinstance(spec, ServiceSpec) else spec.type
        return model.throughput_tokens_per_second(
            products[replica.node],
            workload_type,
            spec.model_parameters_billions,
            replica.gpus,
            variant.relative_throughput,
            replica.power_limit_watts,
        )

    def _best_rate(
        self, model: prior.PerformanceModel, scenario: Scenario, spec: ServiceSpec | JobSpec
    ) -> float:
        """Fastest modelled replica on any product of the cluster that has the memory."""
        workload_type = WorkloadType.INFERENCE if isinstance(spec, ServiceSpec) else spec.type
        best = 0.0
        for product in {node.planner_product for node in scenario.nodes}:
            product_spec = prior.product_spec(product)
            for variant in spec.variants:
                if variant.min_memory_gib > product_spec.memory_gib.value:
                    continue
                best = max(
                    best,
                    model.throughput_tokens_per_second(
                        product,
                        workload_type,
                        spec.model_parameters_billions,
                        spec.gpus_per_replica,
                        variant.relative_throughput,
                        product_spec.max_watts.value,
                    ),
                )
        return best

    def _smooth(self, key: str, ratio: float) -> float:
        low, high = prior.CALIBRATION_BOUNDS
        ratio = min(max(ratio, low), high)
        previous = self._calibration.get(key, 1.0)
        self._calibration[key] = 0.5 * previous + 0.5 * ratio
        return self._calibration[key]

    # -- inputs from telemetry -----------------------------------------------------------------

    def _service_target(
        self,
        view: View,
        service: ServiceSpec,
        running: list[RunningReplica],
        model: prior.PerformanceModel,
        products: Mapping[str, str],
    ) -> float:
        now = view.now_seconds
        scenario = view.scenario
        if self.oracle is not None:
            steps = scenario.step_seconds
            window = max(1, round(scenario.latency_target_seconds / steps))
            start = round(now / steps)
            horizon = round((scenario.replan_interval_seconds + scenario.startup_seconds) / steps)
            demand = service.trace.demand_tokens[start : start + horizon + window]
            if len(demand) == 0:
                return 0.0
            sums = (
                np.convolve(demand, np.ones(window), mode="valid")
                if len(demand) >= window
                else demand
            )
            peak = float(sums.max()) / (window * steps)
            backlog = view.true_backlog_tokens.get(service.key, 0.0)
            return peak + backlog / scenario.replan_interval_seconds
        samples = view.telemetry.recent(now, self.forecast_window_seconds)
        if not samples:
            return 0.0
        # The operator's forecast: the recent peak with headroom, plus the backlog over an interval.
        target = demand_forecast.forecast(
            (s.demand_tokens_per_second.get(service.key, 0.0) for s in samples),
            headroom=self.headroom,
            backlog_tokens=samples[-1].backlog_tokens.get(service.key, 0.0),
            interval_seconds=scenario.replan_interval_seconds,
        )
        if target is None:
            return 0.0
        ready = [r for r in running if r.ready_at_seconds <= now]
        replica_set = tuple(
            sorted(
                (r.node, r.gpus, r.variant, r.effective_limit_watts, r.sm_clock_mhz, r.draining)
                for r in running
            )
        )
        if self._replica_sets.get(service.key) != replica_set:
            self._replica_sets[service.key] = replica_set
            self._replicas_changed_at[service.key] = now
        # Only windows that measured the replicas running now: after the last change of the set
        # and after the last of them became ready.
        since = max(
            max((r.ready_at_seconds for r in running), default=now),
            self._replicas_changed_at[service.key],
        )
        settled = [
            s
            for s in samples
            if s.window_end_seconds - scenario.telemetry.scrape_interval_seconds >= since
        ]
        if ready and len(ready) == len(running) and settled:
            utilisation = sum(s.utilisation.get(service.key, 0.0) for s in settled) / len(settled)
            served = sum(s.served_tokens_per_second.get(service.key, 0.0) for s in settled) / len(
                settled
            )
            if utilisation > 0.2:
                modelled = sum(self._replica_rate(model, products, service, r) for r in ready)
                self._smooth(service.key, (served / utilisation) / modelled)
        return target / self._calibration.get(service.key, 1.0)

    def _job_inputs(
        self,
        view: View,
        job: JobSpec,
        running: list[RunningReplica],
        model: prior.PerformanceModel,
        products: Mapping[str, str],
    ) -> tuple[float, float | None]:
        """(remaining tokens as the planner should see them, deadline in seconds from now)."""
        now = view.now_seconds
        scenario = view.scenario
        gang_ready_at = max((r.ready_at_seconds for r in running), default=math.inf)
        rate = 0.0
        if running:
            rate = len(running) * min(self._replica_rate(model, products, job, r) for r in running)
        if self.oracle is not None:
            remaining = view.true_remaining_tokens.get(job.key, job.work_tokens)
        else:
            visible = view.telemetry.visible(now)
            done = 0.0
            seen_at = -math.inf
            history = [s for s in visible if job.key in s.job_tokens_done]
            if history:
                done = history[-1].job_tokens_done[job.key]
                seen_at = history[-1].window_end_seconds
            # The operator's progress arithmetic: the last measured total, plus the placed rate
            # over the time the whole gang ran since that sample (none while it is not running).
            completed = progress.completed_since(done, rate, now - max(seen_at, gang_ready_at))
            remaining = progress.remaining_tokens(job.work_tokens, completed)
            if running and rate > 0:
                steady = [s for s in history if s.window_end_seconds - 60.0 >= gang_ready_at]
                if len(steady) >= 5:
                    first, last = steady[-5], steady[-1]
                    span = last.window_end_seconds - first.window_end_seconds
                    measured = (
                        last.job_tokens_done[job.key] - first.job_tokens_done[job.key]
                    ) / span
                    self._smooth(job.key, measured / rate)
            remaining = max(remaining, 0.01 * job.work_tokens)
            remaining /= self._calibration.get(job.key, 1.0)
        deadline: float | None = None
        if job.deadline_seconds is not None:
            start_delay = 0.0 if running else scenario.startup_seconds
            if running and gang_ready_at > now:
                start_delay = gang_ready_at - now
            left = (job.deadline_seconds - now - start_delay) * self.deadline_margin
            fastest = self._best_rate(model, scenario, job) * job.replicas
            if left > 0 and fastest * left >= remaining:
                deadline = left
            elif fastest > 0:
                # Behind schedule: ask for at least BEHIND_SCHEDULE_SPEED of the fastest rate, so
                # the job runs near full speed instead of at the most efficient (slowest) level.
                deadline = remaining / (fastest * BEHIND_SCHEDULE_SPEED)
        return remaining, deadline

    # -- the decision ---------------------------------------------------------------------------

    def build_input(self, view: View) -> PlanInput:
        scenario = view.scenario
        model = self._model_for(scenario)
        node_products = {node.name: node.planner_product for node in scenario.nodes}
        by_workload: dict[str, list[RunningReplica]] = {}
        for replica in view.replicas:
            by_workload.setdefault(replica.workload, []).append(replica)
        workloads: list[Workload] = []
        for service in scenario.services:
            running = by_workload.get(service.key, [])
            target = self._service_target(view, service, running, model, node_products)
            ceiling = 0.99 * self._best_rate(model, scenario, service) * service.max_replicas
            workloads.append(
                _service_workload(service, min(max(target, 1.0), ceiling), self.energy_policy)
            )
        for job in view.jobs:
            running = by_workload.get(job.key, [])
            remaining, deadline = self._job_inputs(view, job, running, model, node_products)
            workloads.append(
                Workload(
                    key=job.key,
                    type=job.type,
                    model_parameters_billions=job.model_parameters_billions,
                    gpus_per_replica=job.gpus_per_replica,
                    variants=job.variants,
                    replicas=job.replicas,
                    min_replicas=job.replicas,
                    max_replicas=job.replicas,
                    priority=job.priority,
                    preemptible=job.preemptible,
                    policy=self.energy_policy,
                    remaining_work=WorkAmount(WorkUnit.TOKENS, remaining),
                    deadline_seconds=deadline,
                )
            )
        if self.best_variant_only:
            workloads = [
                replace(w, variants=(max(w.variants, key=lambda v: v.quality),)) for w in workloads
            ]
        current = []
        for key, replicas in sorted(by_workload.items()):
            for index, replica in enumerate(replicas):
                current.append(
                    CurrentPlacement(
                        key, index, replica.node, replica.variant, replica.power_limit_watts
                    )
                )
        return PlanInput(
            nodes=tuple(
                GpuNode(node.name, node.planner_product, node.gpu_count) for node in scenario.nodes
            ),
            workloads=tuple(workloads),
            budgets=tuple(
                Budget(b.name, b.power_cap_watts, b.node_names) for b in scenario.budgets
            ),
            current=tuple(current),
            options=self.options,
        )

    def decide(self, view: View) -> Decision:
        started = time.perf_counter()
        plan_input = self.build_input(view)
        result = planner.plan(plan_input, model=self._model_for(view.scenario))
        elapsed = time.perf_counter() - started
        return decision_from_plan(result, plan_input, elapsed)


def decision_from_plan(result: Plan, plan_input: PlanInput, seconds: float) -> Decision:
    """Turn the optimizer's plan into the engine's desired state."""
    replicas = tuple(
        ReplicaAssignment(
            p.workload, p.node, p.gpus, p.variant, p.power_limit_watts, p.sm_clock_mhz
        )
        for p in result.placements
    )
    busy_gpus: dict[str, int] = {}
    busy_watts: dict[str, float] = {}
    for p in result.placements:
        busy_gpus[p.node] = busy_gpus.get(p.node, 0) + p.gpus
        busy_watts[p.node] = busy_watts.get(p.node, 0.0) + p.gpus * p.power_limit_watts
    idle: dict[str, float] = {}
    for node in plan_input.nodes:
        limits = result.node_power_limits_watts.get(node.name)
        idle_gpus = node.gpu_count - busy_gpus.get(node.name, 0)
        if limits is None or idle_gpus <= 0:
            continue
        idle[node.name] = (sum(limits) - busy_watts.get(node.name, 0.0)) / idle_gpus
    return Decision(replicas, idle, seconds, str(result.status))
