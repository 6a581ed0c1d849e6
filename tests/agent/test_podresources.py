"""The agent's device mapping over the kubelet PodResources API: a gRPC server on a unix socket.

The server is `PodResourcesServer` (the kubelet's v1 proto, as the sandbox's simulated nodes serve
it); the agent reads it with the same client it uses on a real node.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from wattsched_agent.node_agent import NodeAgent
from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.podresources import (
    PodDevices,
    PodResourcesClient,
    PodResourcesError,
    PodResourcesServer,
    gpu_uuid,
)
from wattsched_agent.podresources_v1 import api_pb2
from wattsched_agent.reconcile import PlacedPod
from wattsched_agent.simulated_nvml import SimulatedNvml
from wattsched_api.nodepowerprofile import parse_nodepowerprofile
from wattsched_operator.transition import is_confirmed

NOW = datetime(2026, 12, 5, 10, 0, 0, tzinfo=UTC)
H100 = "NVIDIA-H100-80GB-HBM3"
REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "agent" / "wattsched_agent" / "podresources_v1"


def test_the_committed_stubs_are_what_the_pinned_generator_makes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "agent" / "podresources_stubs.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("api_pb2.py", "api_pb2_grpc.py"):
        fresh = (tmp_path / "wattsched_agent" / "podresources_v1" / name).read_text()
        assert fresh == (STUBS / name).read_text(), f"{name} is stale: make podresources-stubs"


def test_the_proto_keeps_the_kubelets_service_name() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert {method.name for method in service.methods} == {
        "List",
        "Get",
        "GetAllocatableResources",
    }


class Kubelet:
    """A PodResources server whose allocation a test changes."""

    def __init__(self, socket_path: Path) -> None:
        self.pods: list[PodDevices] = []
        self.server = PodResourcesServer(socket_path, lambda: list(self.pods))


def h100_agent(socket_path: Path) -> tuple[NodeAgent, SimulatedNvml, list[str]]:
    library = SimulatedNvml("gpu-h", [H100] * 4)
    agent = NodeAgent("gpu-h", NvmlBackend(library, "nvml"), PodResourcesClient(socket_path))
    uuids = [agent.backend.identities[index].uuid for index in range(4)]
    return agent, library, uuids


def profile(pods: dict[str, float], idle_watts: float, status: Any = None) -> Any:
    body: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": "gpu-h", "generation": 2},
        "spec": {
            "nodeName": "gpu-h",
            "idlePowerLimitWatts": idle_watts,
            "pods": [
                {"namespace": "team", "name": name, "powerLimitWatts": watts}
                for name, watts in pods.items()
            ],
        },
    }
    if status is not None:
        body["status"] = status
    return parse_nodepowerprofile(body)


OURS = [
    PlacedPod("team", "chat-0", "server", 2, "01"),
    PlacedPod("team", "chat-1", "server", 1, "02"),
]


def applied(status: dict[str, Any]) -> list[float]:
    return [gpu["appliedWatts"] for gpu in status["gpus"]]


@pytest.fixture
def kubelet(tmp_path: Path) -> Any:
    kubelet = Kubelet(tmp_path / "pod-resources" / "kubelet.sock")
    kubelet.server.start()
    yield kubelet
    kubelet.server.stop()


def test_each_replicas_limit_goes_to_exactly_the_gpus_its_pod_holds(kubelet: Kubelet) -> None:
    agent, _, uuids = h100_agent(kubelet.server.socket_path)
    # The device plugin chose GPUs 3 and 1 for chat-0 and GPU 0 for chat-1; GPU 2 is free.
    kubelet.pods = [
        PodDevices("team", "chat-0", (uuids[3], uuids[1])),
        PodDevices("team", "chat-1", (uuids[0],)),
    ]
    agent.observe_pods(OURS, NOW)
    status = agent.reconcile(profile({"chat-0": 600, "chat-1": 450}, idle_watts=200), NOW)
    assert applied(status) == [450, 600, 200, 600]
    assert [gpu.get("pod") for gpu in status["gpus"]] == [
        "team/chat-1",
        "team/chat-0",
        None,
        "team/chat-0",
    ]
    assert [gpu.get("uuid") for gpu in status["gpus"]] == uuids
    assert status["deviceMapping"] == {"source": "PodResources", "readTime": "2026-12-05T10:00:00Z"}
    assert status["conditions"][0]["reason"] == "LimitsApplied"
    written = profile({"chat-0": 600, "chat-1": 450}, idle_watts=200, status=status)
    assert is_confirmed(written.to_dict(), 2)


def test_a_time_sliced_device_id_names_its_gpu(kubelet: Kubelet) -> None:
    assert gpu_uuid("GPU-abc::3") == "GPU-abc"
    agent, _, uuids = h100_agent(kubelet.server.socket_path)
    kubelet.pods = [PodDevices("team", "chat-1", (f"{uuids[2]}::0",))]
    agent.observe_pods(OURS, NOW)
    status = agent.reconcile(profile({"chat-1": 500}, idle_watts=200), NOW)
    assert applied(status) == [200, 200, 500, 200]


def test_a_kubelet_restart_keeps_the_last_mapping_then_reads_the_new_one(kubelet: Kubelet) -> None:
    agent, _, uuids = h100_agent(kubelet.server.socket_path)
    kubelet.pods = [PodDevices("team", "chat-1", (uuids[1],))]
    agent.observe_pods(OURS, NOW)
    spec = profile({"chat-1": 500}, idle_watts=200)
    assert applied(agent.reconcile(spec, NOW)) == [200, 500, 200, 200]

    kubelet.server.stop()  # the kubelet restarts: its socket goes away
    later = datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC)
    agent.observe_pods(OURS, later)
    status = agent.reconcile(spec, later)
    assert applied(status) == [200, 500, 200, 200]
    mapping = status["deviceMapping"]
    assert (mapping["source"], mapping["readTime"]) == ("LastKnown", "2026-12-05T10:00:00Z")
    assert "does not exist" in mapping["message"]
    assert is_confirmed(profile({"chat-1": 500}, 200, status).to_dict(), 2)

    kubelet.pods = [PodDevices("team", "chat-1", (uuids[3],))]  # the pod was recreated elsewhere
    kubelet.server.start()
    agent.observe_pods(OURS, later)
    status = agent.reconcile(spec, later)
    assert status["deviceMapping"]["source"] == "PodResources"
    assert applied(status) == [200, 200, 200, 500]


def test_a_missing_socket_sets_no_limit_and_says_why(tmp_path: Path) -> None:
    socket_path = tmp_path / "absent" / "kubelet.sock"
    agent, _, _ = h100_agent(socket_path)
    agent.observe_pods(OURS, NOW)
    spec = profile({"chat-0": 300}, idle_watts=200)
    status = agent.reconcile(spec, NOW)
    assert applied(status) == [700, 700, 700, 700]  # the defaults, untouched
    assert all("targetWatts" not in gpu for gpu in status["gpus"])
    assert status["deviceMapping"]["source"] == "Unavailable"
    assert str(socket_path) in status["deviceMapping"]["message"]
    condition = next(c for c in status["conditions"] if c["type"] == "Applied")
    assert (condition["status"], condition["reason"]) == ("False", "DeviceMappingUnavailable")
    assert not is_confirmed(profile({"chat-0": 300}, 200, status).to_dict(), 2)


def test_the_client_reports_a_server_that_does_not_answer(tmp_path: Path) -> None:
    socket_path = tmp_path / "kubelet.sock"
    socket_path.touch()  # a stale file where the socket was: nothing listens
    with pytest.raises(PodResourcesError, match=r"PodResources List on .* failed"):
        PodResourcesClient(socket_path, timeout_seconds=1.0).list_gpu_pods()
