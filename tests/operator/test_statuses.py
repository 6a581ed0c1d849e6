"""Workload phases, conditions and budget figures computed from a plan and the pods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from wattsched_operator.cache import WORKLOADS, slim
from wattsched_operator.statuses import (
    PodView,
    SloObjective,
    budget_status,
    condition,
    next_phase,
    slo_met,
    workload_status,
)
from wattsched_optimizer.options import key_label
from wattsched_optimizer.problem import BudgetAllocation, Placement, Plan, PlanStatus, Unplaced

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def placement(replica: int, node: str = "n1", watts: float = 300.0) -> Placement:
    return Placement("ns/w", replica, node, 2, "fp8", watts, watts * 0.9, 500.0)


def pod(replica: int, phase: str = "Running", ready: bool = True) -> PodView:
    return PodView(replica=replica, node="n1", phase=phase, ready=ready)


def phase(previous: str | None, placements: list[Placement], pods: list[PodView], **kw: Any) -> str:
    return next_phase(
        previous,
        is_gang=kw.get("is_gang", False),
        gang_size=kw.get("gang_size", 1),
        placements=placements,
        pods=pods,
        failed_permanently=kw.get("failed", False),
    )


def test_a_gang_with_replicas_moving_off_a_lost_node_is_not_running() -> None:
    """Issue 12 item 7: a workload said Running with 2 of its 4 pods."""
    gang = [placement(0, "new"), placement(1, "new"), placement(2), placement(3)]
    old = [PodView(r, "lost", "Running", True) for r in (0, 1)]  # the kubelet has not noticed
    healthy = [pod(2), pod(3)]
    assert phase("Running", gang, [*old, *healthy], is_gang=True, gang_size=4) == "Placed"
    leaving = [PodView(r, "new", "Running", True, deleting=True) for r in (0, 1)]
    assert phase("Running", gang, [*leaving, *healthy], is_gang=True, gang_size=4) == "Placed"
    result = status(placements=gang, pods=[*old, *healthy], is_gang=True, gang_size=4)
    assert result["replicas"] == {"desired": 4, "placed": 4, "ready": 2}
    assert conditions(result)["Ready"]["message"] == "2/4 replica(s) ready"
    moved = [PodView(r, "new", "Running", True) for r in (0, 1)]
    assert phase("Placed", gang, [*moved, *healthy], is_gang=True, gang_size=4) == "Running"


def test_unplaced_new_work_is_pending_and_placed_work_that_loses_its_place_is_preempted() -> None:
    assert phase(None, [], []) == "Pending"
    assert phase("Running", [], []) == "Preempted"
    assert phase("Preempted", [], []) == "Preempted"


def test_work_placed_in_a_status_but_without_pods_is_pending_not_preempted() -> None:
    # E.g. a status written Placed whose pod was never created, then an operator restart.
    assert phase("Placed", [], []) == "Pending"
    assert phase("Placed", [], [pod(0, phase="Pending", ready=False)]) == "Preempted"


def test_placed_work_runs_when_every_planned_replica_is_running_and_ready() -> None:
    assert phase("Pending", [placement(0), placement(1)], [pod(0)]) == "Placed"
    assert phase("Placed", [placement(0)], [pod(0, ready=False)]) == "Placed"
    assert phase("Placed", [placement(0), placement(1)], [pod(0), pod(1)]) == "Running"


def test_a_gang_succeeds_when_every_replica_succeeded_and_stays_succeeded() -> None:
    done = [pod(0, "Succeeded"), pod(1, "Succeeded")]
    assert phase("Running", [], done, is_gang=True, gang_size=2) == "Succeeded"
    assert phase("Running", [], done[:1], is_gang=True, gang_size=2) == "Preempted"
    assert phase("Succeeded", [placement(0)], [], is_gang=True) == "Succeeded"


def test_failed_for_good_is_terminal() -> None:
    assert phase("Running", [placement(0)], [pod(0)], failed=True) == "Failed"
    assert phase("Failed", [placement(0)], [pod(0)]) == "Failed"


def test_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    first = condition([], "Ready", True, "Running", "ok", now=NOW)
    later = condition([first], "Ready", True, "Running", "still ok", now=NOW + timedelta(hours=1))
    flipped = condition([later], "Ready", False, "Placed", "no", now=NOW + timedelta(hours=2))
    assert later["lastTransitionTime"] == first["lastTransitionTime"] == "2026-11-25T12:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-11-25T14:00:00Z"


def status(**kw: Any) -> dict[str, Any]:
    previous = kw.pop("previous", {})
    fields: dict[str, Any] = {
        "generation": 3,
        "is_gang": False,
        "gang_size": 1,
        "placements": [],
        "unplaced": None,
        "pods": [],
        "failure_message": None,
        "now": NOW,
    }
    fields.update(kw)
    return workload_status(previous, **fields)


def conditions(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in result["conditions"]}


def test_an_unplaced_workload_is_unschedulable_with_the_optimizers_reason() -> None:
    reason = "spec.gpu.count=64 exceeds the largest eligible node (8 GPUs)"
    result = status(unplaced=Unplaced("ns/w", reason, "gpus"))
    schedulable = conditions(result)["Schedulable"]
    assert schedulable["status"] == "False"
    assert schedulable["reason"] == "Gpus"
    assert schedulable["message"] == reason
    assert result["phase"] == "Pending"
    assert result["message"] == reason


def test_workloads_one_reason_holds_back_write_the_same_status_which_the_cache_keeps_once() -> None:
    """The optimizer's reasons name the workload (`LLMWorkload ns/w: ...`); its own status does
    not repeat its name, so every workload the same reason holds back says the same, and the
    operator's cache keeps one copy of those statuses."""

    def held_back(key: str) -> dict[str, Any]:
        reason = (
            f"{key_label(key)}: EnergyBudget rack-a holds its nodes (n1) at their minimum; "
            f"elsewhere: {key_label(key)}: no schedulable GPU is free (0 of 8)"
        )
        return status(
            unplaced=Unplaced(key, reason, "budget:rack-a"),
            objective=SloObjective(tokens_per_second=10),
        )

    first, second = held_back("team-a/llama"), held_back("team-b/mistral")
    said = "EnergyBudget rack-a holds its nodes (n1) at their minimum; elsewhere: no schedulable "
    assert first["message"] == said + "GPU is free (0 of 8)"
    assert first == second
    messages = [first["message"], *(c["message"] for c in first["conditions"])]
    assert not [m for m in messages if "team-a" in m or "LLMWorkload" in m]
    assert conditions(first)["SLOMet"]["message"].endswith(": " + first["message"])
    bodies = [
        slim(WORKLOADS, {"metadata": {"name": name, "uid": name}, "status": written})
        for name, written in (("llama", first), ("mistral", second))
    ]
    assert bodies[0]["status"] is bodies[1]["status"]


def test_a_passed_deadline_is_its_own_unschedulable_reason() -> None:
    reason = "ns/w: spec.slo.deadline has passed and work is left"
    result = status(unplaced=Unplaced("ns/w", reason, "deadline_passed"))
    schedulable = conditions(result)["Schedulable"]
    assert (schedulable["status"], schedulable["reason"]) == ("False", "DeadlinePassed")
    assert schedulable["message"] == reason


def test_a_budget_that_holds_work_back_sets_budget_limited() -> None:
    result = status(unplaced=Unplaced("ns/w", "needs 296 W more", "budget:rack-a"))
    limited = conditions(result)["BudgetLimited"]
    assert limited["status"] == "True"
    assert limited["reason"] == "Budget"


def test_placed_status_lists_placements_power_and_replica_counts() -> None:
    result = status(placements=[placement(1, "n2"), placement(0, "n1")], pods=[pod(0)])
    assert [p["replica"] for p in result["placements"]] == [0, 1]
    assert result["power"] == {"capWatts": 1200.0, "expectedWatts": 1080.0, "measuredWatts": None}
    assert result["energy"] == {"source": "modelled"}
    assert result["replicas"] == {"desired": 2, "placed": 2, "ready": 1}
    assert result["nodes"] == "n1,n2"
    assert result["variant"] == "fp8"
    assert result["observedGeneration"] == 3


def test_budget_status_reports_headroom_and_the_last_plan() -> None:
    plan = Plan(PlanStatus.OPTIMAL, 1.0, 1.0, 0.002, 0.25, (), {}, (), ())
    result = budget_status(
        {},
        generation=2,
        allocation=BudgetAllocation("rack", 4000, 3100.0, 2500.0),
        cap_watts=4000,
        node_count=2,
        plan=plan,
        now=NOW,
    )
    assert result["headroomWatts"] == 900.0
    assert result["allocatedCapWatts"] == 3100.0
    assert result["nodes"] == 2
    assert result["lastPlan"] == {
        "time": "2026-11-25T12:00:00Z",
        "seconds": 0.25,
        "status": "Optimal",
        "gap": 0.002,
    }
    assert result["conditions"][0]["status"] == "True"


def test_a_budget_whose_unmanaged_gpus_exceed_its_cap_says_so() -> None:
    plan = Plan(PlanStatus.OPTIMAL, 1.0, 1.0, 0.0, 0.1, (), {}, (), ())

    def conditions(unmanaged_watts: float) -> dict[str, dict[str, Any]]:
        result = budget_status(
            {},
            generation=1,
            allocation=BudgetAllocation("rack", 3000, unmanaged_watts + 800, 0, unmanaged_watts),
            cap_watts=3000,
            node_count=2,
            plan=plan,
            now=NOW,
        )
        assert result["unmanagedWatts"] == unmanaged_watts
        return {c["type"]: c for c in result["conditions"]}

    within = conditions(2000.0)["UnmanagedWithinCap"]
    assert (within["status"], within["reason"]) == ("True", "WithinCap")
    over = conditions(5600.0)["UnmanagedWithinCap"]
    assert (over["status"], over["reason"]) == ("False", "UnmanagedOverCap")
    assert "5600 W of the 3000 W cap" in over["message"]
    assert "wattsched leaves them alone" in over["message"]


def test_a_held_budget_is_not_ready_and_says_why_naming_its_unready_nodes() -> None:
    plan = Plan(PlanStatus.OPTIMAL, 1.0, 1.0, 0.0, 0.1, (), {}, (), ())
    result = budget_status(
        {},
        generation=1,
        allocation=BudgetAllocation("rack-d", 1, 6400.0, 800.0, held=True),
        cap_watts=1,
        node_count=2,
        plan=plan,
        now=NOW,
        unready_nodes=["d1"],
    )
    ready = next(c for c in result["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CapBelowFloor")
    assert ready["message"].startswith("spec.powerCapWatts=1 is below the 6400 W")
    assert "its 2 node(s) take no work" in ready["message"]
    assert ready["message"].endswith("counted at their maximum until their agent confirms: d1")


def test_a_budget_names_the_nodes_left_out_of_planning_and_an_unreadable_spec() -> None:
    plan = Plan(PlanStatus.OPTIMAL, 1.0, 1.0, 0.0, 0.1, (), {}, (), ())

    def conditions(**changes: Any) -> dict[str, dict[str, Any]]:
        result = budget_status(
            {},
            generation=1,
            allocation=None,
            cap_watts=1000,
            node_count=0,
            plan=plan,
            now=NOW,
            **changes,
        )
        return {c["type"]: c for c in result["conditions"]}

    assert conditions()["NodesPlanned"]["status"] == "True"
    left_out = conditions(excluded_nodes={"gpu-x": "Node gpu-x: unknown GPU product"})
    assert left_out["NodesPlanned"]["reason"] == "NodeExcluded"
    assert left_out["NodesPlanned"]["message"] == "Node gpu-x: unknown GPU product"
    invalid = conditions(invalid="EnergyBudget b: spec.powerCapWatts: must be a number")["Ready"]
    assert (invalid["status"], invalid["reason"]) == ("False", "InvalidSpec")
    assert invalid["message"].endswith("spec.powerCapWatts: must be a number")


def test_slo_met_follows_planned_throughput_against_demand_and_a_gangs_place() -> None:
    demand = SloObjective(tokens_per_second=1500)
    one = [Placement("ns/w", 0, "n", 1, "bf16", 700, 500, 1000.0)]
    two = [*one, Placement("ns/w", 1, "n", 1, "bf16", 700, 500, 1000.0)]
    assert slo_met(demand, "Running", two, None)[:2] == (True, "Planned")
    assert slo_met(demand, "Running", one, None)[:2] == (False, "BelowDemand")
    not_placed = slo_met(demand, "Preempted", [], Unplaced("ns/w", "budget rack full", "budget"))
    assert not_placed[:2] == (False, "NotPlaced")
    assert "budget rack full" in not_placed[2]
    deadline = SloObjective(deadline="2026-12-01T00:00:00Z")
    assert slo_met(deadline, "Running", one, None)[:2] == (True, "OnTrack")
    assert slo_met(deadline, "Succeeded", [], None)[:2] == (True, "Succeeded")
    passed = Unplaced("ns/w", "spec.slo.deadline has passed", "deadline_passed")
    assert slo_met(deadline, "Pending", [], passed)[:2] == (False, "DeadlinePassed")
    late = Unplaced("ns/w", "not enough time", "deadline")
    assert slo_met(deadline, "Pending", [], late)[:2] == (False, "NotPlaced")
    assert not SloObjective.from_spec({"type": "Training", "slo": {"totalWork": {}}}).declared


def test_a_service_served_in_part_under_a_budget_is_budget_limited_with_the_share_served() -> None:
    demand = SloObjective(tokens_per_second=4000)
    three = [Placement("ns/w", i, "n", 1, "bf16", 200, 180, 1000.0) for i in range(3)]
    why = Unplaced(
        "ns/w", "serves 3000 of 4000 tokens/s: EnergyBudget rack-a is full", "budget:rack-a"
    )
    met, reason, text = slo_met(demand, "Running", three, why)
    assert (met, reason) == (False, "BudgetLimited")
    assert "75.0% served" in text
    assert "EnergyBudget rack-a" in text
    status = workload_status(
        {},
        generation=1,
        is_gang=False,
        gang_size=1,
        placements=three,
        unplaced=why,
        pods=[],
        failure_message=None,
        now=NOW,
        objective=demand,
    )
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Schedulable"] == ("True", "Planned")
    assert conditions["BudgetLimited"] == ("True", "Budget")
    assert conditions["SLOMet"] == ("False", "BudgetLimited")
    assert status["replicas"]["placed"] == 3


def test_workload_status_has_slo_met_only_when_the_spec_declares_an_objective() -> None:
    def status(objective: SloObjective | None) -> dict[str, Any]:
        return workload_status(
            {},
            generation=1,
            is_gang=False,
            gang_size=1,
            placements=[],
            unplaced=None,
            pods=[],
            failure_message=None,
            now=NOW,
            objective=objective,
        )

    types = [c["type"] for c in status(SloObjective(tokens_per_second=10))["conditions"]]
    assert "SLOMet" in types
    assert "SLOMet" not in [c["type"] for c in status(None)["conditions"]]
