"""Pure parts of the agent's reconcile: read a profile, attribute GPUs to pods, build status.

Nothing here talks to Kubernetes or NVML; `node_agent` calls these functions with what it read and
applies what they return. Profiles and statuses are the typed models of `wattsched_operator.api`
(the one reading of the CRD shared with the operator).

Not for: the API calls (see `kube_access`) or NVML calls (see `nvml_backend`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wattsched_agent.dcgm_metrics import PodRef
from wattsched_agent.nvml_backend import GpuFault, GpuIdentity, GpuSample, LimitOutcome
from wattsched_operator.api.meta import Condition, ConditionStatus, format_time, set_condition
from wattsched_operator.api.nodepowerprofile import (
    APPLIED,
    AgentStatus,
    Backend,
    GpuStatus,
    NodePowerProfile,
    NodePowerProfileStatus,
)

WORKLOAD_LABEL = "wattsched.io/workload"
GPU_RESOURCE = "nvidia.com/gpu"
# Watts in statuses (`kubectl get npp`): to the tenth of a watt, as the operator writes limits.
WATTS_DECIMALS = 1
MESSAGE_LIMIT_CHARS = 4000


@dataclass(frozen=True)
class PlacedPod:
    """A wattsched workload pod bound to a node, with the GPUs it requested."""

    namespace: str
    name: str
    container: str
    gpus: int
    created: str
    utilisation: float = 1.0
    workload_type: str = "Inference"  # the LLMWorkload's spec.type, from the pod's annotation


def gpus_requested(pod_spec: Mapping[str, Any]) -> tuple[int, str]:
    """GPUs a pod requests (limits take precedence, as for extended resources) and its container."""
    total = 0
    first_container = ""
    for container in pod_spec.get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(GPU_RESOURCE) or (
            resources.get("requests") or {}
        ).get(GPU_RESOURCE)
        if amount:
            total += int(amount)
            first_container = first_container or str(container.get("name", ""))
    return total, first_container


def assign_gpus(pods: Iterable[PlacedPod], gpu_count: int) -> dict[int, PlacedPod]:
    """GPU index -> pod, giving each pod the next free indices in order of creation.

    On a simulated node this is the truth (nothing else allocates GPUs). On a real node the device
    plugin picks the indices; this order is then an approximation (see docs/telemetry.md).
    """
    by_gpu: dict[int, PlacedPod] = {}
    next_index = 0
    for pod in sorted(pods, key=lambda pod: (pod.created, pod.namespace, pod.name)):
        for _ in range(pod.gpus):
            if next_index >= gpu_count:
                return by_gpu
            by_gpu[next_index] = pod
            next_index += 1
    return by_gpu


def pod_refs(by_gpu: Mapping[int, PlacedPod]) -> dict[int, PodRef]:
    return {index: PodRef(pod.namespace, pod.name, pod.container) for index, pod in by_gpu.items()}


def _applied(
    *,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    previous: tuple[Condition, ...],
) -> tuple[Condition, ...]:
    condition = Condition(
        type=APPLIED,
        status=status,
        reason=reason,
        message=message[:MESSAGE_LIMIT_CHARS],
        last_transition_time=format_time(now),
        observed_generation=generation,
    )
    return set_condition(previous, condition)


def _gpu_status(identity: GpuIdentity | None, sample: GpuSample) -> GpuStatus:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, WATTS_DECIMALS)

    energy_mj = sample.energy_millijoules
    return GpuStatus(
        index=sample.index,
        uuid=identity.uuid if identity else None,
        product=identity.product if identity else None,
        min_watts=identity.min_watts if identity else None,
        max_watts=identity.max_watts if identity else None,
        default_watts=identity.default_watts if identity else None,
        applied_watts=rounded(sample.applied_watts),
        draw_watts=rounded(sample.draw_watts),
        energy_joules=None if energy_mj is None else energy_mj / 1000,
    )


def _total(values: Iterable[float | None]) -> float:
    return round(sum(value for value in values if value is not None), WATTS_DECIMALS)


def build_status(
    *,
    profile: NodePowerProfile,
    backend: Backend,
    ready: bool,
    identities: Mapping[int, GpuIdentity],
    samples: Sequence[GpuSample],
    outcomes: Sequence[LimitOutcome],
    other_faults: Sequence[GpuFault],
    now: datetime,
) -> NodePowerProfileStatus:
    """The NodePowerProfile status the agent writes after applying `profile.spec`.

    `Applied` is True (reason LimitsApplied) when every limit in spec reads back as asked (or was
    clamped down to the GPU's maximum); otherwise False with the first fault's reason and every
    fault's message.
    """
    faults = [*other_faults, *(outcome.fault for outcome in outcomes if outcome.fault is not None)]
    generation = profile.metadata.generation
    if faults:
        conditions = _applied(
            status=ConditionStatus.FALSE,
            reason=faults[0].reason.value,
            message="; ".join(fault.message for fault in faults),
            generation=generation,
            now=now,
            previous=profile.status.conditions,
        )
    else:
        applied = ", ".join(
            f"GPU {outcome.index}={outcome.applied_watts:g} W" for outcome in outcomes
        )
        conditions = _applied(
            status=ConditionStatus.TRUE,
            reason="LimitsApplied",
            message=f"limits in force: {applied}" if applied else "no limits requested",
            generation=generation,
            now=now,
            previous=profile.status.conditions,
        )
    gpus = tuple(_gpu_status(identities.get(sample.index), sample) for sample in samples)
    return NodePowerProfileStatus(
        observed_generation=generation,
        gpu_count=len(samples),
        target_watts=_total(gpu.power_limit_watts for gpu in profile.spec.gpus),
        applied_watts=_total(gpu.applied_watts for gpu in gpus),
        draw_watts=_total(gpu.draw_watts for gpu in gpus),
        gpus=gpus,
        agent=AgentStatus(
            ready=ready,
            heartbeat_time=format_time(now),
            backend=backend,
            message="; ".join(fault.message for fault in faults)[:MESSAGE_LIMIT_CHARS],
        ),
        conditions=conditions,
    )


def stopped_status(
    *,
    profile: NodePowerProfile,
    backend: Backend,
    defaults_restored: bool,
    identities: Mapping[int, GpuIdentity],
    samples: Sequence[GpuSample],
    now: datetime,
) -> dict[str, Any]:
    """The status merge patch written when the agent stops (exit policy applied).

    Leaving limits in place keeps `Applied` as it was; restoring defaults makes it False, since the
    limits in spec are no longer in force.
    """
    message = (
        "agent stopped and restored the default power limits"
        if defaults_restored
        else "agent stopped; power limits left in place"
    )
    agent = AgentStatus(
        ready=False, heartbeat_time=format_time(now), backend=backend, message=message
    )
    if not defaults_restored:
        return {"agent": agent.to_dict()}
    gpus = tuple(_gpu_status(identities.get(sample.index), sample) for sample in samples)
    conditions = _applied(
        status=ConditionStatus.FALSE,
        reason="DefaultsRestored",
        message=message,
        generation=profile.metadata.generation,
        now=now,
        previous=profile.status.conditions,
    )
    return NodePowerProfileStatus(
        applied_watts=_total(gpu.applied_watts for gpu in gpus),
        gpus=gpus,
        agent=agent,
        conditions=conditions,
    ).to_dict()
