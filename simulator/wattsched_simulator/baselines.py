"""The policies wattsched is compared against: what a cluster does without it. Pure Python.

All four share one controller and differ only in node choice, power limits and when jobs start:
- `spread-max`: kube-scheduler's default scoring (LeastAllocated: the node with the largest share
  of free GPUs after placing), every GPU at its default (= maximum) power limit;
- `binpack-max`: MostAllocated (the node with the smallest share of free GPUs after placing),
  every GPU, idle ones included, at its default limit;
- `static-cap`: binpack with every GPU capped at a fixed fraction of its maximum (default 0.7);
- `carbon-threshold`: `spread-max` plus a carbon gate in the spirit of Compute Gardener (a
  kube-scheduler plugin, github.com/elevated-systems/compute-gardener-scheduler: it holds pods while
  the grid's carbon intensity is above a threshold, pod annotation
  `compute-gardener-scheduler.kubernetes.io/carbon-intensity-threshold`, 200 gCO2/kWh in its
  examples, and releases them when `max-scheduling-delay`, 24 h in its examples, has passed). Here
  the flexible work is every job: a pending job does not start while the current intensity is
  above the threshold, unless it arrived at least the maximum delay ago. Services are never held.
  It reads the current intensity, not a forecast, and knows nothing of deadlines (as the plugin).

Inference replica counts follow a HorizontalPodAutoscaler on utilisation (the share of the ready
replicas' capacity in use, read from the same delayed, noisy telemetry wattsched sees):
desired = ceil(replicas x utilisation / target), target 0.6, scale-up at once, scale-down to the
highest recommendation of the last 300 s (HPA's default stabilisation window). At the first
decision there is no utilisation yet, so replicas are added until their capacity (the ground truth's
figure, as a well-tuned deployment would have been sized) covers the observed demand at the target.
Jobs are gang-scheduled (Kueue-like): pending jobs by priority then arrival, a job starts when all
its replicas fit; nothing is preempted or moved. Variants: always the first (highest quality).
Baselines know nothing of EnergyBudgets. Not for: anything wattsched does (see `controller`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from wattsched_optimizer.problem import WorkloadType

from .cluster import SimNode
from .engine import Decision, ReplicaAssignment, RunningReplica, View
from .truth import GroundTruth
from .workloads import JobSpec, ServiceSpec


class Packing(StrEnum):
    SPREAD = "spread"
    BINPACK = "binpack"


def choose_node(
    *,
    nodes: Sequence[SimNode],
    free_gpus: dict[str, int],
    gpus: int,
    memory_gib_per_gpu: float,
    truth: GroundTruth,
    packing: Packing,
) -> SimNode | None:
    """The node kube-scheduler's scoring would pick, or None when no node fits."""
    best: tuple[float, str] | None = None
    chosen: SimNode | None = None
    for node in nodes:
        free = free_gpus[node.name]
        if free < gpus or truth.product(node.truth_product).memory_gib < memory_gib_per_gpu:
            continue
        free_share_after = (free - gpus) / node.gpu_count
        score = -free_share_after if packing is Packing.SPREAD else free_share_after
        key = (score, node.name)
        if best is None or key < best:
            best, chosen = key, node
    return chosen


@dataclass
class BaselinePolicy:
    name: str
    packing: Packing
    truth: GroundTruth
    # None: default (maximum) limit; else this fraction of the maximum, for every GPU.
    cap_fraction: float | None = None
    target_utilisation: float = 0.6
    utilisation_window_seconds: float = 60.0
    scale_down_window_seconds: float = 300.0
    # carbon-threshold only: jobs wait while gCO2/kWh is above this, at most `max_delay_seconds`.
    carbon_threshold_grams_per_kwh: float | None = None
    max_delay_seconds: float = 24 * 3600.0
    _recommendations: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def _limit(self, node: SimNode) -> float:
        spec = self.truth.product(node.truth_product)
        if self.cap_fraction is None:
            return spec.max_watts
        return max(spec.min_watts, self.cap_fraction * spec.max_watts)

    def _capacity(self, service: ServiceSpec, node: SimNode) -> float:
        return self.truth.replica_tokens_per_second(
            product=node.truth_product,
            workload_type=WorkloadType.INFERENCE,
            model_parameters_billions=service.model_parameters_billions,
            gpus=service.gpus_per_replica,
            relative_throughput=service.variants[0].relative_throughput,
            power_limit_watts=self._limit(node),
        )

    def _recommend(self, view: View, service: ServiceSpec, current: int) -> int | None:
        """HPA's desired replicas; None when the service has no replica yet (first decision)."""
        if current == 0:
            return None
        samples = [
            s
            for s in view.telemetry.recent(view.now_seconds, self.utilisation_window_seconds)
            if service.key in s.utilisation
        ]
        if not samples:
            return current
        utilisation = sum(s.utilisation[service.key] for s in samples) / len(samples)
        if samples[-1].backlog_tokens.get(service.key, 0.0) > 0 and utilisation > 0.9:
            utilisation = 1.0
        desired = math.ceil(current * utilisation / self.target_utilisation - 1e-9)
        history = self._recommendations.setdefault(service.key, deque())
        history.append((view.now_seconds, desired))
        while history and history[0][0] < view.now_seconds - self.scale_down_window_seconds:
            history.popleft()
        stabilised = max(desired, *(d for _, d in history)) if desired < current else desired
        return min(max(stabilised, service.min_replicas), service.max_replicas)

    def decide(self, view: View) -> Decision:
        started = time.perf_counter()
        nodes = view.scenario.nodes
        node_by_name = {node.name: node for node in nodes}
        free = {node.name: node.gpu_count for node in nodes}
        by_workload: dict[str, list[RunningReplica]] = {}
        for replica in view.replicas:
            free[replica.node] -= replica.gpus
            by_workload.setdefault(replica.workload, []).append(replica)
        keep: list[RunningReplica] = []
        added: list[ReplicaAssignment] = []
        samples = view.telemetry.recent(view.now_seconds, self.utilisation_window_seconds)
        for service in view.scenario.services:
            running = sorted(
                by_workload.get(service.key, []), key=lambda r: (r.ready_at_seconds, r.node)
            )
            memory = service.variants[0].min_memory_gib
            desired = self._recommend(view, service, len(running))
            if desired is None:
                demand = max(
                    (s.demand_tokens_per_second.get(service.key, 0.0) for s in samples), default=0.0
                )
                capacity = sum(self._capacity(service, node_by_name[r.node]) for r in running)
                while len(running) + len(added_for(added, service.key)) < service.max_replicas:
                    if capacity * self.target_utilisation >= demand and (
                        len(running) + len(added_for(added, service.key)) >= service.min_replicas
                    ):
                        break
                    node = self._choose(nodes, free, service.gpus_per_replica, memory)
                    if node is None:
                        break
                    free[node.name] -= service.gpus_per_replica
                    added.append(self._assignment(service.key, node, service))
                    capacity += self._capacity(service, node)
                keep.extend(running)
                continue
            if desired < len(running):
                for replica in running[desired:]:
                    free[replica.node] += replica.gpus
                running = running[:desired]
            keep.extend(running)
            for _ in range(desired - len(running)):
                node = self._choose(nodes, free, service.gpus_per_replica, memory)
                if node is None:
                    break
                free[node.name] -= service.gpus_per_replica
                added.append(self._assignment(service.key, node, service))
        pending: list[JobSpec] = []
        for job in view.jobs:
            if job.key in by_workload:
                keep.extend(by_workload[job.key])
            else:
                pending.append(job)
        for job in sorted(pending, key=lambda j: (-j.priority, j.arrival_seconds, j.key)):
            if self._held(view, job):
                continue
            trial = dict(free)
            gang: list[ReplicaAssignment] = []
            for _ in range(job.replicas):
                gang += self._replica(nodes, trial, job)
            if len(gang) == job.pods:
                free = trial
                added.extend(gang)
        replicas = tuple(
            ReplicaAssignment(
                r.workload, r.node, r.gpus, r.variant, self._limit(node_by_name[r.node])
            )
            for r in keep
        ) + tuple(added)
        return Decision(
            replicas=replicas,
            idle_power_limit_watts={node.name: self._limit(node) for node in nodes},
            plan_seconds=time.perf_counter() - started,
        )

    def _held(self, view: View, job: JobSpec) -> bool:
        """Whether the carbon gate holds a pending job now."""
        if self.carbon_threshold_grams_per_kwh is None:
            return False
        if view.now_seconds - job.arrival_seconds >= self.max_delay_seconds:
            return False
        intensity = view.scenario.carbon.grams_per_kwh_at(view.now_seconds)
        return intensity > self.carbon_threshold_grams_per_kwh

    def _replica(
        self, nodes: Sequence[SimNode], trial: dict[str, int], job: JobSpec
    ) -> list[ReplicaAssignment]:
        """One replica's pods, taken from `trial`; fewer than its pods when it does not fit. A
        replica that spans nodes takes whole nodes of one product, trying each product in turn
        (what a gang scheduler with a same-product constraint does)."""
        memory = job.variants[0].min_memory_gib
        if job.nodes_per_replica == 1:
            node = self._choose(nodes, trial, job.gpus_per_replica, memory)
            if node is None:
                return []
            trial[node.name] -= job.gpus_per_replica
            return [self._assignment(job.key, node, job)]
        for product in sorted({n.planner_product for n in nodes}):
            candidates = [
                n
                for n in nodes
                if n.planner_product == product and n.gpu_count == job.gpus_per_replica
            ]
            attempt = dict(trial)
            pods: list[ReplicaAssignment] = []
            for _ in range(job.nodes_per_replica):
                node = self._choose(candidates, attempt, job.gpus_per_replica, memory)
                if node is None:
                    break
                attempt[node.name] -= job.gpus_per_replica
                pods.append(self._assignment(job.key, node, job))
            if len(pods) == job.nodes_per_replica:
                trial.update(attempt)
                return pods
        return []

    def _choose(
        self, nodes: Sequence[SimNode], free: dict[str, int], gpus: int, memory_gib: float
    ) -> SimNode | None:
        return choose_node(
            nodes=nodes,
            free_gpus=free,
            gpus=gpus,
            memory_gib_per_gpu=memory_gib,
            truth=self.truth,
            packing=self.packing,
        )

    def _assignment(
        self, key: str, node: SimNode, spec: ServiceSpec | JobSpec
    ) -> ReplicaAssignment:
        return ReplicaAssignment(
            key, node.name, spec.gpus_per_replica, spec.variants[0].name, self._limit(node)
        )


def added_for(added: Sequence[ReplicaAssignment], key: str) -> list[ReplicaAssignment]:
    return [a for a in added if a.workload == key]


# Compute Gardener's examples: carbon-intensity-threshold "200.0", max-scheduling-delay "24h".
DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH = 200.0


def baseline(
    name: str,
    truth: GroundTruth,
    static_cap_fraction: float = 0.7,
    carbon_threshold_grams_per_kwh: float = DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH,
) -> BaselinePolicy:
    """The baseline policy called `name` (spread-max, binpack-max, static-cap or
    carbon-threshold)."""
    if name == "carbon-threshold":
        if carbon_threshold_grams_per_kwh < 0:
            raise ValueError(
                f"--carbon-threshold={carbon_threshold_grams_per_kwh:g}: must be >= 0 gCO2/kWh"
            )
        return BaselinePolicy(
            name,
            Packing.SPREAD,
            truth,
            carbon_threshold_grams_per_kwh=carbon_threshold_grams_per_kwh,
        )
    if name == "spread-max":
        return BaselinePolicy(name, Packing.SPREAD, truth)
    if name == "binpack-max":
        return BaselinePolicy(name, Packing.BINPACK, truth)
    if name == "static-cap":
        if not 0 < static_cap_fraction <= 1:
            raise ValueError(f"--static-cap-fraction={static_cap_fraction}: must be in (0, 1]")
        return BaselinePolicy(name, Packing.BINPACK, truth, cap_fraction=static_cap_fraction)
    raise ValueError(f"unknown baseline policy {name!r}")
