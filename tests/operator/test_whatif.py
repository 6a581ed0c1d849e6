"""`wattsched plan --set/--diff`: the override syntax and what a plan would change."""

from __future__ import annotations

import pytest

from wattsched_cli.whatif import apply_overrides, diff_lines, parse_override, plan_diff
from wattsched_operator.snapshot import ClusterObjects, SnapshotError
from wattsched_optimizer.problem import (
    CurrentPlacement,
    Placement,
    Plan,
    PlanInput,
    PlanOptions,
    PlanStatus,
    Unplaced,
)


def test_set_reads_kind_name_field_path_and_a_yaml_value() -> None:
    override = parse_override("EB/rack-a.spec.powerCapWatts=7000")
    assert (override.kind, override.name, override.path, override.value) == (
        "EnergyBudget",
        "rack-a",
        ("spec", "powerCapWatts"),
        7000,
    )
    workload = parse_override("llmw/team-a/chat.spec.variants[1].quality=0.9")
    assert workload.name == "team-a/chat"
    assert workload.path == ("spec", "variants", 1, "quality")
    assert workload.field_name == "spec.variants[1].quality"
    label = parse_override('node/gpu-h100-00.metadata.labels["wattsched.io/rack"]=rack-b')
    assert label.path == ("metadata", "labels", "wattsched.io/rack")
    assert label.value == "rack-b"
    assert parse_override("eb/a.b.spec.energy=null").name == "a.b"  # names may hold dots
    assert parse_override("eb/a.b.spec.energy=null").value is None


def test_set_builds_missing_maps_and_removes_fields_with_null() -> None:
    budget = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "rack-a"},
        "spec": {"powerCapWatts": 9000, "pue": 1.2},
    }
    objects = ClusterObjects(budgets=(budget,))
    changed = apply_overrides(
        objects,
        [
            parse_override("eb/rack-a.spec.energy.kilowattHours=100"),
            parse_override("eb/rack-a.spec.pue=null"),
        ],
    )
    assert changed.budgets[0]["spec"] == {"powerCapWatts": 9000, "energy": {"kilowattHours": 100}}
    assert budget["spec"] == {"powerCapWatts": 9000, "pue": 1.2}  # the input is not changed
    with pytest.raises(SnapshotError, match=r"spec\.energy\.kilowattHours: must be greater than 0"):
        apply_overrides(objects, [parse_override("eb/rack-a.spec.energy.kilowattHours=0")])


def current(workload: str, replica: int, node: str, variant: str, watts: float) -> CurrentPlacement:
    return CurrentPlacement(
        workload=workload, replica=replica, node=node, variant=variant, power_limit_watts=watts
    )


def placed(workload: str, replica: int, node: str, variant: str, watts: float) -> Placement:
    return Placement(
        workload=workload,
        replica=replica,
        node=node,
        gpus=1,
        variant=variant,
        power_limit_watts=watts,
        expected_watts_per_gpu=watts,
        expected_throughput=1.0,
    )


def test_diff_names_moves_restarts_stops_starts_and_limit_changes() -> None:
    plan_input = PlanInput(
        nodes=(),
        workloads=(),
        budgets=(),
        current=(
            current("a/chat", 0, "n1", "bf16", 700),
            current("a/chat", 1, "n1", "bf16", 700),
            current("a/chat", 2, "n1", "bf16", 700),
            current("b/job", 0, "n2", "bf16", 400),
        ),
        options=PlanOptions(),
    )
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0.0,
        bound=0.0,
        gap=0.0,
        solve_seconds=0.0,
        placements=(
            placed("a/chat", 0, "n2", "bf16", 700),  # moved
            placed("a/chat", 1, "n1", "fp8", 700),  # restarted with another variant
            placed("a/chat", 2, "n1", "bf16", 500),  # limit lowered in place
            placed("c/new", 0, "n3", "bf16", 300),  # started
        ),
        node_power_limits_watts={"n1": (700.0, 500.0), "n2": (400.0, 400.0)},
        budgets=(),
        unplaced=(Unplaced(workload="b/job", reason="budget rack-a is full", constraint="x"),),
    )
    # What each profile asks for now, per GPU as its agent maps it (n2's GPU 2: another team's).
    profiles = [
        {"metadata": {"name": "n1"}, "spec": {"nodeName": "n1"}, "status": {"gpus": [
            {"index": 0, "targetWatts": 700}, {"index": 1, "targetWatts": 700}]}},
        {"metadata": {"name": "n2"}, "spec": {"nodeName": "n2"}, "status": {"gpus": [
            {"index": 1, "targetWatts": 400}, {"index": 0, "targetWatts": 400},
            {"index": 2, "appliedWatts": 700, "holder": "other"}]}},
    ]  # fmt: skip
    diff = plan_diff(plan_input, plan, profiles)
    assert diff["moved"] == [{"workload": "a/chat", "replica": 0, "fromNode": "n1", "toNode": "n2"}]
    assert diff["variantChanged"] == [
        {
            "workload": "a/chat",
            "replica": 1,
            "node": "n1",
            "fromVariant": "bf16",
            "toVariant": "fp8",
        }
    ]
    assert diff["limitChanged"] == [
        {"workload": "a/chat", "replica": 2, "node": "n1", "fromWatts": 700, "toWatts": 500}
    ]
    assert diff["stopped"] == [
        {"workload": "b/job", "replica": 0, "node": "n2", "reason": "budget rack-a is full"}
    ]
    assert [s["workload"] for s in diff["started"]] == ["c/new"]
    assert diff["nodeLimits"] == [
        {"node": "n1", "fromWatts": 1400.0, "toWatts": 1200.0, "gpusChanged": 1}
    ]
    lines = diff_lines(diff)
    assert "move     a/chat replica 0: n1 -> n2" in lines
    assert "stop     b/job replica 0 on n2: budget rack-a is full" in lines
    assert "node     n1: limits sum 1400 -> 1200 W (1 GPU(s) change)" in lines


def test_diff_of_an_unchanged_plan_says_nothing_changes() -> None:
    plan_input = PlanInput(
        nodes=(),
        workloads=(),
        budgets=(),
        current=(current("a/chat", 0, "n1", "bf16", 700),),
        options=PlanOptions(),
    )
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0.0,
        bound=0.0,
        gap=0.0,
        solve_seconds=0.0,
        placements=(placed("a/chat", 0, "n1", "bf16", 700),),
        node_power_limits_watts={"n1": (700.0,)},
        budgets=(),
        unplaced=(),
    )
    profiles = [{"metadata": {"name": "n1"}, "spec": {"nodeName": "n1"}, "status": {"gpus": [
        {"index": 0, "targetWatts": 700}]}}]  # fmt: skip
    assert diff_lines(plan_diff(plan_input, plan, profiles)) == [
        "no change: the plan keeps every pod and power limit as they are"
    ]
