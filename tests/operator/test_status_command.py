"""`wattsched status` on hand-made objects: budget figures, allowance left and projected, unplaced
workloads with their reason, recent moves and preemptions, unconfirmed nodes, failed rounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from wattsched_cli.kubectl_plugin import SHIM_NAME, install
from wattsched_cli.status import (
    allowance,
    parse_operator_metrics,
    render,
    unconfirmed_nodes,
)
from wattsched_cli.status import (
    build_parser as status_parser,
)
from wattsched_operator.run import parse_args as parse_operator_args
from wattsched_operator.snapshot import ClusterObjects

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def budget(name: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": name},
        "spec": {
            "powerCapWatts": 10000,
            "pue": 1.5,
            "energy": {"kilowattHours": 200, "period": "Day"},
        },
        "status": {
            "allocatedCapWatts": 8000,
            "expectedWatts": 6000,
            "headroomWatts": 2000,
            "energyUsedKilowattHours": 100.0,
            "periodStart": "2026-12-05T00:00:00Z",
            "accountedUntil": stamp(NOW),
            "lastPlan": {"time": stamp(NOW - timedelta(seconds=20)), "status": "Optimal"},
            **status,
        },
    }


def node(name: str, gpus: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def profile(
    name: str, *, ready: bool = True, observed: int = 2, heartbeat: datetime = NOW
) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": name, "generation": 2},
        "spec": {"nodeName": name},
        "status": {
            "observedGeneration": observed,
            "agent": {"ready": ready, "heartbeatTime": stamp(heartbeat), "backend": "simulated"},
        },
    }


def workload(name: str, phase: str | None, **condition: str) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    if condition:
        status["conditions"] = [{"type": "Schedulable", "status": "False", **condition}]
    return {"metadata": {"name": name, "namespace": "team-a"}, "status": status}


def event(reason: str, name: str, age_seconds: float, message: str) -> dict[str, Any]:
    return {
        "involvedObject": {"kind": "LLMWorkload", "namespace": "team-a", "name": name},
        "reason": reason,
        "message": message,
        "lastTimestamp": stamp(NOW - timedelta(seconds=age_seconds)),
    }


def test_allowance_left_and_projected_to_the_end_of_the_period() -> None:
    figures = allowance(budget("rack-a"), NOW)
    assert figures.left_kwh == 100.0
    # 100 kWh used + 6000 W (expected: modelled) x PUE 1.5 x the 12 h left of the day
    assert figures.projected_kwh == pytest.approx(100.0 + 6.0 * 1.5 * 12)
    assert figures.source == "modelled"
    measured = allowance(budget("rack-a", measuredWatts=4000), NOW)
    assert measured.projected_kwh == pytest.approx(100.0 + 4.0 * 1.5 * 12)
    assert measured.source == "measured"


def test_budget_rows_show_cap_allocated_headroom_and_flag_a_projected_overrun() -> None:
    text = render(ClusterObjects(budgets=(budget("rack-a"),)), [], NOW)
    row = next(line.split() for line in text.splitlines() if line.startswith("rack-a "))
    assert row[:5] == ["rack-a", "10,000", "8,000", "-", "2,000"]
    assert row[5:9] == ["100", "100", "of", "200"]
    assert row[9:11] == ["208", "(over)"]
    assert "! rack-a: projected to use 208 kWh by 2026-12-06 00:00 UTC, above its 200" in text


def test_the_operators_horizon_projection_and_an_exhausted_allowance_are_shown() -> None:
    exhausted = {
        "type": "AllowanceExhausted",
        "status": "True",
        "reason": "EnergyAllowance",
        "message": "The day's allowance has no room for all flexible work (199.0 of 200 kWh used)",
    }
    body = budget("rack-a", projectedKilowattHoursAtPeriodEnd=199.5, conditions=[exhausted])
    # The plan's projection (flexible work deferred), not the current draw held to the end.
    assert allowance(body, NOW).projected_kwh == pytest.approx(199.5)
    text = render(ClusterObjects(budgets=(body,)), [], NOW)
    row = next(line.split() for line in text.splitlines() if line.startswith("rack-a "))
    assert row[9:] == ["200", "modelled"]  # 199.5 rounded, not over
    assert (
        "! rack-a: AllowanceExhausted: The day's allowance has no room for all flexible work "
        "(199.0 of 200 kWh used)"
    ) in text


def test_unplaced_workloads_are_listed_with_the_operators_reason() -> None:
    objects = ClusterObjects(
        workloads=(
            workload("chat", "Running"),
            workload("big", "Pending", reason="BudgetRackA", message="budget rack-a is full"),
            workload("new", None),
        )
    )
    text = render(objects, [], NOW)
    assert "WORKLOADS NOT PLACED: 2 of 3 active" in text
    assert "team-a/big  Pending  BudgetRackA    budget rack-a is full" in text
    assert "team-a/new  -        NotYetPlanned" in text
    assert "team-a/chat" not in text


def test_recent_moves_and_preemptions_come_from_events() -> None:
    events = [
        event("Moved", "chat", 60, "1 replica(s): chat-0: gpu-a -> gpu-b"),
        event("Preempted", "batch", 300, "2 replica(s): budget rack-a is full"),
        event("Preempted", "old", 7200, "too old to show"),
        event("Placed", "chat", 30, "not a move"),
    ]
    text = render(ClusterObjects(), events, NOW)
    assert "MOVES AND PREEMPTIONS IN THE LAST HOUR: 2" in text
    assert "60s ago  team-a/chat   Moved      1 replica(s): chat-0: gpu-a -> gpu-b" in text
    assert "5m ago   team-a/batch  Preempted  2 replica(s): budget rack-a is full" in text
    assert "too old" not in text
    assert "not a move" not in text


def test_nodes_whose_agent_has_not_confirmed_are_listed_with_why() -> None:
    nodes = [node(n) for n in ("ok", "none", "down", "behind", "silent")] + [node("cpu", gpus=0)]
    profiles = [
        profile("ok"),
        profile("down", ready=False),
        profile("behind", observed=1),
        profile("silent", heartbeat=NOW - timedelta(minutes=10)),
    ]
    found = dict(unconfirmed_nodes(nodes, profiles, NOW, 120.0))
    assert sorted(found) == ["behind", "down", "none", "silent"]
    assert "no NodePowerProfile" in found["none"]
    assert found["down"] == "the agent reports not ready"
    assert found["behind"] == "limits of generation 2 not applied yet (agent at 1)"
    assert found["silent"] == "last heartbeat 10m ago"
    text = render(ClusterObjects(nodes=tuple(nodes), profiles=tuple(profiles)), [], NOW)
    assert "NODES WHOSE AGENT HAS NOT CONFIRMED ITS LIMITS: 4 of 5 GPU nodes" in text


def test_by_default_an_agent_is_lost_after_the_operators_heartbeat_timeout() -> None:
    # The operator counts an agent silent for over 30 s as lost (`wattsched operator
    # --heartbeat-timeout-seconds`' default); `wattsched status` reads it the same way.
    nodes = [node("recent"), node("quiet")]
    profiles = [
        profile("recent", heartbeat=NOW - timedelta(seconds=20)),
        profile("quiet", heartbeat=NOW - timedelta(seconds=45)),
    ]
    text = render(ClusterObjects(nodes=tuple(nodes), profiles=tuple(profiles)), [], NOW)
    assert "NODES WHOSE AGENT HAS NOT CONFIRMED ITS LIMITS: 1 of 2 GPU nodes" in text
    assert "quiet  last heartbeat 45s ago" in text
    assert "recent" not in text
    operator_default = parse_operator_args([]).heartbeat_timeout_seconds
    assert status_parser().parse_args([]).heartbeat_timeout_seconds == operator_default == 30.0


def test_rounds_flag_a_stale_or_infeasible_plan_and_read_the_operator_counter() -> None:
    fresh = render(ClusterObjects(budgets=(budget("rack-a"),)), [], NOW)
    assert "last plan 20s ago: Optimal" in fresh
    assert "!" not in fresh.split("PLANNING ROUNDS")[1]
    stale = budget(
        "rack-a",
        lastPlan={"time": stamp(NOW - timedelta(minutes=10)), "status": "Infeasible"},
    )
    metrics = parse_operator_metrics(
        "# TYPE wattsched_reconcile_errors counter\n"
        'wattsched_reconcile_errors_total{step="plan"} 7.0\n'
        'wattsched_reconcile_errors_total{step="apply"} 1.0\n'
        "# TYPE wattsched_plans counter\n"
        'wattsched_plans_total{status="Optimal"} 40.0\n'
    )
    assert metrics.failed_rounds == 7.0
    text = render(ClusterObjects(budgets=(stale,)), [], NOW, counters=metrics)
    assert "! no plan for over 180 s: rounds are failing or the operator is down" in text
    assert "! budget rack-a: the last plan was Infeasible" in text
    assert "operator metrics: 7 failed rounds since it started; plans: Optimal 40" in text


def test_the_kubectl_plugin_shim_runs_the_wattsched_cli(tmp_path: Path) -> None:
    path = install(tmp_path / "bin", python="/opt/py/bin/python3")
    assert path.name == SHIM_NAME
    assert path.stat().st_mode & 0o111
    assert path.read_text().splitlines()[-1] == (
        'exec /opt/py/bin/python3 -m wattsched_cli.main "$@"'
    )
