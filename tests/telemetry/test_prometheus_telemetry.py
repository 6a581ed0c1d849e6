"""Telemetry end to end: simulated agents -> real Prometheus -> prometheus-api-client -> readings.

The agents here are the real NodeAgent and /metrics server over the simulated NVML library (no
Kubernetes needed: limits and pods are given directly); Prometheus is Debian's binary on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_api_client import PrometheusConnect

from tests.agent.conftest import truth_draw_watts
from tests.telemetry.conftest import SCRAPE_INTERVAL_SECONDS, RunningPrometheus, write_targets
from wattsched_agent.cli import serve_metrics
from wattsched_agent.dcgm_metrics import MetricsServer
from wattsched_agent.node_agent import NodeAgent
from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.reconcile import PlacedPod
from wattsched_agent.simulated_kubelet import SimulatedKubelet
from wattsched_agent.simulated_nvml import SimulatedNvml
from wattsched_api.vocabulary import Source
from wattsched_operator.telemetry import TelemetryConfig, TelemetryReader

pytestmark = pytest.mark.prometheus

RATE_WINDOW_SECONDS = 8
H100 = "NVIDIA-H100-80GB-HBM3"
StartPrometheus = Callable[[Path], RunningPrometheus]


@dataclass
class Fleet:
    agents: dict[str, NodeAgent]
    libraries: dict[str, SimulatedNvml]
    servers: dict[str, MetricsServer]
    targets_file: Path

    def draw_watts(self, node: str, gpus: range | None = None) -> float:
        backend = self.agents[node].backend
        indices = gpus if gpus is not None else range(backend.gpu_count)
        return sum(backend.sample(index).draw_watts or 0.0 for index in indices)

    def energy_joules(self, node: str, gpus: range | None = None) -> float:
        backend = self.agents[node].backend
        indices = gpus if gpus is not None else range(backend.gpu_count)
        return sum((backend.sample(index).energy_millijoules or 0) / 1000 for index in indices)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Two simulated nodes: h100-a (2x H100, limits 400 W) and l4-a (1x L4, limit 60 W)."""
    products = {"h100-a": [H100] * 2, "l4-a": ["NVIDIA-L4"]}
    libraries = {name: SimulatedNvml(name, gpus) for name, gpus in products.items()}
    kubelets = {name: SimulatedKubelet() for name in libraries}
    agents = {
        name: NodeAgent(
            name, NvmlBackend(library, "simulated"), kubelets[name], library, kubelets[name]
        )
        for name, library in libraries.items()
    }
    agents["h100-a"].backend.apply_limit(0, 400)
    agents["h100-a"].backend.apply_limit(1, 400)
    agents["l4-a"].backend.apply_limit(0, 60)
    agents["h100-a"].observe_pods([PlacedPod("team-a", "llama-0", "server", 1, "t1")])
    agents["l4-a"].observe_pods([PlacedPod("team-b", "small-0", "server", 1, "t1", 0.5)])
    targets_file = tmp_path / "targets.json"
    servers = serve_metrics(agents, "127.0.0.1", 0, targets_file)
    yield Fleet(agents, libraries, servers, targets_file)
    for server in servers.values():
        server.close()


def reader_for(prometheus: RunningPrometheus) -> TelemetryReader:
    return TelemetryReader(
        TelemetryConfig(prometheus.url, timeout_seconds=3, rate_window_seconds=RATE_WINDOW_SECONDS)
    )


def wait_for_window(prometheus: RunningPrometheus, targets: int) -> None:
    prometheus.wait_for_targets_up(targets)
    time.sleep(RATE_WINDOW_SECONDS + 2)


def test_queries_return_what_the_agents_export(fleet: Fleet, prometheus: StartPrometheus) -> None:
    server = prometheus(fleet.targets_file)
    wait_for_window(server, 2)
    snapshot = reader_for(server).read(
        ["h100-a", "l4-a"], [("team-a", "llama-0"), ("team-b", "small-0")]
    )
    assert (snapshot.source, snapshot.stale, snapshot.reason) == (Source.MEASURED, False, "")
    h100 = snapshot.node_watts["h100-a"]
    assert h100.metric == "rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)"
    assert h100.value == pytest.approx(fleet.draw_watts("h100-a"), rel=0.01)
    # The simulated GPUs draw the ground truth: one busy H100 held by its cap, one idle; the L4
    # half loaded below its 60 W limit.
    h100_factor = fleet.libraries["h100-a"].node_factor
    busy = truth_draw_watts(H100, 1.0, 400, h100_factor)
    assert busy == 400
    idle = truth_draw_watts(H100, 0.0, 400, h100_factor)
    assert h100.value == pytest.approx(busy + idle, rel=0.01)
    half_loaded = truth_draw_watts("NVIDIA-L4", 0.5, 60, fleet.libraries["l4-a"].node_factor)
    assert half_loaded < 60
    assert snapshot.node_watts["l4-a"].value == pytest.approx(half_loaded, rel=0.01)
    assert snapshot.pod_watts["team-a", "llama-0"].value == pytest.approx(busy, rel=0.01)
    assert snapshot.pod_watts["team-b", "small-0"].value == pytest.approx(half_loaded, rel=0.01)

    limits = PrometheusConnect(server.url).custom_query("DCGM_FI_DEV_POWER_MGMT_LIMIT")
    by_gpu = {(row["metric"]["Hostname"], row["metric"]["gpu"]): row for row in limits}
    assert float(by_gpu["h100-a", "1"]["value"][1]) == 400
    assert float(by_gpu["l4-a", "0"]["value"][1]) == 60
    labels = by_gpu["h100-a", "0"]["metric"]
    assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert labels["UUID"] == fleet.agents["h100-a"].backend.identities[0].uuid
    assert (labels["pod"], labels["namespace"]) == ("llama-0", "team-a")


def test_energy_from_prometheus_matches_the_agents_counters_within_2_percent(
    fleet: Fleet, prometheus: StartPrometheus
) -> None:
    server = prometheus(fleet.targets_file)
    server.wait_for_targets_up(2)
    time.sleep(2)
    start = datetime.now(UTC)
    start_joules = {node: fleet.energy_joules(node) for node in fleet.agents}
    start_gpu0_joules = fleet.energy_joules("h100-a", range(1))
    time.sleep(10)
    switch_gpu1_joules = fleet.energy_joules("h100-a", range(1, 2))
    # The load changes half way: the reading must integrate it, not extrapolate one power level.
    # llama-0 keeps GPU 0 (a pod keeps its devices); llama-1 arrives and gets GPU 1.
    fleet.agents["h100-a"].observe_pods(
        [
            PlacedPod("team-a", "llama-0", "server", 1, "t1", utilisation=0.3),
            PlacedPod("team-a", "llama-1", "server", 1, "t2", utilisation=0.3),
        ]
    )
    fleet.agents["l4-a"].observe_pods([])
    time.sleep(10)
    end = datetime.now(UTC)
    end_joules = {node: fleet.energy_joules(node) for node in fleet.agents}
    end_gpu0_joules = fleet.energy_joules("h100-a", range(1))
    end_gpu1_joules = fleet.energy_joules("h100-a", range(1, 2))
    loaded_gpu1_watts = fleet.draw_watts("h100-a", range(1, 2))
    time.sleep(2)  # let the scrape after `end` land

    reading = reader_for(server).energy(
        ["h100-a", "l4-a"], [("team-a", "llama-0"), ("team-a", "llama-1")], start=start, end=end
    )
    assert (reading.source, reading.stale) == (Source.MEASURED, False)
    for node in fleet.agents:
        counted = end_joules[node] - start_joules[node]
        measured = reading.node_joules[node]
        assert measured.metric == "increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)"
        assert measured.value == pytest.approx(counted, rel=0.02), node
    # llama-0 held GPU 0 throughout, llama-1 GPU 1 in the second half. llama-1's pod-labelled
    # series starts at the first scrape after the switch. increase() extrapolates a series that
    # starts inside the window back by up to half a scrape interval at its own rate (and cannot
    # reach the switch exactly): allow one scrape's worth of the loaded draw above, more below.
    gpu0 = end_gpu0_joules - start_gpu0_joules
    gpu1 = end_gpu1_joules - switch_gpu1_joules
    one_scrape_joules = loaded_gpu1_watts * SCRAPE_INTERVAL_SECONDS
    assert reading.pod_joules["team-a", "llama-0"].value == pytest.approx(gpu0, rel=0.02)
    llama1 = reading.pod_joules["team-a", "llama-1"].value
    assert gpu1 * 0.85 < llama1 < gpu1 * 1.02 + one_scrape_joules


def test_energy_across_a_driver_reload_counts_both_sides_of_the_counter_reset(
    fleet: Fleet, prometheus: StartPrometheus
) -> None:
    server = prometheus(fleet.targets_file)
    server.wait_for_targets_up(2)
    time.sleep(2)
    start = datetime.now(UTC)
    start_joules = fleet.energy_joules("l4-a")
    time.sleep(8)
    before_reload_joules = fleet.energy_joules("l4-a")
    fleet.libraries["l4-a"].reload_driver()  # the counter restarts at 0 (and the limit at default)
    time.sleep(8)
    end = datetime.now(UTC)
    counted = before_reload_joules - start_joules + fleet.energy_joules("l4-a")
    time.sleep(2)

    measured = reader_for(server).energy(["l4-a"], start=start, end=end).node_joules["l4-a"]
    # What lies between the last scrape before the reload and the reload itself is lost to every
    # reader of the counter; allow that and one interval of edge extrapolation.
    allowance = 2 * SCRAPE_INTERVAL_SECONDS * fleet.draw_watts("l4-a")
    assert measured.value == pytest.approx(counted, abs=allowance)


def test_hostname_spellings_kepler_names_and_token_counters_are_read(
    tmp_path: Path, prometheus: StartPrometheus
) -> None:
    began = time.monotonic()

    def exporter_text() -> str:
        elapsed = time.monotonic() - began
        return "\n".join(
            [
                "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
                'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",hostname="lower-node"} '
                f"{300_000 * elapsed:.0f}",
                "# TYPE kepler_node_gpu_watts gauge",
                'kepler_node_gpu_watts{node_name="kepler-node"} 150',
                "# TYPE kepler_pod_gpu_joules_total counter",
                'kepler_pod_gpu_joules_total{pod_name="p",pod_namespace="ns",'
                f'node_name="kepler-node"}} {100 * elapsed:.3f}',
                "# TYPE vllm:generation_tokens_total counter",
                f'vllm:generation_tokens_total{{namespace="ns",pod="p"}} {500 * elapsed:.3f}',
                "",
            ]
        )

    exporter = MetricsServer("127.0.0.1", 0, exporter_text)
    try:
        targets_file = tmp_path / "targets.json"
        write_targets(targets_file, {"exporter": exporter.address})
        server = prometheus(targets_file)
        wait_for_window(server, 1)
        snapshot = reader_for(server).read(["lower-node", "kepler-node"], [("ns", "p")])
    finally:
        exporter.close()
    assert snapshot.node_watts["lower-node"].value == pytest.approx(300, rel=0.01)
    kepler = snapshot.node_watts["kepler-node"]
    assert (kepler.metric, kepler.value) == ("avg_over_time(kepler_node_gpu_watts)", 150)
    pod = snapshot.pod_watts["ns", "p"]
    assert pod.metric == "rate(kepler_pod_gpu_joules_total)"
    assert pod.value == pytest.approx(100, rel=0.01)
    assert snapshot.pod_tokens_per_second["ns", "p"] == pytest.approx(500, rel=0.01)
    tokens_per_joule = snapshot.tokens_per_joule(("ns", "p"))
    assert tokens_per_joule == pytest.approx(5, rel=0.02)


def test_prometheus_stopped_mid_test_reads_as_stale_without_raising(
    fleet: Fleet, prometheus: StartPrometheus
) -> None:
    server = prometheus(fleet.targets_file)
    wait_for_window(server, 2)
    reader = reader_for(server)
    assert not reader.read(["h100-a"]).stale

    server.stop()
    snapshot = reader.read(["h100-a", "l4-a"], [("team-a", "llama-0")])
    assert (snapshot.source, snapshot.stale) == (Source.MODELLED, True)
    assert server.url in snapshot.reason
    assert snapshot.node_watts == {}
    energy = reader.energy(["h100-a"], start=datetime.now(UTC))
    assert (energy.source, energy.stale) == (Source.MODELLED, True)
    assert reader.scalar("vector(1)") is None


def test_a_node_whose_agent_stops_reporting_goes_missing_then_stale(
    fleet: Fleet, prometheus: StartPrometheus
) -> None:
    server = prometheus(fleet.targets_file)
    wait_for_window(server, 2)
    reader = reader_for(server)
    assert reader.scalar("vector(42)") == 42
    fleet.servers["l4-a"].close()
    time.sleep(RATE_WINDOW_SECONDS + 2)
    snapshot = reader.read(["h100-a", "l4-a"])
    assert (snapshot.stale, snapshot.source) == (False, Source.MEASURED)
    assert snapshot.missing_nodes == {"l4-a"}
    assert "l4-a" in snapshot.reason
    only_lost = reader.read(["l4-a"])
    assert (only_lost.stale, only_lost.source) == (True, Source.MODELLED)
    assert "is the agent or DCGM exporter being scraped" in only_lost.reason


def test_vllms_queue_and_a_short_window_peak_are_read_per_pod(
    tmp_path: Path, prometheus: StartPrometheus
) -> None:
    """The default queue query (vLLM's waiting requests x generation tokens per finished
    request) and a peak query over the same counter, on a real Prometheus."""
    began = time.monotonic()

    def exporter_text() -> str:
        elapsed = time.monotonic() - began
        # 400 tokens/s, 2 requests finished per second (200 tokens each), 30 requests waiting.
        return "\n".join(
            [
                "# TYPE vllm:generation_tokens_total counter",
                f'vllm:generation_tokens_total{{namespace="ns",pod="p"}} {400 * elapsed:.3f}',
                "# TYPE vllm:request_success_total counter",
                'vllm:request_success_total{namespace="ns",pod="p",finished_reason="stop"} '
                f"{2 * elapsed:.3f}",
                "# TYPE vllm:num_requests_waiting gauge",
                'vllm:num_requests_waiting{namespace="ns",pod="p"} 30',
                "",
            ]
        )

    exporter = MetricsServer("127.0.0.1", 0, exporter_text)
    try:
        targets_file = tmp_path / "targets.json"
        write_targets(targets_file, {"exporter": exporter.address})
        server = prometheus(targets_file)
        wait_for_window(server, 1)
        reader = TelemetryReader(
            TelemetryConfig(
                server.url,
                timeout_seconds=3,
                rate_window_seconds=RATE_WINDOW_SECONDS,
                # At this test's 1-s scrapes: the highest 2-s rate at 1-s steps.
                peak_token_query="max_over_time(sum by (namespace, pod) "
                "(rate(vllm:generation_tokens_total[2s]))[{window}:1s])",
            )
        )
        snapshot = reader.read([], [("ns", "p")])
        off = TelemetryReader(
            TelemetryConfig(server.url, timeout_seconds=3, queue_query="", peak_token_query="")
        ).read([], [("ns", "p")])
    finally:
        exporter.close()
    # 30 waiting x 200 tokens per request.
    assert snapshot.pod_queued_tokens["ns", "p"] == pytest.approx(6000, rel=0.05)
    assert snapshot.pod_peak_tokens_per_second["ns", "p"] == pytest.approx(400, rel=0.05)
    assert off.pod_queued_tokens == {}
    assert off.pod_peak_tokens_per_second == {}
