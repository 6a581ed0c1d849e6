"""`wattsched plan -f SNAPSHOT.yaml [-o json|table]` prints the plan in the documented JSON shape,
and a bad snapshot gives one error line naming the object and field, exit code 2, no traceback."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_operator.plan_command import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "examples" / "snapshot.yaml"
NOW = "2026-11-25T02:00:00Z"


def run_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["-f", str(path), "-o", "json", "--now", NOW]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def snapshot_items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = yaml.safe_load(SNAPSHOT.read_text())["items"]
    return items


def write_snapshot(tmp_path: Path, items: list[dict[str, Any]]) -> Path:
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump_all(items))
    return path


def test_json_output_has_the_documented_shape(capsys: pytest.CaptureFixture[str]) -> None:
    plan = run_json(capsys, SNAPSHOT)
    assert plan["status"] in {"Optimal", "Feasible", "Infeasible", "TimeLimit"}
    for key in ("objective", "bound", "gap", "solveSeconds"):
        assert isinstance(plan[key], float), key
    assert plan["placements"]
    for placement in plan["placements"]:
        assert {"workload", "replica", "node", "gpus", "variant", "powerLimitWatts"} <= set(
            placement
        )
        assert "/" in placement["workload"]
        assert isinstance(placement["replica"], int)
        assert isinstance(placement["gpus"], int)
        assert isinstance(placement["powerLimitWatts"], float)
    for budget in plan["budgets"]:
        assert set(budget) == {
            "name",
            "capWatts",
            "allocatedCapWatts",
            "unmanagedWatts",
            "expectedWatts",
        }
        assert budget["allocatedCapWatts"] <= budget["capWatts"]
    for unplaced in plan["unplaced"]:
        assert {"workload", "reason"} <= set(unplaced)


def test_every_gpu_node_is_listed_with_one_limit_per_allocatable_gpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = run_json(capsys, SNAPSHOT)
    gpus = {
        item["metadata"]["name"]: int(item["status"]["allocatable"]["nvidia.com/gpu"])
        for item in snapshot_items()
        if item["kind"] == "Node"
    }
    listed = {entry["node"]: entry["gpuPowerLimitsWatts"] for entry in plan["nodes"]}
    assert {name: len(limits) for name, limits in listed.items()} == gpus


def test_workload_asking_for_an_absent_product_is_unplaced_with_a_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = run_json(capsys, SNAPSHOT)
    unplaced = {entry["workload"]: entry["reason"] for entry in plan["unplaced"]}
    assert "H200" in unplaced["team-b/h200-only"]
    assert "team-b/h200-only" not in {p["workload"] for p in plan["placements"]}


def test_table_output_lists_placements_and_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-f", str(SNAPSHOT), "--now", NOW]) == 0
    out = capsys.readouterr().out
    assert out.startswith("status ")
    assert "WORKLOAD" in out
    assert "team-a/chat" in out
    assert "BUDGET" in out
    assert "rack-a" in out
    assert "UNPLACED" in out


def test_snapshot_is_read_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(SNAPSHOT.read_text()))
    assert main(["-f", "-", "-o", "json", "--now", NOW]) == 0
    assert json.loads(capsys.readouterr().out)["placements"]


def first(items: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(item for item in items if item["kind"] == kind)


def malformed_memory_label(items: list[dict[str, Any]]) -> str:
    first(items, "Node")["metadata"]["labels"]["nvidia.com/gpu.memory"] = "80 GiB"
    return "Node gpu-h100-00: metadata.labels[\"nvidia.com/gpu.memory\"]: '80 GiB' is not a whole"


def malformed_quantity(items: list[dict[str, Any]]) -> str:
    first(items, "Node")["status"]["allocatable"]["nvidia.com/gpu"] = "eight"
    return "Node gpu-h100-00: status.allocatable[\"nvidia.com/gpu\"]: 'eight' is not a whole number"


def missing_field(items: list[dict[str, Any]]) -> str:
    del first(items, "LLMWorkload")["spec"]["gpu"]
    return "LLMWorkload team-a/chat: spec.gpu: is required"


def bad_budget(items: list[dict[str, Any]]) -> str:
    first(items, "EnergyBudget")["spec"]["powerCapWatts"] = "lots"
    return "EnergyBudget cluster: spec.powerCapWatts: must be a number, got 'lots'"


def bad_profile(items: list[dict[str, Any]]) -> str:
    first(items, "NodePowerProfile")["status"]["agent"]["backend"] = "dcgm"
    return "NodePowerProfile gpu-h100-00: status.agent.backend: must be one of nvml, simulated"


def bad_pod(items: list[dict[str, Any]]) -> str:
    first(items, "Pod")["metadata"]["labels"]["wattsched.io/replica"] = "first"
    return 'Pod team-a/chat-0: metadata.labels["wattsched.io/replica"]'


def no_nodes(items: list[dict[str, Any]]) -> str:
    items[:] = [item for item in items if item["kind"] != "Node"]
    return "the snapshot has no Node objects"


def twice(kind: str, label: str, field: str) -> Any:
    """A breaker that appends a second copy of the first object of `kind`."""

    def duplicate(items: list[dict[str, Any]]) -> str:
        items.append(copy.deepcopy(first(items, kind)))
        return f"{kind} {label}: {field}: the snapshot holds two objects with this name"

    duplicate.__name__ = f"duplicate_{kind}"
    return duplicate


@pytest.mark.parametrize(
    "break_snapshot",
    [
        malformed_memory_label,
        malformed_quantity,
        missing_field,
        bad_budget,
        bad_profile,
        bad_pod,
        no_nodes,
        twice("Node", "gpu-h100-00", "metadata.name"),
        twice("LLMWorkload", "team-a/chat", "metadata.namespace and metadata.name"),
        twice("EnergyBudget", "cluster", "metadata.name"),
        twice("NodePowerProfile", "gpu-h100-00", "metadata.name"),
    ],
)
def test_bad_snapshot_exits_2_with_one_line_naming_object_and_field(
    break_snapshot: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = snapshot_items()
    expected = break_snapshot(items)
    assert main(["-f", str(write_snapshot(tmp_path, items)), "--now", NOW]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("wattsched plan: ")
    assert expected in captured.err
    assert captured.err.count("\n") == 1


def test_unreadable_or_invalid_yaml_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-f", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Node\n  metadata: [\n")
    assert main(["-f", str(broken)]) == 2
    assert "broken.yaml: not valid YAML" in capsys.readouterr().err


def test_bad_now_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-f", str(SNAPSHOT), "--now", "yesterday"]) == 2
    assert "--now: 'yesterday' is not an RFC 3339 date-time" in capsys.readouterr().err


def test_console_script_prints_no_traceback_for_a_bad_snapshot(tmp_path: Path) -> None:
    items = snapshot_items()
    expected = missing_field(items)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wattsched_operator.cli",
            "plan",
            "-f",
            str(write_snapshot(tmp_path, items)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_deadlines_are_measured_from_now(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = [
        item
        for item in snapshot_items()
        if item["kind"] == "Node" or item["metadata"]["name"] == "pretrain"
    ]
    path = write_snapshot(tmp_path, items)
    early = run_json(capsys, path)
    assert main(["-f", str(path), "-o", "json", "--now", "2026-12-04T23:59:00Z"]) == 0
    late = json.loads(capsys.readouterr().out)
    assert [p["workload"] for p in early["placements"]] == ["team-b/pretrain"]
    assert late["placements"] == []
    assert [u["workload"] for u in late["unplaced"]] == ["team-b/pretrain"]
    assert "deadline" in late["unplaced"][0]["reason"]


def test_a_decode_bound_efficiency_service_gets_a_locked_clock_range_on_its_gpus(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = snapshot_items()
    for item in items:
        if item["kind"] == "LLMWorkload" and item["metadata"]["name"] == "chat":
            item["spec"]["energy"]["policy"] = "Efficiency"
    plan = run_json(capsys, write_snapshot(tmp_path, items))
    chat = [p for p in plan["placements"] if p["workload"] == "team-a/chat"]
    assert chat
    ranges = {json.dumps(p["smClockRangeMHz"]) for p in chat}
    assert "null" not in ranges
    for placement in chat:
        clock = placement["smClockRangeMHz"]
        assert 0 < clock["min"] <= clock["max"]
    nodes = {entry["node"]: entry for entry in plan["nodes"]}
    for node, entry in nodes.items():
        assert len(entry["gpuSmClockRangesMHz"]) == len(entry["gpuPowerLimitsWatts"])
        locked = [r for r in entry["gpuSmClockRangesMHz"] if r is not None]
        on_node = sum(p["gpus"] for p in chat if p["node"] == node)
        assert len(locked) == on_node
    training = [p for p in plan["placements"] if p["workload"] == "team-b/pretrain"]
    assert [p["smClockRangeMHz"] for p in training] == [None]


def test_performance_services_get_no_clock_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = snapshot_items()
    for item in items:
        if item["kind"] == "LLMWorkload":
            item["spec"].setdefault("energy", {})["policy"] = "Performance"
    plan = run_json(capsys, write_snapshot(tmp_path, items))
    assert all(p["smClockRangeMHz"] is None for p in plan["placements"])
    assert all(r is None for entry in plan["nodes"] for r in entry["gpuSmClockRangesMHz"])
