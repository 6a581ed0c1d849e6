"""Locked SM clocks in plans: decode-bound inference under Efficiency and Balanced gets a clock
when it saves energy at the SLO; Performance and compute-bound work never do; budgets still count
power limits, never clocks."""

from __future__ import annotations

import dataclasses
import math

import pytest

from wattsched_optimizer.model import (
    CatalogueModel,
    product_spec,
    sm_clock_effect,
    sm_clock_levels_mhz,
)
from wattsched_optimizer.options import BALANCED_MIN_CLOCK_THROUGHPUT
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import (
    Budget,
    EnergyPolicy,
    GpuNode,
    PlanInput,
    Precision,
    Variant,
    Workload,
    WorkloadType,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0, relative_throughput=1.0, quality=1.0)
MODEL = CatalogueModel()
NODES = (GpuNode("h0", "H100-80GB", 8),)


def service(**changes: object) -> Workload:
    base = Workload(
        key="team/chat",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=1,
        max_replicas=8,
        tokens_per_second=10_000.0,
        policy=EnergyPolicy.EFFICIENCY,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_clock_levels_exist_for_decode_bound_inference_only() -> None:
    assert sm_clock_levels_mhz("H100-80GB", WorkloadType.INFERENCE) == (693, 990, 1188, 1485)
    for compute_bound in (
        WorkloadType.TRAINING,
        WorkloadType.FINE_TUNING,
        WorkloadType.BATCH_INFERENCE,
    ):
        assert sm_clock_levels_mhz("H100-80GB", compute_bound) == ()


def test_the_clock_curve_carries_the_cited_best_decode_saving() -> None:
    # Ma et al. (arXiv 2605.11999): up to 32% of decode energy saved by locking the SM clock.
    throughput, draw = sm_clock_effect("H100-80GB", WorkloadType.INFERENCE, 990)
    assert 1 - draw / throughput == pytest.approx(0.32, abs=0.01)
    assert sm_clock_effect("H100-80GB", WorkloadType.INFERENCE, None) == (1.0, 1.0)
    assert sm_clock_effect("H100-80GB", WorkloadType.TRAINING, 990) == (1.0, 1.0)


@pytest.mark.parametrize("policy", [EnergyPolicy.EFFICIENCY, EnergyPolicy.BALANCED])
def test_efficiency_and_balanced_lock_decode_clocks_and_meet_the_slo(
    policy: EnergyPolicy,
) -> None:
    result = plan(PlanInput(NODES, (service(policy=policy),)))
    assert result.placements
    clocks = {p.sm_clock_mhz for p in result.placements}
    assert None not in clocks
    assert clocks <= set(sm_clock_levels_mhz("H100-80GB", WorkloadType.INFERENCE))
    assert sum(p.expected_throughput for p in result.placements) >= 10_000.0
    for p in result.placements:
        assert p.expected_watts_per_gpu <= p.power_limit_watts
    locked = [c for c in result.node_sm_clocks_mhz["h0"] if c is not None]
    assert len(locked) == sum(p.gpus for p in result.placements)


def test_the_locked_plan_uses_less_modelled_energy_per_token_than_the_best_unlocked_one() -> None:
    demand = 10_000.0
    locked = plan(PlanInput(NODES, (service(),)))
    locked_watts = sum(p.expected_watts_per_gpu * p.gpus for p in locked.placements)
    unlocked_watts = []
    for level in (200.0, 325.0, 450.0, 575.0, product_spec("H100-80GB").max_watts.value):
        per_replica = MODEL.throughput_tokens_per_second(
            "H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, level
        )
        replicas = math.ceil(demand / per_replica)
        unlocked_watts.append(
            replicas * MODEL.expected_power_watts("H100-80GB", WorkloadType.INFERENCE, level)
        )
    assert locked_watts / demand < min(unlocked_watts) / demand


def test_performance_never_locks_clocks() -> None:
    result = plan(PlanInput(NODES, (service(policy=EnergyPolicy.PERFORMANCE),)))
    assert result.placements
    assert {p.sm_clock_mhz for p in result.placements} == {None}
    assert set(result.node_sm_clocks_mhz["h0"]) == {None}


def test_training_never_locks_clocks() -> None:
    job = Workload(
        key="team/train",
        type=WorkloadType.TRAINING,
        model_parameters_billions=8,
        gpus_per_replica=8,
        variants=(BF16,),
        replicas=1,
        policy=EnergyPolicy.EFFICIENCY,
    )
    result = plan(PlanInput(NODES, (job,)))
    assert [p.sm_clock_mhz for p in result.placements] == [None]


def test_the_budget_counts_power_limits_not_clocked_draw() -> None:
    budget = Budget("rack", 8 * 200.0 + 1_500.0, frozenset({"h0"}))
    result = plan(PlanInput(NODES, (service(),), budgets=(budget,)))
    (allocation,) = result.budgets
    assert allocation.allocated_cap_watts == pytest.approx(
        sum(result.node_power_limits_watts["h0"])
    )
    assert allocation.allocated_cap_watts <= budget.power_cap_watts
    assert allocation.expected_watts <= allocation.allocated_cap_watts


def test_balanced_locks_only_clocks_that_keep_nearly_all_the_throughput() -> None:
    balanced = plan(PlanInput(NODES, (service(policy=EnergyPolicy.BALANCED),)))
    assert balanced.placements
    for p in balanced.placements:
        assert p.sm_clock_mhz is not None
        kept, _ = sm_clock_effect("H100-80GB", WorkloadType.INFERENCE, p.sm_clock_mhz)
        assert kept >= BALANCED_MIN_CLOCK_THROUGHPUT
