"""The typed API models read every example, apply the CRD schema's defaults and reject what the
schema rejects, naming the field. The CRD YAML is read here and is the reference."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from wattsched_api import (
    ApiValidationError,
    parse_energybudget,
    parse_llmworkload,
    parse_nodepowerprofile,
)
from wattsched_api.llmworkload import EnergyPolicy, WorkloadType
from wattsched_api.meta import Condition, ConditionStatus, set_condition
from wattsched_api.nodepowerprofile import Backend

if TYPE_CHECKING:
    from tests.api.conftest import Example, InvalidCase

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "LLMWorkload": parse_llmworkload,
    "EnergyBudget": parse_energybudget,
    "NodePowerProfile": parse_nodepowerprofile,
}


def crd_schema(kind: str) -> dict[str, Any]:
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"no CRD for {kind} in {CRD_DIR}")


def apply_schema_defaults(value: Any, schema: dict[str, Any], path: str, applied: set[str]) -> Any:
    """Structural-schema defaulting as the API server does it: missing properties with a `default`
    get it (recursively, defaults inside defaults too). Records the defaulted paths in `applied`."""
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
                applied.add(f"{path}.{name}")
            if name in value:
                value[name] = apply_schema_defaults(value[name], child, f"{path}.{name}", applied)
    if isinstance(value, list) and "items" in schema:
        return [
            apply_schema_defaults(item, schema["items"], f"{path}[]", applied) for item in value
        ]
    return value


def schema_default_paths(schema: dict[str, Any], path: str = "") -> set[str]:
    found: set[str] = set()
    for name, child in (schema.get("properties") or {}).items():
        if "default" in child:
            found.add(f"{path}.{name}")
        found |= schema_default_paths(child, f"{path}.{name}")
    if "items" in schema:
        found |= schema_default_paths(schema["items"], f"{path}[]")
    return found


MINIMAL_OBJECTS: list[dict[str, Any]] = [
    {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "tiny", "namespace": "team-a"},
        "spec": {
            "type": "Inference",
            "model": {"name": "m", "parametersBillions": 1},
            "gpu": {"count": 1},
            "slo": {"tokensPerSecond": 10},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    },
    {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "tiny-job", "namespace": "team-a"},
        "spec": {
            "type": "Training",
            "model": {"name": "m", "parametersBillions": 1},
            "gpu": {"count": 2},
            "variants": [{"name": "fp8", "precision": "fp8"}],
            "energy": {"maxPowerWattsPerGPU": 400},
            "slo": {"totalWork": {"gpuHours": 3}},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
        # A placement written without a rank (before replicas could span nodes) reads as rank 0.
        "status": {
            "placements": [
                {"replica": 0, "node": "n", "gpus": 2, "variant": "fp8", "powerLimitWatts": 300}
            ]
        },
    },
    {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "tiny"},
        "spec": {"powerCapWatts": 1000, "energy": {"kilowattHours": 10}},
    },
    {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": "n"},
        "spec": {"nodeName": "n"},
    },
]


def test_every_wattsched_manifest_under_examples_and_offline_is_an_example(
    example_manifests: dict[str, dict[str, Any]],
) -> None:
    """Subdirectories included: a manifest no test applies could drift from the API unnoticed."""
    repo = Path(__file__).resolve().parents[2]
    examples = repo / "examples"
    paths = [(path, path.relative_to(examples)) for path in examples.glob("**/*.y*ml")]
    paths += [(path, path.relative_to(repo)) for path in repo.glob("offline/**/*.y*ml")]
    manifests = {
        relative.as_posix()
        for path, relative in paths
        if "apiVersion: wattsched.io/" in (text := path.read_text())
        and "kind: List" not in text  # `wattsched plan` snapshots
    }
    sources = {source.split("#")[0] for source in example_manifests}
    assert "offline/simulation-budget.yaml" in manifests
    assert manifests <= sources


def test_every_example_round_trips_through_its_model(example: Example) -> None:
    parse = PARSERS[example.manifest["kind"]]
    model = parse(example.manifest)
    assert parse(model.to_dict()) == model
    expected = apply_schema_defaults(
        copy.deepcopy(example.manifest), crd_schema(example.manifest["kind"]), "", set()
    )
    if model.metadata.namespace is not None:  # examples are applied with `kubectl -n`
        expected["metadata"].setdefault("namespace", "default")
    assert model.to_dict() == expected


@pytest.mark.parametrize(
    "minimal", MINIMAL_OBJECTS, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}"
)
def test_model_applies_the_same_defaults_as_the_crd_schema(minimal: dict[str, Any]) -> None:
    applied: set[str] = set()
    expected = apply_schema_defaults(
        copy.deepcopy(minimal), crd_schema(minimal["kind"]), "", applied
    )
    assert PARSERS[minimal["kind"]](minimal).to_dict() == expected


def test_the_minimal_objects_exercise_every_default_in_the_crds() -> None:
    applied: set[str] = set()
    wanted: set[str] = set()
    for kind in PARSERS:
        wanted |= {f"{kind}{path}" for path in schema_default_paths(crd_schema(kind))}
    for minimal in MINIMAL_OBJECTS:
        found: set[str] = set()
        apply_schema_defaults(copy.deepcopy(minimal), crd_schema(minimal["kind"]), "", found)
        applied |= {f"{minimal['kind']}{path}" for path in found}
    assert wanted, "the CRDs declare defaults"
    assert applied == wanted


def test_invalid_manifest_is_rejected_naming_the_field(invalid_case: InvalidCase) -> None:
    parse = PARSERS[invalid_case.manifest["kind"]]
    with pytest.raises(ApiValidationError) as caught:
        parse(invalid_case.manifest)
    assert invalid_case.field in str(caught.value)
    assert invalid_case.manifest["kind"] in str(caught.value)


def inference(**spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(MINIMAL_OBJECTS[0])
    manifest["spec"].update(spec)
    return manifest


def job(workload_type: str, **spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(MINIMAL_OBJECTS[1])
    manifest["spec"]["type"] = workload_type
    manifest["spec"].update(spec)
    return manifest


def test_error_names_kind_namespace_name_and_field() -> None:
    with pytest.raises(ApiValidationError) as caught:
        parse_llmworkload(inference(gpu={"count": 99}))
    assert str(caught.value) == (
        "LLMWorkload team-a/tiny: spec.gpu.count: must be between 1 and 64, got 99"
    )
    assert (caught.value.kind, caught.value.name, caught.value.field) == (
        "LLMWorkload",
        "team-a/tiny",
        "spec.gpu.count",
    )


def test_batch_inference_is_preemptible_by_default_and_others_are_not() -> None:
    batch = parse_llmworkload(job("BatchInference"))
    training = parse_llmworkload(job("Training"))
    assert batch.spec.effective_preemptible is True
    assert training.spec.effective_preemptible is False
    assert (
        parse_llmworkload(job("BatchInference", preemptible=False)).spec.effective_preemptible
        is False
    )


def test_inference_replica_range_defaults_from_replicas_and_min_replicas() -> None:
    fixed = parse_llmworkload(inference(replicas=3)).spec
    ranged = parse_llmworkload(inference(minReplicas=2)).spec
    open_top = parse_llmworkload(inference(maxReplicas=5)).spec
    assert (fixed.effective_min_replicas, fixed.effective_max_replicas) == (3, 3)
    assert (ranged.effective_min_replicas, ranged.effective_max_replicas) == (2, 2)
    assert (open_top.effective_min_replicas, open_top.effective_max_replicas) == (1, 5)


def test_gang_size_is_replicas_defaulting_to_one() -> None:
    assert parse_llmworkload(job("Training")).spec.effective_min_replicas == 1
    spec = parse_llmworkload(job("FineTuning", replicas=4)).spec
    assert (spec.effective_min_replicas, spec.effective_max_replicas, spec.is_gang) == (4, 4, True)


def test_variant_without_memory_needs_the_workloads_memory_per_gpu() -> None:
    spec = parse_llmworkload(
        inference(
            gpu={"count": 1, "minMemory": "40Gi"},
            variants=[
                {"name": "bf16", "precision": "bf16"},
                {"name": "int4", "precision": "int4", "minMemory": "12Gi"},
            ],
        )
    ).spec
    assert [spec.variant_min_memory_gib(v) for v in spec.variants] == [40.0, 12.0]


@pytest.mark.parametrize(
    ("quantity", "gib"), [("80Gi", 80.0), ("40960Mi", 40.0), ("1Ti", 1024.0), ("0.5Gi", 0.5)]
)
def test_memory_per_gpu_is_a_quantity_read_in_gib(quantity: str, gib: float) -> None:
    spec = parse_llmworkload(inference(gpu={"count": 1, "minMemory": quantity})).spec
    assert spec.gpu.min_memory_gib == gib
    assert spec.gpu.to_dict()["minMemory"] == quantity  # written back as the user wrote it


def test_memory_per_gpu_in_decimal_units_is_converted_to_gib() -> None:
    spec = parse_llmworkload(inference(gpu={"count": 1, "minMemory": "80G"})).spec
    assert spec.gpu.min_memory_gib == pytest.approx(80e9 / 2**30)


def test_defaults_are_typed_enums() -> None:
    workload = parse_llmworkload(MINIMAL_OBJECTS[0])
    assert workload.spec.type is WorkloadType.INFERENCE
    assert workload.spec.energy.policy is EnergyPolicy.BALANCED
    assert [v.name for v in workload.spec.variants] == ["bf16"]
    assert workload.key == "team-a/tiny"


def test_unknown_field_is_rejected_with_its_path() -> None:
    manifest = inference()
    manifest["spec"]["slo"]["tokensPerSecnd"] = 5
    with pytest.raises(ApiValidationError, match=r"spec\.slo\.tokensPerSecnd: unknown field"):
        parse_llmworkload(manifest)


def test_template_keeps_fields_the_schema_does_not_list() -> None:
    template = {
        "metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"name": "c", "image": "i", "args": ["--x"]}], "hostIPC": False},
    }
    assert parse_llmworkload(inference(template=template)).spec.template == template


def test_workload_without_namespace_is_in_default() -> None:
    manifest = inference()
    del manifest["metadata"]["namespace"]
    assert parse_llmworkload(manifest).key == "default/tiny"


def test_wrong_kind_or_version_is_rejected() -> None:
    manifest = inference()
    manifest["apiVersion"] = "wattsched.io/v1"
    with pytest.raises(ApiValidationError, match=r"apiVersion: must be wattsched\.io/v1alpha1"):
        parse_llmworkload(manifest)
    with pytest.raises(ApiValidationError, match="kind: must be EnergyBudget"):
        parse_energybudget(manifest)


WORKLOAD_STATUS: dict[str, Any] = {
    "phase": "Running",
    "observedGeneration": 2,
    "replicas": {"desired": 2, "placed": 2, "ready": 1},
    "variant": "fp8",
    "nodes": "gpu-h100-00,gpu-h100-01",
    "placements": [
        {
            "replica": 0,
            "rank": 0,
            "node": "gpu-h100-00",
            "gpus": 4,
            "variant": "fp8",
            "powerLimitWatts": 560,
        },
        {
            "replica": 1,
            "rank": 0,
            "node": "gpu-h100-01",
            "gpus": 4,
            "variant": "fp8",
            "powerLimitWatts": 560,
        },
    ],
    "service": "chat",
    "power": {"capWatts": 4480, "expectedWatts": 3900},
    "energy": {
        "joules": 3.6e6,
        "kilowattHours": 1.0,
        "tokensPerJoule": 2.5,
        "tokensPerJouleSource": "measured",
        "carbonGrams": 400.0,
        "accountedUntil": "2026-11-25T01:00:00Z",
        "source": "mixed",
    },
    "conditions": [
        {
            "type": "Placed",
            "status": "True",
            "reason": "Placed",
            "message": "2 replicas on 2 nodes",
            "lastTransitionTime": "2026-11-25T01:00:00Z",
            "observedGeneration": 2,
        }
    ],
    "message": "placed",
}


def test_workload_status_round_trips() -> None:
    manifest = inference(minReplicas=1, maxReplicas=2)
    manifest["status"] = WORKLOAD_STATUS
    workload = parse_llmworkload(manifest)
    assert workload.to_dict()["status"] == WORKLOAD_STATUS
    assert workload.status.condition("Placed") is not None


def test_energy_figures_must_say_where_they_come_from() -> None:
    manifest = inference()
    manifest["status"] = {"energy": {"joules": 10}}
    with pytest.raises(ApiValidationError, match=r"status\.energy\.source: is required"):
        parse_llmworkload(manifest)


def test_budget_selector_matches_labels_and_empty_selects_everything() -> None:
    budget = parse_energybudget(
        {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "EnergyBudget",
            "metadata": {"name": "b"},
            "spec": {
                "powerCapWatts": 100,
                "nodeSelector": {
                    "matchLabels": {"rack": "a"},
                    "matchExpressions": [
                        {"key": "zone", "operator": "NotIn", "values": ["z9"]},
                        {"key": "gpu", "operator": "Exists"},
                    ],
                },
            },
        }
    )
    assert budget.spec.selects({"rack": "a", "gpu": "x"})
    assert budget.spec.selects({"rack": "a", "gpu": "x", "zone": "z1"})
    assert not budget.spec.selects({"rack": "a", "gpu": "x", "zone": "z9"})
    assert not budget.spec.selects({"rack": "b", "gpu": "x"})
    assert not budget.spec.selects({"rack": "a"})
    everything = parse_energybudget(MINIMAL_OBJECTS[2])
    assert everything.spec.selects({})
    assert everything.spec.selects({"any": "label"})


PROFILE_STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "gpuCount": 1,
    "targetWatts": 500,
    "appliedWatts": 500,
    "drawWatts": 312.5,
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-0",
            "product": "NVIDIA H100 80GB HBM3",
            "pod": "team/chat-0",
            "holder": "wattsched",
            "minWatts": 200,
            "maxWatts": 700,
            "defaultWatts": 700,
            "targetWatts": 500,
            "appliedWatts": 500,
            "drawWatts": 312.5,
            "energyJoules": 1.0e7,
        }
    ],
    "deviceMapping": {"source": "LastKnown", "readTime": "2026-11-25T01:59:00Z", "message": "x"},
    "agent": {"ready": True, "heartbeatTime": "2026-11-25T02:00:00Z", "backend": "simulated"},
    "conditions": [
        {
            "type": "Applied",
            "status": "True",
            "reason": "LimitsApplied",
            "message": "ok",
            "lastTransitionTime": "2026-11-25T02:00:00Z",
        }
    ],
}


def profile(generation: int, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": "n", "generation": generation},
        "spec": {
            "nodeName": "n",
            "idlePowerLimitWatts": 200,
            "pods": [{"namespace": "team", "name": "chat-0", "powerLimitWatts": 500}],
        },
        "status": status,
    }


def test_profile_status_round_trips_and_confirms_the_current_generation() -> None:
    model = parse_nodepowerprofile(profile(3, PROFILE_STATUS))
    assert model.to_dict()["status"] == PROFILE_STATUS
    assert model.status.agent is not None
    assert model.status.agent.backend is Backend.SIMULATED
    assert model.limits_confirmed
    assert model.spec.pod_limit_watts("team", "chat-0") == 500.0
    assert model.spec.pod_limit_watts("team", "chat-1") is None
    assert model.spec.idle_power_limit_watts == 200.0


def test_profile_limits_are_unconfirmed_for_a_newer_generation_or_a_failed_apply() -> None:
    assert not parse_nodepowerprofile(profile(4, PROFILE_STATUS)).limits_confirmed
    failed = copy.deepcopy(PROFILE_STATUS)
    failed["conditions"][0].update(status="False", reason="NoPermission")
    assert not parse_nodepowerprofile(profile(3, failed)).limits_confirmed
    not_ready = copy.deepcopy(PROFILE_STATUS)
    not_ready["agent"]["ready"] = False
    assert not parse_nodepowerprofile(profile(3, not_ready)).limits_confirmed


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    old = Condition("Placed", ConditionStatus.TRUE, "Placed", "one", "2026-11-25T01:00:00Z")
    same = Condition("Placed", ConditionStatus.TRUE, "Placed", "two", "2026-11-25T02:00:00Z")
    flipped = Condition("Placed", ConditionStatus.FALSE, "Preempted", "x", "2026-11-25T03:00:00Z")
    other = Condition("Ready", ConditionStatus.FALSE, "Pending", "", "2026-11-25T03:00:00Z")
    kept = set_condition((old,), same)
    assert kept == (
        Condition("Placed", ConditionStatus.TRUE, "Placed", "two", "2026-11-25T01:00:00Z"),
    )
    assert set_condition(kept, flipped) == (flipped,)
    assert set_condition(kept, other) == (*kept, other)


def test_budget_status_with_energy_carbon_and_their_sources_round_trips() -> None:
    manifest = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "rack"},
        "spec": {"powerCapWatts": 1000, "energy": {"kilowattHours": 10}},
        "status": {
            "energyUsedKilowattHours": 1.25,
            "energySource": "measured",
            "carbonKg": 0.5,
            "carbonIntensity": {"gramsPerKilowattHour": 400.0, "source": "prometheus"},
            "periodStart": "2026-11-25T00:00:00Z",
            "accountedUntil": "2026-11-25T01:00:00Z",
        },
    }
    budget = parse_energybudget(manifest)
    assert budget.to_dict()["status"] == manifest["status"]
    manifest["status"] = {"carbonIntensity": {"gramsPerKilowattHour": 400.0, "source": "guess"}}
    with pytest.raises(ApiValidationError, match=r"status\.carbonIntensity\.source"):
        parse_energybudget(manifest)


@pytest.mark.parametrize("name", ["9-llama", "llama.v2", "l" * 51])
def test_a_replica_spanning_nodes_needs_a_name_that_can_name_hostnames_and_services(
    name: str,
) -> None:
    manifest = inference()
    manifest["metadata"]["name"] = name
    manifest["spec"]["gpu"] = {"count": 8, "nodesPerReplica": 2}
    with pytest.raises(ApiValidationError, match=r"spec\.gpu\.nodesPerReplica: .*DNS label"):
        parse_llmworkload(manifest)
    manifest["spec"]["gpu"]["nodesPerReplica"] = 1
    assert parse_llmworkload(manifest).spec.gpu.nodes_per_replica == 1
