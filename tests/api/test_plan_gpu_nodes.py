"""`wattsched plan` on snapshots with real-node situations: GPUs held by other teams' pods, a node
whose allocatable GPUs read 0, GPU products the catalogue does not know, and memory labels."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_cli.plan import main
from wattsched_optimizer.model import use_catalogue

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "offline" / "snapshot.yaml"
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


def test_an_opted_in_cap_on_other_teams_gpus_counts_once_the_agent_applied_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A budget's spec.unmanagedGpus opt-in reaches the node as spec.unmanagedPowerLimitWatts; the
    budget counts the other team's GPUs at what the agent applied: 700 W until it applies 300 W."""
    objects = [*items(), other_teams_pod("gpu-h100-01", 8)]
    named(objects, "EnergyBudget", "rack-a")["spec"]["unmanagedGpus"] = {"powerLimitWatts": 300}
    profile = named(objects, "NodePowerProfile", "gpu-h100-01")
    profile["spec"]["unmanagedPowerLimitWatts"] = 300
    profile["status"]["deviceMapping"] = {"source": "PodResources", "readTime": NOW}

    def held_at(applied: float) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "pod": "ml/trainer",
                "holder": "other",
                "maxWatts": 700,
                "targetWatts": 300,
                "appliedWatts": applied,
            }
            for i in range(8)
        ]

    profile["status"]["gpus"] = held_at(700)  # written, not applied yet
    plan = plan_of(capsys, tmp_path, objects)
    assert budget_entry(plan, "rack-a")["unmanagedWatts"] == 8 * 700.0
    profile["status"]["gpus"] = held_at(300)  # the agent applied the cap
    plan = plan_of(capsys, tmp_path, objects)
    assert node_entry(plan, "gpu-h100-01")["unmanagedWatts"] == 8 * 300.0
    assert budget_entry(plan, "rack-a")["unmanagedWatts"] == 8 * 300.0


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


def test_a_budget_below_what_other_teams_run_at_is_held(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), other_teams_pod("gpu-h100-01", 8)]
    named(objects, "EnergyBudget", "rack-a")["spec"]["powerCapWatts"] = 5000
    plan = plan_of(capsys, tmp_path, objects)
    # The budget is held (issue 12b): its nodes take no work, the rest is planned.
    assert plan["status"] == "Optimal"
    rack_a = budget_entry(plan, "rack-a")
    assert rack_a["unmanagedWatts"] == 5600.0
    assert rack_a["allocatedCapWatts"] > 5000
    assert not {p["node"] for p in plan["placements"]} & {"gpu-h100-00", "gpu-h100-01"}
    assert plan["placements"]  # the rest of the cluster is planned


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


def test_an_l4_labelled_22_5_gib_never_gets_a_24_gib_variant(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # team-b/summaries' only variant needs 24 GiB; the catalogue's L4 has 24 GiB, and without a
    # memory label the plan puts it there.
    unlabelled = plan_of(capsys, tmp_path, items())
    summaries = {p["node"] for p in unlabelled["placements"] if p["workload"] == "team-b/summaries"}
    assert "gpu-l4-00" in summaries
    objects = items()
    named(objects, "Node", "gpu-l4-00")["metadata"]["labels"]["nvidia.com/gpu.memory"] = "23034"
    plan = plan_of(capsys, tmp_path, objects)
    assert not [p for p in plan["placements"] if p["node"] == "gpu-l4-00"]
    assert [p for p in plan["placements"] if p["workload"] == "team-b/summaries"]


def b200_node() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "gpu-b200-00",
            "labels": {
                "kubernetes.io/hostname": "gpu-b200-00",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-B200",
                "nvidia.com/gpu.count": "8",
                "nvidia.com/gpu.memory": "183359",
                "wattsched.io/rack": "rack-c",
            },
        },
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def b200_profile() -> dict[str, Any]:
    """The B200 node's profile as its agent reports it: the NVML power range of each GPU."""
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": "gpu-b200-00", "generation": 1},
        "spec": {"nodeName": "gpu-b200-00", "idlePowerLimitWatts": 400},
        "status": {
            "observedGeneration": 1,
            "gpuCount": 8,
            "gpus": [
                {
                    "index": i,
                    "product": "NVIDIA-B200",
                    "minWatts": 400,
                    "maxWatts": 1000,
                    "defaultWatts": 1000,
                    "appliedWatts": 400,
                }
                for i in range(8)
            ],
            "deviceMapping": {"source": "PodResources", "readTime": NOW},
            "agent": {"ready": True, "heartbeatTime": NOW, "backend": "nvml"},
            "conditions": [
                {
                    "type": "Applied",
                    "status": "True",
                    "reason": "LimitsApplied",
                    "message": "ok",
                    "lastTransitionTime": NOW,
                    "observedGeneration": 1,
                }
            ],
        },
    }


def b200_workload() -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "big", "namespace": "team-c", "uid": "uid-big"},
        "spec": {
            "type": "Inference",
            "model": {"name": "meta-llama/Llama-3.1-405B", "parametersBillions": 405},
            "gpu": {"count": 8, "minMemory": "150Gi", "products": ["NVIDIA-B200"]},
            "slo": {"tokensPerSecond": 100},
            "template": {"spec": {"containers": [{"name": "main", "image": "vllm"}]}},
        },
    }


def test_a_b200_with_its_nvml_range_reported_takes_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = [*items(), b200_node(), b200_profile(), b200_workload()]
    plan = plan_of(capsys, tmp_path, objects)
    [big] = [p for p in plan["placements"] if p["workload"] == "team-c/big"]
    assert big["node"] == "gpu-b200-00"
    assert 400 <= big["powerLimitWatts"] <= 1000  # within the range NVML reported
    assert plan["nodeNotes"] == []
    limits = node_entry(plan, "gpu-b200-00")["gpuPowerLimitsWatts"]
    assert limits == [big["powerLimitWatts"]] * 8


def test_a_b200_without_an_agent_report_takes_nothing_and_the_rest_is_planned(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Until its agent reports, the B200 node counts at 2000 W per GPU (16 kW): give the cluster
    # budget the room for it, so that only the B200 itself is held back.
    baseline = items()
    named(baseline, "EnergyBudget", "cluster")["spec"]["powerCapWatts"] = 40000
    before = plan_of(capsys, tmp_path, baseline)
    plan = plan_of(capsys, tmp_path, [*baseline, b200_node(), b200_workload()])
    assert "team-c/big" not in {p["workload"] for p in plan["placements"]}
    others = {(p["workload"], p["replica"], p["node"]) for p in plan["placements"]}
    assert others == {(p["workload"], p["replica"], p["node"]) for p in before["placements"]}
    [note] = plan["nodeNotes"]
    assert note["node"] == "gpu-b200-00"
    assert "'B200' is not in the catalogue" in note["reason"]
    assert "has not reported the GPUs' power range" in note["reason"]
    # Left out of planning (issue 12b's exclusion), counted in its budgets at 2000 W per GPU.
    assert "gpu-b200-00" not in {n["node"] for n in plan["nodes"]}
    cluster = budget_entry(plan, "cluster")
    assert cluster["allocatedCapWatts"] == pytest.approx(
        budget_entry(before, "cluster")["allocatedCapWatts"] + 16000.0
    )


B200_CATALOGUE = """
sources:
  b200-test: "figures for this test only"
products:
  B200:
    labels: [NVIDIA-B200]
    memory_gib: {value: 179, source: b200-test}
    min_watts: {value: 400, source: b200-test}
    default_watts: {value: 1000, source: b200-test}
    max_watts: {value: 1000, source: b200-test}
    idle_watts: {value: 120, source: b200-test}
    relative_speed:
      Inference: {value: 2.0, source: b200-test}
      BatchInference: {value: 2.0, source: b200-test}
      Training: {value: 2.0, source: b200-test}
      FineTuning: {value: 2.0, source: b200-test}
"""


@pytest.fixture
def shipped_catalogue_after() -> Iterator[None]:
    yield
    use_catalogue(None)


def test_a_catalogue_file_makes_the_b200_a_known_product(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shipped_catalogue_after: None
) -> None:
    catalogue_file = tmp_path / "catalogue.yaml"
    catalogue_file.write_text(B200_CATALOGUE)
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump_all([*items(), b200_node(), b200_workload()]))
    args = ["-f", str(snapshot), "-o", "json", "--now", NOW]
    assert main([*args, "--catalogue-file", str(catalogue_file)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["nodeNotes"] == []
    [big] = [p for p in plan["placements"] if p["workload"] == "team-c/big"]
    assert big["node"] == "gpu-b200-00"
    assert 400 <= big["powerLimitWatts"] <= 1000


def test_a_malformed_catalogue_file_is_one_line_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, shipped_catalogue_after: None
) -> None:
    catalogue_file = tmp_path / "catalogue.yaml"
    unsourced = B200_CATALOGUE.replace("source: b200-test}\n    min", "source: x}\n    min")
    catalogue_file.write_text(unsourced)
    assert main(["-f", str(SNAPSHOT), "--catalogue-file", str(catalogue_file)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"--catalogue-file {catalogue_file}" in error
    assert "'x' is not in sources" in error
