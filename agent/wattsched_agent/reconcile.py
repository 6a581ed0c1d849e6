"""Pure parts of the agent's reconcile: who holds each GPU, the limit each GPU gets, the status.

Nothing here talks to Kubernetes or NVML; `node_agent` calls these functions with what it read and
applies what they return. Profiles and statuses are the typed models of `wattsched_api`
(the one reading of the CRD shared with the operator).

Not for: the API calls (see `kube_access`) or NVML calls (see `nvml_backend`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wattsched_agent.dcgm_metrics import PodRef
from wattsched_agent.nvml_backend import (
    ClockOutcome,
    GpuFault,
    GpuIdentity,
    GpuSample,
    LimitOutcome,
)
from wattsched_agent.podresources import PodDevices, gpu_uuid
from wattsched_api.meta import Condition, ConditionStatus, format_time, set_condition
from wattsched_api.nodepowerprofile import (
    AgentStatus,
    Backend,
    ClockRange,
    DeviceMapping,
    GpuStatus,
    Holder,
    MappingSource,
    NodePowerProfile,
    NodePowerProfileSpec,
    NodePowerProfileStatus,
)
from wattsched_api.vocabulary import GPU_RESOURCE, ConditionType, Reason

# Watts in statuses (`kubectl get npp`): to the tenth of a watt, as the operator writes limits.
WATTS_DECIMALS = 1
MESSAGE_LIMIT_CHARS = 4000


@dataclass(frozen=True)
class PlacedPod:
    """A pod bound to a node that requests GPUs, as the API server lists it.

    `managed`: wattsched created it (labelled `wattsched.io/workload`); other pods hold GPUs too.
    """

    namespace: str
    name: str
    container: str
    gpus: int
    created: str
    utilisation: float = 1.0
    workload_type: str = "Inference"  # the LLMWorkload's spec.type, from the pod's annotation
    managed: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class GpuHolder:
    """The pod holding one GPU (from the device mapping), with what the API server says of it."""

    namespace: str
    name: str
    managed: bool
    container: str = ""
    pod: PlacedPod | None = None  # None: the API server has not listed it (yet)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


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


def holders_by_index(
    mapping: Sequence[PodDevices],
    identities: Mapping[int, GpuIdentity],
    pods: Sequence[PlacedPod],
) -> dict[int, GpuHolder]:
    """GPU index -> the pod holding it: the mapping's device IDs matched to the GPUs' UUIDs.

    A pod the API server lists without the wattsched label, or does not list, counts as another
    team's (`managed` False) until the profile names it (see `gpu_targets`).
    """
    index_by_uuid = {identity.uuid: index for index, identity in identities.items()}
    listed = {pod.key: pod for pod in pods}
    holders: dict[int, GpuHolder] = {}
    for devices in mapping:
        pod = listed.get(devices.key)
        holder = GpuHolder(
            namespace=devices.namespace,
            name=devices.name,
            managed=pod is not None and pod.managed,
            container=pod.container if pod is not None else "",
            pod=pod,
        )
        for device_id in devices.device_ids:
            index = index_by_uuid.get(gpu_uuid(device_id))
            if index is not None:
                holders[index] = holder
    return holders


def is_wattsched(holder: GpuHolder, spec: NodePowerProfileSpec) -> bool:
    return holder.managed or spec.pod_limit_watts(holder.namespace, holder.name) is not None


def gpu_targets(
    spec: NodePowerProfileSpec, holders: Mapping[int, GpuHolder], gpu_count: int
) -> dict[int, float]:
    """GPU index -> the limit to set. GPUs held by other teams' pods are left alone (absent)
    unless the spec carries `unmanagedPowerLimitWatts` (an EnergyBudget opted in to capping them).

    A pod named in `spec.pods` gets its limit on every GPU it holds; a free GPU, or one held by a
    wattsched pod the spec does not name yet, gets `spec.idlePowerLimitWatts` (absent if unset).
    """
    targets: dict[int, float] = {}
    for index in range(gpu_count):
        holder = holders.get(index)
        limit = (
            spec.idle_power_limit_watts
            if holder is None
            else spec.pod_limit_watts(holder.namespace, holder.name)
        )
        if limit is None and holder is not None and holder.managed:
            limit = spec.idle_power_limit_watts
        if limit is None and holder is not None and not holder.managed:
            limit = spec.unmanaged_power_limit_watts  # another team's GPU: only on opt-in
        if limit is not None:
            targets[index] = limit
    return targets


def gpu_clock_targets(
    spec: NodePowerProfileSpec, holders: Mapping[int, GpuHolder]
) -> dict[int, ClockRange]:
    """GPU index -> the SM clock range to lock: the range of the spec's pod holding it. A GPU
    absent here is unlocked if the agent locked it (its pod left, or the spec dropped the range)."""
    targets: dict[int, ClockRange] = {}
    for index, holder in holders.items():
        clocks = spec.pod_clock_range(holder.namespace, holder.name)
        if clocks is not None:
            targets[index] = clocks
    return targets


def locked_clocks_summary(locked: Mapping[int, tuple[int, int]]) -> str:
    """`status.lockedClocks`: GPU indices grouped by the range locked on them, or "none"."""
    by_range: dict[tuple[int, int], list[int]] = {}
    for index, clock_range in sorted(locked.items()):
        by_range.setdefault(clock_range, []).append(index)
    parts = [
        f"{','.join(str(i) for i in indices)}={low}-{high}"
        for (low, high), indices in sorted(by_range.items(), key=lambda item: item[1][0])
    ]
    return " ".join(parts) if parts else "none"


def pod_refs(holders: Mapping[int, GpuHolder]) -> dict[int, PodRef]:
    return {
        index: PodRef(holder.namespace, holder.name, holder.container)
        for index, holder in holders.items()
    }


def _applied(
    *,
    condition_type: str = ConditionType.APPLIED,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
    previous: tuple[Condition, ...],
) -> tuple[Condition, ...]:
    condition = Condition(
        type=condition_type,
        status=status,
        reason=reason,
        message=message[:MESSAGE_LIMIT_CHARS],
        last_transition_time=format_time(now),
        observed_generation=generation,
    )
    return set_condition(previous, condition)


def _gpu_status(
    identity: GpuIdentity | None,
    sample: GpuSample,
    *,
    holder: GpuHolder | None = None,
    wattsched: bool = False,
    target_watts: float | None = None,
    locked_mhz: tuple[int, int] | None = None,
) -> GpuStatus:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, WATTS_DECIMALS)

    energy_mj = sample.energy_millijoules
    return GpuStatus(
        pod=None if holder is None else f"{holder.namespace}/{holder.name}",
        holder=None if holder is None else (Holder.WATTSCHED if wattsched else Holder.OTHER),
        target_watts=rounded(target_watts),
        index=sample.index,
        uuid=identity.uuid if identity else None,
        product=identity.product if identity else None,
        min_watts=identity.min_watts if identity else None,
        max_watts=identity.max_watts if identity else None,
        default_watts=identity.default_watts if identity else None,
        applied_watts=rounded(sample.applied_watts),
        draw_watts=rounded(sample.draw_watts),
        energy_joules=None if energy_mj is None else energy_mj / 1000,
        sm_clock_range_mhz=None if locked_mhz is None else ClockRange(*locked_mhz),
        sm_clock_mhz=sample.sm_clock_mhz,
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
    holders: Mapping[int, GpuHolder],
    mapping: DeviceMapping,
    clock_outcomes: Sequence[ClockOutcome] = (),
    locked_mhz: Mapping[int, tuple[int, int]] | None = None,
) -> NodePowerProfileStatus:
    """The NodePowerProfile status the agent writes after applying `profile.spec`.

    `Applied` is True (reason LimitsApplied) when every limit set reads back as asked (or was
    clamped down to the GPU's maximum); False with reason DeviceMappingUnavailable when the agent
    has never read which GPU each pod holds (it then sets no limit); otherwise False with the first
    fault's reason and every fault's message. `ClocksApplied` says the same of the clock ranges
    (`clock_outcomes`: locks and unlocks this pass; `locked_mhz`: what is locked now), apart from
    `Applied`, which the budget guarantee reads.
    """
    locked_mhz = locked_mhz or {}
    faults = [*other_faults, *(outcome.fault for outcome in outcomes if outcome.fault is not None)]
    generation = profile.metadata.generation
    if mapping.source is MappingSource.UNAVAILABLE:
        conditions = _applied(
            status=ConditionStatus.FALSE,
            reason=Reason.DEVICE_MAPPING_UNAVAILABLE,
            message=f"no limit set: {mapping.message}",
            generation=generation,
            now=now,
            previous=profile.status.conditions,
        )
    elif faults:
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
            reason=Reason.LIMITS_APPLIED,
            message=f"limits in force: {applied}" if applied else "no limits requested",
            generation=generation,
            now=now,
            previous=profile.status.conditions,
        )
    clock_faults = [outcome.fault for outcome in clock_outcomes if outcome.fault is not None]
    conditions = _applied(
        condition_type=ConditionType.CLOCKS_APPLIED,
        status=ConditionStatus.FALSE if clock_faults else ConditionStatus.TRUE,
        reason=clock_faults[0].reason.value if clock_faults else Reason.CLOCKS_APPLIED,
        message="; ".join(fault.message for fault in clock_faults)
        if clock_faults
        else f"locked SM clocks (MHz): {locked_clocks_summary(locked_mhz)}",
        generation=generation,
        now=now,
        previous=conditions,
    )
    targets = {
        outcome.index: outcome.requested_watts
        if outcome.target_watts is None
        else outcome.target_watts
        for outcome in outcomes
    }
    gpus = tuple(
        _gpu_status(
            identities.get(sample.index),
            sample,
            holder=holders.get(sample.index),
            wattsched=sample.index in holders and is_wattsched(holders[sample.index], profile.spec),
            target_watts=targets.get(sample.index),
            locked_mhz=locked_mhz.get(sample.index),
        )
        for sample in samples
    )
    return NodePowerProfileStatus(
        observed_generation=generation,
        gpu_count=len(samples),
        target_watts=_total(targets.values()),
        applied_watts=_total(gpu.applied_watts for gpu in gpus),
        draw_watts=_total(gpu.draw_watts for gpu in gpus),
        locked_clocks=locked_clocks_summary(locked_mhz),
        gpus=gpus,
        device_mapping=mapping,
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

    Leaving limits in place keeps `Applied` as it was; restoring defaults makes it (and
    `ClocksApplied`, the clocks being unlocked too) False, since the spec is no longer in force.
    """
    message = (
        "agent stopped, restored the default power limits and unlocked the clocks"
        if defaults_restored
        else "agent stopped; power limits left in place"
    )
    agent = AgentStatus(
        ready=False, heartbeat_time=format_time(now), backend=backend, message=message
    )
    if not defaults_restored:
        return {"agent": agent.to_dict()}
    gpus = tuple(_gpu_status(identities.get(sample.index), sample) for sample in samples)
    conditions = profile.status.conditions
    for condition_type in (ConditionType.APPLIED, ConditionType.CLOCKS_APPLIED):
        conditions = _applied(
            condition_type=condition_type,
            status=ConditionStatus.FALSE,
            reason=Reason.DEFAULTS_RESTORED,
            message=message,
            generation=profile.metadata.generation,
            now=now,
            previous=conditions,
        )
    return NodePowerProfileStatus(
        applied_watts=_total(gpu.applied_watts for gpu in gpus),
        locked_clocks=locked_clocks_summary({}),
        gpus=gpus,
        agent=agent,
        conditions=conditions,
    ).to_dict()
