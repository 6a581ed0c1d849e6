"""`wattsched explain` text: placement, budgets over the workload's nodes, the binding reason."""

from __future__ import annotations

from typing import Any

from wattsched_operator.explain import render


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
    )
    assert "unplaced because of Gpus: spec.gpu.count=64 exceeds the largest eligible node" in text
    assert "phase: Pending" in text
