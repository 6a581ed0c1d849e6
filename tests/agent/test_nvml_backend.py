"""The NVML backend on the simulated library: units, clamping, read-back and every error path."""

from __future__ import annotations

import statistics
from typing import Any, NoReturn

import pynvml
import pytest

from tests.agent.conftest import truth_draw_watts
from wattsched_agent.nvml_backend import FaultReason, NvmlBackend
from wattsched_agent.simulated_nvml import GpuFaults, SimulatedNvml
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.truth import GroundTruth

H100 = "NVIDIA-H100-80GB-HBM3"


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedErrorNvml(SimulatedNvml):
    """The simulated library with NVML error codes scripted into single calls.

    `errors[call]` lists what the next calls of that pynvml function do, in order: an NVML error
    code raises `NVMLError(code)`, None runs the call; once the list is used up the call runs.
    This reaches error paths `GpuFaults` does not model (unmapped codes, one failing call).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors: dict[str, list[int | None]] = {}

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml"):
            script = object.__getattribute__(self, "errors").get(name)
            if script:
                code = script.pop(0)
                if code is not None:

                    def fail(*_: object) -> NoReturn:
                        raise pynvml.NVMLError(code)

                    return fail
        return super().__getattribute__(name)


def scripted_h100_node() -> ScriptedErrorNvml:
    return ScriptedErrorNvml("node-a", [H100] * 2)


def open_backend(library: SimulatedNvml) -> NvmlBackend:
    backend = NvmlBackend(library, name="simulated")
    assert backend.open() == []
    return backend


def h100_node(**options: object) -> SimulatedNvml:
    return SimulatedNvml("node-a", [H100] * 2, **options)  # type: ignore[arg-type]


def test_simulated_library_speaks_milliwatts_and_raises_pynvml_errors() -> None:
    library = h100_node()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        library.nvmlDeviceGetCount()
    library.nvmlInit()
    handle = library.nvmlDeviceGetHandleByIndex(0)
    assert library.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [200_000, 700_000]
    assert library.nvmlDeviceGetPowerManagementDefaultLimit(handle) == 700_000
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        library.nvmlDeviceSetPowerManagementLimit(handle, 150_000)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        library.nvmlDeviceGetHandleByIndex(2)


def test_identity_reports_product_uuid_and_constraints_in_watts() -> None:
    backend = open_backend(h100_node())
    identity = backend.identities[1]
    assert identity.nvml_name == "NVIDIA H100 80GB HBM3"
    assert identity.product == "NVIDIA-H100-80GB-HBM3"
    assert identity.uuid.startswith("GPU-")
    assert identity.uuid != backend.identities[0].uuid
    assert (identity.min_watts, identity.max_watts, identity.default_watts) == (200, 700, 700)


def test_limit_within_constraints_is_set_and_read_back() -> None:
    library = h100_node()
    backend = open_backend(library)
    outcome = backend.apply_limit(0, 450.0)
    assert outcome.fault is None
    assert outcome.applied_watts == 450.0
    handle = library.nvmlDeviceGetHandleByIndex(0)
    assert library.nvmlDeviceGetPowerManagementLimit(handle) == 450_000
    assert backend.sample(1).applied_watts == 700.0


def test_limit_above_maximum_is_clamped_down_without_fault() -> None:
    backend = open_backend(h100_node())
    outcome = backend.apply_limit(0, 900.0)
    assert (outcome.target_watts, outcome.applied_watts, outcome.fault) == (700.0, 700.0, None)


def test_limit_below_minimum_is_clamped_up_and_reported() -> None:
    backend = open_backend(h100_node())
    outcome = backend.apply_limit(0, 120.0)
    assert outcome.applied_watts == 200.0
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.CLAMPED_TO_MINIMUM
    assert "120 W" in outcome.fault.message
    assert "200 W" in outcome.fault.message


def test_no_permission_is_reported_with_the_current_limit() -> None:
    library = h100_node(faults={0: GpuFaults(no_permission=True)})
    backend = open_backend(library)
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NO_PERMISSION
    assert "CAP_SYS_ADMIN" in outcome.fault.message
    assert outcome.applied_watts == 700.0
    assert backend.apply_limit(1, 400.0).fault is None


def test_no_permission_is_not_raised_when_the_limit_already_matches() -> None:
    library = h100_node(faults={0: GpuFaults(no_permission=True)})
    backend = open_backend(library)
    outcome = backend.apply_limit(0, 700.0)
    assert (outcome.applied_watts, outcome.fault) == (700.0, None)


def test_not_supported_board_reports_identity_without_constraints() -> None:
    library = h100_node(faults={1: GpuFaults(not_supported=True)})
    backend = NvmlBackend(library)
    faults = backend.open()
    assert [(fault.index, fault.reason) for fault in faults] == [(1, FaultReason.NOT_SUPPORTED)]
    assert backend.identities[1].uuid.startswith("GPU-")
    assert backend.identities[1].max_watts is None
    outcome = backend.apply_limit(1, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NOT_SUPPORTED
    sample = backend.sample(1)
    assert sample.applied_watts is None
    assert sample.draw_watts is not None


def test_readable_but_not_settable_board_reports_limits_and_not_supported_on_set() -> None:
    library = h100_node(faults={0: GpuFaults(set_not_supported=True)})
    backend = open_backend(library)
    identity = backend.identities[0]
    assert (identity.min_watts, identity.max_watts, identity.default_watts) == (200, 700, 700)
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NOT_SUPPORTED
    assert "nvmlDeviceSetPowerManagementLimit failed" in outcome.fault.message
    assert (outcome.target_watts, outcome.applied_watts) == (400.0, 700.0)
    sample = backend.sample(0)
    assert (sample.applied_watts, sample.fault) == (700.0, None)
    assert sample.draw_watts is not None
    assert backend.apply_limit(0, 700.0).fault is None  # already in force: no set needed


def test_unmapped_nvml_code_is_nvml_error_with_the_code_and_other_readings_kept() -> None:
    library = scripted_h100_node()
    backend = open_backend(library)
    library.errors["nvmlDeviceGetPowerUsage"] = [pynvml.NVML_ERROR_TIMEOUT]
    sample = backend.sample(0)
    assert sample.fault is not None
    assert sample.fault.reason is FaultReason.NVML_ERROR
    assert f"(NVML error {pynvml.NVML_ERROR_TIMEOUT})" in sample.fault.message
    assert "nvmlDeviceGetPowerUsage" in sample.fault.message
    assert sample.draw_watts is None
    assert (sample.applied_watts, sample.utilisation_percent) == (700.0, 0)
    assert sample.energy_millijoules is not None
    assert backend.sample(0).fault is None


def test_missing_libnvidia_ml_is_nvml_unavailable_with_the_hint() -> None:
    library = scripted_h100_node()
    library.errors["nvmlInit"] = [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND]
    backend = NvmlBackend(library)
    [fault] = backend.open()
    assert (fault.index, fault.reason) == (None, FaultReason.NVML_UNAVAILABLE)
    assert "libnvidia-ml" in fault.message
    assert backend.gpu_count == 0


def test_constraints_error_while_applying_sets_nothing() -> None:
    library = scripted_h100_node()
    backend = open_backend(library)
    library.errors["nvmlDeviceGetPowerManagementLimitConstraints"] = [pynvml.NVML_ERROR_GPU_IS_LOST]
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.GPU_LOST
    assert "nvmlDeviceGetPowerManagementLimitConstraints" in outcome.fault.message
    assert (outcome.target_watts, outcome.applied_watts) == (None, None)
    assert backend.sample(0).applied_watts == 700.0


def test_read_back_error_after_a_successful_set_is_reported_with_a_later_reading() -> None:
    library = scripted_h100_node()
    backend = open_backend(library)
    # first read: the current limit; second: the read-back after the set fails.
    library.errors["nvmlDeviceGetPowerManagementLimit"] = [None, pynvml.NVML_ERROR_UNKNOWN]
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NVML_ERROR
    assert "nvmlDeviceGetPowerManagementLimit (read-back) failed" in outcome.fault.message
    assert (outcome.target_watts, outcome.applied_watts) == (400.0, 400.0)


def test_read_back_and_later_reading_both_failing_leave_the_applied_limit_unknown() -> None:
    library = scripted_h100_node()
    backend = open_backend(library)
    lost = pynvml.NVML_ERROR_GPU_IS_LOST
    library.errors["nvmlDeviceGetPowerManagementLimit"] = [None, lost, lost]
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.GPU_LOST
    assert (outcome.target_watts, outcome.applied_watts) == (400.0, None)


def test_lost_gpu_is_reported_and_the_other_gpus_keep_working() -> None:
    library = h100_node()
    backend = open_backend(library)
    library.set_faults(0, GpuFaults(gpu_lost=True))
    outcome = backend.apply_limit(0, 400.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.GPU_LOST
    sample = backend.sample(0)
    assert sample.fault is not None
    assert sample.fault.reason is FaultReason.GPU_LOST
    assert (sample.draw_watts, sample.energy_millijoules) == (None, None)
    assert backend.apply_limit(1, 400.0).applied_watts == 400.0


def test_gpu_lost_at_start_is_identified_once_it_returns() -> None:
    library = h100_node(faults={0: GpuFaults(gpu_lost=True)})
    backend = NvmlBackend(library)
    assert [fault.reason for fault in backend.open()] == [FaultReason.GPU_LOST]
    assert 0 not in backend.identities
    library.set_faults(0, GpuFaults())
    assert backend.apply_limit(0, 300.0).applied_watts == 300.0
    assert backend.identities[0].max_watts == 700.0


def test_set_that_returns_success_but_changes_nothing_is_caught_by_read_back() -> None:
    library = h100_node(faults={0: GpuFaults(set_ignored=True)})
    backend = open_backend(library)
    outcome = backend.apply_limit(0, 300.0)
    assert outcome.applied_watts == 700.0
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.READ_BACK_MISMATCH


def test_index_beyond_the_node_is_gpu_not_found() -> None:
    backend = open_backend(h100_node())
    outcome = backend.apply_limit(5, 300.0)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.GPU_NOT_FOUND
    assert "0..1" in outcome.fault.message


def test_missing_driver_is_nvml_unavailable() -> None:
    backend = NvmlBackend(h100_node(driver_loaded=False))
    faults = backend.open()
    assert [(fault.index, fault.reason) for fault in faults] == [
        (None, FaultReason.NVML_UNAVAILABLE)
    ]
    assert backend.gpu_count == 0


def test_limit_lost_on_driver_reload_is_applied_again() -> None:
    library = h100_node()
    backend = open_backend(library)
    backend.apply_limit(0, 350.0)
    library.reload_driver()
    assert backend.sample(0).applied_watts == 700.0
    assert backend.apply_limit(0, 350.0).applied_watts == 350.0


def test_restore_default_sets_the_board_default() -> None:
    backend = open_backend(h100_node())
    backend.apply_limit(0, 300.0)
    assert backend.restore_default(0).applied_watts == 700.0


def test_restore_default_on_a_board_without_power_cap_reports_not_supported() -> None:
    backend = NvmlBackend(h100_node(faults={1: GpuFaults(not_supported=True)}))
    backend.open()
    outcome = backend.restore_default(1)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.NOT_SUPPORTED
    assert (outcome.target_watts, outcome.applied_watts) == (None, None)


def test_restore_default_of_a_missing_gpu_is_gpu_not_found() -> None:
    backend = open_backend(h100_node())
    outcome = backend.restore_default(7)
    assert outcome.fault is not None
    assert outcome.fault.reason is FaultReason.GPU_NOT_FOUND


def test_close_swallows_shutdown_errors() -> None:
    unopened = NvmlBackend(h100_node(driver_loaded=False))
    unopened.open()
    unopened.close()  # nvmlShutdown raises Uninitialized: the agent still exits cleanly
    library = scripted_h100_node()
    backend = open_backend(library)
    library.errors["nvmlShutdown"] = [pynvml.NVML_ERROR_UNKNOWN]
    backend.close()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        h100_node().nvmlShutdown()


def test_draw_follows_the_ground_truth_load_and_limit_and_energy_integrates_it() -> None:
    clock = ManualClock()
    library = h100_node(clock=clock)
    backend = open_backend(library)
    factor = library.node_factor

    def truth(utilisation: float, limit_watts: float) -> float:
        return truth_draw_watts(H100, utilisation, limit_watts, factor)

    assert backend.sample(0).draw_watts == pytest.approx(truth(0.0, 700), abs=1e-3)  # idle
    library.set_utilisation(0, 1.0)
    busy = backend.sample(0).draw_watts
    assert busy == pytest.approx(truth(1.0, 700), abs=1e-3)  # busy, uncapped
    backend.apply_limit(0, 400.0)
    assert backend.sample(0).draw_watts == 400.0  # busy, held by the cap
    backend.apply_limit(0, 700.0)
    library.set_utilisation(0, 0.2)
    light = backend.sample(0).draw_watts
    assert light == pytest.approx(truth(0.2, 700), abs=1e-3)
    assert light is not None
    assert busy is not None
    assert truth(0.0, 700) < light < busy
    start = backend.sample(0).energy_millijoules
    assert start is not None
    clock.now += 10.0
    end = backend.sample(0).energy_millijoules
    assert end is not None
    assert end - start == pytest.approx(truth(0.2, 700) * 10.0 * 1000, abs=1)
    assert backend.sample(0).utilisation_percent == 20


def test_batch_work_draws_its_full_load_whatever_the_limit_keeps_of_throughput() -> None:
    library = h100_node()
    backend = open_backend(library)
    backend.apply_limit(0, 650.0)
    library.set_utilisation(0, 1.0, "Training")
    library.set_utilisation(1, 1.0, "Inference")
    backend.apply_limit(1, 650.0)
    factor = library.node_factor
    training = truth_draw_watts(H100, 1.0, 650, factor, WorkloadType.TRAINING)
    inference = truth_draw_watts(H100, 1.0, 650, factor, WorkloadType.INFERENCE)
    assert backend.sample(0).draw_watts == pytest.approx(training, abs=1e-3)
    assert backend.sample(1).draw_watts == pytest.approx(inference, abs=1e-3)
    with pytest.raises(ValueError, match="workload type 'Gaming' is not in the ground-truth"):
        library.set_utilisation(0, 1.0, "Gaming")


def test_each_node_keeps_its_own_power_deviation_from_the_truths_spread() -> None:
    spread = GroundTruth().node_power_spread
    factors = [SimulatedNvml(f"node-{i}", [H100]).node_factor for i in range(40)]
    assert SimulatedNvml("node-3", [H100]).node_factor == factors[3]
    assert len(set(factors)) == len(factors)
    assert all(abs(factor - 1.0) < 5 * spread for factor in factors)
    assert 0.5 * spread < statistics.stdev(factors) < 2 * spread


def test_unknown_product_is_rejected_naming_the_node() -> None:
    with pytest.raises(ValueError, match=r"node n1: GPU product\(s\) \['NVIDIA-B999'\]"):
        SimulatedNvml("n1", ["NVIDIA-B999"])
