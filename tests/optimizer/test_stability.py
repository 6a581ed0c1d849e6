"""Hand-checked stability: running replicas stay unless a move must happen (node lost, budget,
priority) or gains enough and the workload's spec.disruption.moveToSaveEnergy allows it.

The gains below come from the catalogue (checked first in each test, so a catalogue change that
removes the case fails loudly instead of passing for the wrong reason).
"""

from __future__ import annotations

import math

import pytest

from wattsched_optimizer.model import (
    CatalogueModel,
    power_levels_watts,
    product_spec,
    sm_clock_effect,
    sm_clock_levels_mhz,
)
from wattsched_optimizer.options import BALANCED_MIN_CLOCK_THROUGHPUT
from wattsched_optimizer.planner import PlanInputError, plan
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    MoveReason,
    Plan,
    PlanInput,
    PlanOptions,
    Precision,
    Variant,
    WorkAmount,
    Workload,
    WorkloadType,
    WorkUnit,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0, relative_throughput=1.0, quality=1.0)
MODEL = CatalogueModel()


def batch_job(**changes: object) -> Workload:
    fields: dict[str, object] = {
        "key": "team/batch",
        "type": WorkloadType.BATCH_INFERENCE,
        "model_parameters_billions": 8,
        "gpus_per_replica": 1,
        "variants": (BF16,),
        "replicas": 1,
    } | changes
    return Workload(**fields)  # type: ignore[arg-type]


def service(tokens_per_second: float, *, moves_to_save_energy: bool = False) -> Workload:
    return Workload(
        key="team/svc",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=1,
        max_replicas=8,
        tokens_per_second=tokens_per_second,
        moves_to_save_energy=moves_to_save_energy,
    )


def batch_joules_per_token(product: str) -> float:
    """The cheapest expected J/token of the 8B batch job on one GPU of `product`."""
    return min(
        MODEL.expected_power_watts(product, WorkloadType.BATCH_INFERENCE, level)
        / MODEL.throughput_tokens_per_second(
            product, WorkloadType.BATCH_INFERENCE, 8, 1, 1.0, level
        )
        for level in power_levels_watts(product, 5)
    )


def service_joules_per_token(product: str, demand: float) -> float:
    """The cheapest expected J per demanded token of the 8B (Balanced) service, replicas rounded
    up: at each power level unlocked, or with a locked SM clock Balanced allows whose draw stays
    under the level."""
    inference = WorkloadType.INFERENCE
    top = product_spec(product).max_watts.value
    full = MODEL.throughput_tokens_per_second(product, inference, 8, 1, 1.0, top)
    unlocked_watts = MODEL.expected_power_watts(product, inference, top)
    costs = []
    for level in power_levels_watts(product, 5):
        settings = [
            (
                MODEL.throughput_tokens_per_second(product, inference, 8, 1, 1.0, level),
                MODEL.expected_power_watts(product, inference, level),
            )
        ]
        for clock in sm_clock_levels_mhz(product, inference):
            throughput_fraction, draw_fraction = sm_clock_effect(product, inference, clock)
            if throughput_fraction < BALANCED_MIN_CLOCK_THROUGHPUT:  # the service is Balanced
                continue
            watts = max(MODEL.idle_power_watts(product), unlocked_watts * draw_fraction)
            if watts <= level:
                settings.append((full * throughput_fraction, watts))
        costs += [math.ceil(demand / tp) * watts / demand for tp, watts in settings]
    return min(costs)


def products_used(result: Plan, key: str) -> set[str]:
    return {p.node.split("-")[0] for p in result.placements if p.workload == key}


H100_AND_L4 = (GpuNode("h100-0", "H100-80GB", 8), GpuNode("l4-0", "L4", 4))
# Moving the batch job from an H100 to an L4 saves 1 - 0.0476/0.0567 = 16% J/token.
BATCH_GAIN = 1 - batch_joules_per_token("L4") / batch_joules_per_token("H100-80GB")
ON_H100 = (CurrentPlacement("team/batch", 0, "h100-0", "bf16", 325.0),)


def test_the_batch_case_has_a_moderate_gain() -> None:
    assert 0.12 < BATCH_GAIN < 0.2


def test_running_batch_job_is_not_moved_for_a_gain_below_the_threshold() -> None:
    options = PlanOptions(churn_threshold=0.2)
    result = plan(PlanInput(H100_AND_L4, (batch_job(),), current=ON_H100, options=options))
    assert [(p.node, p.variant) for p in result.placements] == [("h100-0", "bf16")]


def test_running_batch_job_moves_for_a_gain_above_the_threshold_when_its_spec_allows() -> None:
    options = PlanOptions(churn_threshold=0.1)
    job = batch_job(moves_to_save_energy=True)
    result = plan(PlanInput(H100_AND_L4, (job,), current=ON_H100, options=options))
    assert products_used(result, "team/batch") == {"l4"}
    assert result.move_reasons == {"team/batch": MoveReason.SAVINGS}


def test_running_batch_job_stays_for_a_gain_above_the_threshold_by_default() -> None:
    options = PlanOptions(churn_threshold=0.1)
    result = plan(PlanInput(H100_AND_L4, (batch_job(),), current=ON_H100, options=options))
    assert [(p.node, p.variant) for p in result.placements] == [("h100-0", "bf16")]
    assert result.move_reasons == {}


def test_running_batch_job_changes_its_power_limit_in_place_for_free() -> None:
    # Running at 700 W; the most efficient H100 level is lower: it stays on h100-0 at that level.
    at_max = (CurrentPlacement("team/batch", 0, "h100-0", "bf16", 700.0),)
    options = PlanOptions(churn_threshold=0.2)
    result = plan(PlanInput(H100_AND_L4, (batch_job(),), current=at_max, options=options))
    (placement,) = result.placements
    assert placement.node == "h100-0"
    assert placement.power_limit_watts == 325.0


def test_running_batch_job_moves_when_its_node_cannot_keep_it() -> None:
    nodes = (
        GpuNode("h100-0", "H100-80GB", 8, schedulable=False, keeps_running=False),
        GpuNode("h100-1", "H100-80GB", 8),
    )
    options = PlanOptions(churn_threshold=0.9)
    result = plan(PlanInput(nodes, (batch_job(),), current=ON_H100, options=options))
    assert [p.node for p in result.placements] == ["h100-1"]
    assert result.move_reasons == {"team/batch": MoveReason.NODE}


def test_a_cordon_alone_moves_nothing_and_takes_no_new_replicas() -> None:
    # h100-0 is cordoned (unschedulable, keeps what runs): the job stays there; the service's new
    # replicas go to h100-1 although h100-0 has free GPUs.
    nodes = (
        GpuNode("h100-0", "H100-80GB", 8, schedulable=False),
        GpuNode("h100-1", "H100-80GB", 8),
    )
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700.0
    )
    svc = Workload(
        key="team/svc",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=3,
        max_replicas=3,
        tokens_per_second=per_replica,
    )
    result = plan(PlanInput(nodes, (batch_job(), svc), current=ON_H100))
    assert [p.node for p in result.placements if p.workload == "team/batch"] == ["h100-0"]
    assert [p.node for p in result.placements if p.workload == "team/svc"] == ["h100-1"] * 3
    assert result.move_reasons == {}


def test_a_cordoned_nodes_service_replicas_stay_and_only_new_ones_go_elsewhere() -> None:
    nodes = (
        GpuNode("h100-0", "H100-80GB", 8, schedulable=False),
        GpuNode("h100-1", "H100-80GB", 8),
    )
    current = tuple(CurrentPlacement("team/svc", i, "h100-0", "bf16", 325.0) for i in range(2))
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 325.0
    )
    result = plan(PlanInput(nodes, (service(2 * per_replica),), current=current))
    assert sorted(p.node for p in result.placements) == ["h100-0", "h100-0"]


def test_lowering_a_budget_lowers_limits_in_place_before_anything_moves() -> None:
    # Two racks of H100s. The service runs on rack a; a cut of rack a to what its replicas draw at
    # a lower limit keeps them there at that limit (no move to rack b's free GPUs).
    nodes = (GpuNode("a0", "H100-80GB", 8), GpuNode("b0", "H100-80GB", 8))
    current = tuple(CurrentPlacement("team/svc", i, "a0", "bf16", 700.0) for i in range(4))
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 450.0
    )
    demand = 4 * per_replica
    rack_a = Budget("rack-a", 8 * 200 + 4 * (450 - 200), frozenset({"a0"}))
    result = plan(PlanInput(nodes, (service(demand),), (rack_a,), current=current))
    assert sorted(p.node for p in result.placements) == ["a0"] * 4
    assert {p.power_limit_watts for p in result.placements} == {450.0}
    assert result.move_reasons == {}


def test_a_budget_no_limit_in_place_can_keep_moves_the_work_and_says_why() -> None:
    nodes = (GpuNode("a0", "H100-80GB", 8), GpuNode("b0", "H100-80GB", 8))
    current = tuple(CurrentPlacement("team/svc", i, "a0", "bf16", 700.0) for i in range(4))
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700.0
    )
    # Four replicas at 700 W are needed; rack a can hold none above the idle minimum.
    rack_a = Budget("rack-a", 8 * 200 + 50, frozenset({"a0"}))
    result = plan(PlanInput(nodes, (service(4 * per_replica),), (rack_a,), current=current))
    assert {p.node for p in result.placements} == {"b0"}
    assert result.move_reasons == {"team/svc": MoveReason.BUDGET}


def test_a_moved_job_must_meet_its_deadline_after_the_restart() -> None:
    # The fastest option (one H100 at 700 W) finishes the work in 100 s; the deadline is 130 s,
    # so a restart of 60 s makes it late, and the job's node is being drained.
    fastest = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.BATCH_INFERENCE, 8, 1, 1.0, 700.0
    )
    job = batch_job(remaining_work=WorkAmount(WorkUnit.TOKENS, 100 * fastest), deadline_seconds=130)
    nodes = (
        GpuNode("h100-0", "H100-80GB", 8, schedulable=False, keeps_running=False),
        GpuNode("h100-1", "H100-80GB", 8),
    )
    late = plan(PlanInput(nodes, (job,), current=ON_H100))
    assert not late.placements
    assert late.unplaced[0].constraint == "deadline"
    instant = PlanOptions(startup_seconds=0.0)
    on_time = plan(PlanInput(nodes, (job,), current=ON_H100, options=instant))
    assert [p.node for p in on_time.placements] == ["h100-1"]


def test_a_job_that_stays_needs_no_restart_time_for_its_deadline() -> None:
    fastest = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.BATCH_INFERENCE, 8, 1, 1.0, 700.0
    )
    job = batch_job(remaining_work=WorkAmount(WorkUnit.TOKENS, 100 * fastest), deadline_seconds=130)
    result = plan(PlanInput(H100_AND_L4, (job,), current=ON_H100))
    (placement,) = result.placements
    assert placement.node == "h100-0"
    assert placement.expected_throughput * 130 >= 100 * fastest


A100_AND_L4 = (GpuNode("a100-0", "A100-80GB", 8), GpuNode("l4-0", "L4", 4))
DEMAND = 1000.0
# Three L4 replicas at 40 W vs one A100 replica at 100 W: moving saves 1 - 100/120 = 17% (no clock
# Balanced allows lowers the draw of either under its limit).
SERVICE_GAIN = 1 - service_joules_per_token("A100-80GB", DEMAND) / service_joules_per_token(
    "L4", DEMAND
)
ON_L4 = tuple(CurrentPlacement("team/svc", i, "l4-0", "bf16", 40.0) for i in range(3))


def test_the_service_case_has_a_moderate_gain() -> None:
    assert pytest.approx(1 - 100 / 120) == SERVICE_GAIN


def test_service_is_not_churned_for_a_gain_below_the_threshold() -> None:
    options = PlanOptions(churn_threshold=0.25)
    result = plan(PlanInput(A100_AND_L4, (service(DEMAND),), current=ON_L4, options=options))
    assert products_used(result, "team/svc") == {"l4"}
    assert len(result.placements) == 3


def test_service_moves_for_a_gain_above_the_threshold_when_its_spec_allows() -> None:
    options = PlanOptions(churn_threshold=0.05)
    svc = service(DEMAND, moves_to_save_energy=True)
    result = plan(PlanInput(A100_AND_L4, (svc,), current=ON_L4, options=options))
    assert products_used(result, "team/svc") == {"a100"}


def test_service_stays_for_a_gain_above_the_threshold_by_default() -> None:
    options = PlanOptions(churn_threshold=0.05)
    result = plan(PlanInput(A100_AND_L4, (service(DEMAND),), current=ON_L4, options=options))
    assert products_used(result, "team/svc") == {"l4"}


def test_negative_stability_options_are_input_errors_naming_the_field() -> None:
    with pytest.raises(PlanInputError, match=r"PlanOptions.churn_threshold=-0.1"):
        plan(PlanInput(A100_AND_L4, (), options=PlanOptions(churn_threshold=-0.1)))
    with pytest.raises(PlanInputError, match=r"PlanOptions.startup_seconds=-1"):
        plan(PlanInput(A100_AND_L4, (), options=PlanOptions(startup_seconds=-1)))


def test_new_replicas_of_a_higher_priority_service_do_not_take_a_running_jobs_node() -> None:
    # h0 is full with the service; it needs 4 more replicas. Best fit alone would put them on h1
    # (equal free GPUs, lower name), where the 8-GPU fine-tuning job runs, and move the job.
    nodes = tuple(GpuNode(f"h{i}", "H100-80GB", 8) for i in range(3))
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700.0
    )
    svc = Workload(
        key="team/svc",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=12,
        max_replicas=12,
        tokens_per_second=per_replica,
        priority=1000,
    )
    job = batch_job(key="team/ft", type=WorkloadType.FINE_TUNING, gpus_per_replica=8)
    current = (
        *(CurrentPlacement("team/svc", i, "h0", "bf16", 325.0) for i in range(8)),
        CurrentPlacement("team/ft", 0, "h1", "bf16", 325.0),
    )
    result = plan(PlanInput(nodes, (svc, job), current=current))
    assert [p.node for p in result.placements if p.workload == "team/ft"] == ["h1"]
    service_nodes = sorted(p.node for p in result.placements if p.workload == "team/svc")
    assert service_nodes == ["h0"] * 8 + ["h2"] * 4


def test_a_replica_gone_from_a_cordoned_node_is_placed_elsewhere_and_the_others_stay() -> None:
    # kubectl drain evicted replica 0 from the cordoned h100-0; replica 1 still runs there.
    nodes = (
        GpuNode("h100-0", "H100-80GB", 8, schedulable=False),
        GpuNode("h100-1", "H100-80GB", 8),
    )
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 4, 1.0, 450.0
    )
    svc = Workload(
        key="team/svc",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=4,
        variants=(BF16,),
        min_replicas=2,
        max_replicas=2,
        tokens_per_second=per_replica,
        policy=EnergyPolicy.PERFORMANCE,
    )
    current = (CurrentPlacement("team/svc", 1, "h100-0", "bf16", 700.0),)
    result = plan(PlanInput(nodes, (svc,), current=current))
    assert sorted(p.node for p in result.placements) == ["h100-0", "h100-1"]


def test_a_replica_packing_could_keep_only_by_moving_it_gets_the_budget_as_its_reason() -> None:
    # The service runs on a0 (rack a) and b0. Rack a is cut below one replica at its only level
    # (Performance): the replicas on a0 must go, and the plan says the budget forced it.
    nodes = (
        GpuNode("a0", "H100-80GB", 8),
        GpuNode("b0", "H100-80GB", 8),
        GpuNode("b1", "H100-80GB", 8),
    )
    per_replica = MODEL.throughput_tokens_per_second(
        "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700.0
    )
    svc = Workload(
        key="team/svc",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=8,
        max_replicas=8,
        tokens_per_second=8 * per_replica,
        policy=EnergyPolicy.PERFORMANCE,
    )
    current = tuple(
        CurrentPlacement("team/svc", i, "a0" if i < 4 else "b0", "bf16", 700.0) for i in range(8)
    )
    rack_a = Budget("rack-a", 8 * 200 + 100, frozenset({"a0"}))
    result = plan(PlanInput(nodes, (svc,), (rack_a,), current=current))
    assert "a0" not in {p.node for p in result.placements}
    assert len(result.placements) == 8
    assert result.move_reasons == {"team/svc": MoveReason.BUDGET}
