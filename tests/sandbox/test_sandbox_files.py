"""The sandbox's inputs without a cluster: the GPU node file, its scaler, and the endpoint list.

Not for: starting the sandbox (test_control_plane.py does that).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES_FILE = REPO_ROOT / "sandbox" / "nodes.yaml"
EXPECTED_MIX = {
    "NVIDIA-H100-80GB-HBM3": (8, 8),
    "NVIDIA-A100-SXM4-80GB": (4, 8),
    "NVIDIA-L40S": (2, 4),
    "NVIDIA-L4": (2, 4),
}  # product label: (nodes, GPUs per node)


def example_nodes() -> list[dict[str, Any]]:
    return [node for node in yaml.safe_load_all(NODES_FILE.read_text()) if node]


def run_script(script: str, *args: str, sandbox_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "sandbox" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SANDBOX_DIR": str(sandbox_dir)},
        timeout=60,
    )


def test_example_nodes_have_the_agreed_gpu_product_mix() -> None:
    nodes = example_nodes()
    products = Counter(node["metadata"]["labels"]["nvidia.com/gpu.product"] for node in nodes)
    assert products == {product: count for product, (count, _) in EXPECTED_MIX.items()}
    for node in nodes:
        labels = node["metadata"]["labels"]
        gpus_per_node = EXPECTED_MIX[labels["nvidia.com/gpu.product"]][1]
        assert labels["nvidia.com/gpu.count"] == str(gpus_per_node)
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(gpus_per_node)
        assert node["status"]["capacity"]["nvidia.com/gpu"] == str(gpus_per_node)


def test_example_nodes_carry_gfd_labels_kwok_annotation_and_a_rack() -> None:
    for node in example_nodes():
        metadata = node["metadata"]
        labels = metadata["labels"]
        assert labels["kubernetes.io/hostname"] == metadata["name"]
        assert labels["nvidia.com/gpu.present"] == "true"
        assert int(labels["nvidia.com/gpu.memory"]) > 20_000  # MiB, as GFD writes it
        assert labels["wattsched.io/rack"].startswith("rack-")
        assert metadata["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_scaling_keeps_the_product_mix_and_gives_unique_hostnames(tmp_path: Path) -> None:
    result = run_script("nodes.py", str(NODES_FILE), "200", sandbox_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    nodes = list(yaml.safe_load_all(result.stdout))
    names = [node["metadata"]["name"] for node in nodes]
    assert len(names) == 200
    assert len(set(names)) == 200
    assert all(
        node["metadata"]["labels"]["kubernetes.io/hostname"] == node["metadata"]["name"]
        for node in nodes
    )
    products = Counter(node["metadata"]["labels"]["nvidia.com/gpu.product"] for node in nodes)
    # 200 = 12 full copies of the 16-node mix + the first 8 nodes (H100s) of a 13th.
    assert products == {
        "NVIDIA-H100-80GB-HBM3": 12 * 8 + 8,
        "NVIDIA-A100-SXM4-80GB": 12 * 4,
        "NVIDIA-L40S": 12 * 2,
        "NVIDIA-L4": 12 * 2,
    }


def test_scaling_to_zero_nodes_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    result = run_script("nodes.py", str(NODES_FILE), "0", sandbox_dir=tmp_path)
    assert result.returncode == 1
    assert "node_count=0 must be at least 1" in result.stderr


def test_endpoints_can_be_added_read_and_removed(tmp_path: Path) -> None:
    assert (
        run_script(
            "endpoints.py", "add", "prometheus", "http://127.0.0.1:9999", sandbox_dir=tmp_path
        ).returncode
        == 0
    )
    assert (
        run_script(
            "endpoints.py",
            "add",
            "agent/gpu-h100-00",
            "http://127.0.0.1:9998/metrics",
            sandbox_dir=tmp_path,
        ).returncode
        == 0
    )
    document = yaml.safe_load((tmp_path / "endpoints.yaml").read_text())
    assert document["endpoints"] == {
        "prometheus": "http://127.0.0.1:9999",
        "agent/gpu-h100-00": "http://127.0.0.1:9998/metrics",
    }
    got = run_script("endpoints.py", "get", "prometheus", sandbox_dir=tmp_path)
    assert got.stdout.strip() == "http://127.0.0.1:9999"
    assert run_script("endpoints.py", "remove", "prometheus", sandbox_dir=tmp_path).returncode == 0
    missing = run_script("endpoints.py", "get", "prometheus", sandbox_dir=tmp_path)
    assert missing.returncode == 1
    assert "no endpoint 'prometheus'" in missing.stderr


def test_an_endpoint_that_is_not_a_url_is_refused(tmp_path: Path) -> None:
    result = run_script("endpoints.py", "add", "prometheus", "localhost:9090", sandbox_dir=tmp_path)
    assert result.returncode == 1
    assert "endpoint prometheus: url 'localhost:9090' must be a URL" in result.stderr
    assert not (tmp_path / "endpoints.yaml").exists()


def test_stopping_a_sandbox_that_never_ran_is_a_no_op(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "sandbox" / "down.sh")],
        env={**os.environ, "SANDBOX_DIR": str(tmp_path / "never-started")},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0
    assert "nothing running" in result.stderr


def test_starting_without_built_binaries_fails_with_the_command_to_build_them(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [str(REPO_ROOT / "sandbox" / "up.sh")],
        env={
            **os.environ,
            "SANDBOX_DIR": str(tmp_path / "sandbox"),
            "WATTSCHED_CACHE": str(tmp_path / "empty-cache"),
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1
    assert "missing" in result.stderr
    assert "make binaries" in result.stderr
