"""kind-config.yaml uses only fields of kind's v1alpha4 Cluster schema, and its GPU one-liner works.

kind cannot run here (no Docker), so the field sets below are written from kind's Go types
(sigs.k8s.io/kind pkg/apis/config/v1alpha4/types.go: Cluster, Node, Networking). The documented
one-liner that fakes `nvidia.com/gpu` capacity is taken from the file's comments and run against
the sandbox on a throwaway node.

Not for: checking kind's own behaviour.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from tests.conftest import Sandbox

KIND_CONFIG = Path(__file__).resolve().parents[2] / "kind-config.yaml"

CLUSTER_FIELDS = {
    "kind",
    "apiVersion",
    "name",
    "nodes",
    "networking",
    "featureGates",
    "runtimeConfig",
    "kubeadmConfigPatches",
    "kubeadmConfigPatchesJSON6902",
    "containerdConfigPatches",
    "containerdConfigPatchesJSON6902",
}
NODE_FIELDS = {
    "role",
    "image",
    "labels",
    "extraMounts",
    "extraPortMappings",
    "gpus",
    "kubeadmConfigPatches",
    "kubeadmConfigPatchesJSON6902",
}
NETWORKING_FIELDS = {
    "ipFamily",
    "apiServerPort",
    "apiServerAddress",
    "podSubnet",
    "serviceSubnet",
    "disableDefaultCNI",
    "kubeProxyMode",
    "dnsSearch",
}
NODE_ROLES = {"control-plane", "worker"}
GFD_LABELS = {"nvidia.com/gpu.product", "nvidia.com/gpu.memory", "nvidia.com/gpu.count"}


def load_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(KIND_CONFIG.read_text())
    return config


def test_kind_config_is_a_v1alpha4_cluster_with_known_fields_only() -> None:
    config = load_config()
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert set(config) <= CLUSTER_FIELDS, set(config) - CLUSTER_FIELDS
    assert set(config.get("networking", {})) <= NETWORKING_FIELDS
    for position, node in enumerate(config["nodes"]):
        assert set(node) <= NODE_FIELDS, f"nodes[{position}]: {set(node) - NODE_FIELDS}"
        assert node["role"] in NODE_ROLES, f"nodes[{position}].role={node['role']!r}"


def test_kind_config_has_one_control_plane_and_three_gpu_labelled_workers() -> None:
    nodes = load_config()["nodes"]
    assert [node["role"] for node in nodes].count("control-plane") == 1
    workers = [node for node in nodes if node["role"] == "worker"]
    assert len(workers) == 3
    for worker in workers:
        labels = worker["labels"]
        assert set(labels) >= GFD_LABELS
        # kind's Node.Labels is map[string]string: every value must be a YAML string.
        assert all(isinstance(value, str) for value in labels.values()), labels
        assert labels["nvidia.com/gpu.present"] == "true"
        assert labels["nvidia.com/gpu.product"].startswith("NVIDIA-")
        assert int(labels["nvidia.com/gpu.count"]) > 0


def documented_one_liner() -> str:
    match = re.search(
        r"^#\s+(kubectl get nodes -l nvidia\.com/gpu\.present=true .*)$",
        KIND_CONFIG.read_text(),
        re.MULTILINE,
    )
    assert match, "kind-config.yaml must document the GPU-capacity one-liner"
    return match.group(1)


@pytest.mark.cluster
def test_documented_one_liner_gives_gpu_nodes_capacity_from_their_count_label(
    sandbox: Sandbox,
) -> None:
    probe = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "kind-one-liner-probe",
            "labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "2"},
        },
        "spec": {"unschedulable": True},
        # What a kind kubelet registers with: capacity without GPUs.
        "status": {"capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"}},
    }
    sandbox.kubectl("create", "-f", "-", input=json.dumps(probe))
    try:
        patched = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", documented_one_liner()],
            env={**os.environ, "KUBECONFIG": str(sandbox.kubeconfig)},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert patched.returncode == 0, patched.stderr
        node = json.loads(
            sandbox.kubectl("get", "node", "kind-one-liner-probe", "-o", "json").stdout
        )
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
    finally:
        sandbox.kubectl("delete", "node", "kind-one-liner-probe", "--ignore-not-found")
