"""Replicas that span nodes (spec.gpu.nodesPerReplica > 1): whole nodes of one product and pool,
all pods or none, one power limit for every GPU of the replica, running replicas kept in place."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattsched_optimizer.model import product_spec
from wattsched_optimizer.planner import PlanInputError, plan
from wattsched_optimizer.problem import (
    Budget,
    CurrentPlacement,
    EnergyPolicy,
    GpuNode,
    Placement,
    Plan,
    PlanInput,
    Precision,
    Variant,
    Workload,
    WorkloadType,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0)


def spanning(key: str = "team/big", **changes: object) -> Workload:
    """A 405B service whose replica is 2 nodes x 8 GPUs."""
    base = Workload(
        key=key,
        type=WorkloadType.INFERENCE,
        model_parameters_billions=405,
        gpus_per_replica=16,
        nodes_per_replica=2,
        variants=(BF16,),
        min_replicas=1,
        max_replicas=1,
        tokens_per_second=100,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def nodes(product: str, count: int, prefix: str, gpus: int = 8) -> tuple[GpuNode, ...]:
    return tuple(GpuNode(f"{prefix}{i}", product, gpus) for i in range(count))


def pods_of(result: Plan, key: str) -> list[Placement]:
    return sorted(
        (p for p in result.placements if p.workload == key), key=lambda p: (p.replica, p.rank)
    )


def test_a_16_gpu_replica_takes_two_whole_8_gpu_nodes_with_one_limit() -> None:
    result = plan(PlanInput(nodes=nodes("H100-80GB", 2, "h"), workloads=(spanning(),)))
    pods = pods_of(result, "team/big")
    assert [(p.replica, p.rank, p.gpus, p.nodes_per_replica) for p in pods] == [
        (0, 0, 8, 2),
        (0, 1, 8, 2),
    ]
    assert {p.node for p in pods} == {"h0", "h1"}
    assert len({(p.power_limit_watts, p.sm_clock_mhz, p.variant) for p in pods}) == 1
    limit = pods[0].power_limit_watts
    for node in ("h0", "h1"):
        assert result.node_power_limits_watts[node] == (limit,) * 8
    assert result.unplaced == ()


def test_a_replica_is_never_split_across_products() -> None:
    cluster = (*nodes("H100-80GB", 1, "h"), *nodes("A100-80GB", 1, "a"))
    result = plan(PlanInput(nodes=cluster, workloads=(spanning(),)))
    assert pods_of(result, "team/big") == []
    (unplaced,) = result.unplaced
    assert unplaced.constraint == "gpus"
    assert "spec.gpu.nodesPerReplica=2" in unplaced.reason
    assert "never spans products" in unplaced.reason


def test_nodes_with_more_gpus_than_a_pod_needs_are_not_used() -> None:
    """Whole nodes: a pod of 4 GPUs spans only nodes of exactly 4 GPUs."""
    workload = spanning(gpus_per_replica=8, nodes_per_replica=2)
    result = plan(PlanInput(nodes=nodes("H100-80GB", 2, "h"), workloads=(workload,)))
    assert pods_of(result, "team/big") == []
    assert result.unplaced[0].constraint == "gpus"
    result = plan(PlanInput(nodes=nodes("H100-80GB", 2, "h", gpus=4), workloads=(workload,)))
    assert [p.gpus for p in pods_of(result, "team/big")] == [4, 4]


def test_a_budget_that_fits_only_part_of_a_replica_places_none_of_it() -> None:
    cluster = nodes("H100-80GB", 2, "h")
    spec = product_spec("H100-80GB")
    floor = 16 * spec.min_watts.value
    # Performance pins the maximum: room for one pod's 8 GPUs at it, not for the other's.
    cap = floor + 8 * (spec.max_watts.value - spec.min_watts.value) + 100
    budget = Budget("rack", cap, frozenset(n.name for n in cluster))
    workload = spanning(policy=EnergyPolicy.PERFORMANCE)
    result = plan(PlanInput(nodes=cluster, workloads=(workload,), budgets=(budget,)))
    assert pods_of(result, "team/big") == []
    assert result.unplaced[0].constraint == "budget:rack"
    assert result.budgets[0].allocated_cap_watts == floor


def test_a_gang_of_spanning_replicas_runs_all_or_none() -> None:
    job = spanning(
        "team/train",
        type=WorkloadType.TRAINING,
        model_parameters_billions=70,
        replicas=2,
        tokens_per_second=None,
    )
    short = plan(PlanInput(nodes=nodes("H100-80GB", 3, "h"), workloads=(job,)))
    assert pods_of(short, "team/train") == []
    assert short.unplaced[0].constraint == "gpus"
    enough = plan(PlanInput(nodes=nodes("H100-80GB", 4, "h"), workloads=(job,)))
    pods = pods_of(enough, "team/train")
    assert [(p.replica, p.rank) for p in pods] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({p.node for p in pods}) == 4


def test_spanning_replicas_and_single_node_work_share_a_pool_without_splitting_a_node() -> None:
    small = Workload(
        key="team/small",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=4,
        max_replicas=4,
    )
    result = plan(PlanInput(nodes=nodes("H100-80GB", 3, "h"), workloads=(spanning(), small)))
    big_nodes = {p.node for p in pods_of(result, "team/big")}
    small_nodes = {p.node for p in pods_of(result, "team/small")}
    assert len(big_nodes) == 2
    assert big_nodes.isdisjoint(small_nodes)
    assert len(pods_of(result, "team/small")) == 4


def test_nodes_of_one_product_in_different_pools_do_not_form_a_replica() -> None:
    """A replica stays inside one pool: here each node is in its own rack budget."""
    cluster = nodes("H100-80GB", 2, "h")
    budgets = (
        Budget("rack-a", 10_000, frozenset({"h0"})),
        Budget("rack-b", 10_000, frozenset({"h1"})),
    )
    result = plan(PlanInput(nodes=cluster, workloads=(spanning(),), budgets=budgets))
    assert pods_of(result, "team/big") == []


def test_a_running_spanning_replica_keeps_its_nodes_and_ranks() -> None:
    cluster = nodes("H100-80GB", 4, "h")
    first = plan(PlanInput(nodes=cluster, workloads=(spanning(),)))
    current = tuple(
        CurrentPlacement(p.workload, p.replica, p.node, p.variant, p.power_limit_watts, rank=p.rank)
        for p in pods_of(first, "team/big")
    )
    # Swap which nodes look free first: the replica must still stay where it runs.
    reordered = tuple(reversed(cluster))
    again = plan(PlanInput(nodes=reordered, workloads=(spanning(),), current=current))
    assert [(p.replica, p.rank, p.node) for p in pods_of(again, "team/big")] == [
        (c.replica, c.rank, c.node) for c in current
    ]


def test_nodes_per_replica_must_divide_the_replica_gpus() -> None:
    bad = spanning(gpus_per_replica=9, nodes_per_replica=2)
    with pytest.raises(PlanInputError, match=r"spec\.gpu\.nodesPerReplica=2"):
        plan(PlanInput(nodes=nodes("H100-80GB", 2, "h"), workloads=(bad,)))


@st.composite
def mixed_inputs(draw: st.DrawFn) -> PlanInput:
    """Nodes of two products with 4 or 8 GPUs, spanning and single-node workloads, a budget."""
    cluster = []
    for index in range(draw(st.integers(2, 8))):
        product = draw(st.sampled_from(["H100-80GB", "A100-80GB"]))
        cluster.append(GpuNode(f"n{index}", product, draw(st.sampled_from([4, 8]))))
    workloads = []
    for index in range(draw(st.integers(1, 5))):
        per_pod = draw(st.sampled_from([4, 8]))
        nodes_per_replica = draw(st.sampled_from([1, 2, 3]))
        gang = draw(st.booleans())
        workloads.append(
            Workload(
                key=f"team/w{index}",
                type=WorkloadType.TRAINING if gang else WorkloadType.INFERENCE,
                model_parameters_billions=70,
                gpus_per_replica=per_pod * nodes_per_replica,
                nodes_per_replica=nodes_per_replica,
                variants=(BF16,),
                replicas=draw(st.integers(1, 2)),
                min_replicas=1,
                max_replicas=draw(st.integers(1, 3)),
                tokens_per_second=None if gang else draw(st.sampled_from([10.0, 5000.0])),
                priority=draw(st.integers(0, 2)),
            )
        )
    floor = sum(n.gpu_count * product_spec(n.product).min_watts.value for n in cluster)
    budget = Budget("all", floor + draw(st.integers(0, 20_000)), frozenset(n.name for n in cluster))
    return PlanInput(nodes=tuple(cluster), workloads=tuple(workloads), budgets=(budget,))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_inputs())
def test_spanning_replicas_are_whole_one_product_and_never_share_a_node(
    plan_input: PlanInput,
) -> None:
    result = plan(plan_input)
    node_of = {n.name: n for n in plan_input.nodes}
    used: dict[str, int] = {}
    for placement in result.placements:
        used[placement.node] = used.get(placement.node, 0) + placement.gpus
    assert all(used[n] <= node_of[n].gpu_count for n in used)
    for workload in plan_input.workloads:
        pods = [p for p in result.placements if p.workload == workload.key]
        if not pods:
            continue
        replicas: dict[int, list[Placement]] = {}
        for pod in pods:
            replicas.setdefault(pod.replica, []).append(pod)
        if workload.type.is_gang:
            assert len(replicas) == workload.replicas
        for members in replicas.values():
            assert sorted(p.rank for p in members) == list(range(workload.nodes_per_replica))
            assert len({(p.power_limit_watts, p.variant, p.sm_clock_mhz) for p in members}) == 1
            assert sum(p.gpus for p in members) == workload.gpus_per_replica
            if workload.spans_nodes:
                nodes = [node_of[p.node] for p in members]
                assert len({n.name for n in nodes}) == workload.nodes_per_replica
                assert len({n.product for n in nodes}) == 1
                assert all(n.gpu_count == workload.gpus_per_pod for n in nodes)
                # Whole nodes: nothing else runs there.
                assert all(used[n.name] == n.gpu_count for n in nodes)
    for allocation in result.budgets:
        assert allocation.allocated_cap_watts <= allocation.cap_watts + 1e-6
