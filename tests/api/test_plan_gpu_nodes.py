"""`wattsched plan` on snapshots with real-node situations: GPUs held by other teams' pods, a node
whose allocatable GPUs read 0, GPU products the catalogue does not know, and memory labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_operator.plan_command import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "examples" / "snapshot.yaml"
NOW = "2026-11-25T02:00:00Z"


def items() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(SNAPSHOT.read_text())["items"]
    return loaded


def plan_of(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, objects: list[dict[str, Any]]
) -> dict[str, Any]:
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert main(["-f", str(path), "-o", "json", "--now", NOW]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def other_teams_pod(node: str, gpus: int) -> dict[str, Any]:
    """A running pod wattsched did not create (no wattsched.io/workload label)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainer", "namespace": "ml", "labels": {"team": "ml"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "main",
                    "image": "trainer",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
        "status": {"phase": "Running"},
    }


def node_entry(plan: dict[str, Any], node: str) -> dict[str, Any]:
    return next(entry for entry in plan["nodes"] if entry["node"] == node)


def budget_entry(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in plan["budgets"] if entry["name"] == name)


def test_another_teams_8_gpu_pod_takes_the_node_out_and_counts_at_maximum(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), other_teams_pod("gpu-h100-01", 8)]
    plan = plan_of(capsys, tmp_path, objects)
    assert "gpu-h100-01" not in {p["node"] for p in plan["placements"]}
    entry = node_entry(plan, "gpu-h100-01")
    assert entry["gpuPowerLimitsWatts"] == []
    assert (entry["unmanagedGpus"], entry["unmanagedWatts"]) == (8, 8 * 700.0)  # H100 maximum
    rack_a = budget_entry(plan, "rack-a")
    assert rack_a["unmanagedWatts"] == 5600.0
    ours = sum(sum(node_entry(plan, n)["gpuPowerLimitsWatts"]) for n in ("gpu-h100-00",))
    assert rack_a["allocatedCapWatts"] == pytest.approx(ours + 5600.0)
    assert rack_a["allocatedCapWatts"] <= rack_a["capWatts"]


def test_other_teams_gpus_count_at_the_limit_the_agent_reads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), other_teams_pod("gpu-h100-01", 8)]
    profile = named(objects, "NodePowerProfile", "gpu-h100-01")
    profile["status"]["deviceMapping"] = {"source": "PodResources", "readTime": NOW}
    profile["status"]["gpus"] = [
        {"index": i, "pod": "ml/trainer", "holder": "other", "maxWatts": 700, "appliedWatts": 450}
        for i in range(8)
    ]
    plan = plan_of(capsys, tmp_path, objects)
    assert "gpu-h100-01" not in {p["node"] for p in plan["placements"]}
    entry = node_entry(plan, "gpu-h100-01")
    assert (entry["unmanagedGpus"], entry["unmanagedWatts"]) == (8, 8 * 450.0)
    assert budget_entry(plan, "rack-a")["unmanagedWatts"] == 3600.0


def test_a_partly_held_node_offers_only_its_free_gpus(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), other_teams_pod("gpu-h100-01", 3)]
    plan = plan_of(capsys, tmp_path, objects)
    entry = node_entry(plan, "gpu-h100-01")
    assert len(entry["gpuPowerLimitsWatts"]) == 5
    assert (entry["unmanagedGpus"], entry["unmanagedWatts"]) == (3, 2100.0)
    used = sum(p["gpus"] for p in plan["placements"] if p["node"] == "gpu-h100-01")
    assert used <= 5


def test_a_budget_below_what_other_teams_run_at_says_so_in_every_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), other_teams_pod("gpu-h100-01", 8)]
    named(objects, "EnergyBudget", "rack-a")["spec"]["powerCapWatts"] = 5000
    plan = plan_of(capsys, tmp_path, objects)
    assert plan["status"] == "Infeasible"
    reason = next(u["reason"] for u in plan["unplaced"] if u["workload"] == "team-a/chat")
    assert "5600 W of it on GPUs held by pods wattsched did not create" in reason
    assert budget_entry(plan, "rack-a")["unmanagedWatts"] == 5600.0


def zero_allocatable(objects: list[dict[str, Any]], node: str) -> None:
    named(objects, "Node", node)["status"]["allocatable"]["nvidia.com/gpu"] = "0"


def test_a_node_whose_allocatable_reads_0_stays_in_its_budgets_at_maximum_until_confirmed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    zero_allocatable(objects, "gpu-h100-01")
    profile = named(objects, "NodePowerProfile", "gpu-h100-01")
    profile["metadata"]["generation"] = 4  # new limits written, not yet confirmed by the agent
    plan = plan_of(capsys, tmp_path, objects)
    assert "gpu-h100-01" not in {p["node"] for p in plan["placements"]}
    assert node_entry(plan, "gpu-h100-01")["gpuPowerLimitsWatts"] == [700.0] * 8
    rack_a = budget_entry(plan, "rack-a")
    ours = sum(node_entry(plan, "gpu-h100-00")["gpuPowerLimitsWatts"])
    assert rack_a["allocatedCapWatts"] == pytest.approx(ours + 8 * 700.0)


def test_a_node_whose_allocatable_reads_0_counts_at_confirmed_limits_and_takes_no_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    zero_allocatable(objects, "gpu-h100-01")
    plan = plan_of(capsys, tmp_path, objects)
    assert "gpu-h100-01" not in {p["node"] for p in plan["placements"]}
    assert node_entry(plan, "gpu-h100-01")["gpuPowerLimitsWatts"] == [200.0] * 8  # H100 minimum


def test_a_node_with_0_allocatable_and_no_agent_report_is_no_gpu_node(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [o for o in items() if o["metadata"]["name"] != "gpu-h100-01" or o["kind"] == "Node"]
    zero_allocatable(objects, "gpu-h100-01")
    plan = plan_of(capsys, tmp_path, objects)
    assert "gpu-h100-01" not in {entry["node"] for entry in plan["nodes"]}
