"""Hand-checked packing around moves: new replicas keep off the GPUs that moving replicas leave.

A replica that keeps its workload's product and variant stays on its node; every other replica
goes onto GPUs no running replica occupies while such GPUs of its product are free, so a moved
replica's old copy can keep serving while the new one starts. The moves here are forced by
`allowed_products` (a running service no longer allowed on the product it runs on), so they do
not depend on the catalogue's prices.
"""

from __future__ import annotations

from collections import Counter

from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import (
    CurrentPlacement,
    GpuNode,
    Plan,
    PlanInput,
    Precision,
    Variant,
    Workload,
    WorkloadType,
)

BF16 = Variant("bf16", Precision.BF16, min_memory_gib=0, relative_throughput=1.0, quality=1.0)


def service(key: str, replicas: int, allowed: str) -> Workload:
    """An 8B service of exactly `replicas` 1-GPU replicas (its demand is tiny)."""
    return Workload(
        key=key,
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(BF16,),
        min_replicas=replicas,
        max_replicas=replicas,
        tokens_per_second=1.0,
        allowed_products=frozenset({allowed}),
        priority=1000,
    )


def running(key: str, node: str, replicas: int, first: int = 0) -> list[CurrentPlacement]:
    return [CurrentPlacement(key, first + i, node, "bf16", 325.0) for i in range(replicas)]


def nodes_of(result: Plan, key: str) -> Counter[str]:
    return Counter(p.node for p in result.placements if p.workload == key)


def h100(name: str) -> GpuNode:
    return GpuNode(name, "H100-80GB", 8)


def a100(name: str) -> GpuNode:
    return GpuNode(name, "A100-80GB", 8)


def test_two_services_that_swap_products_leave_each_others_nodes_alone() -> None:
    # x fills h0 and must move to A100; y fills a0 and must move to H100. h1 and a1 are free:
    # placing either service on the node the other is leaving (the first node of its product
    # by name) would leave the mover's old replicas no GPUs to serve on while the new ones start.
    nodes = (h100("h0"), h100("h1"), a100("a0"), a100("a1"))
    workloads = (service("team/x", 8, "A100-80GB"), service("team/y", 8, "H100-80GB"))
    current = (*running("team/x", "h0", 8), *running("team/y", "a0", 8))
    result = plan(PlanInput(nodes, workloads, current=current))
    assert nodes_of(result, "team/x") == {"a1": 8}
    assert nodes_of(result, "team/y") == {"h1": 8}


def test_new_replicas_fill_the_free_gpus_of_a_node_a_mover_is_leaving_before_its_own() -> None:
    # x (3 GPUs on h0) moves to A100; y is new and needs 5 H100 GPUs. Best fit puts y on h0,
    # where the 5 GPUs x does not occupy fit it exactly; h1 stays empty, and x keeps its 3.
    nodes = (h100("h0"), h100("h1"), a100("a0"))
    workloads = (service("team/x", 3, "A100-80GB"), service("team/y", 5, "H100-80GB"))
    result = plan(PlanInput(nodes, workloads, current=tuple(running("team/x", "h0", 3))))
    assert nodes_of(result, "team/x") == {"a0": 3}
    assert nodes_of(result, "team/y") == {"h0": 5}


def test_vacated_gpus_are_used_when_no_free_ones_of_the_product_are_left() -> None:
    # Only h0 exists for y, and x is leaving it: y still runs, on the GPUs x leaves.
    nodes = (h100("h0"), a100("a0"))
    workloads = (service("team/x", 8, "A100-80GB"), service("team/y", 8, "H100-80GB"))
    result = plan(PlanInput(nodes, workloads, current=tuple(running("team/x", "h0", 8))))
    assert nodes_of(result, "team/x") == {"a0": 8}
    assert nodes_of(result, "team/y") == {"h0": 8}
    assert not result.unplaced


def test_a_service_whose_option_is_unchanged_keeps_its_exact_nodes() -> None:
    # z runs 2 replicas on h2 and 1 on h1, keeps its product and variant, and stays exactly
    # there, although best fit alone would gather its replicas on one node; x moves off h0 and
    # y's new replicas go onto GPUs nobody occupies (h2 then h1, fewest free first), not onto h0.
    nodes = (h100("h0"), h100("h1"), h100("h2"), a100("a0"))
    workloads = (
        service("team/x", 8, "A100-80GB"),
        service("team/y", 10, "H100-80GB"),
        service("team/z", 3, "H100-80GB"),
    )
    current = (
        *running("team/x", "h0", 8),
        *running("team/z", "h2", 2),
        *running("team/z", "h1", 1, first=2),
    )
    result = plan(PlanInput(nodes, workloads, current=current))
    assert nodes_of(result, "team/z") == {"h2": 2, "h1": 1}
    assert nodes_of(result, "team/x") == {"a0": 8}
    assert nodes_of(result, "team/y") == {"h2": 6, "h1": 4}
