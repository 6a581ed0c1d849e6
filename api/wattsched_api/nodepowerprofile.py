"""NodePowerProfile (`wattsched.io/v1alpha1`, cluster-scoped, named after its node): typed spec
(a power limit per wattsched pod and one for idle GPUs, written by the operator) and status (which
GPU each pod holds, what the agent applied and measured), parsed and validated with the same rules
as `crds/wattsched.io_nodepowerprofiles.yaml`.

Not for talking to NVML or the API server: the agent and operator do that with these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from wattsched_api.fields import Fields, JsonObject, present
from wattsched_api.meta import (
    Condition,
    ConditionStatus,
    ObjectMeta,
    object_to_dict,
    parse_time,
    read_conditions,
    read_envelope,
    read_time,
)
from wattsched_api.vocabulary import ConditionType

KIND = "NodePowerProfile"
PLURAL = "nodepowerprofiles"
MAX_GPUS_PER_NODE = 64
MAX_POWER_LIMIT_WATTS = 2000
MAX_CLOCK_MHZ = 10000


class Backend(StrEnum):
    NVML = "nvml"
    SIMULATED = "simulated"


class Holder(StrEnum):
    """Who holds a GPU, as the agent's device mapping says (`status.gpus[].holder`)."""

    WATTSCHED = "wattsched"  # a pod wattsched created (labelled wattsched.io/workload)
    OTHER = "other"  # a pod wattsched did not create: its limit is left alone


class MappingSource(StrEnum):
    """Where the agent's GPU -> pod mapping comes from (`status.deviceMapping.source`)."""

    POD_RESOURCES = "PodResources"  # the kubelet PodResources API, read at this heartbeat
    LAST_KNOWN = "LastKnown"  # the API is unreachable; the last mapping read is used
    UNAVAILABLE = "Unavailable"  # never read: no limit is set, Applied is False


@dataclass(frozen=True)
class ClockRange:
    """A locked SM clock range, in MHz (min <= max)."""

    min_mhz: int
    max_mhz: int

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min_mhz, "max": self.max_mhz}


@dataclass(frozen=True)
class PodPowerLimit:
    """One entry of `spec.pods`: the limit, in watts, for every GPU the pod holds, and the SM clock
    range to lock them to (None: clocks left to the driver)."""

    namespace: str
    name: str
    power_limit_watts: float
    sm_clock_range_mhz: ClockRange | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "powerLimitWatts": self.power_limit_watts,
        }
        if self.sm_clock_range_mhz is not None:
            out["smClockRangeMegahertz"] = self.sm_clock_range_mhz.to_dict()
        return out


@dataclass(frozen=True)
class NodePowerProfileSpec:
    """Limits by holder, not by GPU index: the kubelet's device plugin chose the GPUs.

    A GPU held by a pod in `pods` gets that pod's limit; a GPU no pod holds, or held by a
    wattsched pod not (yet) in `pods`, gets `idle_power_limit_watts` (None: left as it is); a GPU
    held by a pod wattsched did not create gets `unmanaged_power_limit_watts` (None, unless an
    EnergyBudget opts in: left alone). Clocks follow the same mapping: a pod's
    `sm_clock_range_mhz` is locked on the GPUs it holds; every other GPU the agent locked is
    unlocked.
    """

    node_name: str
    idle_power_limit_watts: float | None = None
    pods: tuple[PodPowerLimit, ...] = ()
    # For GPUs held by pods wattsched did not create; None: left alone (no budget opted in).
    unmanaged_power_limit_watts: float | None = None

    def pod_limit_watts(self, namespace: str, name: str) -> float | None:
        return next((p.power_limit_watts for p in self.pods if p.key == (namespace, name)), None)

    def pod_clock_range(self, namespace: str, name: str) -> ClockRange | None:
        return next((p.sm_clock_range_mhz for p in self.pods if p.key == (namespace, name)), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodeName": self.node_name}
        if self.idle_power_limit_watts is not None:
            out["idlePowerLimitWatts"] = self.idle_power_limit_watts
        if self.pods:
            out["pods"] = [p.to_dict() for p in self.pods]
        if self.unmanaged_power_limit_watts is not None:
            out["unmanagedPowerLimitWatts"] = self.unmanaged_power_limit_watts
        return out


@dataclass(frozen=True)
class GpuStatus:
    """One entry of `status.gpus`, as the agent read it from NVML (watts, joules)."""

    index: int
    uuid: str | None = None
    product: str | None = None
    min_watts: float | None = None
    max_watts: float | None = None
    default_watts: float | None = None
    applied_watts: float | None = None
    draw_watts: float | None = None
    energy_joules: float | None = None
    # The pod holding this GPU ("namespace/name", from the device mapping) and who it belongs to.
    pod: str | None = None
    holder: Holder | None = None
    # The limit the agent set for this spec generation; None where it leaves the GPU alone.
    target_watts: float | None = None
    # The supported SM clock range the agent locked (None: unlocked) and the SM clock read back.
    sm_clock_range_mhz: ClockRange | None = None
    sm_clock_mhz: int | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("index", self.index),
            ("uuid", self.uuid),
            ("product", self.product),
            ("pod", self.pod),
            ("holder", None if self.holder is None else self.holder.value),
            ("minWatts", self.min_watts),
            ("maxWatts", self.max_watts),
            ("defaultWatts", self.default_watts),
            ("targetWatts", self.target_watts),
            ("appliedWatts", self.applied_watts),
            ("drawWatts", self.draw_watts),
            ("energyJoules", self.energy_joules),
            (
                "smClockRangeMegahertz",
                None if self.sm_clock_range_mhz is None else self.sm_clock_range_mhz.to_dict(),
            ),
            ("smClockMegahertz", self.sm_clock_mhz),
        ]
        return present(pairs)


@dataclass(frozen=True)
class AgentStatus:
    ready: bool = False
    heartbeat_time: str | None = None
    backend: Backend | None = None
    message: str | None = None

    @property
    def heartbeat(self) -> datetime | None:
        return None if self.heartbeat_time is None else parse_time(self.heartbeat_time)

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("ready", self.ready),
            ("heartbeatTime", self.heartbeat_time),
            ("backend", None if self.backend is None else self.backend.value),
            ("message", self.message),
        ]
        return present(pairs)


@dataclass(frozen=True)
class DeviceMapping:
    """`status.deviceMapping`: where the GPU -> pod mapping in `status.gpus[].pod` comes from."""

    source: MappingSource
    read_time: str | None = None  # when the mapping in use was read
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("source", self.source.value),
            ("readTime", self.read_time),
            ("message", self.message),
        ]
        return present(pairs)


@dataclass(frozen=True)
class NodePowerProfileStatus:
    observed_generation: int | None = None
    gpu_count: int | None = None
    target_watts: float | None = None
    applied_watts: float | None = None
    draw_watts: float | None = None
    locked_clocks: str | None = None  # e.g. "0,1=990-1005 2=1410-1410", or "none"
    gpus: tuple[GpuStatus, ...] = ()
    device_mapping: DeviceMapping | None = None
    agent: AgentStatus | None = None
    conditions: tuple[Condition, ...] = ()

    def condition(self, condition_type: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == condition_type), None)

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("observedGeneration", self.observed_generation),
            ("gpuCount", self.gpu_count),
            ("targetWatts", self.target_watts),
            ("appliedWatts", self.applied_watts),
            ("drawWatts", self.draw_watts),
            ("lockedClocks", self.locked_clocks),
        ]
        out = present(pairs)
        if self.gpus:
            out["gpus"] = [g.to_dict() for g in self.gpus]
        if self.device_mapping is not None:
            out["deviceMapping"] = self.device_mapping.to_dict()
        if self.agent is not None:
            out["agent"] = self.agent.to_dict()
        if self.conditions:
            out["conditions"] = [c.to_dict() for c in self.conditions]
        return out


@dataclass(frozen=True)
class NodePowerProfile:
    metadata: ObjectMeta
    spec: NodePowerProfileSpec
    status: NodePowerProfileStatus = field(default_factory=NodePowerProfileStatus)

    @property
    def limits_confirmed(self) -> bool:
        """The agent is ready, has applied this generation of the spec, and says Applied=True."""
        return self.limits_applied(self.metadata.generation)

    def limits_applied(self, generation: int | None) -> bool:
        """The agent is ready, has applied `generation` of the spec (None: any) or a later one,
        and says Applied=True."""
        agent = self.status.agent
        if agent is None or not agent.ready:
            return False
        observed = self.status.observed_generation
        if generation is not None and (observed is None or observed < generation):
            return False
        applied = self.status.condition(ConditionType.APPLIED)
        return applied is None or applied.status is ConditionStatus.TRUE

    def to_dict(self) -> dict[str, Any]:
        return object_to_dict(KIND, self.metadata, self.spec.to_dict(), self.status.to_dict())


# -- reading ---------------------------------------------------------------------------------------


def parse_nodepowerprofile(obj: JsonObject) -> NodePowerProfile:
    """Read and validate a NodePowerProfile; raises `ApiValidationError` naming object and field."""
    metadata, top = read_envelope(obj, kind=KIND, namespaced=False)
    spec = _read_spec(top.section("spec"))
    if spec.node_name != metadata.name:
        raise top.error(
            "spec.nodeName",
            "must equal metadata.name (one NodePowerProfile per node, named after it)",
        )
    status_fields = top.optional_section("status")
    status = NodePowerProfileStatus() if status_fields is None else _read_status(status_fields)
    top.finish()
    return NodePowerProfile(metadata=metadata, spec=spec, status=status)


def _read_clock_range(fields: Fields, field_path: str) -> ClockRange:
    clocks = ClockRange(
        min_mhz=fields.integer("min", minimum=0, maximum=MAX_CLOCK_MHZ),
        max_mhz=fields.integer("max", minimum=1, maximum=MAX_CLOCK_MHZ),
    )
    fields.finish()
    if clocks.min_mhz > clocks.max_mhz:
        raise fields.error("min", f"must be less than or equal to {field_path}.max")
    return clocks


def _read_spec(spec: Fields) -> NodePowerProfileSpec:
    items = spec.objects("pods", max_items=MAX_GPUS_PER_NODE) or []
    spec.unique_by("pods", items, lambda item: (item.data.get("namespace"), item.data.get("name")))
    pods = []
    for item in items:
        pods.append(
            PodPowerLimit(
                namespace=item.string("namespace", max_length=63, min_length=1),
                name=item.string("name", max_length=253, min_length=1),
                power_limit_watts=item.number(
                    "powerLimitWatts",
                    minimum=0,
                    maximum=MAX_POWER_LIMIT_WATTS,
                    exclusive_minimum=True,
                ),
                sm_clock_range_mhz=_optional_clock_range(item, "spec.pods[].smClockRangeMegahertz"),
            )
        )
        item.finish()
    idle = spec.optional_number(
        "idlePowerLimitWatts", minimum=0, maximum=MAX_POWER_LIMIT_WATTS, exclusive_minimum=True
    )
    result = NodePowerProfileSpec(
        node_name=spec.string("nodeName", max_length=253, min_length=1),
        idle_power_limit_watts=idle,
        pods=tuple(pods),
        unmanaged_power_limit_watts=spec.optional_number(
            "unmanagedPowerLimitWatts", minimum=1, maximum=MAX_POWER_LIMIT_WATTS
        ),
    )
    spec.finish()
    return result


def _optional_clock_range(fields: Fields, field_path: str) -> ClockRange | None:
    section = fields.optional_section("smClockRangeMegahertz")
    return None if section is None else _read_clock_range(section, field_path)


def _read_status(status: Fields) -> NodePowerProfileStatus:
    big = 1e30
    items = status.objects("gpus", max_items=MAX_GPUS_PER_NODE) or []
    status.unique_by("gpus", items, lambda item: item.data.get("index"))
    gpus = []
    for item in items:
        holder = item.optional_string("holder", max_length=16, enum=tuple(Holder))
        gpus.append(
            GpuStatus(
                index=item.integer("index", minimum=0, maximum=MAX_GPUS_PER_NODE - 1),
                uuid=item.optional_string("uuid", max_length=128),
                product=item.optional_string("product", max_length=128),
                pod=item.optional_string("pod", max_length=317),
                holder=None if holder is None else Holder(holder),
                target_watts=item.optional_number("targetWatts", minimum=0, maximum=big),
                min_watts=item.optional_number("minWatts", minimum=0, maximum=big),
                max_watts=item.optional_number("maxWatts", minimum=0, maximum=big),
                default_watts=item.optional_number("defaultWatts", minimum=0, maximum=big),
                applied_watts=item.optional_number("appliedWatts", minimum=0, maximum=big),
                draw_watts=item.optional_number("drawWatts", minimum=0, maximum=big),
                energy_joules=item.optional_number("energyJoules", minimum=0, maximum=big),
                sm_clock_range_mhz=_optional_clock_range(
                    item, "status.gpus[].smClockRangeMegahertz"
                ),
                sm_clock_mhz=item.optional_integer(
                    "smClockMegahertz", minimum=0, maximum=MAX_CLOCK_MHZ
                ),
            )
        )
        item.finish()
    agent = None
    agent_fields = status.optional_section("agent")
    if agent_fields is not None:
        backend = agent_fields.optional_string("backend", max_length=16, enum=tuple(Backend))
        agent = AgentStatus(
            ready=bool(agent_fields.optional_boolean("ready")),
            heartbeat_time=read_time(agent_fields, "heartbeatTime"),
            backend=None if backend is None else Backend(backend),
            message=agent_fields.optional_string("message", max_length=4096),
        )
        agent_fields.finish()
    mapping = None
    mapping_fields = status.optional_section("deviceMapping")
    if mapping_fields is not None:
        mapping = DeviceMapping(
            source=MappingSource(
                mapping_fields.string("source", max_length=32, enum=tuple(MappingSource))
            ),
            read_time=read_time(mapping_fields, "readTime"),
            message=mapping_fields.optional_string("message", max_length=4096),
        )
        mapping_fields.finish()
    result = NodePowerProfileStatus(
        observed_generation=status.optional_integer(
            "observedGeneration", minimum=0, maximum=2**63 - 1
        ),
        gpu_count=status.optional_integer("gpuCount", minimum=0, maximum=2**31),
        target_watts=status.optional_number("targetWatts", minimum=0, maximum=big),
        applied_watts=status.optional_number("appliedWatts", minimum=0, maximum=big),
        draw_watts=status.optional_number("drawWatts", minimum=0, maximum=big),
        locked_clocks=status.optional_string("lockedClocks", max_length=1024),
        gpus=tuple(gpus),
        device_mapping=mapping,
        agent=agent,
        conditions=read_conditions(status),
    )
    status.finish()
    return result
