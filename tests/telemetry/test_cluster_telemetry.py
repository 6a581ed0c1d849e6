"""Telemetry on the sandbox: `wattsched agent --all-nodes` scraped by a real Prometheus.

The NodePowerProfile status the agent writes, the agent's own /metrics counters and what the
TelemetryReader gets from Prometheus must agree; stopping Prometheus makes readings stale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.agent.conftest import (
    applied_status,
    apply_profile,
    scrape,
    start_agent,
    stop_agent,
    truth_draw_watts,
    wait_until,
)
from tests.telemetry.conftest import RunningPrometheus
from wattsched_agent.simulated_nvml import load_ground_truth
from wattsched_api.vocabulary import Source
from wattsched_operator.telemetry import TelemetryConfig, TelemetryReader

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus]

NODE = "gpu-h100-01"
PRODUCT = "NVIDIA-H100-80GB-HBM3"
RATE_WINDOW_SECONDS = 8


def node_energy_joules(address: str) -> float:
    samples = scrape(address)["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    return float(sum(sample.value for sample in samples)) / 1000


def test_prometheus_readings_match_the_agent_status_and_counters_then_go_stale(
    sandbox: Sandbox,
    crds: list[str],
    namespace: str,
    tmp_path: Path,
    prometheus: Callable[[Path], RunningPrometheus],
) -> None:
    targets_file = tmp_path / "targets.json"
    agent = start_agent(
        sandbox,
        tmp_path / "agent.log",
        "--all-nodes",
        "--node-selector",
        f"kubernetes.io/hostname={NODE}",
        "--metrics-port",
        "0",
        "--targets-file",
        str(targets_file),
    )
    try:
        apply_profile(sandbox, NODE, 450.0)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "trainer-0",
                "namespace": namespace,
                "labels": {"wattsched.io/workload": "trainer"},
            },
            "spec": {
                "nodeName": NODE,
                "containers": [
                    {
                        "name": "train",
                        "image": "trainer",
                        "resources": {"limits": {"nvidia.com/gpu": "4"}},
                    }
                ],
            },
        }
        sandbox.kubectl("apply", "-f", "-", input=json.dumps(pod))
        wait_until("the targets file", targets_file.exists)
        address = json.loads(targets_file.read_text())[0]["targets"][0]
        wait_until("busy GPUs", lambda: scrape(address)["DCGM_FI_DEV_POWER_USAGE"][3].value > 400)
        status = wait_until("Applied=True", lambda: applied_status(sandbox, NODE, "True"))
        server = prometheus(targets_file)
        server.wait_for_targets_up(1)

        start = datetime.now(UTC)
        start_joules = node_energy_joules(address)
        time.sleep(RATE_WINDOW_SECONDS + 4)
        end = datetime.now(UTC)
        end_joules = node_energy_joules(address)
        time.sleep(2)

        reader = TelemetryReader(
            TelemetryConfig(server.url, rate_window_seconds=RATE_WINDOW_SECONDS)
        )
        snapshot = reader.read([NODE], [(namespace, "trainer-0")])
        assert (snapshot.source, snapshot.stale) == (Source.MEASURED, False)
        # 4 busy GPUs held by their 450 W limit (the ground truth's busy draw is above it) + 4 idle.
        factor = load_ground_truth().node_factor(NODE)
        idle_watts = truth_draw_watts(PRODUCT, 0.0, 450, factor)
        assert truth_draw_watts(PRODUCT, 1.0, 450, factor) == 450
        assert status["drawWatts"] == pytest.approx(4 * 450 + 4 * idle_watts, rel=0.01)
        assert snapshot.node_watts[NODE].value == pytest.approx(status["drawWatts"], rel=0.01)
        assert snapshot.pod_watts[namespace, "trainer-0"].value == pytest.approx(1800, rel=0.01)

        energy = reader.energy([NODE], start=start, end=end)
        assert energy.node_joules[NODE].value == pytest.approx(end_joules - start_joules, rel=0.02)

        server.stop()
        stale = reader.read([NODE])
        assert (stale.source, stale.stale) == (Source.MODELLED, True)
        assert server.url in stale.reason
    finally:
        stop_agent(agent)
        sandbox.kubectl("delete", "nodepowerprofile", NODE, "--ignore-not-found")
