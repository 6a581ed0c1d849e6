"""LLMWorkload (`wattsched.io/v1alpha1`, namespaced): typed spec and status, parsed and validated
with the same rules and defaults as `crds/wattsched.io_llmworkloads.yaml`.

`parse_llmworkload` reads an object as the API server returns it (or as a user wrote it: schema
defaults are applied the same way); `LLMWorkload.to_dict()` writes the object back with those
defaults, exactly as the API server stores it. Defaults that depend on other fields (the replica
range, `preemptible`, a variant's memory) are not stored: they are the `effective_*` properties.
Not for deciding anything: the optimizer decides; this module only reads and writes the API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from wattsched_api.errors import ApiValidationError
from wattsched_api.fields import Fields, JsonObject, nesting_depth, present, quantity_gibibytes
from wattsched_api.meta import (
    Condition,
    ObjectMeta,
    object_to_dict,
    parse_time,
    read_conditions,
    read_envelope,
    read_time,
)
from wattsched_api.vocabulary import GPU_RESOURCE, EnergySource, Phase

KIND = "LLMWorkload"
PLURAL = "llmworkloads"
MAX_GPUS_PER_REPLICA = 64
MAX_NODES_PER_REPLICA = 64
# A workload whose replica spans nodes names pod hostnames and headless Services after itself
# (`<name>-<replica>-w<rank>`, a DNS label of at most 63 characters; a Service name starts with a
# letter), so its own name is a DNS label of at most this length.
MAX_SPANNING_NAME_LENGTH = 50
SPANNING_NAME = re.compile(rf"[a-z]([-a-z0-9]{{0,{MAX_SPANNING_NAME_LENGTH - 2}}}[a-z0-9])?")
MAX_REPLICAS = 1024
MAX_VARIANTS = 8
# The largest minMemory per GPU accepted (1Ti; the largest GPU today has 192 GB).
MAX_MEMORY_GIB = 1024
PRIORITY_RANGE = (-1_000_000, 1_000_000)


class WorkloadType(StrEnum):
    INFERENCE = "Inference"
    TRAINING = "Training"
    FINE_TUNING = "FineTuning"
    BATCH_INFERENCE = "BatchInference"


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


class EnergyPolicy(StrEnum):
    PERFORMANCE = "Performance"
    BALANCED = "Balanced"
    EFFICIENCY = "Efficiency"


@dataclass(frozen=True)
class ModelRef:
    name: str
    parameters_billions: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "parametersBillions": self.parameters_billions}


@dataclass(frozen=True)
class GpuRequest:
    """`spec.gpu`: GPUs per pod, memory per GPU (GiB), allowed products (as written), and the
    whole nodes one replica spans (a leader pod and workers, each pod with `count` GPUs)."""

    count: int
    min_memory: str | None = None
    products: tuple[str, ...] = ()
    nodes_per_replica: int = 1

    @property
    def gpus_per_replica(self) -> int:
        return self.count * self.nodes_per_replica

    @property
    def min_memory_gib(self) -> float | None:
        """`minMemory` in GiB; None when not set."""
        return None if self.min_memory is None else quantity_gibibytes(self.min_memory)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "nodesPerReplica": self.nodes_per_replica}
        if self.min_memory is not None:
            out["minMemory"] = self.min_memory
        if self.products:
            out["products"] = list(self.products)
        return out


@dataclass(frozen=True)
class VariantSpec:
    """One entry of `spec.variants`."""

    name: str
    precision: Precision
    min_memory: str | None = None
    relative_throughput: float = 1.0
    quality: float = 1.0

    @property
    def min_memory_gib(self) -> float | None:
        """`minMemory` in GiB; None when not set."""
        return None if self.min_memory is None else quantity_gibibytes(self.min_memory)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "precision": self.precision.value}
        if self.min_memory is not None:
            out["minMemory"] = self.min_memory
        out["relativeThroughput"] = self.relative_throughput
        out["quality"] = self.quality
        return out


DEFAULT_VARIANTS = (VariantSpec(name="bf16", precision=Precision.BF16),)


@dataclass(frozen=True)
class TotalWork:
    """`spec.slo.totalWork`: exactly one of tokens, steps (with tokens_per_step), gpu_hours."""

    tokens: float | None = None
    steps: int | None = None
    tokens_per_step: float | None = None
    gpu_hours: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.steps is not None:
            out["steps"] = self.steps
        if self.tokens_per_step is not None:
            out["tokensPerStep"] = self.tokens_per_step
        if self.gpu_hours is not None:
            out["gpuHours"] = self.gpu_hours
        return out


@dataclass(frozen=True)
class Slo:
    tokens_per_second: float | None = None
    total_work: TotalWork | None = None
    deadline: str | None = None  # RFC 3339, as written

    @property
    def deadline_time(self) -> datetime | None:
        return None if self.deadline is None else parse_time(self.deadline)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tokens_per_second is not None:
            out["tokensPerSecond"] = self.tokens_per_second
        if self.total_work is not None:
            out["totalWork"] = self.total_work.to_dict()
        if self.deadline is not None:
            out["deadline"] = self.deadline
        return out


@dataclass(frozen=True)
class EnergyPreference:
    policy: EnergyPolicy = EnergyPolicy.BALANCED
    max_power_watts_per_gpu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy.value}
        if self.max_power_watts_per_gpu is not None:
            out["maxPowerWattsPerGPU"] = self.max_power_watts_per_gpu
        return out


@dataclass(frozen=True)
class LLMWorkloadSpec:
    type: WorkloadType
    model: ModelRef
    gpu: GpuRequest
    slo: Slo
    template: dict[str, Any]
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    variants: tuple[VariantSpec, ...] = DEFAULT_VARIANTS
    min_quality: float = 0.0
    priority: int = 0
    preemptible: bool | None = None
    energy: EnergyPreference = field(default_factory=EnergyPreference)
    # `spec.progress.prometheusQuery`: PromQL whose value is the tokens a job has processed.
    progress_query: str | None = None
    # spec.disruption.moveToSaveEnergy: running replicas may move to save more than the churn
    # threshold (otherwise they move only when their node goes, a budget or priority forces it).
    move_to_save_energy: bool = False

    @property
    def is_gang(self) -> bool:
        """Training, FineTuning and BatchInference run all their replicas or none."""
        return self.type is not WorkloadType.INFERENCE

    @property
    def effective_min_replicas(self) -> int:
        """Fewest replicas: the gang size, or Inference's minReplicas (else replicas, else 1)."""
        if self.is_gang:
            return self.replicas or 1
        return self.min_replicas or self.replicas or 1

    @property
    def effective_max_replicas(self) -> int:
        """Most replicas: the gang size, or Inference's maxReplicas (else max(replicas, min))."""
        if self.is_gang:
            return self.replicas or 1
        if self.max_replicas is not None:
            return self.max_replicas
        return max(self.replicas or 1, self.effective_min_replicas)

    @property
    def effective_preemptible(self) -> bool:
        """`preemptible`, defaulting to true for BatchInference and false otherwise."""
        if self.preemptible is not None:
            return self.preemptible
        return self.type is WorkloadType.BATCH_INFERENCE

    def variant_min_memory_gib(self, variant: VariantSpec) -> float:
        """GiB per GPU a variant needs: its minMemory, else spec.gpu.minMemory, else 0."""
        if variant.min_memory_gib is not None:
            return variant.min_memory_gib
        return self.gpu.min_memory_gib or 0.0

    def variant(self, name: str) -> VariantSpec | None:
        return next((v for v in self.variants if v.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type.value,
            "model": self.model.to_dict(),
            "gpu": self.gpu.to_dict(),
        }
        if self.replicas is not None:
            out["replicas"] = self.replicas
        if self.min_replicas is not None:
            out["minReplicas"] = self.min_replicas
        if self.max_replicas is not None:
            out["maxReplicas"] = self.max_replicas
        out["variants"] = [v.to_dict() for v in self.variants]
        out["minQuality"] = self.min_quality
        out["slo"] = self.slo.to_dict()
        out["priority"] = self.priority
        if self.preemptible is not None:
            out["preemptible"] = self.preemptible
        out["energy"] = self.energy.to_dict()
        if self.progress_query is not None:
            out["progress"] = {"prometheusQuery": self.progress_query}
        out["disruption"] = {"moveToSaveEnergy": self.move_to_save_energy}
        out["template"] = self.template
        return out


@dataclass(frozen=True)
class ReplicaCounts:
    desired: int = 0
    placed: int = 0
    ready: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"desired": self.desired, "placed": self.placed, "ready": self.ready}


@dataclass(frozen=True)
class ReplicaPlacement:
    """One entry of `status.placements`."""

    replica: int
    node: str
    gpus: int
    variant: str
    power_limit_watts: float
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "rank": self.rank,
            "node": self.node,
            "gpus": self.gpus,
            "variant": self.variant,
            "powerLimitWatts": self.power_limit_watts,
        }


@dataclass(frozen=True)
class PowerStatus:
    cap_watts: float | None = None
    expected_watts: float | None = None
    measured_watts: float | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs = [
            ("capWatts", self.cap_watts),
            ("expectedWatts", self.expected_watts),
            ("measuredWatts", self.measured_watts),
        ]
        return present(pairs)


@dataclass(frozen=True)
class EnergyStatus:
    source: EnergySource
    joules: float | None = None
    kwh: float | None = None
    tokens_per_joule: float | None = None
    tokens_per_joule_source: EnergySource | None = None
    carbon_grams: float | None = None
    accounted_until: str | None = None

    def to_dict(self) -> dict[str, Any]:
        tokens_source = self.tokens_per_joule_source
        pairs = [
            ("joules", self.joules),
            ("kilowattHours", self.kwh),
            ("tokensPerJoule", self.tokens_per_joule),
            ("tokensPerJouleSource", None if tokens_source is None else tokens_source.value),
            ("carbonGrams", self.carbon_grams),
            ("accountedUntil", self.accounted_until),
        ]
        out = present(pairs)
        out["source"] = self.source.value
        return out


@dataclass(frozen=True)
class ProgressStatus:
    """`status.progress` of a job: tokens done (measured or modelled) and what follows."""

    completed_tokens: float
    source: EnergySource
    updated_at: str
    total_tokens: float | None = None
    fraction: float | None = None
    running_seconds: float | None = None
    tokens_per_second: float | None = None
    estimated_completion_time: str | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs = [
            ("completedTokens", self.completed_tokens),
            ("totalTokens", self.total_tokens),
            ("fraction", self.fraction),
            ("source", self.source.value),
            ("runningSeconds", self.running_seconds),
            ("tokensPerSecond", self.tokens_per_second),
            ("updatedAt", self.updated_at),
            ("estimatedCompletionTime", self.estimated_completion_time),
        ]
        return present(pairs)


@dataclass(frozen=True)
class LLMWorkloadStatus:
    phase: Phase | None = None
    observed_generation: int | None = None
    replicas: ReplicaCounts | None = None
    variant: str | None = None
    nodes: str | None = None
    placements: tuple[ReplicaPlacement, ...] = ()
    # The Service an Inference workload's clients use (in its namespace).
    service: str | None = None
    power: PowerStatus | None = None
    energy: EnergyStatus | None = None
    progress: ProgressStatus | None = None
    conditions: tuple[Condition, ...] = ()
    message: str | None = None

    def condition(self, condition_type: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == condition_type), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.phase is not None:
            out["phase"] = self.phase.value
        if self.observed_generation is not None:
            out["observedGeneration"] = self.observed_generation
        if self.replicas is not None:
            out["replicas"] = self.replicas.to_dict()
        if self.variant is not None:
            out["variant"] = self.variant
        if self.nodes is not None:
            out["nodes"] = self.nodes
        if self.placements:
            out["placements"] = [p.to_dict() for p in self.placements]
        if self.service is not None:
            out["service"] = self.service
        if self.power is not None:
            out["power"] = self.power.to_dict()
        if self.energy is not None:
            out["energy"] = self.energy.to_dict()
        if self.progress is not None:
            out["progress"] = self.progress.to_dict()
        if self.conditions:
            out["conditions"] = [c.to_dict() for c in self.conditions]
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass(frozen=True)
class LLMWorkload:
    metadata: ObjectMeta
    spec: LLMWorkloadSpec
    status: LLMWorkloadStatus = field(default_factory=LLMWorkloadStatus)

    @property
    def key(self) -> str:
        """`namespace/name`: how the optimizer names this workload."""
        return self.metadata.key

    def to_dict(self) -> dict[str, Any]:
        return object_to_dict(KIND, self.metadata, self.spec.to_dict(), self.status.to_dict())


# -- reading ---------------------------------------------------------------------------------------


def parse_llmworkload(obj: JsonObject) -> LLMWorkload:
    """Read and validate an LLMWorkload; raises `ApiValidationError` naming the object and field."""
    metadata, top = read_envelope(obj, kind=KIND, namespaced=True)
    spec = _read_spec(top.section("spec"))
    if spec.gpu.nodes_per_replica > 1 and not SPANNING_NAME.fullmatch(metadata.name):
        raise ApiValidationError(
            KIND,
            metadata.key,
            "spec.gpu.nodesPerReplica",
            f"a replica that spans nodes needs metadata.name to be a DNS label of at most "
            f"{MAX_SPANNING_NAME_LENGTH} characters (a-z, 0-9, '-', starting with a letter): its "
            f"pods' hostnames and headless Services are named after it; got {metadata.name!r}",
        )
    status_fields = top.optional_section("status")
    status = LLMWorkloadStatus() if status_fields is None else _read_status(status_fields)
    top.finish()
    return LLMWorkload(metadata=metadata, spec=spec, status=status)


def _read_spec(spec: Fields) -> LLMWorkloadSpec:
    workload_type = WorkloadType(spec.string("type", max_length=16, enum=tuple(WorkloadType)))

    model_fields = spec.section("model")
    model = ModelRef(
        name=model_fields.string("name", max_length=253, min_length=1),
        parameters_billions=model_fields.number(
            "parametersBillions", minimum=0, maximum=10000, exclusive_minimum=True
        ),
    )
    model_fields.finish()

    gpu_fields = spec.section("gpu")
    gpu = GpuRequest(
        count=gpu_fields.integer("count", minimum=1, maximum=MAX_GPUS_PER_REPLICA),
        min_memory=gpu_fields.optional_memory_quantity("minMemory", maximum_gib=MAX_MEMORY_GIB),
        products=gpu_fields.strings(
            "products", max_items=16, max_length=63, min_length=1, unique=True
        ),
        nodes_per_replica=gpu_fields.optional_integer(
            "nodesPerReplica", minimum=1, maximum=MAX_NODES_PER_REPLICA
        )
        or 1,
    )
    gpu_fields.finish()

    replicas = spec.optional_integer("replicas", minimum=1, maximum=MAX_REPLICAS)
    min_replicas = spec.optional_integer("minReplicas", minimum=1, maximum=MAX_REPLICAS)
    max_replicas = spec.optional_integer("maxReplicas", minimum=1, maximum=MAX_REPLICAS)
    if workload_type is not WorkloadType.INFERENCE and (
        min_replicas is not None or max_replicas is not None
    ):
        raise spec.error(
            "minReplicas",
            "spec.minReplicas and spec.maxReplicas apply only to type Inference; use "
            "spec.replicas (the gang size) for Training, FineTuning and BatchInference",
        )
    if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
        raise spec.error("minReplicas", "must be less than or equal to spec.maxReplicas")
    if replicas is not None and min_replicas is not None and replicas < min_replicas:
        raise spec.error("replicas", "must be greater than or equal to spec.minReplicas")
    if replicas is not None and max_replicas is not None and replicas > max_replicas:
        raise spec.error("replicas", "must be less than or equal to spec.maxReplicas")

    variants = _read_variants(spec)
    min_quality = spec.number("minQuality", minimum=0, maximum=1, default=0.0)
    if not any(v.quality >= min_quality for v in variants):
        raise spec.error(
            "minQuality",
            "excludes every entry of spec.variants; lower spec.minQuality or add a variant "
            "with a higher quality",
        )

    slo_fields = spec.optional_section("slo")
    if slo_fields is None and workload_type is WorkloadType.INFERENCE:
        raise spec.error("slo", "is required for type Inference (spec.slo.tokensPerSecond)")
    slo = Slo() if slo_fields is None else _read_slo(slo_fields, workload_type)

    progress_query = None
    progress_fields = spec.optional_section("progress")
    if progress_fields is not None:
        if workload_type is WorkloadType.INFERENCE:
            raise spec.error("progress", "applies only to Training, FineTuning and BatchInference")
        progress_query = progress_fields.string("prometheusQuery", max_length=4096, min_length=1)
        progress_fields.finish()

    energy_fields = spec.optional_section("energy")
    energy = EnergyPreference()
    if energy_fields is not None:
        energy = EnergyPreference(
            policy=EnergyPolicy(
                energy_fields.string(
                    "policy", max_length=16, enum=tuple(EnergyPolicy), default="Balanced"
                )
            ),
            max_power_watts_per_gpu=energy_fields.optional_number(
                "maxPowerWattsPerGPU", minimum=0, maximum=2000, exclusive_minimum=True
            ),
        )
        energy_fields.finish()
    move_to_save_energy = False
    disruption_fields = spec.optional_section("disruption")
    if disruption_fields is not None:
        move_to_save_energy = bool(disruption_fields.optional_boolean("moveToSaveEnergy"))
        disruption_fields.finish()

    result = LLMWorkloadSpec(
        type=workload_type,
        model=model,
        gpu=gpu,
        slo=slo,
        template=_read_template(spec),
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        variants=variants,
        min_quality=min_quality,
        priority=spec.integer(
            "priority", minimum=PRIORITY_RANGE[0], maximum=PRIORITY_RANGE[1], default=0
        ),
        preemptible=spec.optional_boolean("preemptible"),
        energy=energy,
        progress_query=progress_query,
        move_to_save_energy=move_to_save_energy,
    )
    spec.finish()
    return result


def _read_variants(spec: Fields) -> tuple[VariantSpec, ...]:
    items = spec.objects("variants", max_items=MAX_VARIANTS, min_items=1)
    if items is None:
        return DEFAULT_VARIANTS
    spec.unique_by("variants", items, lambda item: item.data.get("name"))
    variants = []
    for item in items:
        variants.append(
            VariantSpec(
                name=item.string(
                    "name", max_length=63, min_length=1, pattern=r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                ),
                precision=Precision(item.string("precision", max_length=8, enum=tuple(Precision))),
                min_memory=item.optional_memory_quantity("minMemory", maximum_gib=MAX_MEMORY_GIB),
                relative_throughput=item.number(
                    "relativeThroughput", minimum=0, maximum=10, exclusive_minimum=True, default=1.0
                ),
                quality=item.number("quality", minimum=0, maximum=1, default=1.0),
            )
        )
        item.finish()
    return tuple(variants)


def _read_slo(slo: Fields, workload_type: WorkloadType) -> Slo:
    total_work = None
    work_fields = slo.optional_section("totalWork")
    if work_fields is not None:
        total_work = TotalWork(
            tokens=work_fields.optional_number(
                "tokens", minimum=0, maximum=1e18, exclusive_minimum=True
            ),
            steps=work_fields.optional_integer("steps", minimum=1, maximum=10**12),
            tokens_per_step=work_fields.optional_number(
                "tokensPerStep", minimum=0, maximum=1e12, exclusive_minimum=True
            ),
            gpu_hours=work_fields.optional_number(
                "gpuHours", minimum=0, maximum=1e9, exclusive_minimum=True
            ),
        )
        work_fields.finish()
        units = [total_work.tokens, total_work.steps, total_work.gpu_hours]
        if sum(unit is not None for unit in units) != 1:
            raise slo.error("totalWork", "must set exactly one of tokens, steps, gpuHours")
        if (total_work.steps is None) != (total_work.tokens_per_step is None):
            raise work_fields.error(
                "tokensPerStep", "is required with steps and allowed only with steps"
            )
    result = Slo(
        tokens_per_second=slo.optional_number(
            "tokensPerSecond", minimum=0, maximum=1e9, exclusive_minimum=True
        ),
        total_work=total_work,
        deadline=read_time(slo, "deadline"),
    )
    slo.finish()
    if workload_type is WorkloadType.INFERENCE:
        if result.tokens_per_second is None:
            raise slo.error("tokensPerSecond", "is required for type Inference")
        if result.total_work is not None or result.deadline is not None:
            raise slo.error(
                "totalWork" if result.total_work is not None else "deadline",
                "spec.slo.totalWork and spec.slo.deadline apply only to Training, FineTuning "
                "and BatchInference; an Inference service sets spec.slo.tokensPerSecond",
            )
    else:
        if result.deadline is not None and result.total_work is None:
            raise slo.error(
                "deadline",
                "needs spec.slo.totalWork (the work to finish by then); without totalWork a job "
                "runs best effort at its energy policy's level",
            )
        if result.tokens_per_second is not None:
            raise slo.error(
                "tokensPerSecond", "spec.slo.tokensPerSecond applies only to type Inference"
            )
    return result


# Levels of objects and lists `spec.template` may nest. A PodTemplateSpec needs about 11 (e.g.
# spec.volumes[].ephemeral.volumeClaimTemplate.spec.selector.matchExpressions[].values[]); the API
# server accepts 10,000 under the schema's free-form parts, and anything that deep only costs the
# operator stack and time. Deeper templates are refused (InvalidSpec), never copied into pods.
MAX_TEMPLATE_DEPTH = 32

# PodSpec fields that choose a node: the plan does (a nodeSelector on kubernetes.io/hostname).
_PLACEMENT_FIELDS = (
    ("nodeName", "the plan chooses the node and kube-scheduler binds the pod there"),
    ("nodeSelector", "the plan chooses the node (wattsched sets the nodeSelector)"),
)


def _read_template(spec: Fields) -> dict[str, Any]:
    depth = nesting_depth(spec.raw("template"), limit=MAX_TEMPLATE_DEPTH)
    if depth > MAX_TEMPLATE_DEPTH:
        raise spec.error(
            "template",
            f"nests more than {MAX_TEMPLATE_DEPTH} levels of objects and lists (a pod template "
            "needs about 11); flatten it",
        )
    template = spec.section("template")
    pod_spec = template.section("spec")
    containers = pod_spec.objects("containers", max_items=32, min_items=1)
    if containers is None:
        raise pod_spec.error("containers", "is required (at least one container)")
    for container in containers:
        container.string("name", max_length=63, min_length=1)
    for name, why in _PLACEMENT_FIELDS:
        if pod_spec.raw(name) is not None:
            raise pod_spec.error(
                name, f"must not be set: {why}; steer placement with spec.gpu.products"
            )
    affinity = pod_spec.optional_section("affinity")
    if affinity is not None and affinity.raw("nodeAffinity") is not None:
        raise affinity.error(
            "nodeAffinity",
            "must not be set: the plan chooses the node; steer placement with spec.gpu.products",
        )
    # The first container gets the plan's GPU request (any it asks for is replaced); a GPU asked
    # for by any other container would be held by the pod without being counted by the plan.
    gpu_holders = [(f"{pod_spec.field('containers')}[{i}]", c) for i, c in enumerate(containers)]
    init_containers = pod_spec.objects("initContainers", max_items=32) or []
    gpu_holders += [
        (f"{pod_spec.field('initContainers')}[{i}]", c) for i, c in enumerate(init_containers)
    ]
    for path, container in gpu_holders[1:]:
        resources = container.data.get("resources")
        for section in ("requests", "limits"):
            amounts = resources.get(section) if isinstance(resources, Mapping) else None
            if isinstance(amounts, Mapping) and GPU_RESOURCE in amounts:
                raise ApiValidationError(
                    spec.kind,
                    spec.name,
                    f'{path}.resources.{section}["{GPU_RESOURCE}"]',
                    "must not be set: wattsched requests the plan's GPUs on the first container "
                    "only (other and init containers use none)",
                )
    metadata = template.optional_section("metadata")
    template.finish()
    del metadata  # preserved as written: the API server keeps unknown fields here
    return dict(template.data)


def _read_status(status: Fields) -> LLMWorkloadStatus:
    phase_text = status.optional_string("phase", max_length=16, enum=tuple(Phase))
    replicas = None
    replica_fields = status.optional_section("replicas")
    if replica_fields is not None:
        replicas = ReplicaCounts(
            desired=replica_fields.integer("desired", minimum=0, maximum=2**31, default=0),
            placed=replica_fields.integer("placed", minimum=0, maximum=2**31, default=0),
            ready=replica_fields.integer("ready", minimum=0, maximum=2**31, default=0),
        )
        replica_fields.finish()
    placements = []
    items = status.objects("placements", max_items=MAX_REPLICAS) or []
    status.unique_by(
        "placements", items, lambda item: (item.data.get("replica"), item.data.get("rank", 0))
    )
    for item in items:
        placements.append(
            ReplicaPlacement(
                rank=item.integer("rank", minimum=0, maximum=MAX_NODES_PER_REPLICA - 1, default=0),
                replica=item.integer("replica", minimum=0, maximum=2**31),
                node=item.string("node", max_length=253),
                gpus=item.integer("gpus", minimum=1, maximum=MAX_GPUS_PER_REPLICA),
                variant=item.string("variant", max_length=63),
                power_limit_watts=item.number("powerLimitWatts", minimum=0, maximum=1e9),
            )
        )
        item.finish()
    power = None
    power_fields = status.optional_section("power")
    if power_fields is not None:
        power = PowerStatus(
            cap_watts=power_fields.optional_number("capWatts", minimum=0, maximum=1e12),
            expected_watts=power_fields.optional_number("expectedWatts", minimum=0, maximum=1e12),
            measured_watts=power_fields.optional_number("measuredWatts", minimum=0, maximum=1e12),
        )
        power_fields.finish()
    energy = None
    energy_fields = status.optional_section("energy")
    if energy_fields is not None:
        tokens_source = energy_fields.optional_string(
            "tokensPerJouleSource",
            max_length=16,
            enum=(EnergySource.MEASURED, EnergySource.MODELLED),
        )
        energy = EnergyStatus(
            source=EnergySource(
                energy_fields.string("source", max_length=16, enum=tuple(EnergySource))
            ),
            joules=energy_fields.optional_number("joules", minimum=0, maximum=1e30),
            kwh=energy_fields.optional_number("kilowattHours", minimum=0, maximum=1e30),
            tokens_per_joule=energy_fields.optional_number(
                "tokensPerJoule", minimum=0, maximum=1e30
            ),
            tokens_per_joule_source=None if tokens_source is None else EnergySource(tokens_source),
            carbon_grams=energy_fields.optional_number("carbonGrams", minimum=0, maximum=1e30),
            accounted_until=read_time(energy_fields, "accountedUntil"),
        )
        energy_fields.finish()
    progress = None
    progress_fields = status.optional_section("progress")
    if progress_fields is not None:
        updated_at = read_time(progress_fields, "updatedAt")
        if updated_at is None:
            raise progress_fields.error("updatedAt", "is required")
        progress = ProgressStatus(
            completed_tokens=progress_fields.number("completedTokens", minimum=0, maximum=1e30),
            source=EnergySource(
                progress_fields.string(
                    "source", max_length=16, enum=(EnergySource.MEASURED, EnergySource.MODELLED)
                )
            ),
            updated_at=updated_at,
            total_tokens=progress_fields.optional_number("totalTokens", minimum=0, maximum=1e30),
            fraction=progress_fields.optional_number("fraction", minimum=0, maximum=1),
            running_seconds=progress_fields.optional_number(
                "runningSeconds", minimum=0, maximum=1e12
            ),
            tokens_per_second=progress_fields.optional_number(
                "tokensPerSecond", minimum=0, maximum=1e15
            ),
            estimated_completion_time=read_time(progress_fields, "estimatedCompletionTime"),
        )
        progress_fields.finish()
    result = LLMWorkloadStatus(
        phase=None if phase_text is None else Phase(phase_text),
        observed_generation=status.optional_integer(
            "observedGeneration", minimum=0, maximum=2**63 - 1
        ),
        replicas=replicas,
        variant=status.optional_string("variant", max_length=1024),
        nodes=status.optional_string("nodes", max_length=32768),
        placements=tuple(placements),
        service=status.optional_string("service", max_length=63),
        power=power,
        energy=energy,
        progress=progress,
        conditions=read_conditions(status),
        message=status.optional_string("message", max_length=32768),
    )
    status.finish()
    return result
