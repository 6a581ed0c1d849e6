"""Set-up the simulator's tests share: a flat, noise-free ground truth, H100 nodes, a training
job, a small scenario, a policy that places fixed replicas, a tiny trace file and a generated job's
nominal duration. Import them: `from tests.simulator.conftest import flat_truth, ...`.
Not for: assertions (each test file keeps its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.cluster import SimBudget, SimNode
from wattsched_simulator.engine import Decision, ReplicaAssignment, Scenario, View
from wattsched_simulator.truth import GroundTruth, ProductTruth, TypeTruth
from wattsched_simulator.workloads import JobSpec, ServiceSpec, model_variants

FLAT = ((0.2, 1.0), (1.0, 1.0))


def flat_truth(tokens_per_second: float = 100.0) -> GroundTruth:
    """One product (H100 power figures), every type at `tokens_per_second` (8B model), no noise."""
    return GroundTruth(
        products={"H100-80GB": ProductTruth(200, 700, 75, 80, 1.0, 1.0, 1980)},
        types={t: TypeTruth(tokens_per_second, 0.97, FLAT, True) for t in WorkloadType},
        node_power_spread=0.0,
        power_noise=0.0,
    )


def gpu_node(name: str, product_label: str, product: str, gpus: int = 8) -> SimNode:
    """A node of `gpus` GPUs labelled `product_label` (GPU Feature Discovery's
    nvidia.com/gpu.product), the catalogue's and the ground truth's `product`."""
    return SimNode(
        name=name,
        labels={"nvidia.com/gpu.product": product_label},
        product_label=product_label,
        planner_product=product,
        truth_product=product,
        gpu_count=gpus,
    )


def h100_node(name: str, gpus: int = 8) -> SimNode:
    return gpu_node(name, "NVIDIA-H100-80GB-HBM3", "H100-80GB", gpus)


def job(
    key: str,
    work_tokens: float,
    *,
    arrival_seconds: float = 0.0,
    deadline_seconds: float | None = None,
    gpus: int = 1,
    replicas: int = 1,
    priority: int = 0,
) -> JobSpec:
    return JobSpec(
        key=key,
        type=WorkloadType.TRAINING,
        model_parameters_billions=8.0,
        gpus_per_replica=gpus,
        replicas=replicas,
        variants=model_variants(8.0)[:1],
        work_tokens=work_tokens,
        arrival_seconds=arrival_seconds,
        deadline_seconds=deadline_seconds,
        priority=priority,
        preemptible=False,
    )


def scenario(
    *,
    nodes: Sequence[SimNode],
    duration_seconds: float,
    services: Sequence[ServiceSpec] = (),
    jobs: Sequence[JobSpec] = (),
    budgets: Sequence[SimBudget] = (),
    latency_target_seconds: float = 1.0,
    step_seconds: float = 1.0,
    seed: int = 0,
) -> Scenario:
    return Scenario(
        nodes=tuple(nodes),
        budgets=tuple(budgets),
        services=tuple(services),
        jobs=tuple(jobs),
        duration_seconds=duration_seconds,
        carbon=CarbonIntensity.constant(500.0, "test"),
        pue=1.5,
        step_seconds=step_seconds,
        latency_target_seconds=latency_target_seconds,
        seed=seed,
    )


@dataclass
class FixedPolicy:
    """Places the given replicas (of workloads present at the time) at the given limit."""

    placements: Sequence[tuple[str, str]]  # (workload, node)
    power_limit_watts: float = 700.0
    name: str = "fixed"

    def decide(self, view: View) -> Decision:
        active = {s.key for s in view.scenario.services} | {j.key for j in view.jobs}
        return Decision(
            replicas=tuple(
                ReplicaAssignment(workload, node, 1, "bf16", self.power_limit_watts)
                for workload, node in self.placements
                if workload in active
            ),
            idle_power_limit_watts={},
            plan_seconds=0.0,
        )


def write_trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    """An Azure-format trace file (TIMESTAMP, ContextTokens, GeneratedTokens) with these rows."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{stamp},{context},{generated}" for stamp, context, generated in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def nominal_seconds(job: JobSpec) -> float:
    """How long the job takes at full power on H100s, by the default ground truth."""
    truth = GroundTruth()
    rate = truth.replica_tokens_per_second(
        product="H100-80GB",
        workload_type=job.type,
        model_parameters_billions=job.model_parameters_billions,
        gpus=job.gpus_per_replica,
        relative_throughput=1.0,
        power_limit_watts=truth.product("H100-80GB").max_watts,
    )
    return job.work_tokens / (rate * job.replicas)
