"""The operator with `--prometheus-url` on the sandbox: the simulated agents scraped by a real
Prometheus, EnergyBudget `measuredWatts` against the agents' own `drawWatts`, and planning that
goes on (with `TelemetryFresh=False`) once Prometheus is stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.operator.conftest import TEST_LABEL, StartOperator, get_json, wait_until
from tests.telemetry.conftest import start_prometheus

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus]

SCOPE = {"nvidia.com/gpu.product": "NVIDIA-L4"}
WINDOW_SECONDS = 5


def telemetry_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    return next(
        (c for c in status.get("conditions") or [] if c.get("type") == "TelemetryFresh"), None
    )


def draw_in_scope_watts(sandbox: Sandbox, nodes: list[str]) -> float:
    return sum(
        float((get_json(sandbox, "nodepowerprofile", node).get("status") or {})["drawWatts"])
        for node in nodes
    )


def test_budget_measured_watts_match_the_agents_draw_and_go_stale_without_prometheus(
    sandbox: Sandbox,
    agents: Path,
    namespace: str,
    start_operator: StartOperator,
    tmp_path: Path,
) -> None:
    wait_until("the agents' targets file", agents.exists)
    server = start_prometheus(tmp_path / "prometheus", agents)
    try:
        server.wait_for_targets_up(sum(len(g["targets"]) for g in json.loads(agents.read_text())))
        # A rate() over a window Prometheus has not filled yet extrapolates from a few samples.
        time.sleep(WINDOW_SECONDS + 3)
        selector = ",".join(f"{k}={v}" for k, v in SCOPE.items())
        nodes = sorted(
            n["metadata"]["name"] for n in get_json(sandbox, "nodes", "-l", selector)["items"]
        )
        assert nodes
        name = f"telemetry-{namespace[-8:]}"
        budget = {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "EnergyBudget",
            "metadata": {"name": name, "labels": {TEST_LABEL: "operator"}},
            "spec": {"nodeSelector": {"matchLabels": SCOPE}, "powerCapWatts": 10000},
        }
        sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump(budget))
        start_operator(
            "--prometheus-url",
            server.url,
            "--telemetry-window-seconds",
            str(WINDOW_SECONDS),
            "--replan-seconds",
            "2",
        )

        def measured() -> dict[str, Any] | None:
            status: dict[str, Any] = get_json(sandbox, "energybudget", name).get("status") or {}
            fresh = telemetry_condition(status)
            ok = fresh is not None and fresh["status"] == "True" and "measuredWatts" in status
            return status if ok else None

        status = wait_until("measuredWatts with TelemetryFresh=True", measured, timeout_seconds=60)
        assert status is not None
        assert status["nodes"] == len(nodes)
        assert status["measuredWatts"] == pytest.approx(
            draw_in_scope_watts(sandbox, nodes), rel=0.05
        )

        last_plan = status["lastPlan"]["time"]
        server.stop()

        def stale() -> dict[str, Any] | None:
            status: dict[str, Any] = get_json(sandbox, "energybudget", name).get("status") or {}
            fresh = telemetry_condition(status)
            ok = fresh is not None and fresh["status"] == "False"
            return status if ok and status["lastPlan"]["time"] != last_plan else None

        status = wait_until("TelemetryFresh=False without Prometheus", stale, timeout_seconds=60)
        assert status is not None
        condition = telemetry_condition(status)
        assert condition is not None
        assert condition["reason"] == "PrometheusUnavailable"
        assert server.url in condition["message"]
        assert "measuredWatts" not in status
        assert status["allocatedCapWatts"] > 0
    finally:
        server.stop()
