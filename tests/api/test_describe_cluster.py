"""`kubectl describe` on each wattsched kind reads as words: no field name splits inside a unit.

kubectl describe prints a custom object's field names split at capitals, so a unit abbreviated in a
name splits (`kWh` reads `K Wh`, `GiB` `Gi B`, `MHz` `M Hz`); v1alpha1 spells units out instead.
The examples are applied with statuses like the operator's and the agent's, so every field with a
unit is printed, and each describe is checked for the readable labels and for no one-letter word
in any label.
"""

from __future__ import annotations

import copy
import json
import re
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("crds")]

NOW = "2026-12-05T12:00:00Z"

# A label line of kubectl describe's custom-object printer: capitalised words, then a colon.
LABEL = re.compile(r"^\s*(?:- )?((?:[A-Z][A-Za-z]*)(?: [A-Z][A-Za-z]*)*):(?:\s|$)")
# What the old names printed as, spelled out for the failure message.
KNOWN_SPLITS = re.compile(r" K Wh\b| Gi B\b| Mi B\b| M Hz\b| G Hz\b")


def mangled_labels(described: str) -> list[str]:
    """The label lines with a unit split apart: a one-letter word (`K Wh`, `Gi B`, `M Hz`)."""
    found = []
    for line in described.splitlines():
        match = LABEL.match(line)
        if KNOWN_SPLITS.search(line) or (
            match and any(len(word) == 1 for word in match.group(1).split())
        ):
            found.append(line.strip())
    return found


def workload(example: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(example)
    manifest["spec"]["gpu"]["minMemory"] = "40Gi"  # the example sets it per variant only
    return manifest


WORKLOAD_STATUS = {
    "phase": "Running",
    "power": {"capWatts": 2400, "expectedWatts": 2100, "measuredWatts": 2050.5},
    "energy": {
        "joules": 7.2e6,
        "kilowattHours": 2.0,
        "tokensPerJoule": 3.5,
        "tokensPerJouleSource": "measured",
        "carbonGrams": 700.0,
        "source": "measured",
        "accountedUntil": NOW,
    },
}
BUDGET_STATUS = {
    "nodes": 2,
    "allocatedCapWatts": 8000,
    "energyUsedJoules": 3.6e9,
    "energyUsedKilowattHours": 1000.0,
    "energySource": "measured",
    "carbonGrams": 350000.0,
    "carbonKg": 350.0,
    "carbonIntensity": {"gramsPerKilowattHour": 350.0, "source": "static"},
    "periodStart": NOW,
    "accountedUntil": NOW,
}
PROFILE_STATUS = {
    "gpuCount": 1,
    "targetWatts": 500,
    "appliedWatts": 500,
    "drawWatts": 410.0,
    "lockedClocks": "0=990-1005",
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-00000000-0000-0000-0000-000000000000",
            "product": "NVIDIA H100 80GB HBM3",
            "pod": "team-a/chat-0",
            "holder": "wattsched",
            "minWatts": 200,
            "maxWatts": 700,
            "defaultWatts": 700,
            "targetWatts": 500,
            "appliedWatts": 500,
            "drawWatts": 410.0,
            "energyJoules": 1.2e9,
            "smClockRangeMegahertz": {"min": 990, "max": 1005},
            "smClockMegahertz": 990,
        }
    ],
    "agent": {"ready": True, "heartbeatTime": NOW, "backend": "simulated"},
}

# kind -> (resource, labels the describe must show: proof the unit fields were printed)
EXPECTED_LABELS = {
    "LLMWorkload": ("llmw", ["Min Memory: 40Gi", "Min Memory: 72Gi", "Kilowatt Hours: 2"]),
    "EnergyBudget": (
        "eb",
        [
            "Kilowatt Hours: 3000",
            "Intensity Grams Per Kilowatt Hour: 350",
            "Energy Used Kilowatt Hours: 1000",
            "Grams Per Kilowatt Hour: 350",
        ],
    ),
    "NodePowerProfile": ("npp", ["Sm Clock Range Megahertz:", "Sm Clock Megahertz: 990"]),
}


def objects(example_manifests: dict[str, dict[str, Any]], namespace: str) -> dict[str, Any]:
    """kind -> (manifest, status) for the three kinds; cluster-scoped names carry the namespace."""
    budget = copy.deepcopy(example_manifests["budget-rack.yaml"])
    budget["metadata"]["name"] = f"{namespace}-rack"[:63]
    node = f"{namespace}-node"[:63]
    profile = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": node},
        "spec": {
            "nodeName": node,
            "idlePowerLimitWatts": 200,
            "pods": [
                {
                    "namespace": "team-a",
                    "name": "chat-0",
                    "powerLimitWatts": 500,
                    "smClockRangeMegahertz": {"min": 990, "max": 1005},
                }
            ],
        },
    }
    return {
        "LLMWorkload": (workload(example_manifests["inference-vllm.yaml"]), WORKLOAD_STATUS),
        "EnergyBudget": (budget, BUDGET_STATUS),
        "NodePowerProfile": (profile, PROFILE_STATUS),
    }


@pytest.mark.parametrize("kind", sorted(EXPECTED_LABELS))
def test_kubectl_describe_prints_every_unit_as_words(
    sandbox: Sandbox, namespace: str, example_manifests: dict[str, dict[str, Any]], kind: str
) -> None:
    manifest, status = objects(example_manifests, namespace)[kind]
    resource, expected = EXPECTED_LABELS[kind]
    name = manifest["metadata"]["name"]
    scope = ["-n", namespace] if kind == "LLMWorkload" else []
    sandbox.kubectl("apply", *scope, "-f", "-", input=json.dumps(manifest))
    try:
        sandbox.kubectl(
            "patch",
            resource,
            name,
            *scope,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        described = sandbox.kubectl("describe", resource, name, *scope).stdout
        lines = [" ".join(line.split()) for line in described.splitlines()]
        missing = [label for label in expected if not any(label in line for line in lines)]
        assert missing == [], f"kubectl describe {resource} shows none of {missing}:\n{described}"
        assert mangled_labels(described) == [], described
    finally:
        sandbox.kubectl(
            "delete", resource, name, *scope, "--ignore-not-found", "--wait=false", check=True
        )


def test_the_mangled_label_check_catches_the_old_names() -> None:
    # Names with an abbreviated unit (kWh, GiB, MHz) as kubectl describe splits them.
    old = "  Energy:\n    K Wh:  3000\n  Gpu:\n    Min Memory Gi B:  80\n    Sm Clock M Hz:  990\n"
    assert mangled_labels(old) == ["K Wh:  3000", "Min Memory Gi B:  80", "Sm Clock M Hz:  990"]
    assert mangled_labels("    Energy Used Kilowatt Hours:  1000\n    Min Memory:  80Gi\n") == []
