"""`wattsched plan` on a snapshot with an LLMWorkload whose replica spans nodes
(spec.gpu.nodesPerReplica): placed on whole nodes of one product, or refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_cli.plan import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "offline" / "snapshot.yaml"
NOW = "2026-11-25T02:00:00Z"


def nodes_and_budgets() -> list[dict[str, Any]]:
    """The saved snapshot's GPU nodes (2 H100, 2 A100 of which one is cordoned, an L40S and an
    L4, 8/8/8/8/4/4 GPUs), its budgets and node profiles, without its workloads and pods."""
    items: list[dict[str, Any]] = yaml.safe_load(SNAPSHOT.read_text())["items"]
    return [i for i in items if i["kind"] in {"Node", "EnergyBudget", "NodePowerProfile"}]


def llama_405b(products: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "llama-405b", "namespace": "team-a", "uid": "u1"},
        "spec": {
            "type": "Inference",
            "model": {"name": "meta-llama/Llama-3.1-405B", "parametersBillions": 405},
            "gpu": {"count": 8, "nodesPerReplica": 2, "products": products},
            "slo": {"tokensPerSecond": 50},
            "template": {"spec": {"containers": [{"name": "server", "image": "vllm"}]}},
        },
    }


def plan_of(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, objects: list[dict[str, Any]]
) -> dict[str, Any]:
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert main(["-f", str(path), "-o", "json", "--now", NOW]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def test_plan_places_a_16_gpu_replica_on_two_8_gpu_nodes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*nodes_and_budgets(), llama_405b(["NVIDIA-H100-80GB-HBM3"])]
    plan = plan_of(capsys, tmp_path, objects)
    pods = [p for p in plan["placements"] if p["workload"] == "team-a/llama-405b"]
    assert [(p["replica"], p["rank"], p["gpus"], p["nodesPerReplica"]) for p in pods] == [
        (0, 0, 8, 2),
        (0, 1, 8, 2),
    ]
    assert {p["node"] for p in pods} == {"gpu-h100-00", "gpu-h100-01"}
    assert len({p["powerLimitWatts"] for p in pods}) == 1
    limits = {n["node"]: n["gpuPowerLimitsWatts"] for n in plan["nodes"]}
    assert limits["gpu-h100-00"] == limits["gpu-h100-01"] == [pods[0]["powerLimitWatts"]] * 8
    assert plan["unplaced"] == []


def test_plan_refuses_to_split_a_replica_across_products(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """One H100 node and one schedulable A100 node: 16 GPUs in all, but no two of one product."""
    objects = [
        o
        for o in nodes_and_budgets()
        if o["metadata"]["name"] != "gpu-h100-01" or o["kind"] == "EnergyBudget"
    ]
    objects.append(llama_405b(["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]))
    plan = plan_of(capsys, tmp_path, objects)
    assert [p for p in plan["placements"] if p["workload"] == "team-a/llama-405b"] == []
    (unplaced,) = plan["unplaced"]
    assert unplaced["workload"] == "team-a/llama-405b"
    assert unplaced["reason"] == "Gpus"
    assert "spec.gpu.nodesPerReplica=2" in unplaced["message"]
    assert "never spans products" in unplaced["message"]


def test_the_table_shows_each_pod_rank(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "snapshot.yaml"
    objects = [*nodes_and_budgets(), llama_405b(["NVIDIA-H100-80GB-HBM3"])]
    path.write_text(yaml.safe_dump_all(objects))
    assert main(["-f", str(path), "-o", "table", "--now", NOW]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    mine = [row for row in rows if row and row[0] == "team-a/llama-405b"]
    assert [row[1:3] for row in mine] == [["0", "(0/2)"], ["0", "(1/2)"]]
