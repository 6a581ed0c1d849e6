"""The agent's /metrics: DCGM exporter names, types, units and labels, served over HTTP; and the
agent command's flags and wiring."""

from __future__ import annotations

import functools
import threading
import time
import urllib.error
import urllib.request
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wattsched_agent.cli import build_agents, parse_args, parse_faults
from wattsched_agent.dcgm_metrics import (
    GpuMetrics,
    MetricsLoop,
    MetricsServer,
    PodRef,
    render_metrics,
)
from wattsched_agent.kube_access import GpuNodeInfo, KubeAccess
from wattsched_agent.nvml_backend import GpuIdentity, GpuSample
from wattsched_agent.simulated_nvml import GpuFaults

IDENTITY = GpuIdentity(0, "GPU-abc", "NVIDIA L4", 40.0, 72.0, 72.0)


def test_metrics_use_dcgm_names_types_and_labels() -> None:
    text = render_metrics(
        "node-1",
        [
            GpuMetrics(IDENTITY, GpuSample(0, 60.0, 42.5, 123456, 87), PodRef("ns", "pod-0", "c")),
            GpuMetrics(None, GpuSample(1, None, None, None, None), None),
        ],
    )
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    [power] = families["DCGM_FI_DEV_POWER_USAGE"].samples
    assert power.value == 42.5
    assert power.labels == {
        "gpu": "0",
        "UUID": "GPU-abc",
        "device": "nvidia0",
        "modelName": "NVIDIA L4",
        "Hostname": "node-1",
        "container": "c",
        "namespace": "ns",
        "pod": "pod-0",
    }
    [energy] = families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].samples
    assert energy.value == 123456
    [limit] = families["DCGM_FI_DEV_POWER_MGMT_LIMIT"].samples
    assert limit.value == 60.0
    [utilisation] = families["DCGM_FI_DEV_GPU_UTIL"].samples
    assert utilisation.value == 87


def test_server_serves_metrics_and_health_and_nothing_else() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: "up 1\n")
    try:
        base = f"http://{server.address}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert response.read() == b"up 1\n"
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{base}/other", timeout=5)
        assert error.value.code == 404
        error.value.close()
    finally:
        server.close()


def up(n: int) -> str:
    return f"up {n}\n"


def test_many_servers_share_one_thread_and_it_stops_with_the_last() -> None:
    before = threading.active_count()
    loop = MetricsLoop()
    servers = [MetricsServer("127.0.0.1", 0, functools.partial(up, n), loop) for n in range(50)]
    try:
        assert threading.active_count() == before + 1  # one thread, not one per server
        for n in (0, 17, 49):
            with urllib.request.urlopen(f"http://{servers[n].address}/metrics", timeout=5) as r:
                assert r.read() == f"up {n}\n".encode()
    finally:
        for server in servers:
            server.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)  # the request threads end after their response
    assert threading.active_count() == before


def test_a_server_closed_twice_is_closed_once() -> None:
    # A node's agent stopped early and then the whole fleet: with a shared loop the second
    # close must not unregister a closed socket.
    loop = MetricsLoop()
    servers = [MetricsServer("127.0.0.1", 0, functools.partial(up, n), loop) for n in range(2)]
    servers[0].close()
    servers[0].close()
    with urllib.request.urlopen(f"http://{servers[1].address}/metrics", timeout=5) as r:
        assert r.read() == b"up 1\n"
    for server in servers:
        server.close()


def test_fault_flags_name_a_node_or_every_node() -> None:
    faults = parse_faults(["a/1=no-permission", "0=gpu-lost"], ["a", "b"])
    assert faults == {
        "a": {1: GpuFaults(no_permission=True), 0: GpuFaults(gpu_lost=True)},
        "b": {0: GpuFaults(gpu_lost=True)},
    }
    with pytest.raises(ValueError, match="KIND one of"):
        parse_faults(["1=melted"], ["a"])


def test_readable_but_not_settable_fault_is_a_simulate_fault_kind() -> None:
    assert parse_faults(["2=set-not-supported"], ["a"]) == {
        "a": {2: GpuFaults(set_not_supported=True)}
    }


def test_all_nodes_mode_needs_the_simulated_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--all-nodes", "--backend", "nvml"])
    assert "--all-nodes needs --backend simulated" in capsys.readouterr().err


def test_the_nvml_agent_reads_the_kubelets_socket_and_only_simulated_nodes_serve_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    nvml = parse_args(["--node-name", "n"])
    assert str(nvml.pod_resources_socket) == "/var/lib/kubelet/pod-resources/kubelet.sock"
    with pytest.raises(SystemExit):
        parse_args(["--node-name", "n", "--pod-resources-dir", "/tmp/x"])
    assert "--pod-resources-dir needs --backend simulated" in capsys.readouterr().err


class _Nodes:
    """The GPU nodes `build_agents` asks the API for (the one call it makes)."""

    def __init__(self, *nodes: GpuNodeInfo) -> None:
        self.nodes = list(nodes)

    def gpu_nodes(self, node_name: str | None, selector: str = "") -> list[GpuNodeInfo]:
        return [n for n in self.nodes if node_name in {None, n.name}]


def test_the_all_nodes_agent_skips_a_node_it_cannot_impersonate_and_serves_the_rest() -> None:
    nodes = _Nodes(GpuNodeInfo("l4", "NVIDIA-L4", 1), GpuNodeInfo("b200", "NVIDIA-B200", 8))
    fleet = build_agents(
        parse_args(["--backend", "simulated", "--all-nodes"]), cast(KubeAccess, nodes), []
    )
    assert list(fleet) == ["l4"]
    with pytest.raises(ValueError, match=r"node b200: GPU product\(s\) \['NVIDIA-B200'\]"):
        build_agents(
            parse_args(["--backend", "simulated", "--node-name", "b200"]),
            cast(KubeAccess, nodes),
            [],
        )
