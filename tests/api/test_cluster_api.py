"""The CRDs on a real API server (the sandbox): every example applies and is stored exactly as the
typed model reads it (same defaults), `kubectl explain` and `kubectl get -o wide` show what the CRDs
declare, every invalid manifest of the shared table is rejected with a message naming the field,
immutable fields stay put, and status is written only through the status subresource."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from wattsched_api import parse_energybudget, parse_llmworkload, parse_nodepowerprofile

if TYPE_CHECKING:
    from tests.api.conftest import Example, InvalidCase
    from tests.conftest import Sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("crds")]

PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "LLMWorkload": parse_llmworkload,
    "EnergyBudget": parse_energybudget,
    "NodePowerProfile": parse_nodepowerprofile,
}
CLUSTER_SCOPED = {"EnergyBudget", "NodePowerProfile"}


def apply(sandbox: Sandbox, manifest: dict[str, Any], namespace: str, *, check: bool = True) -> Any:
    return sandbox.kubectl(
        "apply",
        "--server-side",
        "--field-manager=api-tests",
        "-n",
        namespace,
        "-f",
        "-",
        "-o",
        "json",
        input=json.dumps(manifest),
        check=check,
    )


def unique_cluster_name(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    """Cluster-scoped objects get the test namespace's name, so tests never collide."""
    renamed = copy.deepcopy(manifest)
    if renamed["kind"] in CLUSTER_SCOPED:
        # At most 63 characters, ending alphanumeric (an RFC 1123 name).
        renamed["metadata"]["name"] = f"{namespace}-{renamed['metadata']['name']}"[:63].rstrip("-")
        if renamed["kind"] == "NodePowerProfile":
            renamed["spec"]["nodeName"] = renamed["metadata"]["name"]
    return renamed


def delete(sandbox: Sandbox, manifest: dict[str, Any], namespace: str) -> None:
    sandbox.kubectl(
        "delete",
        "-n",
        namespace,
        "-f",
        "-",
        "--ignore-not-found",
        "--wait=false",
        input=json.dumps(manifest),
    )


def test_the_three_crds_are_established(crds: list[str]) -> None:
    assert sorted(crds) == [
        "energybudgets.wattsched.io",
        "llmworkloads.wattsched.io",
        "nodepowerprofiles.wattsched.io",
    ]


def test_example_applies_and_is_stored_as_the_model_reads_it(
    sandbox: Sandbox, namespace: str, example: Example
) -> None:
    manifest = unique_cluster_name(example.manifest, namespace)
    stored = json.loads(apply(sandbox, manifest, namespace).stdout)
    try:
        model = PARSERS[manifest["kind"]](manifest)
        assert stored["spec"] == model.to_dict()["spec"]
        assert PARSERS[manifest["kind"]](stored).spec == model.spec
    finally:
        delete(sandbox, manifest, namespace)


def test_kubectl_explain_shows_the_slo_field_descriptions(
    sandbox: Sandbox, crds: list[str]
) -> None:
    out = sandbox.kubectl("explain", "llmworkload.spec.slo").stdout
    assert "Service-level objective" in out
    for field, words in {
        "tokensPerSecond": "in tokens per second",
        "totalWork": "exactly one unit",
        "deadline": "RFC 3339",
    }.items():
        assert field in out
        assert words in " ".join(out.split())
    power = sandbox.kubectl("explain", "energybudget.spec.powerCapWatts").stdout
    assert "in watts" in " ".join(power.split())


def get_wide(sandbox: Sandbox, resource: str, name: str, namespace: str) -> tuple[list[str], str]:
    out = sandbox.kubectl("get", resource, name, "-n", namespace, "-o", "wide").stdout
    header, row = out.splitlines()[:2]
    return header.split(), row


def test_get_wide_shows_the_llmworkload_columns_and_status_values(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]]
) -> None:
    manifest = example_manifests["inference-vllm.yaml"]
    apply(sandbox, manifest, namespace)
    status = {
        "phase": "Running",
        "replicas": {"desired": 2, "placed": 2, "ready": 2},
        "variant": "fp8",
        "nodes": "gpu-h100-00,gpu-h100-01",
        "power": {"capWatts": 4480},
        "energy": {
            "joules": 7.2e6,
            "kilowattHours": 2,
            "tokensPerJoule": 3.5,
            "source": "measured",
        },
        "conditions": [
            {
                "type": "Admitted",
                "status": "True",
                "reason": "Accepted",
                "message": "the operator read the spec",
                "lastTransitionTime": "2026-12-01T00:00:00Z",
            },
            {
                "type": "Schedulable",
                "status": "False",
                "reason": "Budget",
                "message": "EnergyBudget rack-a has 0 W of headroom",
                "lastTransitionTime": "2026-12-01T00:00:00Z",
            },
        ],
    }
    sandbox.kubectl(
        "patch",
        "llmw",
        manifest["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    header, row = get_wide(sandbox, "llmw", manifest["metadata"]["name"], namespace)
    assert header == [
        "NAME", "TYPE", "PHASE", "REASON", "GPUS/REPLICA", "REPLICAS", "VARIANT", "POWER(W)",
        "AGE", "NODE(S)", "TOKENS/J", "ENERGY(KWH)", "DONE", "NODES/REPLICA",
    ]  # fmt: skip
    # The REASON column is the Schedulable condition's reason, not the first condition's.
    assert row.split()[1:5] == ["Inference", "Running", "Budget", "4"]
    for value in ("fp8", "4480", "gpu-h100-00,gpu-h100-01", "3.5"):
        assert value in row.split()


def test_get_wide_shows_the_budget_and_profile_columns(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]]
) -> None:
    budget = unique_cluster_name(example_manifests["budget-rack.yaml"], namespace)
    apply(sandbox, budget, namespace)
    try:
        header, _ = get_wide(sandbox, "eb", budget["metadata"]["name"], namespace)
        assert header == [
            "NAME", "CAP(W)", "ALLOCATED(W)", "MEASURED(W)", "HEADROOM(W)", "AGE",
            "NODES", "ENERGY(KWH)", "CARBON(KG)", "LEFT(KWH)", "PROJECTED(KWH)", "SOURCE",
        ]  # fmt: skip
    finally:
        delete(sandbox, budget, namespace)
    name = f"{namespace}-npp"[:63]
    profile = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": name},
        "spec": {"nodeName": name, "idlePowerLimitWatts": 500},
    }
    apply(sandbox, profile, namespace)
    try:
        header, _ = get_wide(sandbox, "npp", name, namespace)
        assert header == [
            "NAME", "NODE", "GPUS", "TARGET(W)", "APPLIED(W)", "DRAW(W)", "READY", "AGE",
            "BACKEND", "CLOCKS(MHZ)", "HEARTBEAT",
        ]  # fmt: skip
        everything = sandbox.kubectl("get", "wattsched", "-A", "-o", "name").stdout
        assert f"nodepowerprofile.wattsched.io/{name}" in everything
    finally:
        delete(sandbox, profile, namespace)


def test_invalid_manifest_is_rejected_with_a_message_naming_the_field(
    sandbox: Sandbox, namespace: str, invalid_case: InvalidCase
) -> None:
    result = apply(sandbox, invalid_case.manifest, namespace, check=False)
    assert result.returncode != 0, f"accepted: {invalid_case.name}"
    assert invalid_case.field in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "BatchInference"}, "spec.type"),
        ({"gpu": {"count": 4}}, "spec.gpu.count"),
        ({"gpu": {"count": 8, "nodesPerReplica": 2}}, "spec.gpu.nodesPerReplica"),
    ],
)
def test_fields_that_would_orphan_pods_cannot_change(
    sandbox: Sandbox,
    namespace: str,
    example_manifests: dict[str, dict[str, Any]],
    change: dict[str, Any],
    field: str,
) -> None:
    manifest = example_manifests["training-deadline.yaml"]
    apply(sandbox, manifest, namespace)
    changed = copy.deepcopy(manifest)
    changed["spec"].update(change)
    result = apply(sandbox, changed, namespace, check=False)
    assert result.returncode != 0
    assert f"{field} is immutable" in result.stderr
    allowed = copy.deepcopy(manifest)
    allowed["spec"]["priority"] = 7
    assert json.loads(apply(sandbox, allowed, namespace).stdout)["spec"]["priority"] == 7


@pytest.mark.parametrize("name", ["9-llama", "llama.v2", "l" * 51])
def test_a_replica_spanning_nodes_needs_a_name_that_can_name_hostnames_and_services(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]], name: str
) -> None:
    manifest = copy.deepcopy(example_manifests["training-deadline.yaml"])
    manifest["metadata"]["name"] = name
    manifest["spec"]["gpu"]["nodesPerReplica"] = 2
    result = apply(sandbox, manifest, namespace, check=False)
    assert result.returncode != 0, f"accepted {name}"
    assert "spec.gpu.nodesPerReplica" in result.stderr, result.stderr
    manifest["spec"]["gpu"]["nodesPerReplica"] = 1
    assert apply(sandbox, manifest, namespace, check=False).returncode == 0


# kind -> (example, resource, a status field, the value written through the main resource, the
# value written through the status subresource).
STATUS_CASES = {
    "LLMWorkload": ("finetune.yaml", "llmw", "phase", "Failed", "Running"),
    "EnergyBudget": ("budget-rack.yaml", "eb", "allocatedCapWatts", 19000, 12000),
    "NodePowerProfile": (None, "npp", "targetWatts", 5600, 2400),
}


@pytest.mark.parametrize("kind", sorted(STATUS_CASES))
def test_status_is_written_only_through_the_status_subresource(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]], kind: str
) -> None:
    example, resource, field, ignored, written = STATUS_CASES[kind]
    if example is None:  # no NodePowerProfile example outside the snapshot: the agent creates them
        base = {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": "status-test"},
            "spec": {"nodeName": "status-test"},
        }
    else:
        base = example_manifests[example]
    manifest = unique_cluster_name(base, namespace)
    name = manifest["metadata"]["name"]
    manifest["status"] = {field: ignored}
    created = json.loads(apply(sandbox, manifest, namespace).stdout)
    try:
        assert "status" not in created

        def patch(value: object, *subresource: str) -> None:
            sandbox.kubectl(
                "patch",
                resource,
                name,
                "-n",
                namespace,
                *subresource,
                "--type=merge",
                "-p",
                json.dumps({"status": {field: value}}),
            )

        patch(ignored)
        patch(written, "--subresource=status")
        patch(ignored)
        stored = json.loads(
            sandbox.kubectl("get", resource, name, "-n", namespace, "-o", "json").stdout
        )
        assert stored["status"] == {field: written}
    finally:
        delete(sandbox, manifest, namespace)


def test_status_subresource_validates_status_too(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]]
) -> None:
    manifest = example_manifests["finetune.yaml"]
    apply(sandbox, manifest, namespace)
    result = sandbox.kubectl(
        "patch",
        "llmw",
        manifest["metadata"]["name"],
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"energy": {"joules": 5}}}),
        check=False,
    )
    assert result.returncode != 0
    assert "status.energy.source" in result.stderr
