"""The agent's reconcile without a cluster: profile -> limits -> status, pods -> GPUs -> load.

The device mapping here comes from the simulated kubelet (in process); tests/agent/
test_podresources.py runs the agent against a PodResources gRPC server on a unix socket.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.agent.conftest import truth_draw_watts
from wattsched_agent.kube_access import node_gpu_info, placed_pod
from wattsched_agent.node_agent import ExitPolicy, NodeAgent
from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.reconcile import PlacedPod
from wattsched_agent.simulated_kubelet import SimulatedKubelet
from wattsched_agent.simulated_nvml import GpuFaults, SimulatedNvml
from wattsched_api.nodepowerprofile import (
    NodePowerProfile,
    parse_nodepowerprofile,
)
from wattsched_optimizer.problem import WorkloadType

NOW = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
A100 = "NVIDIA-A100-SXM4-80GB"


def profile(
    limits: dict[int, float],
    generation: int = 3,
    status: Any = None,
    idle_watts: float | None = None,
) -> NodePowerProfile:
    """A profile giving pod `team/gpu<i>` (which `a100_agent` puts on GPU i) its limit."""
    spec: dict[str, Any] = {
        "nodeName": "gpu-a",
        "pods": [
            {"namespace": "team", "name": f"gpu{i}", "powerLimitWatts": w}
            for i, w in limits.items()
        ],
    }
    if idle_watts is not None:
        spec["idlePowerLimitWatts"] = idle_watts
    obj: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": "gpu-a", "generation": generation},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return parse_nodepowerprofile(obj)


def named_profile(limits: dict[str, float], idle_watts: float | None = None) -> NodePowerProfile:
    """A profile giving each pod `team/<name>` its limit."""
    spec: dict[str, Any] = {
        "nodeName": "gpu-a",
        "pods": [
            {"namespace": "team", "name": name, "powerLimitWatts": w} for name, w in limits.items()
        ],
    }
    if idle_watts is not None:
        spec["idlePowerLimitWatts"] = idle_watts
    return parse_nodepowerprofile(
        {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "NodePowerProfile",
            "metadata": {"name": "gpu-a", "generation": 3},
            "spec": spec,
        }
    )


def one_gpu_pods(count: int) -> list[PlacedPod]:
    """Idle single-GPU wattsched pods `team/gpu<i>`, created in index order."""
    return [PlacedPod("team", f"gpu{i}", "c", 1, f"{i:02d}", utilisation=0.0) for i in range(count)]


def a100_agent(
    faults: dict[int, GpuFaults] | None = None, pods: list[PlacedPod] | None = None
) -> tuple[NodeAgent, SimulatedNvml]:
    """Four simulated A100s; GPU i held by pod team/gpu<i> unless `pods` says otherwise."""
    library = SimulatedNvml("gpu-a", [A100] * 4, faults=faults)
    kubelet = SimulatedKubelet()
    agent = NodeAgent("gpu-a", NvmlBackend(library, "simulated"), kubelet, library, kubelet)
    agent.observe_pods(one_gpu_pods(4) if pods is None else pods, NOW)
    return agent, library


def test_status_reports_applied_limits_and_the_applied_condition() -> None:
    agent, library = a100_agent()
    factor = library.node_factor  # idle draw: the truth's idle watts times the node's deviation
    status = agent.reconcile(profile({0: 250, 1: 300, 2: 100, 3: 400}), NOW)
    assert status["observedGeneration"] == 3
    assert [gpu["appliedWatts"] for gpu in status["gpus"]] == [250, 300, 100, 400]
    assert status["targetWatts"] == 1050
    assert status["appliedWatts"] == 1050
    assert status["gpuCount"] == 4
    gpu = status["gpus"][0]
    assert gpu["product"] == "NVIDIA-A100-SXM4-80GB"
    assert (gpu["minWatts"], gpu["maxWatts"], gpu["defaultWatts"]) == (100, 400, 400)
    # Rounded to the tenth of a watt for people (the metrics keep NVML's milliwatts).
    assert gpu["drawWatts"] == round(truth_draw_watts(A100, 0.0, 250, factor), 1)
    assert status["agent"] == {
        "ready": True,
        "heartbeatTime": "2026-11-25T03:00:00Z",
        "backend": "simulated",
        "message": "",
    }
    condition = next(c for c in status["conditions"] if c["type"] == "Applied")
    assert (condition["type"], condition["status"], condition["reason"]) == (
        "Applied",
        "True",
        "LimitsApplied",
    )
    assert condition["observedGeneration"] == 3


def test_status_round_trips_through_the_api_model() -> None:
    agent, _ = a100_agent()
    status = agent.reconcile(profile({0: 250}), NOW)
    again = profile({0: 250}, status=status)
    assert again.status.to_dict() == status
    assert again.limits_confirmed


def test_no_permission_makes_applied_false_with_the_reason() -> None:
    agent, _ = a100_agent({1: GpuFaults(no_permission=True)})
    status = agent.reconcile(profile({0: 250, 1: 250}), NOW)
    condition = next(c for c in status["conditions"] if c["type"] == "Applied")
    assert (condition["status"], condition["reason"]) == ("False", "NoPermission")
    assert "GPU 1" in condition["message"]
    assert status["gpus"][1]["appliedWatts"] == 400
    assert status["agent"]["ready"] is True
    assert not profile({0: 250, 1: 250}, status=status).limits_confirmed


def test_readable_but_not_settable_gpu_fails_applied_and_still_reports_draw_and_limits() -> None:
    agent, library = a100_agent({0: GpuFaults(set_not_supported=True)})
    library.set_utilisation(0, 1.0)
    status = agent.reconcile(profile({0: 250, 1: 250}), NOW)
    condition = next(c for c in status["conditions"] if c["type"] == "Applied")
    assert (condition["status"], condition["reason"]) == ("False", "NotSupported")
    assert "GPU 0: nvmlDeviceSetPowerManagementLimit failed" in condition["message"]
    gpu = status["gpus"][0]
    assert (gpu["minWatts"], gpu["maxWatts"], gpu["defaultWatts"]) == (100, 400, 400)
    assert gpu["appliedWatts"] == 400  # the default stays in force
    handle = library.nvmlDeviceGetHandleByIndex(0)
    assert gpu["drawWatts"] == round(library.nvmlDeviceGetPowerUsage(handle) / 1000, 1) > 63
    assert status["gpus"][1]["appliedWatts"] == 250
    assert status["agent"]["ready"] is True


def test_lost_gpu_outside_the_spec_still_fails_applied() -> None:
    agent, library = a100_agent()
    library.set_faults(3, GpuFaults(gpu_lost=True))
    status = agent.reconcile(profile({0: 250}), NOW)
    assert status["conditions"][0]["reason"] == "GpuLost"
    assert "appliedWatts" not in status["gpus"][3]
    assert status["gpus"][3]["uuid"].startswith("GPU-")


def test_transition_time_is_kept_while_the_condition_holds() -> None:
    agent, _ = a100_agent()
    first = agent.reconcile(profile({0: 250}), NOW)
    later = agent.reconcile(profile({0: 260}, status=first), NOW + timedelta(minutes=5))
    assert later["conditions"][0]["lastTransitionTime"] == "2026-11-25T03:00:00Z"
    assert later["agent"]["heartbeatTime"] == "2026-11-25T03:05:00Z"


def test_limits_lost_by_a_driver_reload_come_back_on_the_next_reconcile() -> None:
    agent, library = a100_agent()
    agent.reconcile(profile({0: 200}), NOW)
    library.reload_driver()
    status = agent.reconcile(profile({0: 200}), NOW)
    assert status["gpus"][0]["appliedWatts"] == 200


def test_restore_policy_sets_defaults_and_reports_it() -> None:
    agent, _ = a100_agent()
    applied = profile({0: 200}, status=agent.reconcile(profile({0: 200}), NOW))
    agent.stop(ExitPolicy.RESTORE)
    patch = agent.stopped_status(applied)
    assert patch["gpus"][0]["appliedWatts"] == 400
    assert patch["agent"]["ready"] is False
    assert patch["conditions"][0]["reason"] == "DefaultsRestored"


def test_leave_policy_keeps_limits_and_only_marks_the_agent_stopped() -> None:
    agent, _ = a100_agent()
    applied = profile({0: 200}, status=agent.reconcile(profile({0: 200}), NOW))
    agent.stop(ExitPolicy.LEAVE)
    patch = agent.stopped_status(applied)
    assert set(patch) == {"agent"}
    assert patch["agent"]["ready"] is False
    assert agent.backend.sample(0).applied_watts == 200


def test_pods_get_free_gpus_in_creation_order_keep_them_and_make_them_busy() -> None:
    late = PlacedPod("team", "late", "server", 1, "2026-11-25T02:00:00Z")
    early = PlacedPod("team", "early", "server", 2, "2026-11-25T01:00:00Z", utilisation=0.05)
    agent, library = a100_agent(pods=[late, early])
    limits = named_profile({"early": 400, "late": 300}, idle_watts=300)
    status = agent.reconcile(limits, NOW)
    assert [gpu.get("pod") for gpu in status["gpus"]] == [
        "team/early",
        "team/early",
        "team/late",
        None,
    ]
    assert [gpu["targetWatts"] for gpu in status["gpus"]] == [400, 400, 300, 300]
    text = agent.metrics_text()
    assert 'gpu="0",' in text
    power = {
        line.split('gpu="')[1].split('"')[0]: line
        for line in text.splitlines()
        if line.startswith("DCGM_FI_DEV_POWER_USAGE{")
    }
    assert 'pod="early"' in power["0"]
    assert 'pod="early"' in power["1"]
    assert 'pod="late"' in power["2"]
    assert "pod=" not in power["3"]

    def watts(gpu: str) -> float:
        return float(power[gpu].rsplit(" ", 1)[1])

    def truth(utilisation: float, limit_watts: float) -> float:
        return truth_draw_watts(A100, utilisation, limit_watts, library.node_factor)

    assert watts("0") == pytest.approx(truth(0.05, 400), abs=1e-3)  # lightly loaded
    assert watts("2") == 300  # busy, held by the 300 W limit
    assert watts("3") == pytest.approx(truth(0.0, 300), abs=1e-3)  # idle
    assert watts("3") < watts("0") < watts("2")

    # "early" goes: its GPUs are free again; a newer pod gets the lowest free ones, "late" stays.
    newer = PlacedPod("team", "newer", "server", 1, "2026-11-25T03:00:00Z")
    agent.observe_pods([late, newer], NOW)
    status = agent.reconcile(limits, NOW)
    assert [gpu.get("pod") for gpu in status["gpus"]] == [
        "team/newer",
        None,
        "team/late",
        None,
    ]


def test_a_pods_workload_type_sets_how_its_simulated_gpus_draw() -> None:
    agent, library = a100_agent(
        pods=[
            PlacedPod("team", "gpu0", "c", 1, "1", workload_type="Inference"),
            PlacedPod("team", "gpu1", "c", 1, "2", workload_type="Training"),
        ]
    )
    agent.reconcile(profile({0: 400, 1: 400}), NOW)
    factor = library.node_factor
    draws = [agent.backend.sample(index).draw_watts for index in (0, 1)]
    assert draws == [
        pytest.approx(truth_draw_watts(A100, 1.0, 400, factor, WorkloadType.INFERENCE), abs=1e-3),
        pytest.approx(truth_draw_watts(A100, 1.0, 400, factor, WorkloadType.TRAINING), abs=1e-3),
    ]
    assert draws[0] != draws[1]


def test_a_pod_that_does_not_fit_in_the_free_gpus_gets_none() -> None:
    kubelet = SimulatedKubelet()
    kubelet.allocate(
        [PlacedPod("a", "p", "c", 3, "1"), PlacedPod("a", "q", "c", 3, "2")],
        ["GPU-0", "GPU-1", "GPU-2", "GPU-3"],
    )
    [only] = kubelet.list_gpu_pods()
    assert (only.name, only.device_ids) == ("p", ("GPU-0", "GPU-1", "GPU-2"))


def test_other_teams_gpus_are_left_alone_and_reported_as_theirs() -> None:
    theirs = PlacedPod("ml", "big", "c", 2, "00", utilisation=1.0, managed=False)
    ours = PlacedPod("team", "gpu2", "c", 1, "01")
    agent, library = a100_agent(pods=[theirs, ours])
    for index in (0, 1):  # another team's pods run at whatever limit they set
        handle = library.nvmlDeviceGetHandleByIndex(index)
        library.nvmlDeviceSetPowerManagementLimit(handle, 350_000)
    status = agent.reconcile(profile({2: 250}, idle_watts=100), NOW)
    gpus = status["gpus"]
    assert [(g.get("pod"), g.get("holder")) for g in gpus] == [
        ("ml/big", "other"),
        ("ml/big", "other"),
        ("team/gpu2", "wattsched"),
        (None, None),
    ]
    assert [g["appliedWatts"] for g in gpus] == [350, 350, 250, 100]
    assert ["targetWatts" in g for g in gpus] == [False, False, True, True]
    assert status["targetWatts"] == 350
    assert status["conditions"][0]["reason"] == "LimitsApplied"


def test_a_budgets_opt_in_caps_exactly_the_other_teams_gpus() -> None:
    theirs = PlacedPod("ml", "big", "c", 2, "00", utilisation=1.0, managed=False)
    ours = PlacedPod("team", "gpu2", "c", 1, "01")
    agent, library = a100_agent(pods=[theirs, ours])
    for index in (0, 1):
        library.nvmlDeviceSetPowerManagementLimit(
            library.nvmlDeviceGetHandleByIndex(index), 350_000
        )
    base = profile({2: 250}, idle_watts=100)
    capped = dataclasses.replace(
        base, spec=dataclasses.replace(base.spec, unmanaged_power_limit_watts=200)
    )
    gpus = agent.reconcile(capped, NOW)["gpus"]
    assert [g.get("holder") for g in gpus] == ["other", "other", "wattsched", None]
    assert [g["appliedWatts"] for g in gpus] == [200, 200, 250, 100]
    assert [g.get("targetWatts") for g in gpus] == [200, 200, 250, 100]
    # Without the opt-in they are left at what they run at (the cap already set stays).
    gpus = agent.reconcile(base, NOW)["gpus"]
    assert [g["appliedWatts"] for g in gpus] == [200, 200, 250, 100]
    assert ["targetWatts" in g for g in gpus] == [False, False, True, True]


def test_a_wattsched_pod_not_yet_in_the_spec_gets_the_idle_limit() -> None:
    agent, _ = a100_agent()
    status = agent.reconcile(profile({0: 300}, idle_watts=150), NOW)
    assert [g["appliedWatts"] for g in status["gpus"]] == [300, 150, 150, 150]
    assert [g["holder"] for g in status["gpus"]] == ["wattsched"] * 4


def test_only_live_pods_with_gpus_count_and_ours_carry_the_workload_label() -> None:
    def pod(phase: str, gpus: int, deleting: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": "p", "namespace": "n", "creationTimestamp": "t"}
        if deleting:
            metadata["deletionTimestamp"] = "t"
        limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
        return {
            "metadata": metadata,
            "spec": {"containers": [{"name": "c", "resources": {"limits": limits}}]},
            "status": {"phase": phase},
        }

    assert placed_pod(pod("Running", 2)) == PlacedPod("n", "p", "c", 2, "t", managed=False)
    typed = pod("Running", 2)
    typed["metadata"]["labels"] = {"wattsched.io/workload": "w"}
    typed["metadata"]["annotations"] = {"wattsched.io/workload-type": "Training"}
    assert placed_pod(typed) == PlacedPod("n", "p", "c", 2, "t", workload_type="Training")
    typed["metadata"]["annotations"] = {"wattsched.io/workload-type": "Gaming"}
    assert placed_pod(typed) == PlacedPod("n", "p", "c", 2, "t", workload_type="Inference")
    assert placed_pod(pod("Succeeded", 2)) is None
    assert placed_pod(pod("Running", 0)) is None
    assert placed_pod(pod("Running", 2, deleting=True)) is None


def test_node_labels_describe_the_simulated_gpus() -> None:
    node = {
        "metadata": {
            "name": "h100-0",
            "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "status": {"allocatable": {"nvidia.com/gpu": "8"}},
    }
    info = node_gpu_info(node)
    assert (info.name, info.product, info.gpu_count) == ("h100-0", "NVIDIA-H100-80GB-HBM3", 8)
    with pytest.raises(ValueError, match=r"node cpu-0: needs label nvidia\.com/gpu\.product"):
        node_gpu_info({"metadata": {"name": "cpu-0"}})
