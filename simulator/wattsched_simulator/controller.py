"""wattsched and the oracle as simulator policies: the operator's own pieces on a simulated cluster.

`wattsched` is what the operator decides, by the operator's code: the simulated cluster is shown
to it as the Kubernetes objects and telemetry reading it reads (`observed`), and each round runs
the operator's path on them: `snapshot.build_snapshot` (nodes, budgets, LLMWorkloads with their
deadline and persisted `status.progress`, running pods pinned where they run), the demand forecast
(`demand.DemandHistory`: the peak of the last 5 minutes of measured tokens/s x 1.2), job progress
(`progress.advance`: the job's progress counter as last scraped, else the planned rate over the
time the gang ran), the calibrator (`telemetry.Calibrator` over `calibration_samples`, at most once
per accounting interval), the optimizer (`planner.plan` with the calibrated catalogue model), and
`desired` (the pods and NodePowerProfile limits), which `observed` turns into the engine's
`Decision`. What stays here is only what the simulation needs: the memory the operator keeps
between rounds (in its process and in statuses), and which pod each simulated replica is.

`oracle` goes through the same path with what no real system has: each service declares the
future demand over the next interval (the highest latency-window average) plus its current true
backlog, with no measured history to override it; each job's `status.progress` is its true
progress; and the ground truth is the performance model (no calibration). It is a reference
point, not a policy one could deploy, and not a proven lower bound on energy.
Not for: baselines (`baselines`) or physics (`engine`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from wattsched_operator import demand as demand_forecast
from wattsched_operator import desired, progress, snapshot
from wattsched_operator.api.meta import parse_time
from wattsched_operator.telemetry import (
    Calibrator,
    PodKey,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_operator.transition import NodeLimits
from wattsched_optimizer import model as prior
from wattsched_optimizer import planner
from wattsched_optimizer.problem import (
    EnergyPolicy,
    Placement,
    PlanInput,
    PlanOptions,
    WorkloadType,
)

from . import observed
from .engine import Decision, RunningReplica, Scenario, View
from .truth import GroundTruth
from .workloads import JobSpec, ServiceSpec

# How often the operator folds a reading into its calibration (`--accounting-seconds`).
ACCOUNTING_SECONDS = 60.0


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


@dataclass
class PlannerPolicy:
    name: str
    options: PlanOptions = field(default_factory=PlanOptions)
    energy_policy: EnergyPolicy = EnergyPolicy.BALANCED
    oracle: OracleKnowledge | None = None
    # The demand forecast's headroom: the operator's, unless a what-if changes it.
    headroom: float = demand_forecast.HEADROOM
    # Ablation: offer the planner only each workload's highest-quality variant.
    best_variant_only: bool = False
    # The operator's memory between rounds: in its process (demand history, calibration, the
    # applied plan) and in statuses (each job's status.progress).
    _demand: demand_forecast.DemandHistory = field(init=False)
    _calibrator: Calibrator = field(default_factory=Calibrator)
    _calibrated_at: float = -np.inf
    _progress: dict[str, dict[str, object]] = field(default_factory=dict)
    _placements: tuple[Placement, ...] = ()
    _limits: dict[str, NodeLimits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._demand = demand_forecast.DemandHistory(headroom=self.headroom)

    # -- which pod each simulated replica is -----------------------------------------------------

    def _pods(self, view: View) -> list[tuple[RunningReplica, int]]:
        """Each running replica with its replica index: the index of the applied placement on
        the same node with the same variant (as the engine matched them), else the lowest free."""
        planned: dict[str, list[Placement]] = {}
        for placement in self._placements:
            planned.setdefault(placement.workload, []).append(placement)
        out: list[tuple[RunningReplica, int]] = []
        by_workload: dict[str, list[RunningReplica]] = {}
        for replica in view.replicas:
            by_workload.setdefault(replica.workload, []).append(replica)
        for key, replicas in sorted(by_workload.items()):
            free = list(planned.get(key, []))
            used: set[int] = set()
            unmatched = []
            for replica in replicas:
                match = next(
                    (p for p in free if p.node == replica.node and p.variant == replica.variant),
                    None,
                )
                if match is None:
                    unmatched.append(replica)
                    continue
                free.remove(match)
                used.add(match.replica)
                out.append((replica, match.replica))
            index = 0
            for replica in unmatched:
                while index in used:
                    index += 1
                used.add(index)
                out.append((replica, index))
        return out

    # -- what the operator observes -------------------------------------------------------------

    def _declared_tokens_per_second(self, view: View, service: ServiceSpec) -> float:
        """What the service's spec.slo.tokensPerSecond says: its mean demand over the run (what
        a user declares from past traffic), or for the oracle the future demand."""
        if self.oracle is None:
            return service.trace.mean_tokens_per_second
        scenario = view.scenario
        steps = scenario.step_seconds
        window = max(1, round(scenario.latency_target_seconds / steps))
        start = round(view.now_seconds / steps)
        horizon = round((scenario.replan_interval_seconds + scenario.startup_seconds) / steps)
        future = service.trace.demand_tokens[start : start + horizon + window]
        if len(future) == 0:
            return 0.0
        sums = (
            np.convolve(future, np.ones(window), mode="valid") if len(future) >= window else future
        )
        peak = float(sums.max()) / (window * steps)
        backlog = view.true_backlog_tokens.get(service.key, 0.0)
        return peak + backlog / scenario.replan_interval_seconds

    def _advance_progress(
        self, view: View, job: JobSpec, pods: list[tuple[RunningReplica, int]]
    ) -> None:
        """`status.progress` as the operator's accounting writes it (see `progress.advance`)."""
        now = view.now_seconds
        previous = progress.read_status(self._progress.get(job.key))
        measured: float | None
        if self.oracle is not None:
            measured = job.work_tokens - view.true_remaining_tokens.get(job.key, job.work_tokens)
        else:
            measured = observed.progress_counter(view.telemetry.visible(now), job.key)
        planned = [p for p in self._placements if p.workload == job.key]
        seconds = 0.0
        if pods and len(pods) >= len(planned) > 0:
            began = max(r.ready_at_seconds for r, _ in pods)
            if previous is not None:
                began = max(began, (previous.updated_at - observed.EPOCH).total_seconds())
            seconds = max(0.0, now - began)
        self._progress[job.key] = progress.advance(
            previous,
            now=observed.at(now),
            running_seconds=seconds,
            rate_tokens_per_second=sum(p.expected_throughput for p in planned),
            total=job.work_tokens,
            measured_tokens=measured,
        ).to_status()

    def observe(self, view: View) -> tuple[snapshot.ClusterObjects, TelemetrySnapshot | None]:
        """The simulated cluster as the operator's cache and telemetry reader show it now."""
        scenario = view.scenario
        pods = self._pods(view)
        by_job: dict[str, list[tuple[RunningReplica, int]]] = {}
        for replica, index in pods:
            by_job.setdefault(replica.workload, []).append((replica, index))
        workloads = [
            observed.service_body(s, self.energy_policy, self._declared_tokens_per_second(view, s))
            for s in scenario.services
        ]
        for job in view.jobs:
            self._advance_progress(view, job, by_job.get(job.key, []))
            workloads.append(observed.job_body(job, self.energy_policy, self._progress[job.key]))
        self._progress = {job.key: self._progress[job.key] for job in view.jobs}
        objects_by_key = {
            f"{b['metadata']['namespace']}/{b['metadata']['name']}": observed.workload_object(b)
            for b in workloads
        }
        pod_bodies = [
            observed.pod_body(
                objects_by_key[replica.workload],
                replica,
                index,
                now_seconds=view.now_seconds,
                startup_seconds=scenario.startup_seconds,
            )
            for replica, index in pods
        ]
        objects = snapshot.ClusterObjects(
            nodes=tuple(observed.node_body(n) for n in scenario.nodes),
            workloads=tuple(workloads),
            budgets=tuple(observed.budget_body(b) for b in scenario.budgets),
            profiles=tuple(
                observed.profile_body(n.name, self._limits.get(n.name)) for n in scenario.nodes
            ),
            pods=tuple(pod_bodies),
        )
        reading = observed.telemetry_reading(
            view.telemetry.visible(view.now_seconds),
            [
                observed.PodReplica(
                    (pod["metadata"]["namespace"], pod["metadata"]["name"]),
                    replica.workload,
                    replica.gpus,
                    replica.ready_at_seconds,
                )
                for pod, (replica, _) in zip(pod_bodies, pods, strict=True)
            ],
            scrape_interval_seconds=scenario.telemetry.scrape_interval_seconds,
            draining=Counter(r.workload for r in view.draining),
        )
        return objects, reading

    # -- the operator's round -------------------------------------------------------------------

    def _model(self, scenario: Scenario) -> prior.PerformanceModel:
        if self.oracle is None:
            return prior.CatalogueModel().calibrated(self._calibrator.corrections())
        products = {node.planner_product: node.truth_product for node in scenario.nodes}
        return TruthModel(self.oracle.truth, products)

    def _record_demand(
        self, plan_input: PlanInput, objects: snapshot.ClusterObjects, reading: TelemetrySnapshot
    ) -> None:
        """The loop's `_record_demand`: a service's measured tokens/s (the sum over its running
        pods) when the reading measured every one of them."""
        at_seconds = (reading.time - observed.EPOCH).total_seconds()
        pods_by_workload: dict[str, list[PodKey]] = {}
        for pod in objects.pods:
            meta = pod["metadata"]
            key = f"{meta['namespace']}/{meta['labels'][desired.LABEL_WORKLOAD]}"
            pods_by_workload.setdefault(key, []).append((meta["namespace"], meta["name"]))
        for workload in plan_input.workloads:
            if workload.type is not WorkloadType.INFERENCE:
                continue
            readings = [
                reading.pod_tokens_per_second.get(pod)
                for pod in pods_by_workload.get(workload.key, [])
            ]
            if readings and all(value is not None for value in readings):
                self._demand.record(
                    workload.key, at_seconds, sum(v for v in readings if v is not None)
                )

    def _calibrate(
        self,
        plan_input: PlanInput,
        objects: snapshot.ClusterObjects,
        reading: TelemetrySnapshot,
    ) -> None:
        """The loop's `_calibrate`: the applied plan's replicas next to a fresh reading of their
        pods, at most once per accounting interval."""
        at_seconds = (reading.time - observed.EPOCH).total_seconds()
        if at_seconds - self._calibrated_at < ACCOUNTING_SECONDS:
            return
        self._calibrated_at = at_seconds
        nodes = {(p.workload, p.replica): p.node for p in self._placements}
        # A reading says what a replica draws only if the pod ran for two rate windows.
        settled_by = reading.time - 2 * timedelta(seconds=observed.RATE_WINDOW_SECONDS)
        pods: dict[tuple[str, int], PodKey] = {}
        for pod in objects.pods:
            if parse_time(pod["status"]["startTime"]) > settled_by:
                continue
            meta = pod["metadata"]
            replica = (
                f"{meta['namespace']}/{meta['labels'][desired.LABEL_WORKLOAD]}",
                int(meta["labels"][desired.LABEL_REPLICA]),
            )
            if nodes.get(replica) == pod["spec"]["nodeName"]:
                pods[replica] = (meta["namespace"], meta["name"])
        samples = calibration_samples(
            self._placements,
            pods=pods,
            products={node.name: node.product for node in plan_input.nodes},
            types={workload.key: workload.type for workload in plan_input.workloads},
            demands={
                workload.key: workload.tokens_per_second
                for workload in plan_input.workloads
                if workload.tokens_per_second is not None
            },
            snapshot=reading,
            corrections=self._calibrator.corrections(),
        )
        for sample in samples:
            self._calibrator.observe(sample)

    def decide(self, view: View) -> Decision:
        started = time.perf_counter()
        objects, reading = self.observe(view)
        now = observed.at(view.now_seconds)
        built = snapshot.build_snapshot(
            objects, now=now, options=self.options, agents_required=True
        )
        plan_input = built.plan_input
        sized = plan_input
        if self.oracle is None:
            self._demand.forget(w.key for w in plan_input.workloads)
            sized = dataclasses.replace(
                plan_input,
                workloads=demand_forecast.with_forecast_demand(
                    plan_input.workloads, self._demand, view.now_seconds
                ),
            )
        if self.best_variant_only:
            sized = dataclasses.replace(
                sized,
                workloads=tuple(
                    dataclasses.replace(w, variants=(max(w.variants, key=lambda v: v.quality),))
                    for w in sized.workloads
                ),
            )
        result = planner.plan(sized, model=self._model(view.scenario))
        if self.oracle is None and reading is not None:
            self._calibrate(plan_input, objects, reading)
            self._record_demand(plan_input, objects, reading)
        workloads = {
            key: observed.workload_object(body)
            for body in objects.workloads
            if (key := f"{body['metadata']['namespace']}/{body['metadata']['name']}")
        }
        pods = desired.desired_pods(workloads, result.placements)
        self._limits = desired.planned_limits(result)
        self._placements = result.placements
        return observed.decision_from_pods(
            pods.values(),
            self._limits,
            plan_seconds=time.perf_counter() - started,
            status=str(result.status),
        )
