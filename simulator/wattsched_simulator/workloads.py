"""What runs in a simulation: inference services fed by traces, and a seeded mix of batch jobs.

Services: one per trace file. A trace whose file name contains "code" is served by a
Llama-3.1-8B-class model on 1 GPU per replica; any other by a Llama-3.1-70B-class model on 4 GPUs
per replica. Both offer a bf16 variant (quality 1.0) and an fp8 variant (1.6x throughput, quality
0.97, half the weight memory); `minQuality` 0.95 allows either.

Generated jobs (`generate_jobs`), all from one seed:
- arrivals: a Poisson process, `jobs_per_hour` on average, over the first 80% of the run;
- type: Training 30%, FineTuning 40%, BatchInference 30%;
- model: 8B (50%), 13B (30%) or 70B (20%); GPUs per replica 1/2/8 for 8B/13B/70B training and
  fine-tuning, 1/1/4 for batch inference; gang of 1 (60%) or 2 (40%) replicas;
- work: sized so that the job takes 8-30 minutes (uniform) at full power on H100s;
- deadline: `deadline_share` of jobs (default 70%) get one, at arrival + nominal duration x slack,
  slack uniform in 1.5-3.0; when that would fall after the end of the run, the job's work is
  shrunk so that it does not (every deadline can be met); the rest are best-effort. With
  `deadline_slack_hours` (MIN, MAX) the deadline is instead arrival + nominal duration + a slack
  drawn uniformly from MIN-MAX hours (from a stream of its own, so the rest of the mix is the same);
  a deadline that would fall after the end of the run is the end of the run, and the job's work is
  shrunk so that it still has half its nominal duration of slack;
- priority: 0 (50%), 50 (35%) or 100 (15%); BatchInference is preemptible;
- replicas that span nodes (`multi_node_share`, default 0): that share of 70B Training jobs runs
  each replica on 2 whole nodes of 8 GPUs (16 GPUs, spec.gpu.nodesPerReplica 2), drawn from a
  stream of its own so that the rest of the mix is the same for any share.
Not for: the ground truth of how fast these run (see `truth`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wattsched_optimizer.problem import Precision, Variant, WorkloadType

from .trace import ServiceTrace
from .truth import GroundTruth

SERVICE_NAMESPACE = "azure"
JOB_NAMESPACE = "batch"


@dataclass(frozen=True)
class ServiceSpec:
    """An inference service: its model, replica shape and demand (tokens arriving per step)."""

    key: str
    model_parameters_billions: float
    gpus_per_replica: int
    variants: tuple[Variant, ...]
    min_replicas: int
    max_replicas: int
    min_quality: float
    priority: int
    trace: ServiceTrace


@dataclass(frozen=True)
class JobSpec:
    """A Training/FineTuning/BatchInference job: a gang that must process `work_tokens`.

    `gpus_per_replica` is per pod: a replica that spans `nodes_per_replica` > 1 nodes is that
    many pods of `gpus_per_replica` GPUs, each on a whole node.
    """

    key: str
    type: WorkloadType
    model_parameters_billions: float
    gpus_per_replica: int
    replicas: int
    variants: tuple[Variant, ...]
    work_tokens: float
    arrival_seconds: float
    deadline_seconds: float | None  # absolute simulation time
    priority: int
    preemptible: bool
    nodes_per_replica: int = 1

    @property
    def pods(self) -> int:
        """Pods of the gang: every replica's, all placed together or none."""
        return self.replicas * self.nodes_per_replica


def model_variants(model_parameters_billions: float) -> tuple[Variant, ...]:
    """bf16 and fp8 variants; memory per GPU is for a 1-GPU replica (weights + KV headroom)."""
    weights_gib = 2.0 * model_parameters_billions
    return (
        Variant("bf16", Precision.BF16, weights_gib * 1.25, 1.0, 1.0),
        Variant("fp8", Precision.FP8, weights_gib * 0.625, 1.6, 0.97),
    )


def _per_gpu(variants: tuple[Variant, ...], gpus: int) -> tuple[Variant, ...]:
    return tuple(
        Variant(v.name, v.precision, v.min_memory_gib / gpus, v.relative_throughput, v.quality)
        for v in variants
    )


def services_from_traces(traces: list[ServiceTrace]) -> list[ServiceSpec]:
    services = []
    for trace in traces:
        small = "code" in trace.name.lower()
        params, gpus = (8.0, 1) if small else (70.0, 4)
        services.append(
            ServiceSpec(
                key=f"{SERVICE_NAMESPACE}/{trace.name}",
                model_parameters_billions=params,
                gpus_per_replica=gpus,
                variants=_per_gpu(model_variants(params), gpus),
                min_replicas=1,
                max_replicas=64 if small else 32,
                min_quality=0.95,
                priority=1000,
                trace=trace,
            )
        )
    return services


_JOB_TYPES = (WorkloadType.TRAINING, WorkloadType.FINE_TUNING, WorkloadType.BATCH_INFERENCE)
_SIZES = (8.0, 13.0, 70.0)
_PRIORITIES = (0, 50, 100)


def generate_jobs(
    *,
    seed: int,
    duration_seconds: float,
    jobs_per_hour: float,
    deadline_share: float = 0.7,
    multi_node_share: float = 0.0,
    deadline_slack_hours: tuple[float, float] | None = None,
) -> list[JobSpec]:
    """The seeded job mix described in the module docstring.

    Work is sized with the default ground truth, so the same seed gives the same jobs whatever
    ground truth the run uses.
    """
    nominal = GroundTruth()
    rng = np.random.default_rng(seed)
    # Its own stream: the share of spanning jobs leaves every other draw of the mix unchanged.
    span_rng = np.random.default_rng([seed, 1])
    slack_rng = np.random.default_rng([seed, 2])
    jobs: list[JobSpec] = []
    now = 0.0
    horizon = 0.8 * duration_seconds
    if jobs_per_hour <= 0:
        return jobs
    while True:
        now += float(rng.exponential(3600.0 / jobs_per_hour))
        if now >= horizon:
            return jobs
        job_type = _JOB_TYPES[int(rng.choice(3, p=[0.3, 0.4, 0.3]))]
        size_index = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        params = _SIZES[size_index]
        if job_type is WorkloadType.BATCH_INFERENCE:
            gpus = (1, 1, 4)[size_index]
        else:
            gpus = (1, 2, 8)[size_index]
        replicas = int(rng.choice([1, 2], p=[0.6, 0.4]))
        nodes_per_replica = 1
        if (
            multi_node_share > 0
            and job_type is WorkloadType.TRAINING
            and params == _SIZES[-1]
            and span_rng.uniform() < multi_node_share
        ):
            nodes_per_replica = 2
        nominal_seconds = float(rng.uniform(8 * 60, 30 * 60))
        wants_deadline = rng.uniform() < deadline_share
        slack = float(rng.uniform(1.5, 3.0))
        deadline: float | None = None
        if wants_deadline and deadline_slack_hours is not None:
            low, high = deadline_slack_hours
            slack_seconds = 3600.0 * float(slack_rng.uniform(low, high))
            deadline = min(now + nominal_seconds + slack_seconds, duration_seconds)
            nominal_seconds = min(nominal_seconds, (deadline - now) / 1.5)
        elif wants_deadline:
            if now + nominal_seconds * slack > duration_seconds:
                nominal_seconds = (duration_seconds - now) / slack
            deadline = now + nominal_seconds * slack
        rate = nominal.replica_tokens_per_second(
            product="H100-80GB",
            workload_type=job_type,
            model_parameters_billions=params,
            gpus=gpus * nodes_per_replica,
            relative_throughput=1.0,
            power_limit_watts=nominal.product("H100-80GB").max_watts,
        )
        priority = _PRIORITIES[int(rng.choice(3, p=[0.5, 0.35, 0.15]))]
        jobs.append(
            JobSpec(
                key=f"{JOB_NAMESPACE}/{job_type.value.lower()}-{len(jobs):03d}",
                type=job_type,
                model_parameters_billions=params,
                gpus_per_replica=gpus,
                replicas=replicas,
                variants=_per_gpu(model_variants(params)[:1], gpus),
                work_tokens=rate * replicas * nominal_seconds,
                arrival_seconds=now,
                deadline_seconds=deadline,
                priority=priority,
                preemptible=job_type is WorkloadType.BATCH_INFERENCE,
                nodes_per_replica=nodes_per_replica,
            )
        )
