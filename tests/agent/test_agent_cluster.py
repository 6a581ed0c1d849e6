"""`wattsched agent` on the sandbox: real API server, KWOK GPU nodes, simulated NVML.

One `--all-nodes` agent process serves every GPU node except the L40S ones (a second, single-node
agent takes gpu-l40s-00 to test the restore shutdown policy). It serves each node's simulated GPU
allocation over the kubelet's PodResources proto on a unix socket and reads it back with the
client a real node uses. NodePowerProfiles are created by hand here, as the operator would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.agent.conftest import (
    applied_status,
    apply_profile,
    gpu_pod,
    profile_object,
    scrape,
    start_agent,
    stop_agent,
    truth_draw_watts,
    wait_until,
)
from wattsched_agent.simulated_nvml import load_ground_truth
from wattsched_operator.desired import node_power_profile
from wattsched_operator.transition import NodeLimits

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster
A100 = "NVIDIA-A100-SXM4-80GB"
REPO_ROOT = Path(__file__).resolve().parents[2]

SERVED_SELECTOR = "nvidia.com/gpu.present=true,nvidia.com/gpu.product!=NVIDIA-L40S"


@pytest.fixture(scope="module")
def fleet_agent(
    sandbox: Sandbox, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The all-nodes agent; yields node -> metrics address (from its file_sd targets file)."""
    workdir = tmp_path_factory.mktemp("fleet-agent")
    targets_file = workdir / "targets.json"
    process = start_agent(
        sandbox,
        workdir / "agent.log",
        "--all-nodes",
        "--node-selector",
        SERVED_SELECTOR,
        "--metrics-port",
        "0",
        "--targets-file",
        str(targets_file),
        "--simulate-fault",
        "gpu-l4-01/2=no-permission",
        "--pod-resources-dir",
        str(workdir / "pod-resources"),
    )
    wait_until("the agent's targets file", targets_file.exists)
    targets = json.loads(targets_file.read_text())
    addresses = {t["labels"]["wattsched_node"]: t["targets"][0] for t in targets}
    yield addresses
    assert stop_agent(process) == 0, (workdir / "agent.log").read_text()[-3000:]
    for node in addresses:
        sandbox.kubectl("delete", "nodepowerprofile", node, "--ignore-not-found", "--wait=false")


def test_all_nodes_mode_serves_every_selected_gpu_node(fleet_agent: dict[str, str]) -> None:
    assert len(fleet_agent) == 14
    assert "gpu-l40s-00" not in fleet_agent
    samples = scrape(fleet_agent["gpu-h100-03"])["DCGM_FI_DEV_POWER_MGMT_LIMIT"]
    assert len(samples) == 8
    assert {sample.labels["Hostname"] for sample in samples} == {"gpu-h100-03"}


def test_agent_applies_the_profile_and_reports_it_with_a_heartbeat(
    sandbox: Sandbox, fleet_agent: dict[str, str], namespace: str
) -> None:
    apply_profile(sandbox, "gpu-h100-00", 300.0)
    status = wait_until("Applied=True", lambda: applied_status(sandbox, "gpu-h100-00", "True"))
    assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [300.0] * 8
    assert status["targetWatts"] == status["appliedWatts"] == 2400
    first = status["gpus"][0]
    assert first["product"] == "NVIDIA-H100-80GB-HBM3"
    assert (first["minWatts"], first["maxWatts"], first["defaultWatts"]) == (200, 700, 700)
    assert first["uuid"].startswith("GPU-")
    assert status["agent"]["ready"] is True
    assert status["agent"]["backend"] == "simulated"
    assert status["deviceMapping"]["source"] == "PodResources"
    limits = scrape(fleet_agent["gpu-h100-00"])["DCGM_FI_DEV_POWER_MGMT_LIMIT"]
    assert {sample.value for sample in limits} == {300.0}

    heartbeat = status["agent"]["heartbeatTime"]
    wait_until(
        "a newer heartbeat",
        lambda: (
            profile_object(sandbox, "gpu-h100-00")["status"]["agent"]["heartbeatTime"] > heartbeat
        ),
        timeout_seconds=10,
    )

    sandbox.kubectl(
        "apply", "-f", "-", input=json.dumps(gpu_pod("chat-0", namespace, "gpu-h100-00", 2))
    )
    apply_profile(sandbox, "gpu-h100-00", 300.0, {(namespace, "chat-0"): 650.0})

    def pod_limit_applied() -> dict[str, Any] | None:
        status = applied_status(sandbox, "gpu-h100-00", "True")
        ok = status is not None and status["gpus"][0].get("appliedWatts") == 650.0
        return status if ok else None

    status = wait_until("the pod's limit on the GPUs it holds", pod_limit_applied)
    assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [650.0] * 2 + [300.0] * 6
    assert [gpu.get("pod") for gpu in status["gpus"][:3]] == [f"{namespace}/chat-0"] * 2 + [None]
    assert status["gpus"][0]["holder"] == "wattsched"
    sandbox.kubectl("delete", "pod", "chat-0", "-n", namespace, "--wait=false")


def test_another_teams_gpus_are_left_alone_and_reported(
    sandbox: Sandbox, fleet_agent: dict[str, str], namespace: str
) -> None:
    # A profile that sets no limit yet: the agent reports the mapping and touches nothing.
    apply_profile(sandbox, "gpu-a100-01", None)
    theirs = gpu_pod("trainer", namespace, "gpu-a100-01", 2, wattsched=False)
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(theirs))

    def mapped() -> dict[str, Any] | None:
        status = applied_status(sandbox, "gpu-a100-01", "True")
        ok = status is not None and status["gpus"][0].get("holder") == "other"
        return status if ok else None

    status = wait_until("the other team's GPUs in the mapping", mapped)
    assert [gpu.get("holder") for gpu in status["gpus"][:3]] == ["other", "other", None]
    apply_profile(sandbox, "gpu-a100-01", 100.0)

    def idle_lowered() -> dict[str, Any] | None:
        status = applied_status(sandbox, "gpu-a100-01", "True")
        ok = status is not None and status["gpus"][2].get("appliedWatts") == 100.0
        return status if ok else None

    status = wait_until("the free GPUs at the idle limit", idle_lowered)
    assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [400.0] * 2 + [100.0] * 6
    assert "targetWatts" not in status["gpus"][0]
    sandbox.kubectl("delete", "pod", "trainer", "-n", namespace, "--wait=false")
    sandbox.kubectl("delete", "nodepowerprofile", "gpu-a100-01", "--ignore-not-found")


def test_a_gpu_without_permission_makes_applied_false_and_the_agent_keeps_reporting(
    sandbox: Sandbox, fleet_agent: dict[str, str]
) -> None:
    apply_profile(sandbox, "gpu-l4-01", 50.0)
    status = wait_until("Applied=False", lambda: applied_status(sandbox, "gpu-l4-01", "False"))
    applied = {c["type"]: c for c in status["conditions"]}["Applied"]
    assert applied["reason"] == "NoPermission"
    assert "GPU 2" in applied["message"]
    assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [50.0, 50.0, 72.0, 50.0]
    assert status["agent"]["ready"] is True
    assert all("drawWatts" in gpu and "energyJoules" in gpu for gpu in status["gpus"])


def test_a_workload_pod_makes_its_gpus_busy_and_labels_their_metrics(
    sandbox: Sandbox, fleet_agent: dict[str, str], namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-0",
            "namespace": namespace,
            "labels": {"wattsched.io/workload": "llama"},
        },
        "spec": {
            "nodeName": "gpu-a100-00",
            "containers": [
                {
                    "name": "server",
                    "image": "vllm/vllm-openai",
                    "env": [{"name": "WATTSCHED_POWER_LIMIT_WATTS", "value": "400"}],
                    "resources": {"limits": {"nvidia.com/gpu": "2"}},
                }
            ],
        },
    }
    # No profile (one left by another test would give the pod's GPUs the idle limit).
    sandbox.kubectl("delete", "nodepowerprofile", "gpu-a100-00", "--ignore-not-found")
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def busy_power() -> dict[str, Any] | None:
        samples = scrape(fleet_agent["gpu-a100-00"])["DCGM_FI_DEV_POWER_USAGE"]
        by_gpu = {sample.labels["gpu"]: sample for sample in samples}
        return by_gpu if by_gpu["1"].value > 300 else None

    by_gpu = wait_until("busy GPUs", busy_power)
    factor = load_ground_truth().node_factor("gpu-a100-00")
    busy_watts = truth_draw_watts(A100, 1.0, 400, factor)
    assert busy_watts < 400  # the ground truth's inference draw, below the 400 W default limit
    assert by_gpu["0"].value == pytest.approx(busy_watts, abs=1e-3)
    assert by_gpu["0"].labels["pod"] == "llama-0"
    assert by_gpu["1"].labels["namespace"] == namespace
    idle_watts = truth_draw_watts(A100, 0.0, 400, factor)
    assert by_gpu["2"].value == pytest.approx(idle_watts, abs=1e-3)
    assert "pod" not in by_gpu["2"].labels

    sandbox.kubectl("delete", "pod", "llama-0", "-n", namespace, "--wait=false")
    wait_until(
        "idle GPUs after the pod is deleted",
        lambda: (
            abs(scrape(fleet_agent["gpu-a100-00"])["DCGM_FI_DEV_POWER_USAGE"][1].value - idle_watts)
            < 1e-3
        ),
    )


def test_single_node_agent_restores_defaults_on_shutdown_when_asked(
    sandbox: Sandbox, crds: list[str], tmp_path: Path
) -> None:
    apply_profile(sandbox, "gpu-l40s-00", 200.0)
    process = start_agent(
        sandbox,
        tmp_path / "agent.log",
        "--node-name",
        "gpu-l40s-00",
        "--metrics-port",
        "0",
        "--shutdown-policy",
        "restore",
    )
    try:
        status = wait_until("Applied=True", lambda: applied_status(sandbox, "gpu-l40s-00", "True"))
        assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [200.0] * 4
        assert stop_agent(process) == 0
        status = profile_object(sandbox, "gpu-l40s-00")["status"]
        assert status["agent"]["ready"] is False
        applied = {c["type"]: c for c in status["conditions"]}["Applied"]
        assert (applied["status"], applied["reason"]) == ("False", "DefaultsRestored")
        assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [350.0] * 4
    finally:
        stop_agent(process)
        sandbox.kubectl("delete", "nodepowerprofile", "gpu-l40s-00", "--ignore-not-found")


def test_a_plans_locked_clocks_are_applied_and_reported_by_the_agent(
    sandbox: Sandbox, fleet_agent: dict[str, str], namespace: str, tmp_path: Path
) -> None:
    """`wattsched plan` on a decode-bound Efficiency service locks a clock; the operator's profile
    for the replica carries it; the agent locks exactly the pod's GPUs and reports it in status,
    in `kubectl get npp -o wide` and as DCGM_FI_DEV_SM_CLOCK."""
    items = yaml.safe_load((REPO_ROOT / "offline" / "snapshot.yaml").read_text())["items"]
    for item in items:
        if item["kind"] == "LLMWorkload" and item["metadata"]["name"] == "chat":
            item["spec"]["energy"]["policy"] = "Efficiency"
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(yaml.safe_dump_all(items))
    wattsched = str(Path(sys.executable).with_name("wattsched"))
    printed = subprocess.run(
        [wattsched, "plan", "-f", str(snapshot), "-o", "json", "--now", "2026-11-25T02:00:00Z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    replica = next(p for p in json.loads(printed)["placements"] if p["workload"] == "team-a/chat")
    clock = replica["smClockRangeMegahertz"]
    assert clock is not None

    node = "gpu-h100-02"
    pod = (namespace, "chat-0")
    manifest = gpu_pod("chat-0", namespace, node, replica["gpus"])
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    limits = NodeLimits(
        idle_watts=200.0,
        pods={pod: replica["powerLimitWatts"]},
        clocks={pod: (clock["min"], clock["max"])},
    )
    sandbox.kubectl("apply", "-f", "-", input=json.dumps(node_power_profile(node, limits)))

    def clocks_locked() -> dict[str, Any] | None:
        status = profile_object(sandbox, node).get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        locked = conditions.get("ClocksApplied", {}).get("status") == "True"
        return status if locked and status.get("lockedClocks", "none") != "none" else None

    status = wait_until("the replica's clocks locked", clocks_locked)
    held = [gpu for gpu in status["gpus"] if gpu.get("pod") == f"{namespace}/chat-0"]
    assert len(held) == replica["gpus"]
    for gpu in held:
        low, high = gpu["smClockRangeMegahertz"]["min"], gpu["smClockRangeMegahertz"]["max"]
        assert abs(high - clock["max"]) <= 15  # the nearest supported clock (15 MHz steps)
        assert low <= high
        assert gpu["smClockMegahertz"] <= high
    others = [gpu for gpu in status["gpus"] if gpu.get("pod") != f"{namespace}/chat-0"]
    assert all("smClockRangeMegahertz" not in gpu for gpu in others)
    wide = sandbox.kubectl("get", "npp", node, "-o", "wide").stdout
    assert "Clocks(MHz)".upper() in wide.upper()
    assert status["lockedClocks"] in wide
    clocks = scrape(fleet_agent[node])["DCGM_FI_DEV_SM_CLOCK"]
    by_gpu = {int(sample.labels["gpu"]): sample.value for sample in clocks}
    assert {by_gpu[gpu["index"]] for gpu in held} <= {
        float(gpu["smClockMegahertz"]) for gpu in held
    }

    sandbox.kubectl("delete", "pod", "chat-0", "-n", namespace, "--wait=false")
    sandbox.kubectl("delete", "nodepowerprofile", node, "--wait=false")
