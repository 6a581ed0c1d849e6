"""The simulated cluster as the operator observes it, and the operator's answer as a `Decision`.

For: running the operator's own pure pieces (`snapshot`, `demand`, `progress`, the calibrator,
`desired`) on the simulator. One way, the simulator's state becomes the Kubernetes-shaped bodies
the operator reads from its cache: GPU Nodes (the labels GPU Feature Discovery writes, allocatable
`nvidia.com/gpu`, Ready), one LLMWorkload per service and arrived job (`spec.slo`, the deadline as
a time, `status.progress` as the operator persisted it), EnergyBudgets (a hostname selector over
the budget's nodes), the running replicas as the pods `desired.build_pod` writes (bound, Running,
Ready once started up) and every node's NodePowerProfile confirmed by its agent. Telemetry becomes
the operator's `TelemetrySnapshot`: per pod, tokens/s and watts over the last rate window of the
samples the simulator made visible (late, as a scrape is). The other way, the pods the operator
wants and the limits it plans (`transition.NodeLimits`) become the engine's `Decision`.

Simulation time 0 is `EPOCH`. Pure: no Kubernetes client; bodies are plain dicts.
Not for: deciding anything (the operator's code does) or physics (`engine`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from wattsched_api.meta import API_VERSION, format_time
from wattsched_api.vocabulary import (
    DCGM_ENERGY_METRIC,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    Phase,
    PodPhase,
    Source,
)
from wattsched_operator import desired
from wattsched_operator.readings import EnergyReading, Measurement, PodKey, TelemetrySnapshot
from wattsched_operator.transition import NodeLimits
from wattsched_optimizer.problem import EnergyPolicy, Placement, WorkloadType

from .carbon import CarbonIntensity
from .cluster import SimBudget, SimNode
from .engine import Decision, ReplicaAssignment, RunningReplica
from .telemetry import Sample
from .workloads import JobSpec, ServiceSpec

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
# What a pod's container looks like in the simulated LLMWorkloads (nothing runs it).
TEMPLATE: Mapping[str, Any] = {"spec": {"containers": [{"name": "model", "image": "simulated"}]}}
# The metric named as each job's progress counter (the simulator's job_tokens_done series).
PROGRESS_QUERY = "wattsched_simulated_job_tokens_done"
# The budgets' carbon forecast query when the scenario's curve is their forecast (answered by
# `carbon_forecast`, not by a Prometheus).
CARBON_FORECAST_QUERY = "wattsched_simulated_carbon_forecast_grams_per_kwh"
# The operator's default rate window (`--telemetry-window-seconds`).
RATE_WINDOW_SECONDS = 60.0


def at(seconds: float) -> datetime:
    """Simulation time as a wall-clock time."""
    return EPOCH + timedelta(seconds=seconds)


def seconds_at(moment: datetime) -> float:
    """A wall-clock time as simulation time (`at`'s inverse)."""
    return (moment - EPOCH).total_seconds()


def carbon_forecast(
    carbon: CarbonIntensity, now_seconds: float, horizon_hours: float
) -> dict[int, float]:
    """The forecast query's answer (`budget_horizon.forecast_by_hours_ahead`'s shape): the
    curve's gCO2/kWh by hours ahead of the current hour, over the horizon and one hour more. A
    perfect forecast: the scenario's curve is what the grid does."""
    hour_start = now_seconds - now_seconds % 3600
    return {
        ahead: carbon.grams_per_kwh_at(hour_start + ahead * 3600)
        for ahead in range(math.ceil(horizon_hours) + 1)
    }


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


def uid(key: str) -> str:
    return f"sim-{key.replace('/', '-')}"


# -- the simulator's state as Kubernetes objects ---------------------------------------------------


def node_body(node: SimNode) -> dict[str, Any]:
    """A Ready GPU Node with its labels (from the node file: GFD's product, memory...), the
    hostname and product labels, and its GPUs allocatable."""
    labels = {
        **node.labels,
        desired.HOSTNAME_LABEL: node.name,
        GPU_PRODUCT_LABEL: node.product_label,
        "nvidia.com/gpu.count": str(node.gpu_count),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "status": {
            "allocatable": {GPU_RESOURCE: str(node.gpu_count)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def budget_body(budget: SimBudget) -> dict[str, Any]:
    """The budget over exactly its nodes (a hostname selector), with its energy allowance."""
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "EnergyBudget",
        "metadata": {"name": budget.name, "uid": uid(budget.name)},
        "spec": {
            "powerCapWatts": budget.power_cap_watts,
            "pue": budget.pue,
            "nodeSelector": {
                "matchExpressions": [
                    {
                        "key": desired.HOSTNAME_LABEL,
                        "operator": "In",
                        "values": sorted(budget.node_names),
                    }
                ]
            },
        },
    }
    if budget.energy_kwh is not None:
        body["spec"]["energy"] = {
            "kilowattHours": budget.energy_kwh,
            "period": budget.energy_period.value,
        }
    return body


def _variants(spec: ServiceSpec | JobSpec) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "precision": v.precision.value,
            "minMemory": f"{round(v.min_memory_gib * 1024)}Mi",  # a quantity, as users write it
            "relativeThroughput": v.relative_throughput,
            "quality": v.quality,
        }
        for v in spec.variants
    ]


def _model(spec: ServiceSpec | JobSpec) -> dict[str, Any]:
    size = spec.model_parameters_billions
    return {"name": f"simulated-{size:g}b", "parametersBillions": size}


def _workload(key: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    namespace, name = split_key(key)
    return {
        "apiVersion": API_VERSION,
        "kind": "LLMWorkload",
        "metadata": {"name": name, "namespace": namespace, "uid": uid(key)},
        "spec": {**spec, "template": TEMPLATE},
        "status": status,
    }


def service_body(
    service: ServiceSpec, policy: EnergyPolicy, tokens_per_second: float
) -> dict[str, Any]:
    """An Inference LLMWorkload declaring `tokens_per_second` (what it is sized for until the
    operator has readings of its own)."""
    return _workload(
        service.key,
        {
            "type": WorkloadType.INFERENCE.value,
            "model": _model(service),
            "gpu": {"count": service.gpus_per_replica},
            "variants": _variants(service),
            "minReplicas": service.min_replicas,
            "maxReplicas": service.max_replicas,
            "minQuality": service.min_quality,
            "priority": service.priority,
            "slo": {"tokensPerSecond": round(max(tokens_per_second, 1.0), 3)},
            "energy": {"policy": policy.value},
        },
        {"phase": Phase.RUNNING},
    )


def job_body(
    job: JobSpec, policy: EnergyPolicy, progress: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A Training/FineTuning/BatchInference LLMWorkload: its total in tokens, its deadline as a
    time, its progress counter named, and `status.progress` as the operator last wrote it."""
    slo: dict[str, Any] = {"totalWork": {"tokens": job.work_tokens}}
    if job.deadline_seconds is not None:
        slo["deadline"] = format_time(at(job.deadline_seconds))
    status: dict[str, Any] = {"phase": Phase.PENDING}
    if progress:
        status["progress"] = dict(progress)
    return _workload(
        job.key,
        {
            "type": job.type.value,
            "model": _model(job),
            "gpu": {"count": job.gpus_per_replica, "nodesPerReplica": job.nodes_per_replica},
            "variants": _variants(job),
            "replicas": job.replicas,
            "priority": job.priority,
            "preemptible": job.preemptible,
            "slo": slo,
            "progress": {"prometheusQuery": f"{PROGRESS_QUERY}{{workload={job.key!r}}}"},
            "energy": {"policy": policy.value},
        },
        status,
    )


def workload_object(body: Mapping[str, Any]) -> desired.WorkloadObject:
    """What `desired.build_pod` needs from an LLMWorkload body written by this module."""
    metadata, spec = body["metadata"], body["spec"]
    return desired.WorkloadObject(
        namespace=metadata["namespace"],
        name=metadata["name"],
        uid=metadata["uid"],
        type=WorkloadType(spec["type"]),
        template=spec["template"],
        precisions={v["name"]: v["precision"] for v in spec.get("variants") or []},
    )


def pod_body(
    workload: desired.WorkloadObject,
    replica: RunningReplica,
    index: int,
    *,
    now_seconds: float,
    startup_seconds: float,
) -> dict[str, Any]:
    """A running replica as the pod the operator created for it: bound to its node, Running
    since it was created, Ready once its start-up is over."""
    pod = desired.build_pod(
        workload,
        Placement(
            workload=workload.key,
            replica=index,
            node=replica.node,
            gpus=replica.gpus,
            variant=replica.variant,
            power_limit_watts=replica.power_limit_watts,
            expected_watts_per_gpu=0.0,
            expected_throughput=0.0,
            sm_clock_mhz=replica.sm_clock_mhz,
        ),
    )
    pod["spec"]["nodeName"] = replica.node
    ready = replica.ready_at_seconds <= now_seconds
    started = min(replica.ready_at_seconds - startup_seconds, now_seconds)
    pod["status"] = {
        "phase": PodPhase.RUNNING,
        "startTime": format_time(at(started)),
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    return pod


def profile_body(node: str, limits: NodeLimits | None, now: datetime) -> dict[str, Any]:
    """The node's NodePowerProfile at `limits` (None: none written yet), as `desired` writes it,
    confirmed by its agent with a heartbeat at `now` (the simulated agents apply at once)."""
    body = desired.node_power_profile(node, limits or NodeLimits(idle_watts=None))
    body["metadata"]["generation"] = 1
    body["status"] = {
        "observedGeneration": 1,
        "agent": {"ready": True, "heartbeatTime": format_time(now)},
    }
    return body


# -- telemetry as the operator reads it ------------------------------------------------------------


@dataclass(frozen=True)
class PodReplica:
    """A running replica's pod and the workload it serves."""

    pod: PodKey
    workload: str
    gpus: int
    ready_at_seconds: float


def telemetry_reading(
    visible: Sequence[Sample],
    pods: Iterable[PodReplica],
    *,
    scrape_interval_seconds: float,
    rate_window_seconds: float = RATE_WINDOW_SECONDS,
    draining: Mapping[str, int] | None = None,
) -> TelemetrySnapshot | None:
    """What the operator's Prometheus queries return from the visible samples (None before the
    first): per pod, tokens/s and watts averaged over the newest `rate_window_seconds`, the
    highest tokens/s of one scrape interval within it (the operator's peak tokens query), and the
    tokens waiting in its queue (vLLM's waiting-requests gauge as the operator's queue query
    reads it: the service's backlog at the newest visible sample, a gauge's last value).

    A service's served tokens/s (vLLM's generation counter) and a job's progress rate are split
    evenly over the workload's Ready pods and its `draining` replicas (removed, still serving
    during a hand-over; not among `pods`); a pod still starting (its server not up) has no
    reading, so the operator does not record the service's demand while one starts; the queue
    likewise, over the same pods; the workload's draw per GPU (DCGM) times each pod's GPUs, for
    pods Ready through the whole window.
    """
    if not visible:
        return None
    newest = visible[-1].window_end_seconds
    window = [s for s in visible if s.window_end_seconds > newest - rate_window_seconds + 1e-9]
    start = window[0].window_end_seconds - scrape_interval_seconds
    by_workload: dict[str, list[PodReplica]] = {}
    for pod in pods:
        by_workload.setdefault(pod.workload, []).append(pod)
    pod_tokens: dict[PodKey, float] = {}
    pod_watts: dict[PodKey, Measurement] = {}
    pod_peak: dict[PodKey, float] = {}
    pod_queued: dict[PodKey, float] = {}
    for key, replicas in by_workload.items():
        ready = [r for r in replicas if r.ready_at_seconds <= newest + 1e-9]
        tokens = _tokens_per_second(key, window, visible)
        watts = [s.workload_watts_per_gpu[key] for s in window if key in s.workload_watts_per_gpu]
        serving = len(ready) + (draining or {}).get(key, 0)
        peak = max(
            (s.served_tokens_per_second[key] for s in window if key in s.served_tokens_per_second),
            default=None,
        )
        backlog = visible[-1].backlog_tokens.get(key)
        for replica in replicas:
            if tokens is not None and replica in ready:
                pod_tokens[replica.pod] = tokens / serving
            if peak is not None and replica in ready:
                pod_peak[replica.pod] = peak / serving
            if backlog is not None and replica in ready:
                pod_queued[replica.pod] = backlog / serving
            if watts and replica.ready_at_seconds <= start + 1e-9:
                pod_watts[replica.pod] = Measurement(
                    sum(watts) / len(watts) * replica.gpus, "DCGM_FI_DEV_POWER_USAGE"
                )
    return TelemetrySnapshot(
        time=at(newest),
        source=Source.MEASURED,
        stale=False,
        reason="",
        pod_watts=pod_watts,
        pod_tokens_per_second=pod_tokens,
        pod_peak_tokens_per_second=pod_peak,
        pod_queued_tokens=pod_queued,
    )


def _tokens_per_second(
    key: str, window: Sequence[Sample], visible: Sequence[Sample]
) -> float | None:
    served = [s.served_tokens_per_second[key] for s in window if key in s.served_tokens_per_second]
    if served:
        return sum(served) / len(served)
    done = [s for s in visible if key in s.job_tokens_done]
    if len(done) < 2:
        return None
    first = next((s for s in done if s.window_end_seconds >= window[0].window_end_seconds), done[0])
    last = done[-1]
    if first is last:
        first = done[-2]
    span = last.window_end_seconds - first.window_end_seconds
    if span <= 0:
        return None
    return max(0.0, last.job_tokens_done[key] - first.job_tokens_done[key]) / span


def energy_reading(
    visible: Sequence[Sample], nodes: Iterable[str], *, start: datetime, end: datetime
) -> EnergyReading:
    """What the operator's node energy query returns (`telemetry.node_energy_queries`, DCGM's
    energy counter first): each node's counter at `end` minus at `start`, the value at a time
    being its last visible sample's plus the rate between its last two samples times the time
    since (`telemetry.counter_value_at`). A node whose counter has no two samples by a time is
    missing, and its budget's energy stays modelled. Pods are not read here: a workload's own
    energy stays modelled in the simulator."""
    start_seconds, end_seconds = seconds_at(start), seconds_at(end)
    joules: dict[str, Measurement] = {}
    missing = set()
    for node in nodes:
        at_end = _counter_at(visible, node, end_seconds)
        at_start = _counter_at(visible, node, start_seconds)
        if at_end is None or at_start is None:
            missing.add(node)
        else:
            joules[node] = Measurement(max(0.0, at_end - at_start), DCGM_ENERGY_METRIC)
    return EnergyReading(
        start=start,
        end=end,
        source=Source.MEASURED,
        stale=False,
        reason=f"no {DCGM_ENERGY_METRIC} samples for {len(missing)} node(s)" if missing else "",
        node_joules=joules,
        missing_nodes=frozenset(missing),
    )


def _counter_at(visible: Sequence[Sample], node: str, seconds: float) -> float | None:
    """A node's energy counter at `seconds`: its last sample by then, extrapolated at the rate
    between its last two samples (None without two)."""
    last: Sample | None = None
    before: Sample | None = None
    for sample in reversed(visible):
        if sample.window_end_seconds > seconds + 1e-9 or node not in sample.node_joules:
            continue
        if last is None:
            last = sample
        else:
            before = sample
            break
    if last is None or before is None:
        return None
    span = last.window_end_seconds - before.window_end_seconds
    rate = (last.node_joules[node] - before.node_joules[node]) / span if span > 0 else 0.0
    return last.node_joules[node] + rate * (seconds - last.window_end_seconds)


def progress_counter(visible: Sequence[Sample], key: str) -> float | None:
    """The job's progress counter (tokens done) as Prometheus last scraped it; None before."""
    for sample in reversed(visible):
        if key in sample.job_tokens_done:
            return sample.job_tokens_done[key]
    return None


# -- the operator's answer as the engine's decision ------------------------------------------------


def decision_from_pods(
    pods: Iterable[Mapping[str, Any]],
    limits: Mapping[str, NodeLimits],
    *,
    plan_seconds: float,
    status: str,
    handovers: int = 0,
) -> Decision:
    """The engine's desired state from the pods the operator wants (built by `desired.build_pod`)
    and the NodePowerProfile limits it plans: each pod is a replica on its nodeSelector's node at
    its profile's limit (its annotation where the profile has none) and locked clock; `handovers`:
    the make-before-break moves the rounds began (`Decision.handovers`)."""
    replicas = []
    for pod in pods:
        metadata, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName") or spec["nodeSelector"][desired.HOSTNAME_LABEL]
        key = (metadata["namespace"], metadata["name"])
        node_limits = limits.get(node)
        watts = None if node_limits is None else node_limits.pods.get(key)
        if watts is None:
            watts = float(metadata["annotations"][desired.ANNOTATION_POWER_LIMIT])
        clock = None if node_limits is None else node_limits.clocks.get(key)
        gpus = int(spec["containers"][0]["resources"]["limits"][GPU_RESOURCE])
        replicas.append(
            ReplicaAssignment(
                workload=f"{metadata['namespace']}/{metadata['labels'][desired.LABEL_WORKLOAD]}",
                node=node,
                gpus=gpus,
                variant=metadata["annotations"][desired.ANNOTATION_VARIANT],
                power_limit_watts=watts,
                sm_clock_mhz=None if clock is None else clock[0],
            )
        )
    idle = {
        node: node_limits.idle_watts
        for node, node_limits in limits.items()
        if node_limits.idle_watts is not None
    }
    return Decision(tuple(replicas), idle, plan_seconds, status, handovers=handovers)
