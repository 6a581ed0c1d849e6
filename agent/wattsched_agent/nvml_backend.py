"""Apply and read GPU power limits through NVML, turning NVML errors into explicit faults.

`NvmlBackend` drives any library with pynvml's shape: the real `pynvml` module (nvidia-ml-py) on a
GPU node, or `SimulatedNvml` elsewhere, so the same code path is tested without hardware.

Rules it follows:
- Units: NVML speaks milliwatts and millijoules; this module's results are in watts (and mJ for the
  energy counter, as DCGM exports it).
- A limit is clamped to `nvmlDeviceGetPowerManagementLimitConstraints` before it is set with
  `nvmlDeviceSetPowerManagementLimit`, and always read back with
  `nvmlDeviceGetPowerManagementLimit`. The read-back is the truth: nvidia-ml-py 13.615's
  `nvmlDeviceSetPowerManagementLimit_v2` discards NVML's return code, and a driver may accept a set
  and keep another value, so this module never uses `_v2` nor trusts a return code alone.
- A limit that already reads back as the target is not set again (no privileged call needed).
- Clocks: a locked SM clock range is set with `nvmlDeviceSetGpuLockedClocks` after each bound is
  moved to the nearest clock `nvmlDeviceGetSupportedGraphicsClocks` lists for the highest memory
  clock (`nvmlDeviceGetSupportedMemoryClocks`), and read back with `nvmlDeviceGetClockInfo`
  (NVML_CLOCK_SM), polled for up to `CLOCK_SETTLE_SECONDS` while the clock falls to the lock:
  NVML has no getter for the lock itself, so a GPU running above the range's top after that
  is the sign that the lock is not in force (it is set again; still above: ReadBackMismatch); below
  the bottom is allowed (an idle GPU, or a power cap or heat throttling it). Memory clocks are left
  alone: decode is bound by HBM bandwidth, so a lower memory clock costs decode throughput, and
  HBM boards list a single memory clock. `nvmlDeviceResetGpuLockedClocks` unlocks.
- Errors never escape as exceptions: each call returns a `GpuFault` naming the GPU, the NVML call
  and the reason (NoPermission, NotSupported, GpuLost, ...): the agent keeps running and reporting.

Not for: talking to Kubernetes, exporting metrics or deciding limits (see `reconcile`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import pynvml

# A limit that reads back within this many watts of the target counts as applied.
READ_BACK_TOLERANCE_WATTS = 1.0
# After `nvmlDeviceSetGpuLockedClocks` the SM clock takes a moment to fall to the lock: 46-95 ms
# on an H100 80GB HBM3 under load (driver 580.159.04, `benchmarks/nvml_check.py`, docs/
# telemetry.md). The read-back is polled this long, every `CLOCK_POLL_SECONDS`, before a clock
# above the lock counts as a mismatch.
CLOCK_SETTLE_SECONDS = 0.25
CLOCK_POLL_SECONDS = 0.01


class NvmlLibrary(Protocol):
    """The pynvml functions the backend calls (the real module or `SimulatedNvml`)."""

    def nvmlInit(self) -> None: ...  # noqa: N802
    def nvmlShutdown(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...  # noqa: N802
    def nvmlDeviceGetName(self, handle: Any) -> str: ...  # noqa: N802
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...  # noqa: N802
    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]: ...  # noqa: N802
    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int: ...  # noqa: N802
    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int: ...  # noqa: N802
    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None: ...  # noqa: N802
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...  # noqa: N802
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...  # noqa: N802
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # noqa: N802
    def nvmlDeviceGetSupportedMemoryClocks(self, handle: Any) -> list[int]: ...  # noqa: N802
    def nvmlDeviceGetSupportedGraphicsClocks(  # noqa: N802
        self,
        handle: Any,
        memory_clock_mhz: int,
    ) -> list[int]: ...
    def nvmlDeviceSetGpuLockedClocks(  # noqa: N802
        self,
        handle: Any,
        min_clock_mhz: int,
        max_clock_mhz: int,
    ) -> None: ...
    def nvmlDeviceResetGpuLockedClocks(self, handle: Any) -> None: ...  # noqa: N802
    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int: ...  # noqa: N802


class FaultReason(StrEnum):
    """Why a GPU's limit is not (exactly) what was asked; used as the `Applied` condition reason."""

    NO_PERMISSION = "NoPermission"
    NOT_SUPPORTED = "NotSupported"
    GPU_LOST = "GpuLost"
    GPU_NOT_FOUND = "GpuNotFound"
    READ_BACK_MISMATCH = "ReadBackMismatch"
    CLAMPED_TO_MINIMUM = "ClampedToMinimum"
    NVML_UNAVAILABLE = "NvmlUnavailable"
    NVML_ERROR = "NvmlError"


_REASON_BY_CODE: dict[int, FaultReason] = {
    pynvml.NVML_ERROR_NO_PERMISSION: FaultReason.NO_PERMISSION,
    pynvml.NVML_ERROR_NOT_SUPPORTED: FaultReason.NOT_SUPPORTED,
    pynvml.NVML_ERROR_GPU_IS_LOST: FaultReason.GPU_LOST,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: FaultReason.NVML_UNAVAILABLE,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: FaultReason.NVML_UNAVAILABLE,
}

_HINT_BY_REASON: dict[FaultReason, str] = {
    FaultReason.NO_PERMISSION: (
        "the agent needs root or CAP_SYS_ADMIN to set power limits and clocks"
    ),
    FaultReason.NOT_SUPPORTED: "this GPU does not support software power limits",
    FaultReason.GPU_LOST: "the GPU fell off the bus; it needs a reset",
    FaultReason.NVML_UNAVAILABLE: "the NVIDIA driver or libnvidia-ml is not available",
}


@dataclass(frozen=True)
class GpuFault:
    """A failed or imperfect NVML operation on one GPU (`index` None: the whole library)."""

    index: int | None
    reason: FaultReason
    message: str


@dataclass(frozen=True)
class GpuIdentity:
    """What does not change while a GPU runs. Watts are None where NVML could not say."""

    index: int
    uuid: str
    nvml_name: str
    min_watts: float | None
    max_watts: float | None
    default_watts: float | None

    @property
    def product(self) -> str:
        """The product as GPU feature discovery labels it (`nvidia.com/gpu.product`)."""
        return self.nvml_name.replace(" ", "-")


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU; a field is None when its NVML call failed (see `fault`)."""

    index: int
    applied_watts: float | None
    draw_watts: float | None
    energy_millijoules: int | None
    utilisation_percent: int | None
    fault: GpuFault | None = None
    sm_clock_mhz: int | None = None  # None: NVML could not say (not a fault: clocks are advisory)


@dataclass(frozen=True)
class LimitOutcome:
    """Result of applying one power limit: what was asked, what was set, what reads back."""

    index: int
    requested_watts: float
    target_watts: float | None
    applied_watts: float | None
    fault: GpuFault | None = None


@dataclass(frozen=True)
class ClockOutcome:
    """Result of locking (or unlocking: `requested_mhz` None) one GPU's SM clocks.

    `target_mhz`: the supported (min, max) range set; `sm_clock_mhz`: the SM clock read back.
    """

    index: int
    requested_mhz: tuple[int, int] | None
    target_mhz: tuple[int, int] | None
    sm_clock_mhz: int | None
    fault: GpuFault | None = None


def nearest_clock_mhz(supported_mhz: list[int], wanted_mhz: int) -> int:
    """The supported clock nearest `wanted_mhz` (the lower one on a tie)."""
    return min(supported_mhz, key=lambda clock: (abs(clock - wanted_mhz), clock))


def fault_from_error(index: int | None, call: str, error: pynvml.NVMLError) -> GpuFault:
    code = int(getattr(error, "value", pynvml.NVML_ERROR_UNKNOWN))
    reason = _REASON_BY_CODE.get(code, FaultReason.NVML_ERROR)
    where = "NVML" if index is None else f"GPU {index}"
    hint = _HINT_BY_REASON.get(reason)
    message = f"{where}: {call} failed: {error} (NVML error {code})"
    return GpuFault(index, reason, f"{message}; {hint}" if hint else message)


class NvmlBackend:
    """Power limits and readings of the GPUs on this node, through an NVML-shaped library."""

    def __init__(
        self,
        library: NvmlLibrary,
        name: str = "nvml",
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.library = library
        self.name = name
        self.sleep = sleep  # between clock read-backs while a new lock takes hold
        self.identities: dict[int, GpuIdentity] = {}
        self._handles: dict[int, Any] = {}
        self._gpu_count = 0
        # The SM clock range this backend locked on each GPU, and each GPU's supported SM clocks.
        self.locked_clocks_mhz: dict[int, tuple[int, int]] = {}
        self._supported_sm_mhz: dict[int, list[int]] = {}

    @property
    def gpu_count(self) -> int:
        return self._gpu_count

    def open(self) -> list[GpuFault]:
        """Initialise NVML and identify every GPU; returns the faults met (empty: all is well)."""
        try:
            self.library.nvmlInit()
            self._gpu_count = int(self.library.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            return [fault_from_error(None, "nvmlInit", error)]
        faults = [self.identify(index) for index in range(self._gpu_count)]
        return [fault for fault in faults if fault is not None]

    def close(self) -> None:
        try:
            self.library.nvmlShutdown()
        except pynvml.NVMLError:
            return

    def identify(self, index: int) -> GpuFault | None:
        """(Re)read a GPU's handle, name, UUID and limit constraints."""
        try:
            handle = self.library.nvmlDeviceGetHandleByIndex(index)
            name = str(self.library.nvmlDeviceGetName(handle))
            uuid = str(self.library.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError as error:
            self._handles.pop(index, None)
            return fault_from_error(index, "nvmlDeviceGetHandleByIndex/GetName/GetUUID", error)
        self._handles[index] = handle
        identity = GpuIdentity(index, uuid, name, None, None, None)
        try:
            min_mw, max_mw = self.library.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            default_mw = self.library.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        except pynvml.NVMLError as error:
            self.identities[index] = identity
            return fault_from_error(index, "nvmlDeviceGetPowerManagementLimitConstraints", error)
        self.identities[index] = replace(
            identity,
            min_watts=min_mw / 1000,
            max_watts=max_mw / 1000,
            default_watts=default_mw / 1000,
        )
        return None

    def _handle(self, index: int) -> tuple[Any, GpuFault | None]:
        if not 0 <= index < self._gpu_count:
            return None, GpuFault(
                index,
                FaultReason.GPU_NOT_FOUND,
                f"GPU {index}: no such GPU; this node has {self._gpu_count} "
                f"(indices 0..{self._gpu_count - 1})",
            )
        if index not in self._handles or self.identities[index].min_watts is None:
            fault = self.identify(index)
            if fault is not None:
                return self._handles.get(index), fault
        return self._handles[index], None

    def apply_limit(self, index: int, requested_watts: float) -> LimitOutcome:
        """Clamp, set (if the current limit differs) and read back one GPU's power limit."""
        handle, fault = self._handle(index)
        if fault is not None:
            return LimitOutcome(index, requested_watts, None, None, fault)
        try:
            min_mw, max_mw = self.library.nvmlDeviceGetPowerManagementLimitConstraints(handle)
        except pynvml.NVMLError as error:
            return LimitOutcome(
                index,
                requested_watts,
                None,
                None,
                fault_from_error(index, "nvmlDeviceGetPowerManagementLimitConstraints", error),
            )
        target_mw = min(max(round(requested_watts * 1000), int(min_mw)), int(max_mw))
        target_watts = target_mw / 1000
        call = "nvmlDeviceGetPowerManagementLimit"
        try:
            current_mw = int(self.library.nvmlDeviceGetPowerManagementLimit(handle))
            if abs(current_mw - target_mw) > READ_BACK_TOLERANCE_WATTS * 1000:
                call = "nvmlDeviceSetPowerManagementLimit"
                self.library.nvmlDeviceSetPowerManagementLimit(handle, target_mw)
                call = "nvmlDeviceGetPowerManagementLimit (read-back)"
                current_mw = int(self.library.nvmlDeviceGetPowerManagementLimit(handle))
        except pynvml.NVMLError as error:
            applied = self._read_limit_watts(handle)
            return LimitOutcome(
                index, requested_watts, target_watts, applied, fault_from_error(index, call, error)
            )
        applied_watts = current_mw / 1000
        if abs(current_mw - target_mw) > READ_BACK_TOLERANCE_WATTS * 1000:
            fault = GpuFault(
                index,
                FaultReason.READ_BACK_MISMATCH,
                f"GPU {index}: set the power limit to {target_watts:g} W but it reads back as "
                f"{applied_watts:g} W",
            )
        elif target_mw > round(requested_watts * 1000):
            fault = GpuFault(
                index,
                FaultReason.CLAMPED_TO_MINIMUM,
                f"GPU {index}: requested {requested_watts:g} W is below the GPU's minimum limit "
                f"{min_mw / 1000:g} W; applied {applied_watts:g} W",
            )
        return LimitOutcome(index, requested_watts, target_watts, applied_watts, fault)

    def _read_limit_watts(self, handle: Any) -> float | None:
        try:
            return int(self.library.nvmlDeviceGetPowerManagementLimit(handle)) / 1000
        except pynvml.NVMLError:
            return None

    def restore_default(self, index: int) -> LimitOutcome:
        """Set a GPU back to its default (board) power limit."""
        _, fault = self._handle(index)
        identity = self.identities.get(index)
        if fault is None and identity is not None and identity.default_watts is not None:
            return self.apply_limit(index, identity.default_watts)
        fault = fault or GpuFault(
            index, FaultReason.NVML_ERROR, f"GPU {index}: default power limit unknown"
        )
        return LimitOutcome(index, 0.0, None, None, fault)

    def _settled_sm_clock_mhz(self, handle: Any, top_mhz: int) -> int:
        """The SM clock after a new lock: read until it is at most `top_mhz`, for up to
        `CLOCK_SETTLE_SECONDS`; raises `pynvml.NVMLError`."""
        polls_left = math.ceil(CLOCK_SETTLE_SECONDS / CLOCK_POLL_SECONDS)
        while True:
            current = int(self.library.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
            if current <= top_mhz or polls_left == 0:
                return current
            self.sleep(CLOCK_POLL_SECONDS)
            polls_left -= 1

    def _read_sm_clock_mhz(self, handle: Any) -> int | None:
        try:
            return int(self.library.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        except pynvml.NVMLError:
            return None

    def supported_sm_clocks_mhz(self, index: int) -> list[int]:
        """The SM clocks a GPU supports at its highest memory clock (read once); raises
        `pynvml.NVMLError`."""
        if index not in self._supported_sm_mhz:
            handle = self._handles[index]
            memory_mhz = max(self.library.nvmlDeviceGetSupportedMemoryClocks(handle))
            clocks = self.library.nvmlDeviceGetSupportedGraphicsClocks(handle, memory_mhz)
            self._supported_sm_mhz[index] = sorted(int(clock) for clock in clocks)
        return self._supported_sm_mhz[index]

    def apply_clocks(self, index: int, min_mhz: int, max_mhz: int) -> ClockOutcome:
        """Lock a GPU's SM clocks to the supported range nearest [min_mhz, max_mhz]; read back."""
        requested = (min_mhz, max_mhz)
        handle, fault = self._handle(index)
        if fault is not None:
            return ClockOutcome(index, requested, None, None, fault)
        call = "nvmlDeviceGetSupportedMemoryClocks/GetSupportedGraphicsClocks"
        try:
            supported = self.supported_sm_clocks_mhz(index)
            if not supported:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            top = nearest_clock_mhz(supported, max_mhz)
            target = (min(nearest_clock_mhz(supported, min_mhz), top), top)
            call = "nvmlDeviceGetClockInfo"
            current = int(self.library.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
            if self.locked_clocks_mhz.get(index) != target or current > target[1]:
                call = "nvmlDeviceSetGpuLockedClocks"
                self.library.nvmlDeviceSetGpuLockedClocks(handle, *target)
                self.locked_clocks_mhz[index] = target
                call = "nvmlDeviceGetClockInfo (read-back)"
                current = self._settled_sm_clock_mhz(handle, target[1])
        except pynvml.NVMLError as error:
            return ClockOutcome(
                index,
                requested,
                None,
                self._read_sm_clock_mhz(handle),
                fault_from_error(index, call, error),
            )
        if current > target[1]:
            fault = GpuFault(
                index,
                FaultReason.READ_BACK_MISMATCH,
                f"GPU {index}: locked the SM clocks to {target[0]}-{target[1]} MHz but the SM "
                f"clock reads {current} MHz",
            )
        return ClockOutcome(index, requested, target, current, fault)

    def reset_clocks(self, index: int) -> ClockOutcome:
        """Unlock a GPU's SM clocks (the driver's default boost behaviour again)."""
        handle, fault = self._handle(index)
        if fault is not None:
            return ClockOutcome(index, None, None, None, fault)
        try:
            self.library.nvmlDeviceResetGpuLockedClocks(handle)
        except pynvml.NVMLError as error:
            return ClockOutcome(
                index,
                None,
                self.locked_clocks_mhz.get(index),
                self._read_sm_clock_mhz(handle),
                fault_from_error(index, "nvmlDeviceResetGpuLockedClocks", error),
            )
        self.locked_clocks_mhz.pop(index, None)
        return ClockOutcome(index, None, None, self._read_sm_clock_mhz(handle))

    def sample(self, index: int) -> GpuSample:
        """Read limit, draw, energy counter and utilisation; keeps what could be read."""
        handle, fault = self._handle(index)
        if handle is None:
            return GpuSample(index, None, None, None, None, fault)
        faults = [fault] if fault is not None else []
        library = self.library

        def read(call: str, function: Callable[[], int]) -> int | None:
            try:
                return function()
            except pynvml.NVMLError as error:
                faults.append(fault_from_error(index, call, error))
                return None

        applied_mw = read(
            "nvmlDeviceGetPowerManagementLimit",
            lambda: int(library.nvmlDeviceGetPowerManagementLimit(handle)),
        )
        draw_mw = read(
            "nvmlDeviceGetPowerUsage", lambda: int(library.nvmlDeviceGetPowerUsage(handle))
        )
        energy_mj = read(
            "nvmlDeviceGetTotalEnergyConsumption",
            lambda: int(library.nvmlDeviceGetTotalEnergyConsumption(handle)),
        )
        utilisation = read(
            "nvmlDeviceGetUtilizationRates",
            lambda: int(library.nvmlDeviceGetUtilizationRates(handle).gpu),
        )
        return GpuSample(
            index,
            None if applied_mw is None else applied_mw / 1000,
            None if draw_mw is None else draw_mw / 1000,
            energy_mj,
            utilisation,
            faults[0] if faults else None,
            self._read_sm_clock_mhz(handle),
        )
