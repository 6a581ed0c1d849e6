"""`wattsched explain` text: placement, budgets over the workload's nodes, the binding reason, and
what sets a placed workload's power limit."""

from __future__ import annotations

from typing import Any

from wattsched_cli.explain import render


def workload(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "namespace": "team-a"},
        "spec": {"type": "Inference", "gpu": {"count": 4}, "priority": 100},
        "status": status,
    }


BUDGETS = [
    {
        "metadata": {"name": "rack-a"},
        "spec": {"powerCapWatts": 20000},
        "status": {"allocatedCapWatts": 18500, "headroomWatts": 1500},
    },
    {"metadata": {"name": "rack-b"}, "spec": {"powerCapWatts": 9000}, "status": {}},
]
SCOPES = {"rack-a": frozenset({"gpu-h100-00"}), "rack-b": frozenset({"gpu-a100-00"})}
PRODUCTS = {"gpu-h100-00": "H100-80GB", "gpu-a100-00": "A100-80GB"}


def test_a_placed_workload_shows_node_variant_limit_applied_and_its_budgets() -> None:
    text = render(
        workload(
            {
                "phase": "Running",
                "placements": [
                    {
                        "replica": 0,
                        "node": "gpu-h100-00",
                        "gpus": 4,
                        "variant": "fp8",
                        "powerLimitWatts": 450,
                    }
                ],
                "power": {"capWatts": 1800, "expectedWatts": 1500},
            }
        ),
        {"gpu-h100-00": {"status": {"gpus": [{"appliedWatts": 450}, {"appliedWatts": 200}]}}},
        BUDGETS,
        [{"lastTimestamp": "t1", "type": "Normal", "reason": "Placed", "message": "1 replica"}],
        SCOPES,
        node_products=PRODUCTS,
    )
    assert "node gpu-h100-00, 4 GPU(s), variant fp8, limit 450 W per GPU" in text
    assert "applied 200-450 W on the node" in text
    assert "expected 1500 W (modelled)" in text
    assert "rack-a: cap 20000 W, allocated 18500 W, headroom 1500 W" in text
    assert "rack-b" not in text
    assert "Normal Placed: 1 replica" in text


def test_an_unplaced_workload_names_the_binding_constraint_and_reason() -> None:
    text = render(
        workload(
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "Schedulable",
                        "status": "False",
                        "reason": "Gpus",
                        "message": "spec.gpu.count=64 exceeds the largest eligible node",
                    }
                ],
            }
        ),
        {},
        BUDGETS,
        [],
        SCOPES,
        node_products=PRODUCTS,
    )
    assert "unplaced because of Gpus: spec.gpu.count=64 exceeds the largest eligible node" in text
    assert "phase: Pending" in text


def placed(limit_watts: float, *, energy: dict[str, Any] | None = None) -> dict[str, Any]:
    body = workload(
        {
            "phase": "Running",
            "placements": [
                {
                    "replica": 0,
                    "node": "gpu-h100-00",
                    "gpus": 4,
                    "variant": "bf16",
                    "powerLimitWatts": limit_watts,
                }
            ],
            "conditions": [
                {
                    "type": "SLOMet",
                    "status": "True",
                    "reason": "Planned",
                    "message": "planned 900 tokens/s for a demand of 800 tokens/s",
                }
            ],
        }
    )
    if energy is not None:
        body["spec"]["energy"] = energy
    return body


def rack_a(headroom_watts: float) -> list[dict[str, Any]]:
    return [
        {
            "metadata": {"name": "rack-a"},
            "spec": {"powerCapWatts": 20000},
            "status": {
                "allocatedCapWatts": 20000 - headroom_watts,
                "headroomWatts": headroom_watts,
            },
        }
    ]


def explain_limit(body: dict[str, Any], budgets: list[dict[str, Any]]) -> str:
    text = render(body, {}, budgets, [], SCOPES, node_products=PRODUCTS)
    rest = text.partition("  what sets its power limit:\n")[2]
    assert rest, f"no power-limit section in:\n{text}"
    return rest


def test_a_placed_workload_under_a_budget_without_room_for_the_next_level_names_the_budget() -> (
    None
):
    # H100 levels are 200, 325, 450, 575, 700 W: one replica of 4 GPUs one level up adds 500 W.
    text = explain_limit(placed(325), rack_a(400))
    assert (
        "replica(s) 0 at 325 W per GPU: limited by budget rack-a: its headroom 400 W is less than"
        " the 500 W one replica at the next level (450 W per GPU) would add"
    ) in text
    assert "objective met (Planned): planned 900 tokens/s" in text


def test_a_placed_workload_with_room_in_its_budgets_was_limited_by_its_energy_policy() -> None:
    text = explain_limit(placed(325, energy={"policy": "Efficiency"}), rack_a(600))
    assert "replica(s) 0 at 325 W per GPU of the H100-80GB's 700 W" in text
    assert "chosen by energy policy Efficiency (the most energy-efficient limit" in text
    assert "the budgets over its nodes have room for the next level" in text


def test_a_placed_workload_at_its_max_power_field_names_the_field() -> None:
    text = explain_limit(placed(300, energy={"maxPowerWattsPerGPU": 300}), rack_a(0))
    assert "capped by spec.energy.maxPowerWattsPerGPU=300 W (the H100-80GB allows 700 W)" in text
    assert "limited by budget" not in text


def test_a_placed_workload_at_the_gpu_maximum_has_nothing_limiting_it() -> None:
    text = explain_limit(placed(700), [])
    assert "replica(s) 0 at 700 W per GPU, the H100-80GB maximum: nothing limits its power" in text


def test_a_node_of_unknown_product_is_said_to_be_unknown() -> None:
    text = render(placed(325), {}, [], [], SCOPES, node_products={})
    assert "the node's GPU product is unknown to the catalogue" in text


def test_the_last_moves_and_preemptions_are_shown_with_their_cause_after_newer_events() -> None:
    body = placed(450.0)
    moved = {
        "lastTimestamp": "2026-12-05T10:00:00Z",
        "type": "Normal",
        "reason": "Moved",
        "message": "1 replica(s), cause NodeLost: its node is gone; team/llama-0: a -> b",
    }
    newer = [
        {
            "lastTimestamp": f"2026-12-05T11:0{i}:00Z",
            "type": "Normal",
            "reason": "Placed",
            "message": f"placed {i}",
        }
        for i in range(6)
    ]
    text = render(body, {}, rack_a(500.0), [moved, *newer], SCOPES, node_products=PRODUCTS)
    lines = text.splitlines()
    start = lines.index("  last moves and preemptions (Event: cause, replicas):")
    assert "Moved: 1 replica(s), cause NodeLost" in lines[start + 1]
    assert "Moved" not in "\n".join(lines[lines.index("  recent events:") :])


def placed_chat(policy: str = "Efficiency", replicas: int = 2) -> dict[str, Any]:
    body = workload(
        {
            "phase": "Running",
            "placements": [
                {
                    "replica": r,
                    "node": "gpu-h100-00",
                    "gpus": 1,
                    "variant": "bf16",
                    "powerLimitWatts": 450,
                }
                for r in range(replicas)
            ],
        }
    )
    body["spec"]["energy"] = {"policy": policy}
    return body


def clocked_profile() -> dict[str, Any]:
    return {
        "spec": {
            "pods": [
                {
                    "namespace": "team-a",
                    "name": "chat-0",
                    "powerLimitWatts": 450,
                    "smClockRangeMegahertz": {"min": 990, "max": 990},
                },
                {"namespace": "team-a", "name": "chat-1", "powerLimitWatts": 450},
            ]
        },
        "status": {"gpus": [{"index": 0, "pod": "team-a/chat-0", "smClockMegahertz": 990}]},
    }


def test_a_replica_with_locked_clocks_says_why_what_is_in_force_and_the_modelled_saving() -> None:
    text = render(
        placed_chat(),
        {"gpu-h100-00": clocked_profile()},
        BUDGETS,
        [],
        SCOPES,
        node_products=PRODUCTS,
    )
    assert "replica 0: SM clocks locked at 990-990 MHz" in text
    assert "the agent reads 990-990 MHz on its GPUs" in text
    assert "under the Efficiency policy" in text
    assert "modelled: 32% less energy per token than unlocked at the same limit" in text
    assert "replica(s) 1: clocks left to the driver" in text


def test_a_performance_workload_says_clocks_are_never_locked() -> None:
    text = render(
        placed_chat("Performance", 1),
        {"gpu-h100-00": {"spec": {"pods": []}}},
        BUDGETS,
        [],
        SCOPES,
        node_products=PRODUCTS,
    )
    assert "clocks left to the driver: the Performance policy never locks clocks" in text


def spanning(limit_watts: float) -> dict[str, Any]:
    """A 405B service whose one replica is a leader and a worker, 8 H100s each, in rack-a."""
    return {
        "metadata": {"name": "big", "namespace": "team-a"},
        "spec": {"type": "Inference", "gpu": {"count": 8, "nodesPerReplica": 2}},
        "status": {
            "phase": "Running",
            "service": "big",
            "placements": [
                {
                    "replica": 0,
                    "rank": rank,
                    "node": node,
                    "gpus": 8,
                    "variant": "fp8",
                    "powerLimitWatts": limit_watts,
                }
                for rank, node in enumerate(("gpu-h100-00", "gpu-h100-01"))
            ],
        },
    }


def test_a_replica_that_spans_nodes_shows_its_leader_worker_and_service() -> None:
    scopes = {"rack-a": frozenset({"gpu-h100-00", "gpu-h100-01"})}
    products = {"gpu-h100-00": "H100-80GB", "gpu-h100-01": "H100-80GB"}
    text = render(spanning(325), {}, rack_a(5000), [], scopes, node_products=products)
    assert "8 GPU(s) per node x 2 whole nodes of one product per replica" in text
    assert "replica 0 leader: node gpu-h100-00, 8 GPU(s)" in text
    assert "replica 0 worker 1: node gpu-h100-01, 8 GPU(s)" in text
    assert "service: big (selects its ready leaders)" in text
    assert "replica(s) 0 at 325 W per GPU" in text


def test_a_spanning_replica_one_level_up_counts_every_gpu_of_every_node() -> None:
    """H100 levels 200, 325, 450 W: 16 GPUs one level up add 2000 W, more than 1500 W of headroom
    (one node's 8 GPUs alone would add 1000 W and fit)."""
    scopes = {"rack-a": frozenset({"gpu-h100-00", "gpu-h100-01"})}
    products = {"gpu-h100-00": "H100-80GB", "gpu-h100-01": "H100-80GB"}
    text = render(spanning(325), {}, rack_a(1500), [], scopes, node_products=products)
    assert (
        "replica(s) 0 at 325 W per GPU: limited by budget rack-a: its headroom 1500 W is less than"
        " the 2000 W one replica at the next level (450 W per GPU) would add"
    ) in text
