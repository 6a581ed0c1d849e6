"""Hand-checked plans: priority, efficient levels, deadlines, variants, budgets, reasons."""

from __future__ import annotations

import dataclasses

import pytest

from wattsched_optimizer import planner
from wattsched_optimizer.model import Calibration, CatalogueModel, power_levels_watts
from wattsched_optimizer.options import build_plan_data, duration_text
from wattsched_optimizer.packing import ClusterState
from wattsched_optimizer.planner import PlanInputError, plan
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    Placement,
    Plan,
    PlanInput,
    PlanOptions,
    PlanStatus,
    Precision,
    Unplaced,
    Variant,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0, relative_throughput=1.0, quality=1.0)
FP8 = Variant("fp8", Precision.FP8, min_memory_gib=0, relative_throughput=1.6, quality=0.97)


def h100_nodes(count: int, prefix: str = "h") -> tuple[GpuNode, ...]:
    return tuple(GpuNode(f"{prefix}{i}", "H100-80GB", 8) for i in range(count))


def training(key: str, **changes: object) -> Workload:
    base = Workload(
        key=key,
        type=WorkloadType.TRAINING,
        model_parameters_billions=8,
        gpus_per_replica=8,
        variants=(BF16,),
        replicas=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def inference(key: str, **changes: object) -> Workload:
    base = Workload(
        key=key,
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=1,
        max_replicas=8,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def placed(result: Plan) -> dict[str, list[tuple[str, str, float]]]:
    out: dict[str, list[tuple[str, str, float]]] = {}
    for p in result.placements:
        out.setdefault(p.workload, []).append((p.node, p.variant, p.power_limit_watts))
    return out


def test_budget_for_one_of_two_equal_jobs_admits_the_higher_priority() -> None:
    nodes = h100_nodes(2)
    # Idle minimum 16 x 200 W; one job pinned at 700 W adds 8 x 500 W; two would add 8,000 W.
    cap = 16 * 200 + 8 * 500 + 100
    jobs = (
        training("team/a", policy=EnergyPolicy.PERFORMANCE, priority=1),
        training("team/b", policy=EnergyPolicy.PERFORMANCE, priority=5),
    )
    result = plan(
        PlanInput(nodes, jobs, (Budget("cluster", cap, frozenset(n.name for n in nodes)),))
    )
    assert set(placed(result)) == {"team/b"}
    (left_out,) = result.unplaced
    assert left_out.workload == "team/a"
    assert left_out.constraint == "budget:cluster"
    assert "EnergyBudget cluster" in left_out.reason
    assert result.budgets[0].allocated_cap_watts <= cap


def test_training_without_deadline_runs_at_its_most_efficient_level() -> None:
    model = CatalogueModel()
    levels = power_levels_watts("H100-80GB", 5)

    def joules_per_token(level: float) -> float:
        watts = model.expected_power_watts("H100-80GB", WorkloadType.TRAINING, level)
        tokens = model.throughput_tokens_per_second(
            "H100-80GB", WorkloadType.TRAINING, 8, 8, 1.0, level
        )
        return watts / tokens

    best = min(levels, key=joules_per_token)
    assert best not in (levels[0], levels[-1])  # the case is only interesting in between
    result = plan(PlanInput(h100_nodes(1), (training("team/t"),)))
    assert placed(result) == {"team/t": [("h0", "bf16", best)]}
    assert result.status is PlanStatus.OPTIMAL


def test_deadline_forces_a_higher_power_level() -> None:
    model = CatalogueModel()
    relaxed = plan(PlanInput(h100_nodes(1), (training("team/t"),)))
    efficient_level = relaxed.placements[0].power_limit_watts
    at_efficient = model.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.TRAINING, 8, 8, 1.0, efficient_level
    )
    deadline_seconds = 3600.0
    # 10% more work than the efficient level finishes before the deadline.
    work = WorkAmount(WorkUnit.TOKENS, at_efficient * deadline_seconds * 1.1)
    job = training("team/t", remaining_work=work, deadline_seconds=deadline_seconds)
    result = plan(PlanInput(h100_nodes(1), (job,)))
    (placement,) = result.placements
    assert placement.power_limit_watts > efficient_level
    assert placement.expected_throughput * deadline_seconds >= work.amount


def test_unreachable_deadline_leaves_the_job_out_with_the_deadline_as_reason() -> None:
    work = WorkAmount(WorkUnit.TOKENS, 1e15)
    job = training("team/t", remaining_work=work, deadline_seconds=60)
    result = plan(PlanInput(h100_nodes(1), (job,)))
    assert not result.placements
    assert result.unplaced[0].constraint == "deadline"
    assert "spec.slo.deadline" in result.unplaced[0].reason


def test_a_passed_deadline_leaves_the_job_out_saying_the_deadline_passed() -> None:
    work = WorkAmount(WorkUnit.TOKENS, 1e9)
    job = training("team/t", remaining_work=work, deadline_seconds=0.0)
    result = plan(PlanInput(h100_nodes(1), (job,)))
    assert not result.placements
    (unplaced,) = result.unplaced
    assert unplaced.constraint == "deadline_passed"
    assert "spec.slo.deadline has passed" in unplaced.reason


def test_highest_quality_variant_runs_when_nothing_forces_a_lower_one() -> None:
    service = inference("team/s", variants=(BF16, FP8), tokens_per_second=4000)
    result = plan(PlanInput(h100_nodes(1), (service,)))
    assert {v for _, v, _ in placed(result)["team/s"]} == {"bf16"}


def test_fp8_runs_when_only_it_fits_in_gpu_memory() -> None:
    bf16 = dataclasses.replace(BF16, min_memory_gib=70)
    fp8 = dataclasses.replace(FP8, min_memory_gib=35)
    nodes = (GpuNode("a0", "A100-40GB", 8),)
    service = inference("team/s", variants=(bf16, fp8), tokens_per_second=1000)
    result = plan(PlanInput(nodes, (service,)))
    assert {v for _, v, _ in placed(result)["team/s"]} == {"fp8"}


def test_fp8_is_not_used_when_min_quality_forbids_it_and_the_reason_says_memory() -> None:
    bf16 = dataclasses.replace(BF16, min_memory_gib=70)
    fp8 = dataclasses.replace(FP8, min_memory_gib=35)
    nodes = (GpuNode("a0", "A100-40GB", 8),)
    service = inference("team/s", variants=(bf16, fp8), tokens_per_second=1000, min_quality=0.99)
    result = plan(PlanInput(nodes, (service,)))
    assert not result.placements
    assert result.unplaced[0].constraint == "memory"
    assert "fp8" in result.unplaced[0].reason


def test_fp8_runs_when_only_it_meets_the_slo_within_the_budget() -> None:
    model = CatalogueModel()
    per_replica = model.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700
    )
    # bf16 needs two replicas at 700 W; fp8 (1.6x) needs one. The budget pays for one.
    demand = per_replica * 1.5
    nodes = h100_nodes(1)
    service = inference(
        "team/s",
        variants=(BF16, FP8),
        tokens_per_second=demand,
        policy=EnergyPolicy.PERFORMANCE,
    )
    tight = Budget("rack", 8 * 200 + 500 + 10, frozenset({"h0"}))
    ample = Budget("rack", 8 * 700, frozenset({"h0"}))
    assert {v for _, v, _ in placed(plan(PlanInput(nodes, (service,), (tight,))))["team/s"]} == {
        "fp8"
    }
    assert {v for _, v, _ in placed(plan(PlanInput(nodes, (service,), (ample,))))["team/s"]} == {
        "bf16"
    }


def test_performance_policy_pins_the_maximum_and_max_power_per_gpu_caps_it() -> None:
    job = training("team/t", policy=EnergyPolicy.PERFORMANCE)
    assert {level for *_, level in placed(plan(PlanInput(h100_nodes(1), (job,))))["team/t"]} == {
        700.0
    }
    capped = dataclasses.replace(job, max_power_watts_per_gpu=610)
    assert {level for *_, level in placed(plan(PlanInput(h100_nodes(1), (capped,))))["team/t"]} == {
        610.0
    }


def test_gang_runs_all_replicas_or_none() -> None:
    job = training("team/t", replicas=3, gpus_per_replica=8)
    result = plan(PlanInput(h100_nodes(2), (job,)))
    assert not result.placements
    assert result.unplaced[0].constraint == "gpus"
    result = plan(PlanInput(h100_nodes(3), (job,)))
    assert sorted(node for node, *_ in placed(result)["team/t"]) == ["h0", "h1", "h2"]


def test_idle_gpus_sit_at_their_minimum_and_agentless_nodes_count_at_maximum() -> None:
    nodes = (GpuNode("h0", "H100-80GB", 8), GpuNode("h1", "H100-80GB", 8, agent_ready=False))
    budget = Budget("cluster", 8 * 200 + 8 * 700, frozenset({"h0", "h1"}))
    result = plan(PlanInput(nodes, (), (budget,)))
    assert result.node_power_limits_watts == {"h0": (200.0,) * 8, "h1": (700.0,) * 8}
    assert result.budgets[0].allocated_cap_watts == 8 * 200 + 8 * 700


def test_a_cap_below_the_idle_minimum_holds_only_its_own_nodes() -> None:
    """Issue 12 item 3: a 1 W budget over rack-d leaves an A100 service elsewhere placed."""
    nodes = (*h100_nodes(2, prefix="d"), GpuNode("a0", "A100-80GB", 8))
    rack_d = Budget("rack-d", 1, frozenset({"d0", "d1"}))
    cluster = Budget("cluster", 100_000, frozenset({"d0", "d1", "a0"}))
    work = (
        inference("team/service", allowed_products=frozenset({"A100-80GB"})),
        training("team/only-h100", allowed_products=frozenset({"H100-80GB"})),
    )
    running = (CurrentPlacement("team/only-h100", 0, "d0", "bf16", 700.0),)
    result = plan(PlanInput(nodes, work, (cluster, rack_d), current=running))
    assert {p.node for p in placed_replicas(result, "team/service")} == {"a0"}
    assert placed_replicas(result, "team/only-h100") == []
    (left_out,) = result.unplaced
    assert left_out.constraint == "budget:rack-d"
    assert "EnergyBudget rack-d holds its nodes (d0, d1)" in left_out.reason
    assert "spec.powerCapWatts=1 is below the 3200 W" in left_out.reason
    assert result.node_power_limits_watts["d0"] == (200.0,) * 8  # held at the H100 minimum
    allocations = {a.name: a for a in result.budgets}
    assert allocations["rack-d"].held
    assert allocations["rack-d"].allocated_cap_watts == 3200
    assert not allocations["cluster"].held


def test_a_budget_tight_while_an_agent_is_down_is_held_and_counts_that_node_at_maximum() -> None:
    nodes = (GpuNode("h0", "H100-80GB", 8, agent_ready=False), GpuNode("h1", "H100-80GB", 8))
    tight = Budget("rack", 8 * 200 + 8 * 200 + 1000, frozenset({"h0", "h1"}))
    other = GpuNode("l0", "L40S", 4)
    result = plan(PlanInput((*nodes, other), (inference("team/s"),), (tight,)))
    assert {p.node for p in placed_replicas(result, "team/s")} == {"l0"}
    (allocation,) = result.budgets
    assert allocation.held
    # Written at the minimum (lowering is always safe), counted at the maximum (unconfirmed).
    assert result.node_power_limits_watts["h0"] == (200.0,) * 8
    assert allocation.allocated_cap_watts == 8 * 700 + 8 * 200


def placed_replicas(result: Plan, key: str) -> list[Placement]:
    return [p for p in result.placements if p.workload == key]


def test_running_training_is_not_moved() -> None:
    job = training("team/t", gpus_per_replica=4)
    current = (CurrentPlacement("team/t", 0, "h1", "bf16", 450.0),)
    result = plan(PlanInput(h100_nodes(2), (job,), current=current))
    assert [node for node, *_ in placed(result)["team/t"]] == ["h1"]


def test_replicas_never_span_nodes_and_allow_lists_hold() -> None:
    nodes = (*h100_nodes(1), GpuNode("l0", "L40S", 4))
    service = inference("team/s", gpus_per_replica=4, allowed_products=frozenset({"L40S"}))
    result = plan(PlanInput(nodes, (service,)))
    assert [node for node, *_ in placed(result)["team/s"]] == ["l0"]


def test_unknown_node_product_is_an_input_error_naming_the_node() -> None:
    with pytest.raises(PlanInputError, match=r"Node x0: product"):
        plan(PlanInput((GpuNode("x0", "B200", 8),), ()))


def test_leaving_gpus_beyond_the_unmanaged_ones_are_an_input_error_naming_the_node() -> None:
    node = GpuNode("h0", "H100-80GB", 6, unmanaged_gpus=2, unmanaged_watts=900.0)
    with pytest.raises(PlanInputError, match=r"Node h0: leaving_gpus=3 .* unmanaged"):
        plan(PlanInput((dataclasses.replace(node, leaving_gpus=3),), ()))
    plan(PlanInput((dataclasses.replace(node, leaving_gpus=2, leaving_watts=900.0),), ()))


def test_cbc_fallback_makes_the_same_plan_as_highs() -> None:
    nodes = h100_nodes(2)
    jobs = tuple(training(f"team/t{i}", gpus_per_replica=4, priority=i) for i in range(5))
    budget = (Budget("cluster", 16 * 200 + 8 * 250, frozenset(n.name for n in nodes)),)
    highs = plan(PlanInput(nodes, jobs, budget))
    cbc = plan(PlanInput(nodes, jobs, budget, options=PlanOptions(solver="cbc")))
    assert (highs.solver, cbc.solver) == ("highs", "cbc")
    assert {p.workload for p in cbc.placements} == {p.workload for p in highs.placements}
    assert cbc.objective == pytest.approx(highs.objective)
    assert cbc.status is PlanStatus.OPTIMAL


def test_unknown_solver_is_an_input_error() -> None:
    with pytest.raises(PlanInputError, match=r"PlanOptions.solver='gurobi'"):
        plan(PlanInput(h100_nodes(1), (), options=PlanOptions(solver="gurobi")))


def test_same_input_gives_the_same_plan() -> None:
    nodes = h100_nodes(3)
    work = tuple(
        training(f"team/t{i}", gpus_per_replica=2 + i % 3, priority=i % 2) for i in range(9)
    )
    first = plan(PlanInput(nodes, work))
    second = plan(PlanInput(nodes, work))
    assert first.placements == second.placements
    assert first.unplaced == second.unplaced


@pytest.mark.parametrize(
    ("changes", "constraint", "field"),
    [
        ({"allowed_products": frozenset({"L4"})}, "products", "spec.gpu.products"),
        ({"gpus_per_replica": 16}, "gpus", "spec.gpu.count=16"),
        ({"min_quality": 1.5}, "quality", "spec.minQuality"),
        ({"max_power_watts_per_gpu": 50.0}, "power", "spec.energy.maxPowerWattsPerGPU=50"),
    ],
)
def test_a_workload_that_can_run_nowhere_says_which_field_to_change(
    changes: dict[str, object], constraint: str, field: str
) -> None:
    result = plan(PlanInput(h100_nodes(1), (inference("team/s", **changes),)))
    (left_out,) = result.unplaced
    assert left_out.constraint == constraint
    assert field in left_out.reason
    assert left_out.reason.startswith("LLMWorkload team/s:")


def test_a_service_a_budget_cannot_serve_whole_keeps_as_many_replicas_as_fit() -> None:
    """40,000 tokens/s of an 8B model need 8 H100s at 700 W or 19 at 200 W; a cap that holds 16
    GPUs at 200 W (2,184 tokens/s each, modelled) serves 34,940 with 16 replicas, not none."""
    nodes = h100_nodes(2)
    cap = 16 * 200 + 100
    service = inference("team/chat", tokens_per_second=40_000, max_replicas=32)
    result = plan(
        PlanInput(nodes, (service,), budgets=(Budget("rack", cap, frozenset({"h0", "h1"})),))
    )
    replicas = placed(result)["team/chat"]
    assert len(replicas) == 16
    assert {limit for *_, limit in replicas} == {200.0}
    assert result.unplaced == ()
    (short,) = result.shortfalls
    assert short.workload == "team/chat"
    assert short.constraint == "budget:rack"
    assert short.served_tokens_per_second == pytest.approx(34_940, rel=1e-3)
    assert short.served_share == pytest.approx(0.8735, abs=1e-3)
    assert "serves 34941 of 40000 tokens/s" in short.reason
    assert sum(sum(limits) for limits in result.node_power_limits_watts.values()) <= cap


def test_a_service_whose_demand_exceeds_max_replicas_runs_max_replicas() -> None:
    result = plan(PlanInput(h100_nodes(1), (inference("team/s", tokens_per_second=1e9),)))
    assert len(placed(result)["team/s"]) == 8
    (short,) = result.shortfalls
    assert short.constraint == "slo"
    assert "spec.slo.tokensPerSecond" in short.reason


def test_a_service_measured_at_zero_tokens_per_second_keeps_its_minimum_replicas() -> None:
    # The operator's forecast is 0 when every reading of the last 5 minutes is 0 (no traffic).
    result = plan(
        PlanInput(h100_nodes(1), (inference("team/s", tokens_per_second=0.0, min_replicas=2),))
    )
    assert len(placed(result)["team/s"]) == 2
    assert result.unplaced == ()


def test_a_service_served_whole_has_no_shortfall() -> None:
    result = plan(PlanInput(h100_nodes(1), (inference("team/s", tokens_per_second=4_000),)))
    assert result.shortfalls == ()
    assert sum(p.expected_throughput for p in result.placements) >= 4_000


def test_a_partly_served_service_never_displaces_higher_priority_work() -> None:
    nodes = h100_nodes(1)
    job = training("team/job", priority=10, policy=EnergyPolicy.PERFORMANCE)
    service = inference("team/chat", tokens_per_second=40_000)
    result = plan(PlanInput(nodes, (job, service)))
    assert "team/job" in placed(result)
    assert "team/chat" not in placed(result)


def batch(key: str, **changes: object) -> Workload:
    return training(key, type=WorkloadType.BATCH_INFERENCE, **changes)


RUNNING_ON_H0 = (CurrentPlacement("team/low", 0, "h0", "bf16", 700.0),)


@pytest.mark.parametrize(
    "low", [training("team/low"), batch("team/low", preemptible=False)], ids=["training", "batch"]
)
def test_running_non_preemptible_lower_priority_work_keeps_its_node_and_the_higher_one_waits(
    low: Workload,
) -> None:
    high = batch("team/high", priority=10, preemptible=True)
    result = plan(PlanInput(h100_nodes(1), (low, high), current=RUNNING_ON_H0))
    assert [node for node, *_ in placed(result)["team/low"]] == ["h0"]
    (waiting,) = result.unplaced
    assert (waiting.workload, waiting.constraint) == ("team/high", "gpus")
    assert "non-preemptible" in waiting.reason


def test_running_non_preemptible_work_keeps_its_share_of_a_binding_budget() -> None:
    nodes = h100_nodes(2)
    # Idle minimum 16 x 200 W plus room for one 8-GPU job at 700 W (8 x 500 W), not two.
    budget = Budget("cluster", 16 * 200 + 8 * 500, frozenset(n.name for n in nodes))
    low = training("team/low", policy=EnergyPolicy.PERFORMANCE)
    high = training("team/high", priority=10, policy=EnergyPolicy.PERFORMANCE)
    result = plan(PlanInput(nodes, (low, high), (budget,), current=RUNNING_ON_H0))
    assert placed(result) == {"team/low": [("h0", "bf16", 700.0)]}
    assert [(u.workload, u.constraint) for u in result.unplaced] == [
        ("team/high", "budget:cluster")
    ]


@pytest.mark.parametrize(
    "low", [training("team/low", preemptible=True), batch("team/low", preemptible=True)]
)
def test_running_preemptible_lower_priority_work_is_preempted_for_higher_priority(
    low: Workload,
) -> None:
    high = batch("team/high", priority=10)
    result = plan(PlanInput(h100_nodes(1), (low, high), current=RUNNING_ON_H0))
    assert [node for node, *_ in placed(result)["team/high"]] == ["h0"]
    assert [u.workload for u in result.unplaced] == ["team/low"]


def test_non_preemptible_work_that_is_not_running_yet_waits_for_higher_priority() -> None:
    low = training("team/low")
    high = batch("team/high", priority=10)
    result = plan(PlanInput(h100_nodes(1), (low, high)))
    assert list(placed(result)) == ["team/high"]


def test_two_budgets_with_one_name_are_an_input_error_naming_the_budget() -> None:
    budget = Budget("cluster", 10_000, frozenset({"h0"}))
    with pytest.raises(PlanInputError, match=r"EnergyBudget cluster: listed twice"):
        plan(PlanInput(h100_nodes(1), (), (budget, budget)))


def test_a_gang_that_finds_no_free_slots_is_told_to_lower_spec_replicas_not_min_replicas() -> None:
    blocker = training("team/blocker", replicas=2, priority=10)
    gang = training("team/gang", replicas=2)
    result = plan(PlanInput(nodes=h100_nodes(2), workloads=(blocker, gang)))
    (unplaced,) = result.unplaced
    assert unplaced.workload == "team/gang"
    assert "lower spec.gpu.count or spec.replicas" in unplaced.reason
    assert "minReplicas" not in unplaced.reason


def test_an_inference_service_without_free_slots_is_told_to_lower_spec_min_replicas() -> None:
    blocker = training("team/blocker", replicas=2, priority=10)
    service = inference("team/chat", gpus_per_replica=8, min_replicas=1, max_replicas=1)
    result = plan(PlanInput(nodes=h100_nodes(2), workloads=(blocker, service)))
    (unplaced,) = result.unplaced
    assert "lower spec.gpu.count or spec.minReplicas" in unplaced.reason


def test_a_deadline_too_close_is_said_in_rounded_time_and_names_the_gang_size_field() -> None:
    work = WorkAmount(WorkUnit.TOKENS, 1e15)
    job = training("team/t", remaining_work=work, deadline_seconds=9532.06)
    result = plan(PlanInput(nodes=h100_nodes(1), workloads=(job,)))
    (unplaced,) = result.unplaced
    assert "in the 2.6 h left before spec.slo.deadline" in unplaced.reason
    assert "9532" not in unplaced.reason
    assert "raise spec.replicas" in unplaced.reason


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(44.4, "44 s"), (600, "10 min"), (9532.06, "2.6 h"), (3 * 86400, "3.0 days")],
)
def test_durations_in_messages_are_rounded_for_people(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


def test_only_the_replicas_on_a_lost_node_move_and_healthy_gang_members_stay() -> None:
    """Issue 12 item 7: the plan after an agent loss moved a gang member from a healthy node."""
    nodes = (
        GpuNode("lost", "H100-80GB", 8, schedulable=False, keeps_running=False),
        *h100_nodes(3),
    )
    job = training("team/job", gpus_per_replica=4, replicas=4)
    service = inference("team/svc", min_replicas=3, max_replicas=3)
    current = (
        CurrentPlacement("team/job", 0, "lost", "bf16", 450.0),
        CurrentPlacement("team/job", 1, "lost", "bf16", 450.0),
        CurrentPlacement("team/job", 2, "h0", "bf16", 450.0),
        CurrentPlacement("team/job", 3, "h0", "bf16", 450.0),
        CurrentPlacement("team/svc", 0, "lost", "bf16", 450.0),
        CurrentPlacement("team/svc", 1, "h1", "bf16", 450.0),
        CurrentPlacement("team/svc", 2, "h1", "bf16", 450.0),
    )
    result = plan(PlanInput(nodes, (job, service), current=current))
    where = {(p.workload, p.replica): p.node for p in result.placements}
    assert where[("team/job", 2)] == where[("team/job", 3)] == "h0"
    assert where[("team/svc", 1)] == where[("team/svc", 2)] == "h1"
    assert "lost" not in where.values()
    assert len(where) == 7


def test_a_budget_limited_reason_says_what_is_needed_and_how_much_is_missing() -> None:
    nodes = h100_nodes(2)
    # After team/b, 100 W of headroom; team/a at 700 W adds 8 x 500 W = 4,000 W over the idle
    # minimum: it needs 4,000 W, 3,900 W more than the headroom (not "needs 3900 W").
    cap = 16 * 200 + 8 * 500 + 100
    jobs = (
        training("team/a", policy=EnergyPolicy.PERFORMANCE, priority=1),
        training("team/b", policy=EnergyPolicy.PERFORMANCE, priority=5),
    )
    result = plan(
        PlanInput(nodes, jobs, (Budget("cluster", cap, frozenset(n.name for n in nodes)),))
    )
    (left_out,) = result.unplaced
    assert "has 100 W of headroom" in left_out.reason
    assert "needs 4000 W, 3900 W more than that" in left_out.reason


def test_a_budget_cut_over_one_node_of_a_running_gang_lowers_its_limit_in_place() -> None:
    # The gang runs on h0 (in the rack) and h2 at 325 W; the cut leaves h0 room only at 200 W.
    # An idle node of the same pool outside the rack (h3) must not take h0's replica.
    nodes = h100_nodes(4)
    rack = Budget("rack", 16 * 200 + 8 * 100, frozenset({"h0", "h1"}))
    current = (
        CurrentPlacement("team/gang", 0, "h0", "bf16", 325.0),
        CurrentPlacement("team/gang", 1, "h2", "bf16", 325.0),
    )
    result = plan(PlanInput(nodes, (training("team/gang", replicas=2),), (rack,), current=current))
    assert placed(result) == {"team/gang": [("h0", "bf16", 200.0), ("h2", "bf16", 200.0)]}
    assert result.move_reasons == {}


# The L40S pair of the sandbox: 2 nodes of 4 GPUs (100-350 W each), one budget over both.
L40S_PAIR = (GpuNode("l0", "L40S", 4), GpuNode("l1", "L40S", 4))
# 5,000 tokens/s need both 4-GPU replicas at 162 W (3,189 tokens/s each, modelled); at 100 W
# two replicas serve 3,954.
IMPORTANT = inference(
    "team/important",
    gpus_per_replica=4,
    max_replicas=2,
    tokens_per_second=5_000,
    priority=100,
    preemptible=False,
    allowed_products=frozenset({"L40S"}),
)
WAITING_BATCH = batch("team/batch", gpus_per_replica=4, priority=0, preemptible=True)


def l40s_budget(cap_watts: float) -> Budget:
    return Budget("l40s", cap_watts, frozenset({"l0", "l1"}))


def test_a_service_served_in_part_keeps_its_replicas_after_a_budget_cut_before_waiting_batch() -> (
    None
):
    """A running non-preemptible service, cut to 1,250 W where its two replicas no longer fit at
    162 W: it keeps both at 100 W (3,954 tokens/s) and the waiting batch job stays waiting
    (it used to take one of its nodes)."""
    running = tuple(
        CurrentPlacement("team/important", i, node, "bf16", 162.0)
        for i, node in enumerate(("l0", "l1"))
    )
    result = plan(
        PlanInput(L40S_PAIR, (IMPORTANT, WAITING_BATCH), (l40s_budget(1_250),), current=running)
    )
    assert sorted(placed(result)["team/important"]) == [
        ("l0", "bf16", 100.0),
        ("l1", "bf16", 100.0),
    ]
    assert "team/batch" not in placed(result)
    (short,) = result.shortfalls
    assert short.workload == "team/important"
    assert short.served_tokens_per_second == pytest.approx(3_954, rel=1e-3)


def test_lower_priority_batch_gets_no_watts_a_higher_priority_service_in_part_could_use() -> None:
    """Under a 1,250 W cap (450 W over the 800 W idle floor) the service cannot be served
    whole: it gets both replicas at 100 W before the batch job is admitted, not one replica
    at 100 W beside batch at 162 W per GPU."""
    result = plan(PlanInput(L40S_PAIR, (IMPORTANT, WAITING_BATCH), (l40s_budget(1_250),)))
    assert [limit for *_, limit in placed(result)["team/important"]] == [100.0, 100.0]
    assert "team/batch" not in placed(result)
    assert [u.workload for u in result.unplaced] == ["team/batch"]


def test_batch_keeps_what_a_service_served_in_part_cannot_use() -> None:
    """With maxReplicas=1 the service's one replica takes one node; the batch job gets the other
    node and the watts left, instead of waiting."""
    one = dataclasses.replace(IMPORTANT, max_replicas=1)
    result = plan(PlanInput(L40S_PAIR, (one, WAITING_BATCH), (l40s_budget(2_000),)))
    assert len(placed(result)["team/important"]) == 1
    assert len(placed(result)["team/batch"]) == 1
    (short,) = result.shortfalls
    assert short.constraint == "slo"


def test_a_running_non_preemptible_service_served_in_part_keeps_its_node_against_new_work() -> None:
    """The service has no whole option (maxReplicas=1 is too few for its demand); the new job,
    of higher priority, waits instead of taking the node (found by the property test)."""
    node = (GpuNode("n0", "H100-80GB", 4),)
    service = inference("team/chat", gpus_per_replica=4, max_replicas=1, tokens_per_second=50_000)
    job = training("team/urgent", gpus_per_replica=2, priority=5)
    running = (CurrentPlacement("team/chat", 0, "n0", "bf16", 700.0),)
    result = plan(PlanInput(node, (service, job), current=running))
    assert [n for n, *_ in placed(result)["team/chat"]] == ["n0"]
    assert [u.workload for u in result.unplaced] == ["team/urgent"]
    (short,) = result.shortfalls
    assert short.constraint == "slo"


def test_a_running_non_preemptible_service_that_must_move_goes_at_its_own_priority() -> None:
    """Found by the round fuzzer: a running non-preemptible service of priority 0 at 1 of its
    minReplicas 2 (its 2-GPU node holds one replica) can only be served on the L40S node, which
    holds two. It used to go first, being protected, and take that node wholly: the service of
    priority 1000 that may only use L40S was left out. Protection keeps running work where it
    runs; a move is a new placement, at the workload's own priority."""
    nodes = (GpuNode("h0", "H100-80GB", 2), GpuNode("l0", "L40S", 4))
    running = inference(
        "team/chat",
        gpus_per_replica=2,
        min_replicas=2,
        max_replicas=2,
        tokens_per_second=50_000,
        preemptible=False,
    )
    probe = inference(
        "probe/svc",
        tokens_per_second=10,
        priority=1000,
        allowed_products=frozenset({"L40S"}),
    )
    current = (CurrentPlacement("team/chat", 0, "h0", "bf16", 300.0),)
    result = plan(PlanInput(nodes, (running, probe), current=current))
    assert [n for n, *_ in placed(result)["probe/svc"]] == ["l0"]
    assert "team/chat" not in placed(result)
    (left_out,) = result.unplaced
    assert left_out.workload == "team/chat"
    # Its reason says what binds now (its maxReplicas alone would not have stopped it).
    assert left_out.constraint == "gpus"
    assert "served in part: needs 2 replica(s) of 2 GPU(s)" in left_out.reason
    assert "after higher-priority" in left_out.reason


def test_a_running_non_preemptible_service_that_grows_keeps_what_runs_when_it_cannot_grow() -> None:
    """The service runs one replica of 2 GPUs on a 4-GPU node and its demand asks for two; a job
    of higher priority needs the other 2 GPUs. Growth goes at the service's own priority: the
    job keeps the free GPUs and the service its running replica, served in part (it used to
    evict the job and grow)."""
    node = (GpuNode("n0", "H100-80GB", 4),)
    service = inference(
        "team/chat",
        gpus_per_replica=2,
        max_replicas=2,
        tokens_per_second=50_000,
        preemptible=False,
    )
    job = training("team/urgent", gpus_per_replica=2, priority=5)
    current = (CurrentPlacement("team/chat", 0, "n0", "bf16", 700.0),)
    result = plan(PlanInput(node, (service, job), current=current))
    assert [n for n, *_ in placed(result)["team/chat"]] == ["n0"]
    assert [n for n, *_ in placed(result)["team/urgent"]] == ["n0"]


def test_a_running_non_preemptible_service_keeps_its_replica_against_new_work_of_its_priority() -> (
    None
):
    """Found by the property tests: a service runs one replica and its demand asks for two; a
    new batch job of the same priority was packed first and takes the budget's headroom. The
    service's growth cannot evict work of its own priority, but its running replica is never
    stopped for new work: as a last resort it stays, the job is evicted, and the service grows
    into the headroom that frees."""
    nodes = (GpuNode("n0", "L40S", 4), GpuNode("n1", "L40S", 4))
    fast = EnergyPolicy.PERFORMANCE
    service = inference(
        "ns/s0", max_replicas=2, tokens_per_second=5_000, priority=1, policy=fast, preemptible=False
    )
    other = inference("ns/s1", max_replicas=1, tokens_per_second=2_000, priority=1, policy=fast)
    job = batch("ns/j0", gpus_per_replica=4, priority=1, policy=fast, preemptible=False)
    current = (CurrentPlacement("ns/s0", 0, "n0", "bf16", 100.0),)
    budget = Budget("b", 1_800, frozenset({"n0", "n1"}))
    result = plan(PlanInput(nodes, (service, other, job), (budget,), current=current))
    assert [n for n, *_ in placed(result)["ns/s0"]] == ["n0", "n0"]
    assert [n for n, *_ in placed(result)["ns/s1"]] == ["n0"]
    assert [u.workload for u in result.unplaced] == ["ns/j0"]


def test_a_running_service_that_packing_cannot_keep_whole_is_served_in_part() -> None:
    """The 48-hour simulation, cut down to what still shows it: a service runs 12 replicas of
    4 H100 GPUs on six nodes and its demand asks for a thirteenth; a new gang of two 8-GPU pods
    and a running 8-GPU job need whole nodes. The last pass could not pack the service whole
    ("packing": GPUs and watts exist in total, not together) and left it out, so all 12 running
    replicas would stop (conv fell to 81.52% of its SLO over two days). A service left out for
    packing is served in part, as for GPUs or a budget."""
    big_bf16 = Variant("bf16", Precision.BF16, min_memory_gib=43.75)
    big_fp8 = Variant(
        "fp8", Precision.FP8, min_memory_gib=21.875, relative_throughput=1.6, quality=0.97
    )
    conv = inference(
        "azure/conv",
        model_parameters_billions=70,
        gpus_per_replica=4,
        variants=(big_bf16, big_fp8),
        max_replicas=32,
        min_quality=0.95,
        priority=1000,
        tokens_per_second=20_289,
    )
    code = inference(
        "azure/code",
        variants=(
            Variant("bf16", Precision.BF16, min_memory_gib=20),
            Variant("fp8", Precision.FP8, min_memory_gib=10, relative_throughput=1.6, quality=0.97),
        ),
        max_replicas=64,
        min_quality=0.95,
        priority=1000,
        tokens_per_second=14_387,
    )
    tokens = WorkUnit.TOKENS
    running_job = training(
        "batch/tune",
        type=WorkloadType.FINE_TUNING,
        model_parameters_billions=70,
        variants=(Variant("bf16", Precision.BF16, min_memory_gib=21.875),),
        priority=1,
        remaining_work=WorkAmount(tokens, 9.81e6),
        deadline_seconds=39_570.0,
    )
    gang = training(
        "batch/gang",
        model_parameters_billions=70,
        variants=(Variant("bf16", Precision.BF16, min_memory_gib=21.875),),
        replicas=2,
        min_replicas=2,
        max_replicas=2,
        priority=51,
        remaining_work=WorkAmount(tokens, 2.133e7),
        deadline_seconds=33_810.0,
    )
    nodes = (
        *(GpuNode(f"a{i}", "A100-80GB", 8) for i in range(3)),
        *h100_nodes(7),
    )
    conv_nodes = ["h5", "h0", "h1", "h1", "h0", "h2", "h3", "h2", "h5", "h3", "h4", "h4"]
    current = (
        *(CurrentPlacement("azure/conv", i, n, "fp8", 575.0) for i, n in enumerate(conv_nodes)),
        CurrentPlacement("batch/tune", 0, "h6", "bf16", 200.0),
    )
    budget = Budget("cluster", 36_000.0, frozenset(n.name for n in nodes))
    # Measured: the services serve about half the catalogue's tokens/s on these GPUs.
    measured = CatalogueModel(
        {
            (product, WorkloadType.INFERENCE): Calibration(throughput_factor=0.5)
            for product in ("A100-80GB", "H100-80GB")
        }
    )
    plan_input = PlanInput(nodes, (code, conv, running_job, gang), (budget,), current=current)
    result = plan(plan_input, measured)
    kept = [p.node for p in result.placements if p.workload == "azure/conv"]
    assert len(kept) >= len(conv_nodes)
    (short,) = [s for s in result.shortfalls if s.workload == "azure/conv"]
    assert short.served_tokens_per_second < short.demand_tokens_per_second
    assert "azure/conv" not in {u.workload for u in result.unplaced}


def test_the_last_pass_serves_a_pinned_service_in_part_rather_than_leaving_it_out() -> None:
    """A running service asks for a third 4-GPU replica where its two fill the only node. In the
    planner's first pass it is not served in part (pinned: the second pass may serve it whole
    elsewhere); in the last it is, on the nodes it runs on. Left out, every replica it ran on
    stopped (seen in the 48-hour simulation)."""
    chat = inference("team/chat", gpus_per_replica=4, max_replicas=3, tokens_per_second=40_000)
    running = tuple(CurrentPlacement("team/chat", i, "h0", "bf16", 700.0) for i in range(2))
    plan_input = PlanInput(h100_nodes(1), (chat,), current=running)
    model = CatalogueModel()
    data = build_plan_data(plan_input, model)
    (chat_class,) = data.classes
    assert chat_class.pinned_nodes

    def left_out(last_pass: bool) -> tuple[list[str], set[str]]:
        state = ClusterState(data, planner._running_gpus(plan_input, {chat.key: chat}))
        unplaced: dict[str, Unplaced] = {}
        planner._fill_and_repair(
            data,
            state=state,
            pending=[chat.key],
            workload_by_key={chat.key: chat},
            class_of={chat.key: chat_class},
            prefer=planner._preferred_nodes(plan_input),
            unplaced=unplaced,
            in_part=lambda w: planner._partial_class(plan_input, data, w, model),
            pinned_in_part=last_pass,
        )
        nodes = list(state.placed[chat.key].nodes) if chat.key in state.placed else []
        return nodes, set(unplaced)

    assert left_out(last_pass=False) == ([], {"team/chat"})
    assert left_out(last_pass=True) == (["h0", "h0"], set())
    (short,) = plan(plan_input).shortfalls
    assert short.workload == "team/chat"
