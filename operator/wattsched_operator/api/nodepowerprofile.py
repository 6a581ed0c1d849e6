"""NodePowerProfile (`wattsched.io/v1alpha1`, cluster-scoped, named after its node): typed spec
(per-GPU power limits, written by the operator) and status (what the agent applied and measured),
parsed and validated with the same rules as `crds/wattsched.io_nodepowerprofiles.yaml`.

Not for talking to NVML or the API server: the agent and operator do that with these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from wattsched_operator.api.fields import Fields, JsonObject
from wattsched_operator.api.meta import (
    Condition,
    ConditionStatus,
    ObjectMeta,
    object_to_dict,
    parse_time,
    read_conditions,
    read_envelope,
    read_time,
)

KIND = "NodePowerProfile"
PLURAL = "nodepowerprofiles"
MAX_GPUS_PER_NODE = 64

# Condition type of status.conditions.
APPLIED = "Applied"


class Backend(StrEnum):
    NVML = "nvml"
    SIMULATED = "simulated"


@dataclass(frozen=True)
class GpuPowerLimit:
    """One entry of `spec.gpus`: the limit, in watts, for the GPU with NVML index `index`."""

    index: int
    power_limit_watts: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "powerLimitWatts": self.power_limit_watts}


@dataclass(frozen=True)
class ClockRange:
    min_mhz: int
    max_mhz: int

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min_mhz, "max": self.max_mhz}


@dataclass(frozen=True)
class NodePowerProfileSpec:
    node_name: str
    gpus: tuple[GpuPowerLimit, ...] = ()
    sm_clock_range_mhz: ClockRange | None = None

    def limit_watts(self, index: int) -> float | None:
        return next((g.power_limit_watts for g in self.gpus if g.index == index), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nodeName": self.node_name}
        if self.gpus:
            out["gpus"] = [g.to_dict() for g in self.gpus]
        if self.sm_clock_range_mhz is not None:
            out["smClockRangeMHz"] = self.sm_clock_range_mhz.to_dict()
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

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("index", self.index),
            ("uuid", self.uuid),
            ("product", self.product),
            ("minWatts", self.min_watts),
            ("maxWatts", self.max_watts),
            ("defaultWatts", self.default_watts),
            ("appliedWatts", self.applied_watts),
            ("drawWatts", self.draw_watts),
            ("energyJoules", self.energy_joules),
        ]
        return {key: value for key, value in pairs if value is not None}


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
        return {key: value for key, value in pairs if value is not None}


@dataclass(frozen=True)
class NodePowerProfileStatus:
    observed_generation: int | None = None
    gpu_count: int | None = None
    target_watts: float | None = None
    applied_watts: float | None = None
    draw_watts: float | None = None
    gpus: tuple[GpuStatus, ...] = ()
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
        ]
        out: dict[str, Any] = {key: value for key, value in pairs if value is not None}
        if self.gpus:
            out["gpus"] = [g.to_dict() for g in self.gpus]
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
        agent = self.status.agent
        if agent is None or not agent.ready:
            return False
        generation = self.metadata.generation
        observed = self.status.observed_generation
        if generation is not None and (observed is None or observed < generation):
            return False
        applied = self.status.condition(APPLIED)
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


def _read_spec(spec: Fields) -> NodePowerProfileSpec:
    items = spec.objects("gpus", max_items=MAX_GPUS_PER_NODE) or []
    spec.unique_by("gpus", items, lambda item: item.data.get("index"))
    gpus = []
    for item in items:
        gpus.append(
            GpuPowerLimit(
                index=item.integer("index", minimum=0, maximum=MAX_GPUS_PER_NODE - 1),
                power_limit_watts=item.number(
                    "powerLimitWatts", minimum=0, maximum=2000, exclusive_minimum=True
                ),
            )
        )
        item.finish()
    clocks = None
    clock_fields = spec.optional_section("smClockRangeMHz")
    if clock_fields is not None:
        clocks = ClockRange(
            min_mhz=clock_fields.integer("min", minimum=0, maximum=10000),
            max_mhz=clock_fields.integer("max", minimum=1, maximum=10000),
        )
        clock_fields.finish()
        if clocks.min_mhz > clocks.max_mhz:
            raise clock_fields.error(
                "min", "must be less than or equal to spec.smClockRangeMHz.max"
            )
    result = NodePowerProfileSpec(
        node_name=spec.string("nodeName", max_length=253, min_length=1),
        gpus=tuple(gpus),
        sm_clock_range_mhz=clocks,
    )
    spec.finish()
    return result


def _read_status(status: Fields) -> NodePowerProfileStatus:
    big = 1e30
    items = status.objects("gpus", max_items=MAX_GPUS_PER_NODE) or []
    status.unique_by("gpus", items, lambda item: item.data.get("index"))
    gpus = []
    for item in items:
        gpus.append(
            GpuStatus(
                index=item.integer("index", minimum=0, maximum=MAX_GPUS_PER_NODE - 1),
                uuid=item.optional_string("uuid", max_length=128),
                product=item.optional_string("product", max_length=128),
                min_watts=item.optional_number("minWatts", minimum=0, maximum=big),
                max_watts=item.optional_number("maxWatts", minimum=0, maximum=big),
                default_watts=item.optional_number("defaultWatts", minimum=0, maximum=big),
                applied_watts=item.optional_number("appliedWatts", minimum=0, maximum=big),
                draw_watts=item.optional_number("drawWatts", minimum=0, maximum=big),
                energy_joules=item.optional_number("energyJoules", minimum=0, maximum=big),
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
    result = NodePowerProfileStatus(
        observed_generation=status.optional_integer(
            "observedGeneration", minimum=0, maximum=2**63 - 1
        ),
        gpu_count=status.optional_integer("gpuCount", minimum=0, maximum=2**31),
        target_watts=status.optional_number("targetWatts", minimum=0, maximum=big),
        applied_watts=status.optional_number("appliedWatts", minimum=0, maximum=big),
        draw_watts=status.optional_number("drawWatts", minimum=0, maximum=big),
        gpus=tuple(gpus),
        agent=agent,
        conditions=read_conditions(status),
    )
    status.finish()
    return result
