"""Locked SM clocks: the simulated NVML's calls and errors, the backend's nearest-supported choice
and read-back, and the agent locking each pod's range on exactly the GPUs it holds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pynvml
import pytest

from wattsched_agent.dcgm_metrics import GpuMetrics, render_metrics
from wattsched_agent.node_agent import ExitPolicy, NodeAgent
from wattsched_agent.nvml_backend import (
    CLOCK_SETTLE_SECONDS,
    ClockOutcome,
    FaultReason,
    NvmlBackend,
    nearest_clock_mhz,
)
from wattsched_agent.reconcile import PlacedPod, locked_clocks_summary
from wattsched_agent.simulated_kubelet import SimulatedKubelet
from wattsched_agent.simulated_nvml import GpuFaults, SimulatedNvml, load_products
from wattsched_api.nodepowerprofile import NodePowerProfile, parse_nodepowerprofile

NOW = datetime(2026, 11, 25, 3, 0, 0, tzinfo=UTC)
H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"


def open_backend(library: SimulatedNvml) -> NvmlBackend:
    backend = NvmlBackend(library, name="simulated")
    assert backend.open() == []
    return backend


def test_simulated_library_lists_supported_clocks_like_nvidia_smi() -> None:
    library = SimulatedNvml("n", [H100, A100])
    library.nvmlInit()
    h100, a100 = (library.nvmlDeviceGetHandleByIndex(i) for i in (0, 1))
    assert library.nvmlDeviceGetSupportedMemoryClocks(h100) == [2619]
    clocks = library.nvmlDeviceGetSupportedGraphicsClocks(h100, 2619)
    assert (clocks[0], clocks[1], clocks[-1]) == (1980, 1965, 345)
    assert library.nvmlDeviceGetSupportedGraphicsClocks(a100, 1593)[0] == 1410
    with pytest.raises(pynvml.NVMLError_NotFound):
        library.nvmlDeviceGetSupportedGraphicsClocks(h100, 1215)


def test_simulated_library_refuses_an_upside_down_or_unsupported_range() -> None:
    library = SimulatedNvml("n", [H100])
    library.nvmlInit()
    handle = library.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        library.nvmlDeviceSetGpuLockedClocks(handle, 1500, 1200)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        library.nvmlDeviceSetGpuLockedClocks(handle, 1200, 2500)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        library.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_VIDEO)


def test_nearest_supported_clock_prefers_the_lower_on_a_tie() -> None:
    assert nearest_clock_mhz([990, 1005, 1020], 1000) == 1005
    assert nearest_clock_mhz([990, 1005, 1020], 997) == 990  # 7 below vs 8 above
    assert nearest_clock_mhz([990, 1020], 1005) == 990
    assert nearest_clock_mhz([990, 1005], 5000) == 1005


def test_a_range_is_moved_to_the_nearest_supported_clocks_locked_and_read_back() -> None:
    library = SimulatedNvml("n", [H100] * 2)
    backend = open_backend(library)
    library.set_utilisation(0, 1.0)
    outcome = backend.apply_clocks(0, 1001, 1201)
    assert outcome.fault is None
    assert outcome.target_mhz == (1005, 1200)  # 1980 - 15 k: 1005 and 1200 are supported
    assert outcome.sm_clock_mhz == 1200  # busy: at the top of the range
    assert backend.locked_clocks_mhz == {0: (1005, 1200)}
    assert backend.sample(0).sm_clock_mhz == 1200
    assert backend.sample(1).sm_clock_mhz == 345  # idle and unlocked: the lowest clock


class FakeTime:
    """A monotonic clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def lock_under_load(settle_seconds: float) -> tuple[FakeTime, ClockOutcome]:
    """Lock a busy simulated H100 at 1,185 MHz whose SM clock falls to a new lock after
    `settle_seconds`, on a fake clock the backend's polling advances."""
    fake = FakeTime()
    library = SimulatedNvml("n", [H100], clock=fake, clock_settle_seconds=settle_seconds)
    backend = NvmlBackend(library, "simulated", sleep=fake.sleep)
    assert backend.open() == []
    library.set_utilisation(0, 1.0)
    return fake, backend.apply_clocks(0, 1185, 1185)


def test_a_lock_is_read_back_once_the_clock_has_fallen_to_it() -> None:
    """A real H100 reads its old SM clock for 46-95 ms after a new lock (docs/telemetry.md):
    the read-back waits for the clock to fall, and no mismatch is reported."""
    fake, outcome = lock_under_load(settle_seconds=0.1)
    assert outcome.fault is None
    assert outcome.sm_clock_mhz == 1185
    assert 0.1 <= fake.now <= 0.12  # polled until it fell, not longer


def test_a_clock_still_above_the_lock_after_the_settling_time_is_a_mismatch() -> None:
    fake, outcome = lock_under_load(settle_seconds=10.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.READ_BACK_MISMATCH
    assert outcome.sm_clock_mhz == 1980
    assert fake.now == pytest.approx(CLOCK_SETTLE_SECONDS, abs=0.011)


def test_a_lock_already_in_force_is_not_set_again() -> None:
    library = SimulatedNvml("n", [H100])
    backend = open_backend(library)
    assert backend.apply_clocks(0, 1200, 1200).fault is None
    library.set_faults(0, GpuFaults(no_permission=True))  # a second set would fail
    outcome = backend.apply_clocks(0, 1200, 1200)
    assert outcome.fault is None
    assert outcome.target_mhz == (1200, 1200)


def test_no_permission_to_lock_is_a_fault_naming_the_call_and_the_fix() -> None:
    backend = open_backend(SimulatedNvml("n", [H100], faults={0: GpuFaults(no_permission=True)}))
    outcome = backend.apply_clocks(0, 1200, 1200)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NO_PERMISSION
    assert "nvmlDeviceSetGpuLockedClocks" in outcome.fault.message
    assert "CAP_SYS_ADMIN" in outcome.fault.message
    assert outcome.sm_clock_mhz == 345
    assert backend.locked_clocks_mhz == {}


def test_a_board_that_cannot_lock_clocks_reports_not_supported() -> None:
    faults = {0: GpuFaults(clocks_not_supported=True)}
    backend = open_backend(SimulatedNvml("n", [A100], faults=faults))
    outcome = backend.apply_clocks(0, 900, 900)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NOT_SUPPORTED
    assert backend.reset_clocks(0).fault is not None


def test_a_lock_lost_on_driver_reload_is_set_again_once_the_gpu_runs_above_it() -> None:
    library = SimulatedNvml("n", [H100])
    backend = open_backend(library)
    library.set_utilisation(0, 1.0)
    backend.apply_clocks(0, 1200, 1200)
    library.reload_driver()
    assert backend.sample(0).sm_clock_mhz == 1980  # unlocked: boosts
    outcome = backend.apply_clocks(0, 1200, 1200)
    assert outcome.fault is None
    assert outcome.sm_clock_mhz == 1200


def test_reset_unlocks_and_the_gpu_boosts_again() -> None:
    library = SimulatedNvml("n", [H100], clock_settle_seconds=0.0)
    backend = open_backend(library)
    library.set_utilisation(0, 0.5)
    backend.apply_clocks(0, 1200, 1200)
    outcome = backend.reset_clocks(0)
    assert outcome.fault is None
    assert outcome.sm_clock_mhz == 1980
    assert backend.locked_clocks_mhz == {}


def test_sm_clock_is_exported_as_dcgm_sm_clock() -> None:
    library = SimulatedNvml("n", [H100], clock_settle_seconds=0.0)
    backend = open_backend(library)
    backend.apply_clocks(0, 1200, 1200)
    text = render_metrics("n", [GpuMetrics(backend.identities[0], backend.sample(0), None)])
    assert "# TYPE DCGM_FI_DEV_SM_CLOCK gauge" in text
    assert 'DCGM_FI_DEV_SM_CLOCK{gpu="0"' in text
    assert text.split("DCGM_FI_DEV_SM_CLOCK{", 1)[1].split("\n")[0].endswith(" 1200")


@pytest.mark.parametrize("label", sorted(load_products()))
def test_every_simulated_product_lists_clocks_within_its_range(label: str) -> None:
    envelope = load_products()[label]
    clocks = envelope.supported_sm_clocks_mhz
    assert clocks[0] == envelope.sm_max_mhz
    assert clocks[-1] >= envelope.sm_min_mhz
    assert clocks == sorted(clocks, reverse=True)


def test_locked_clocks_summary_groups_gpus_by_range() -> None:
    assert locked_clocks_summary({}) == "none"
    assert locked_clocks_summary({2: (1200, 1200), 0: (990, 1005), 1: (990, 1005)}) == (
        "0,1=990-1005 2=1200-1200"
    )


# --- the agent: clocks per pod, status, exit ---------------------------------------------------


def clock_profile(pods: dict[str, tuple[float, tuple[int, int] | None]]) -> NodePowerProfile:
    entries: list[dict[str, Any]] = []
    for name, (watts, clocks) in pods.items():
        entry: dict[str, Any] = {"namespace": "team", "name": name, "powerLimitWatts": watts}
        if clocks is not None:
            entry["smClockRangeMegahertz"] = {"min": clocks[0], "max": clocks[1]}
        entries.append(entry)
    return parse_nodepowerprofile(
        {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "NodePowerProfile",
            "metadata": {"name": "gpu-a", "generation": 4},
            "spec": {"nodeName": "gpu-a", "pods": entries},
        }
    )


def h100_agent(faults: dict[int, GpuFaults] | None = None) -> tuple[NodeAgent, SimulatedNvml]:
    """Four H100s: pod team/decode holds two (busy), team/train one, one is free. Clocks change
    at once (settling is tested on the backend)."""
    library = SimulatedNvml("gpu-a", [H100] * 4, faults=faults, clock_settle_seconds=0.0)
    kubelet = SimulatedKubelet()
    agent = NodeAgent("gpu-a", NvmlBackend(library, "simulated"), kubelet, library, kubelet)
    agent.observe_pods(
        [
            PlacedPod("team", "decode", "c", 2, "01", utilisation=0.6),
            PlacedPod("team", "train", "c", 1, "02", workload_type="Training"),
        ],
        NOW,
    )
    return agent, library


def by_pod(status: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
    gpus: dict[str | None, list[dict[str, Any]]] = {}
    for gpu in status["gpus"]:
        gpus.setdefault(gpu.get("pod"), []).append(gpu)
    return gpus


def condition(status: dict[str, Any], condition_type: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == condition_type)


def test_a_pods_clock_range_is_locked_on_exactly_the_gpus_it_holds() -> None:
    agent, _ = h100_agent()
    status = agent.reconcile(clock_profile({"decode": (500, (1000, 1200)), "train": (700, None)}))
    gpus = by_pod(status)
    assert [g["smClockRangeMegahertz"] for g in gpus["team/decode"]] == [
        {"min": 1005, "max": 1200}
    ] * 2
    assert [g["smClockMegahertz"] for g in gpus["team/decode"]] == [1200, 1200]
    assert [g["appliedWatts"] for g in gpus["team/decode"]] == [500, 500]
    assert "smClockRangeMegahertz" not in gpus["team/train"][0]
    assert gpus["team/train"][0]["smClockMegahertz"] == 1980
    decode_indices = ",".join(str(g["index"]) for g in gpus["team/decode"])
    assert status["lockedClocks"] == f"{decode_indices}=1005-1200"
    clocks = condition(status, "ClocksApplied")
    assert (clocks["status"], clocks["reason"]) == ("True", "ClocksApplied")
    assert condition(status, "Applied")["status"] == "True"


def test_clocks_are_unlocked_when_the_spec_drops_the_range() -> None:
    agent, _ = h100_agent()
    agent.reconcile(clock_profile({"decode": (500, (1200, 1200))}))
    status = agent.reconcile(clock_profile({"decode": (500, None)}))
    assert status["lockedClocks"] == "none"
    assert [g["smClockMegahertz"] for g in by_pod(status)["team/decode"]] == [1980, 1980]
    assert agent.backend.locked_clocks_mhz == {}


def test_a_clock_fault_leaves_the_power_limits_applied() -> None:
    agent, _ = h100_agent({i: GpuFaults(clocks_not_supported=True) for i in range(4)})
    status = agent.reconcile(clock_profile({"decode": (500, (1200, 1200))}))
    assert condition(status, "Applied")["status"] == "True"
    clocks = condition(status, "ClocksApplied")
    assert (clocks["status"], clocks["reason"]) == ("False", "NotSupported")
    assert parse_nodepowerprofile(
        {**clock_profile({}).to_dict(), "status": status}
    ).limits_confirmed


def test_restore_on_exit_unlocks_the_clocks_and_says_so() -> None:
    agent, library = h100_agent()
    profile = clock_profile({"decode": (500, (1200, 1200))})
    agent.reconcile(profile)
    agent.stop(ExitPolicy.RESTORE)
    assert agent.backend.locked_clocks_mhz == {}
    patch = agent.stopped_status(profile)
    assert patch["lockedClocks"] == "none"
    assert condition(patch, "ClocksApplied")["reason"] == "DefaultsRestored"
    handle = library.nvmlDeviceGetHandleByIndex(0)
    assert handle.locked_sm_mhz is None


def test_leave_on_exit_keeps_the_clocks_locked() -> None:
    agent, _ = h100_agent()
    agent.reconcile(clock_profile({"decode": (500, (1200, 1200))}))
    agent.stop(ExitPolicy.LEAVE)
    assert len(agent.backend.locked_clocks_mhz) == 2
