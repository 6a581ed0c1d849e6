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

from wattsched_cli.plan import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "offline" / "snapshot.yaml"
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
        assert set(unplaced) - {"budget"} == {"workload", "reason", "message"}


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
    unplaced = {entry["workload"]: entry for entry in plan["unplaced"]}
    assert unplaced["team-b/h200-only"]["reason"] == "Products"
    assert "H200" in unplaced["team-b/h200-only"]["message"]
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


def unknown_product(items: list[dict[str, Any]]) -> str:
    first(items, "Node")["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-Z9000"
    return "Node gpu-h100-00: GPU product 'Z9000' is not in the catalogue"


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


@pytest.mark.parametrize(
    "break_node", [unknown_product, malformed_quantity, malformed_memory_label]
)
def test_a_node_the_plan_cannot_use_is_left_out_and_named_on_stderr(
    break_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = snapshot_items()
    expected = break_node(items)
    assert main(["-f", str(write_snapshot(tmp_path, items)), "--now", NOW, "-o", "json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("wattsched plan: node gpu-h100-00 takes no work: ")
    assert expected in captured.err
    plan = json.loads(captured.out)
    assert plan["placements"]
    assert all(p["node"] != "gpu-h100-00" for p in plan["placements"])


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
    expected = bad_budget(items)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wattsched_cli.main",
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
    # The same word as the Schedulable condition's reason (one spelling per reason).
    assert late["unplaced"][0]["reason"] == "Deadline"
    assert "left before spec.slo.deadline" in late["unplaced"][0]["message"]


def test_a_passed_deadline_has_the_conditions_spelling_in_the_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """One spelling per reason: the JSON says what the Schedulable condition says."""
    items = [
        item
        for item in snapshot_items()
        if item["kind"] == "Node" or item["metadata"]["name"] == "pretrain"
    ]
    path = write_snapshot(tmp_path, items)
    assert main(["-f", str(path), "-o", "json", "--now", "2027-01-01T00:00:00Z"]) == 0
    (unplaced,) = json.loads(capsys.readouterr().out)["unplaced"]
    assert unplaced["reason"] == "DeadlinePassed"
    assert "deadline_passed" not in json.dumps(unplaced)
    assert "spec.slo.deadline has passed" in unplaced["message"]


# -- invalid workloads, --set and --diff -----------------------------------------------------------


def test_an_invalid_workload_is_skipped_and_listed_while_the_others_are_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = snapshot_items()
    expected = missing_field(items)  # team-a/chat loses spec.gpu
    path = write_snapshot(tmp_path, items)
    plan = run_json(capsys, path)
    assert [error for error in plan["skipped"] if expected in error] == plan["skipped"]
    assert len(plan["skipped"]) == 1
    planned = {p["workload"] for p in plan["placements"]}
    assert "team-a/chat" not in planned
    assert "team-b/pretrain" in planned
    assert main(["-f", str(path), "--now", NOW]) == 0
    table = capsys.readouterr().out
    assert "SKIPPED (invalid; left out of the plan" in table
    assert expected in table


def test_invalid_workloads_from_stdin_are_skipped_not_fatal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    items = snapshot_items()
    missing_field(items)
    kubectl_list = {"apiVersion": "v1", "kind": "List", "items": items}
    monkeypatch.setattr(sys, "stdin", io.StringIO(yaml.safe_dump(kubectl_list)))
    assert main(["-f", "-", "-o", "json", "--now", NOW]) == 0
    assert len(json.loads(capsys.readouterr().out)["skipped"]) == 1


def budget(plan: dict[str, Any], name: str) -> dict[str, Any]:
    return next(b for b in plan["budgets"] if b["name"] == name)


def test_set_lowers_a_budget_cap_for_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    before = run_json(capsys, SNAPSHOT)
    assert budget(before, "rack-a")["allocatedCapWatts"] > 5000
    argv = ["-f", str(SNAPSHOT), "-o", "json", "--now", NOW]
    assert main([*argv, "--set", "energybudget/rack-a.spec.powerCapWatts=5000"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert budget(after, "rack-a")["capWatts"] == 5000
    assert budget(after, "rack-a")["allocatedCapWatts"] <= 5000


def test_set_changes_a_workload_and_a_node_label(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-f", str(SNAPSHOT), "-o", "json", "--now", NOW]
    assert main([*argv, "--set", "llmw/team-b/summaries.spec.replicas=2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len([p for p in plan["placements"] if p["workload"] == "team-b/summaries"]) == 2
    # A node taken out of scheduling: nothing is placed on it.
    assert main([*argv, "--set", "node/gpu-h100-01.spec.unschedulable=true"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert all(p["node"] != "gpu-h100-01" for p in plan["placements"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eb/rack-a.spec.powerCapWatts", "expected KIND/NAME.FIELD=VALUE"),
        ("pod/x.spec.a=1", "unknown kind 'pod'; allowed: energybudget (eb), llmworkload (llmw)"),
        ("eb/rack-z.spec.powerCapWatts=1", "no EnergyBudget named 'rack-z'; there are: cluster"),
        ("llmw/chat.spec.priority=1", "an LLMWorkload is named NAMESPACE/NAME, got 'chat'"),
        ("eb/rack-a.status.headroomWatts=1", "the field starts with .spec or .metadata"),
        ("eb/rack-a.metadata.name=x", 'only metadata.labels["KEY"] may be set'),
        (
            "eb/rack-a.spec.powerCapWatts=lots",
            "EnergyBudget rack-a: spec.powerCapWatts: must be a number, got 'lots'",
        ),
        ("llmw/team-a/chat.spec.variants[7].quality=1", "index [7] is out of range (2 item(s))"),
        ("eb/rack-a.spec.powerCapWatts.x=3", "'x' is inside a value that is not a map"),
        ("llmw/team-a/chat.spec.energy.policy=Fast", "LLMWorkload team-a/chat: spec.energy.policy"),
    ],
)
def test_a_bad_set_exits_2_with_one_line_naming_it(
    override: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-f", str(SNAPSHOT), "--now", NOW, "--set", override]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"wattsched plan: --set {override}: ")
    assert expected in captured.err
    assert captured.err.count("\n") == 1


def test_diff_lists_limit_changes_and_new_pods_against_the_snapshot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The snapshot runs team-a/chat replica 0 on gpu-h100-00 at 560 W per GPU; cap rack-a (the
    # chat's node) at 5000 W and its replica must come down or go.
    argv = ["-f", str(SNAPSHOT), "-o", "json", "--now", NOW, "--diff"]
    assert main([*argv, "--set", "eb/rack-a.spec.powerCapWatts=5000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    diff = plan["diff"]
    (chat,) = [p for p in plan["placements"] if (p["workload"], p["replica"]) == ("team-a/chat", 0)]
    assert chat["node"] == "gpu-h100-00"  # the plan keeps the running replica where it is
    assert chat["powerLimitWatts"] < 560
    assert diff["limitChanged"] == [
        {
            "workload": "team-a/chat",
            "replica": 0,
            "node": "gpu-h100-00",
            "fromWatts": 560.0,
            "toWatts": chat["powerLimitWatts"],
        }
    ]
    assert diff["moved"] == []
    assert diff["stopped"] == []
    started = {(s["workload"], s["replica"]) for s in diff["started"]}
    running_now = {("team-a/chat", 0)}
    planned = {(p["workload"], p["replica"]) for p in plan["placements"]}
    assert started == planned - running_now
    assert {n["node"] for n in diff["nodeLimits"]} == {n["node"] for n in plan["nodes"]}
    assert main(["-f", str(SNAPSHOT), "--now", NOW, "--diff"]) == 0
    table = capsys.readouterr().out
    assert "CHANGES AGAINST THE CLUSTER NOW" in table
    assert "start    team-b/pretrain replica 0 on " in table


def alias_bomb(levels: int) -> str:
    """A "billion laughs" LLMWorkload: `levels` lists of 10 aliases of the list before (10^levels
    values expanded, a few hundred bytes written)."""
    lines = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"  l{level}: &l{level} [{refs}]")
    return "\n".join(
        [
            "apiVersion: wattsched.io/v1alpha1",
            "kind: LLMWorkload",
            "metadata: {name: bomb, namespace: team-a}",
            "spec:",
            *lines,
            "  template: {spec: {containers: [{name: main, image: x, args: *LAST}]}}".replace(
                "LAST", f"l{levels - 1}"
            ),
        ]
    )


def test_a_yaml_alias_bomb_exits_2_naming_the_field_without_expanding_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(SNAPSHOT.read_text() + "\n---\n" + alias_bomb(9) + "\n")
    assert main(["-f", str(path), "--now", NOW]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"wattsched plan: {path}: document 2: spec.")
    assert "YAML aliases expand to more than 10,000,000 values (an alias bomb)" in error
    assert error.count("\n") == 1


def test_a_value_that_refers_to_itself_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("kind: Node\nmetadata: &m {name: n, labels: *m}\n")
    assert main(["-f", str(path)]) == 2
    assert "refers to itself through a YAML alias" in capsys.readouterr().err


def test_a_few_aliases_are_read_as_the_values_they_stand_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = """apiVersion: wattsched.io/v1alpha1
kind: LLMWorkload
metadata: {name: small, namespace: team-a, labels: &labels {app: small}}
spec:
  type: Inference
  model: {name: m, parametersBillions: 8}
  gpu: {count: 1}
  slo: {tokensPerSecond: 10}
  template: {metadata: {labels: *labels}, spec: {containers: [{name: main, image: x}]}}
"""
    path = tmp_path / "aliases.yaml"
    path.write_text(yaml.safe_dump_all(snapshot_items()) + "---\n" + workload)
    assert main(["-f", str(path), "--now", NOW, "-o", "json"]) == 0
    assert "team-a/small" in capsys.readouterr().out


def test_plan_reads_status_progress_and_keeps_a_job_90_percent_done_placed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A running 8-GPU Training job whose 3e9 tokens cannot all be done on one H100 node in the
    10 hours left (~1.93e9 at most, modelled) keeps its place once status.progress says 90% are
    done, exactly as the operator would plan it; with no progress recorded it is unplaced."""
    job: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "pretrain", "namespace": "team-a"},
        "spec": {
            "type": "Training",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 8},
            "slo": {"totalWork": {"tokens": 3e9}, "deadline": "2026-11-25T12:00:00Z"},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
        "status": {"phase": "Running"},
    }
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "h100-0",
            "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "pretrain-0",
            "namespace": "team-a",
            "labels": {"wattsched.io/workload": "pretrain", "wattsched.io/replica": "0"},
            "annotations": {
                "wattsched.io/variant": "bf16",
                "wattsched.io/power-limit-watts": "700",
            },
        },
        "spec": {"nodeName": "h100-0", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running"},
    }
    fresh = run_json(capsys, write_snapshot(tmp_path, [node, job, pod]))
    assert fresh["placements"] == []
    assert [u["workload"] for u in fresh["unplaced"]] == ["team-a/pretrain"]
    job["status"]["progress"] = {
        "completedTokens": 2.7e9,
        "source": "modelled",
        "updatedAt": "2026-11-25T01:59:00Z",
    }
    nearly_done = run_json(capsys, write_snapshot(tmp_path, [node, job, pod]))
    assert [(p["workload"], p["node"]) for p in nearly_done["placements"]] == [
        ("team-a/pretrain", "h100-0")
    ]
    assert nearly_done["unplaced"] == []


def test_plan_serves_a_40k_service_in_part_when_the_budget_cannot_serve_it_whole(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """40,000 tokens/s of an 8B model on two 8-GPU H100 nodes whose budget leaves every GPU at
    its 200 W minimum: 16 replicas serve 34,940 (modelled), not none."""
    nodes = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"h100-{i}",
                "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "rack": "a"},
            },
            "status": {
                "allocatable": {"nvidia.com/gpu": "8"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for i in range(2)
    ]
    budget = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "rack-a"},
        "spec": {"nodeSelector": {"matchLabels": {"rack": "a"}}, "powerCapWatts": 3300},
    }
    service = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {
            "type": "Inference",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 1},
            "minReplicas": 1,
            "maxReplicas": 32,
            "slo": {"tokensPerSecond": 40000},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    plan = run_json(capsys, write_snapshot(tmp_path, [*nodes, budget, service]))
    assert len(plan["placements"]) == 16
    assert {p["powerLimitWatts"] for p in plan["placements"]} == {200.0}
    assert plan["unplaced"] == []
    (short,) = plan["shortfalls"]
    assert short["workload"] == "team-a/chat"
    assert short["constraint"] == "budget:rack-a"
    assert short["servedTokensPerSecond"] == pytest.approx(34_940, rel=1e-3)
    assert short["servedShare"] == pytest.approx(0.8735, abs=1e-3)


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
    ranges = {json.dumps(p["smClockRangeMegahertz"]) for p in chat}
    assert "null" not in ranges
    for placement in chat:
        clock = placement["smClockRangeMegahertz"]
        assert 0 < clock["min"] <= clock["max"]
    nodes = {entry["node"]: entry for entry in plan["nodes"]}
    for node, entry in nodes.items():
        assert len(entry["gpuSmClockRangesMegahertz"]) == len(entry["gpuPowerLimitsWatts"])
        locked = [r for r in entry["gpuSmClockRangesMegahertz"] if r is not None]
        on_node = sum(p["gpus"] for p in chat if p["node"] == node)
        assert len(locked) == on_node
    training = [p for p in plan["placements"] if p["workload"] == "team-b/pretrain"]
    assert [p["smClockRangeMegahertz"] for p in training] == [None]


def test_performance_services_get_no_clock_range(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    items = snapshot_items()
    for item in items:
        if item["kind"] == "LLMWorkload":
            item["spec"].setdefault("energy", {})["policy"] = "Performance"
    plan = run_json(capsys, write_snapshot(tmp_path, items))
    assert all(p["smClockRangeMegahertz"] is None for p in plan["placements"])
    assert all(r is None for entry in plan["nodes"] for r in entry["gpuSmClockRangesMegahertz"])
