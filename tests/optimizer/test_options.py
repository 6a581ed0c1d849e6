"""Aggregation and pruning: pools of identical nodes, classes of identical workloads, options."""

from __future__ import annotations

import dataclasses

import pytest

from wattsched_optimizer import options as options_module
from wattsched_optimizer.model import CatalogueModel, power_levels_watts
from wattsched_optimizer.options import Option, build_plan_data, prune_dominated
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    GpuNode,
    PlanInput,
    Precision,
    Variant,
    Workload,
    WorkloadType,
)

BF16 = Variant("bf16", Precision.BF16, 0, 1.0, 1.0)


def option(replicas: int, level: float, relative_cost: float) -> Option:
    return Option(
        product="H100-80GB",
        variant=BF16,
        power_limit_watts=level,
        is_max_level=level == 700,
        replicas=replicas,
        gpus_per_replica=1,
        throughput_per_replica=1000.0,
        expected_watts_per_gpu=level,
        relative_cost=relative_cost,
        quality_loss=0,
    )


def test_an_option_worse_in_energy_and_in_budget_watts_is_pruned() -> None:
    efficient = option(1, 450, 0.0)
    wasteful = option(1, 575, 0.2)
    assert prune_dominated([(efficient, (0,)), (wasteful, (0,))]) == [(efficient, (0,))]


def test_an_option_that_adds_fewer_budget_watts_is_kept_though_it_costs_more_energy() -> None:
    # One replica at 700 W adds 500 W over the idle minimum; two at 325 W add only 250 W.
    one_fast = option(1, 700, 0.0)
    two_slow = option(2, 325, 0.1)
    candidates = [(one_fast, (0,)), (two_slow, (0,))]
    assert prune_dominated(candidates) == candidates


def test_an_option_allowed_on_more_pools_is_kept() -> None:
    # At 700 W the option may also use a node whose agent is not ready (pool 1).
    at_max = option(1, 700, 0.2)
    efficient = option(1, 450, 0.0)
    candidates = [(efficient, (0,)), (at_max, (0, 1))]
    assert prune_dominated(candidates) == candidates


def test_balanced_training_keeps_only_levels_up_to_its_most_efficient() -> None:
    # Higher levels cost more energy per token and more budget watts.
    job = Workload("t/j", WorkloadType.TRAINING, 8, 8, (BF16,))
    data = build_plan_data(PlanInput((GpuNode("h0", "H100-80GB", 8),), (job,)), CatalogueModel())
    (workload_class,) = data.classes
    levels = sorted(o.power_limit_watts for o in workload_class.options)
    best = min(workload_class.options, key=lambda o: o.relative_cost).power_limit_watts
    assert levels == [w for w in power_levels_watts("H100-80GB", 5) if w <= best]


def test_nodes_alike_in_product_readiness_and_budgets_form_one_pool() -> None:
    nodes = (
        GpuNode("a", "H100-80GB", 8),
        GpuNode("b", "H100-80GB", 8),
        GpuNode("c", "H100-80GB", 8),
        GpuNode("d", "H100-80GB", 8, agent_ready=False),
        GpuNode("e", "L4", 8),
        GpuNode("f", "H100-80GB", 8, schedulable=False),
        GpuNode("g", "H100-80GB", 8, schedulable=False, keeps_running=False),
    )
    rack = Budget("rack", 1e6, frozenset({"c"}))
    data = build_plan_data(PlanInput(nodes, (), (rack,)), CatalogueModel())
    # A cordoned node (f) forms a pool that only keeps what runs there; a node that cannot keep
    # running replicas (g: NotReady, deleting, NoExecute) is in no pool.
    assert sorted((pool.node_names, pool.schedulable) for pool in data.pools) == [
        (("a", "b"), True),
        (("c",), True),
        (("d",), True),
        (("e",), True),
        (("f",), False),
    ]


def test_workloads_differing_only_in_name_share_a_class_and_running_ones_do_not() -> None:
    first = Workload("t/a", WorkloadType.TRAINING, 8, 1, (BF16,))
    twin = dataclasses.replace(first, key="t/b")
    other = dataclasses.replace(first, key="t/c", priority=3)
    data = build_plan_data(
        PlanInput((GpuNode("h0", "H100-80GB", 8),), (first, twin, other)), CatalogueModel()
    )
    assert sorted(tuple(m.key for m in c.members) for c in data.classes) == [
        ("t/a", "t/b"),
        ("t/c",),
    ]


def test_running_workloads_alike_share_their_options_built_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = (
        GpuNode("h0", "H100-80GB", 8),
        GpuNode("h1", "H100-80GB", 8),
        GpuNode("l0", "L40S", 4),
        GpuNode("h2", "H100-80GB", 8, schedulable=False),  # cordoned: a pool of its own
    )
    service = Workload(
        "t/a", WorkloadType.INFERENCE, 8, 1, (BF16,), tokens_per_second=500.0, max_replicas=4
    )
    workloads = tuple(dataclasses.replace(service, key=f"t/{name}") for name in "abcde")
    current = (
        CurrentPlacement("t/a", 0, "h0", "bf16", 500.0),
        CurrentPlacement("t/b", 0, "h1", "bf16", 500.0),  # as t/a: same pool, variant, limit
        CurrentPlacement("t/c", 0, "h0", "bf16", 400.0),  # another limit
        CurrentPlacement("t/d", 0, "l0", "bf16", 300.0),  # another product
        CurrentPlacement("t/e", 0, "h2", "bf16", 500.0),  # as t/a, on a node that takes no others
    )
    counted = options_module.workload_options
    calls: list[str] = []

    def counting(workload: Workload, **kwargs: object) -> object:
        calls.append(workload.key)
        return counted(workload, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(options_module, "workload_options", counting)
    together = build_plan_data(PlanInput(nodes, workloads, current=current), CatalogueModel())

    assert len(calls) == 4  # t/b's are t/a's
    for workload, placement in zip(workloads, current, strict=True):
        alone = build_plan_data(
            PlanInput(nodes, (workload,), current=(placement,)), CatalogueModel()
        )
        [mine] = [c for c in together.classes if c.representative.key == workload.key]
        [reference] = alone.classes
        assert mine.options == reference.options, workload.key
        assert mine.option_pools == reference.option_pools, workload.key
        assert mine.pinned_nodes == reference.pinned_nodes == frozenset({placement.node})
