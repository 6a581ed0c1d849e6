"""A simulated NVML library with the shape of `pynvml`, for nodes without a GPU.

`SimulatedNvml` has the pynvml functions the agent calls (same names, same arguments, same units:
milliwatts and millijoules) and raises pynvml's own `NVMLError` subclasses with NVML's error codes.
The agent's real `NvmlBackend` runs on top of it unchanged, so every NVML code path (clamping,
read-back, NoPermission, NotSupported, GPU lost) is exercised without hardware.

Each simulated GPU has an NVML envelope from `simulated_products.yaml` (name, min/max/default
limit, and which ground-truth product it is). Its draw comes from the simulator's ground-truth
model, read from the same data file the simulator reads (`wattsched_ground_truth/ground_truth.yaml`;
the agent may not import the simulator, and the simulator not the agent, so they share the data
and each evaluates it): for utilisation u of a GPU running work of type t at power limit L,
`min(L, f_node * (idle + (full_t - idle) * (u * kept_t(L))^k))`, where `full_t` is the type's
full-load draw, `kept_t(L)` the throughput an Inference replica keeps at L (1 for batch work,
which runs flat out), `k` the load exponent and `f_node` the node's silicon deviation (drawn from
the truth's node spread, seeded by the node name, so each node keeps its own). The per-step noise
the simulator adds is left out: draw is constant between changes and the energy counter integrates
it exactly over the injected clock. The caller sets u and t (the agent: from the pods placed on
the node). Clocks: each product has its supported SM clocks (`simulated_products.yaml`, cited
there); a locked range holds as the driver holds it (a busy GPU at the range's top, an idle one at
its bottom); a reset or a driver reload unlocks. A locked decode-bound (Inference) GPU draws the
truth's clock curve's share of its full-load draw (`clockCurves`) where that fits under the limit.

Faults are configured per GPU (`GpuFaults`) to behave like a node where the agent lacks
CAP_SYS_ADMIN, a board that cannot be capped or have its clocks locked, a board whose limits can
be read but not set (as on many consumer and virtualised GPUs), a GPU that fell off the bus, or a
driver that returns success for a set it ignored. Not for: modelling throughput (the simulator
does that) or thermal behaviour.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pynvml
import yaml

from wattsched_ground_truth import interpolate

# pynvml's error codes: the simulated library raises exactly what the real one raises.
NVML_ERROR_UNINITIALIZED: int = pynvml.NVML_ERROR_UNINITIALIZED
NVML_ERROR_INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
NVML_ERROR_NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
NVML_ERROR_NO_PERMISSION: int = pynvml.NVML_ERROR_NO_PERMISSION
NVML_ERROR_GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
NVML_ERROR_DRIVER_NOT_LOADED: int = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
NVML_ERROR_NOT_FOUND: int = pynvml.NVML_ERROR_NOT_FOUND

INFERENCE = "Inference"
# How long after a lock change the SM clock reads as before: 46-95 ms measured on an H100 80GB HBM3
# under load (driver 580.159.04, `benchmarks/nvml_check.py`; docs/telemetry.md).
CLOCK_SETTLE_SECONDS = 0.1


@dataclass(frozen=True)
class ProductEnvelope:
    """Power envelope of one GPU product (watts), as NVML reports it, and its ground truth."""

    product: str
    nvml_name: str
    min_watts: float
    max_watts: float
    default_watts: float
    ground_truth_product: str
    memory_clock_mhz: int
    sm_max_mhz: int
    sm_min_mhz: int
    sm_step_mhz: int

    @property
    def supported_sm_clocks_mhz(self) -> list[int]:
        """What nvmlDeviceGetSupportedGraphicsClocks returns: highest first."""
        return list(range(self.sm_max_mhz, self.sm_min_mhz - 1, -self.sm_step_mhz))


@dataclass(frozen=True)
class TruePower:
    """The part of the simulator's ground truth a simulated GPU's draw needs.

    Keys: ground-truth product names and workload types (the CRD's `spec.type`).
    """

    idle_watts: Mapping[str, float]
    max_watts: Mapping[str, float]
    full_load_fraction: Mapping[str, float]
    kept_throughput_curve: Mapping[str, tuple[tuple[float, float], ...]]
    load_power_exponent: float
    node_power_spread: float
    # Per type: (SM clock / max SM clock, throughput kept, busy draw kept); per product: max clock.
    clock_curve: Mapping[str, tuple[tuple[float, float, float], ...]]
    max_sm_clock_mhz: Mapping[str, float]

    def node_factor(self, hostname: str) -> float:
        """The node's multiplicative power deviation: its own draw from the truth's spread."""
        return random.Random(f"wattsched-node-power/{hostname}").gauss(1.0, self.node_power_spread)

    def draw_watts(
        self,
        product: str,
        workload_type: str,
        utilisation: float,
        power_limit_watts: float,
        node_factor: float,
        *,
        sm_clock_mhz: float | None = None,
    ) -> float:
        """One GPU's draw (see the module docstring). With the SM clock locked (`sm_clock_mhz`,
        the lock's top) where the type has a clock curve and the locked full-load draw fits under
        the limit, full load draws that locked draw and the limit does not throttle."""
        idle = self.idle_watts[product]
        full = self.max_watts[product] * self.full_load_fraction[workload_type]
        load = utilisation
        clock_curve = self.clock_curve.get(workload_type, ())
        locked_full = full
        if sm_clock_mhz is not None and clock_curve:
            fraction = sm_clock_mhz / self.max_sm_clock_mhz[product]
            locked_full = full * interpolate(tuple((c, d) for c, _, d in clock_curve), fraction)
        if locked_full < full and locked_full <= power_limit_watts:
            full = locked_full
        elif workload_type == INFERENCE:  # a service's load is its share of full-power capacity
            curve = self.kept_throughput_curve[workload_type]
            load *= interpolate(curve, power_limit_watts / self.max_watts[product])
        share = math.pow(min(load, 1.0), self.load_power_exponent)
        return min(node_factor * (idle + (full - idle) * share), power_limit_watts)


def _read_yaml(package: str, name: str, path: Path | None) -> tuple[Any, str]:
    """A packaged YAML table (or the file at `path` instead) and where it came from."""
    if path is None:
        return yaml.safe_load(
            resources.files(package).joinpath(name).read_text()
        ), f"{package}/{name}"
    return yaml.safe_load(path.read_text()), str(path)


def load_ground_truth(path: Path | None = None) -> TruePower:
    """Read the ground-truth table; `path` overrides the shared `wattsched_ground_truth` one."""
    raw, source = _read_yaml("wattsched_ground_truth", "ground_truth.yaml", path)
    try:
        products = raw["products"]
        types = raw["types"]
        return TruePower(
            idle_watts={str(n): float(f["idleWatts"]) for n, f in products.items()},
            max_watts={str(n): float(f["maxWatts"]) for n, f in products.items()},
            full_load_fraction={str(t): float(f["fullLoadFraction"]) for t, f in types.items()},
            kept_throughput_curve={
                str(t): tuple((float(x), float(y)) for x, y in raw["curves"][f["curve"]])
                for t, f in types.items()
            },
            load_power_exponent=float(raw["loadPowerExponent"]),
            node_power_spread=float(raw["nodePowerSpread"]),
            clock_curve={
                str(t): tuple(
                    (float(c), float(k), float(d))
                    for c, k, d in raw["clockCurves"][f["clockCurve"]]
                )
                for t, f in types.items()
                if f.get("clockCurve")
            },
            max_sm_clock_mhz={str(n): float(f["maxSmClockMHz"]) for n, f in products.items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{source}: not a ground-truth table: {error!r}") from error


def load_products(path: Path | None = None) -> dict[str, ProductEnvelope]:
    """Read the product table; `path` overrides the packaged `simulated_products.yaml`."""
    raw, source = _read_yaml("wattsched_agent", "simulated_products.yaml", path)
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of product name to envelope")
    products: dict[str, ProductEnvelope] = {}
    for product, fields in raw.items():
        try:
            envelope = ProductEnvelope(
                product=str(product),
                nvml_name=str(fields["nvmlName"]),
                min_watts=float(fields["minWatts"]),
                max_watts=float(fields["maxWatts"]),
                default_watts=float(fields["defaultWatts"]),
                ground_truth_product=str(fields["groundTruthProduct"]),
                memory_clock_mhz=int(fields["memoryClockMHz"]),
                sm_max_mhz=int(fields["smMaxMHz"]),
                sm_min_mhz=int(fields["smMinMHz"]),
                sm_step_mhz=int(fields["smStepMHz"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: product {product!r}: {error!r}") from error
        if not envelope.min_watts <= envelope.default_watts <= envelope.max_watts:
            raise ValueError(
                f"{source}: product {product!r}: need minWatts <= defaultWatts <= maxWatts"
            )
        if not 0 < envelope.sm_min_mhz <= envelope.sm_max_mhz or envelope.sm_step_mhz <= 0:
            raise ValueError(
                f"{source}: product {product!r}: need 0 < smMinMHz <= smMaxMHz and smStepMHz > 0"
            )
        products[envelope.product] = envelope
    return products


@dataclass(frozen=True)
class GpuFaults:
    """Failures a simulated GPU shows, like real NVML on a misconfigured or failing node.

    no_permission: setting the limit fails with NVML_ERROR_NO_PERMISSION (agent not root).
    not_supported: the board has no software power cap (limit get/set/constraints unsupported).
    set_not_supported: limits, constraints and default read as usual, but setting one fails with
        NVML_ERROR_NOT_SUPPORTED (consumer and virtualised GPUs, e.g. a vGPU guest).
    gpu_lost: every call on the device fails with NVML_ERROR_GPU_IS_LOST.
    set_ignored: the set returns success but the limit does not change.
    clocks_not_supported: locking SM clocks fails with NVML_ERROR_NOT_SUPPORTED (boards before
        Volta; vGPU guests); the supported-clock list reads as usual.
    """

    no_permission: bool = False
    not_supported: bool = False
    set_not_supported: bool = False
    gpu_lost: bool = False
    set_ignored: bool = False
    clocks_not_supported: bool = False


NO_FAULTS = GpuFaults()


class SimulatedUtilization:
    """What nvmlDeviceGetUtilizationRates returns: percentages as ints."""

    def __init__(self, gpu: int, memory: int) -> None:
        self.gpu = gpu
        self.memory = memory


class SimulatedDevice:
    """One simulated GPU: its limit (mW), load, and an energy counter (mJ)."""

    def __init__(
        self,
        envelope: ProductEnvelope,
        uuid_text: str,
        faults: GpuFaults,
        now: float,
        *,
        truth: TruePower,
        node_factor: float,
    ) -> None:
        self.envelope = envelope
        self.uuid = uuid_text
        self.faults = faults
        self.truth = truth
        self.node_factor = node_factor
        self.limit_milliwatts = round(envelope.default_watts * 1000)
        self.locked_sm_mhz: tuple[int, int] | None = None  # (min, max) in force; None: unlocked
        # The SM clock read before the last lock change, shown until the change settles.
        self.previous_sm_mhz = 0
        self.clock_settles_at = now
        self.utilisation = 0.0
        self.workload_type = INFERENCE
        self.energy_millijoules = 0.0
        self.last_update = now

    def draw_watts(self) -> float:
        return self.truth.draw_watts(
            self.envelope.ground_truth_product,
            self.workload_type,
            self.utilisation,
            self.limit_milliwatts / 1000,
            self.node_factor,
            sm_clock_mhz=None if self.locked_sm_mhz is None else self.locked_sm_mhz[1],
        )

    def sm_clock_mhz(self) -> int:
        """The SM clock now: a busy GPU boosts to the top of its range (the lock's maximum, or
        the board's), an idle one drops to the bottom (the lock's minimum, or the board's)."""
        supported = self.envelope.supported_sm_clocks_mhz
        low, high = self.locked_sm_mhz or (supported[-1], supported[0])
        return high if self.utilisation > 0 else low

    def advance(self, now: float) -> None:
        """Integrate the draw since the last change; the draw is constant in between."""
        elapsed = max(0.0, now - self.last_update)
        self.energy_millijoules += self.draw_watts() * elapsed * 1000
        self.last_update = now


class SimulatedNvml:
    """A pynvml-shaped library over simulated GPUs (see the module docstring).

    `products` lists each GPU's product name (index order). Call `nvmlInit()` before anything else,
    as with the real library.
    """

    def __init__(
        self,
        hostname: str,
        products: list[str],
        *,
        catalogue: Mapping[str, ProductEnvelope] | None = None,
        truth: TruePower | None = None,
        faults: Mapping[int, GpuFaults] | None = None,
        clock: Callable[[], float] = time.monotonic,
        driver_loaded: bool = True,
        clock_settle_seconds: float = CLOCK_SETTLE_SECONDS,
    ) -> None:
        catalogue = load_products() if catalogue is None else catalogue
        unknown = sorted({product for product in products if product not in catalogue})
        if unknown:
            raise ValueError(
                f"node {hostname}: GPU product(s) {unknown} are not in the simulated product "
                f"table; known: {sorted(catalogue)}"
            )
        truth = load_ground_truth() if truth is None else truth
        missing = sorted(
            {
                catalogue[product].ground_truth_product
                for product in products
                if catalogue[product].ground_truth_product not in truth.idle_watts
            }
        )
        if missing:
            raise ValueError(
                f"node {hostname}: ground-truth product(s) {missing} are not in the ground-truth "
                f"table; known: {sorted(truth.idle_watts)}"
            )
        self.truth = truth
        self.node_factor = truth.node_factor(hostname)
        self._clock = clock
        self.clock_settle_seconds = clock_settle_seconds
        self._lock = threading.RLock()
        self._initialised = 0
        self._driver_loaded = driver_loaded
        now = clock()
        faults = faults or {}
        self._devices = [
            SimulatedDevice(
                catalogue[product],
                "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{hostname}/gpu{index}")),
                faults.get(index, NO_FAULTS),
                now,
                truth=truth,
                node_factor=self.node_factor,
            )
            for index, product in enumerate(products)
        ]

    # ----- controls of the simulation (not part of NVML) -----

    def set_utilisation(
        self, index: int, utilisation: float, workload_type: str = INFERENCE
    ) -> None:
        """Set how busy GPU `index` is (0..1) and with what kind of work (the CRD's spec.type);
        the draw follows from the next instant on."""
        if not 0.0 <= utilisation <= 1.0:
            raise ValueError(f"GPU {index}: utilisation must be within 0..1, got {utilisation}")
        if workload_type not in self.truth.full_load_fraction:
            raise ValueError(
                f"GPU {index}: workload type {workload_type!r} is not in the ground-truth table; "
                f"known: {sorted(self.truth.full_load_fraction)}"
            )
        with self._lock:
            device = self._devices[index]
            device.advance(self._clock())
            device.utilisation = utilisation
            device.workload_type = workload_type

    def set_faults(self, index: int, faults: GpuFaults) -> None:
        with self._lock:
            self._devices[index].faults = faults

    def reload_driver(self) -> None:
        """Like a driver reload: every limit falls back to its default, and the energy counter
        starts again from zero (NVML counts energy since the driver was last loaded)."""
        with self._lock:
            now = self._clock()
            for device in self._devices:
                device.advance(now)
                device.limit_milliwatts = round(device.envelope.default_watts * 1000)
                device.locked_sm_mhz = None
                device.energy_millijoules = 0.0

    # ----- the pynvml surface -----

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's name
        with self._lock:
            if not self._driver_loaded:
                raise pynvml.NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
            self._initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        with self._lock:
            self._require_init()
            self._initialised -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        with self._lock:
            self._require_init()
            return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimulatedDevice:  # noqa: N802
        with self._lock:
            self._require_init()
            if not 0 <= index < len(self._devices):
                raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            device = self._devices[index]
            self._check_alive(device)
            return device

    def nvmlDeviceGetName(self, handle: SimulatedDevice) -> str:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            return handle.envelope.nvml_name

    def nvmlDeviceGetUUID(self, handle: SimulatedDevice) -> str:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            return handle.uuid

    def nvmlDeviceGetPowerManagementLimitConstraints(  # noqa: N802
        self, handle: SimulatedDevice
    ) -> list[int]:
        with self._lock:
            self._check_cappable(handle)
            envelope = handle.envelope
            return [round(envelope.min_watts * 1000), round(envelope.max_watts * 1000)]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: SimulatedDevice) -> int:  # noqa: N802
        with self._lock:
            self._check_cappable(handle)
            return round(handle.envelope.default_watts * 1000)

    def nvmlDeviceGetPowerManagementLimit(self, handle: SimulatedDevice) -> int:  # noqa: N802
        with self._lock:
            self._check_cappable(handle)
            return handle.limit_milliwatts

    def nvmlDeviceSetPowerManagementLimit(  # noqa: N802
        self, handle: SimulatedDevice, limit: int
    ) -> None:
        with self._lock:
            self._check_cappable(handle)
            if handle.faults.set_not_supported:
                raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if handle.faults.no_permission:
                raise pynvml.NVMLError(NVML_ERROR_NO_PERMISSION)
            envelope = handle.envelope
            if not envelope.min_watts * 1000 <= limit <= envelope.max_watts * 1000:
                raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if handle.faults.set_ignored:
                return
            handle.advance(self._clock())
            handle.limit_milliwatts = int(limit)

    def nvmlDeviceGetPowerUsage(self, handle: SimulatedDevice) -> int:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            return round(handle.draw_watts() * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimulatedDevice) -> int:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            handle.advance(self._clock())
            return int(handle.energy_millijoules)

    def nvmlDeviceGetUtilizationRates(self, handle: SimulatedDevice) -> SimulatedUtilization:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            percent = round(handle.utilisation * 100)
            return SimulatedUtilization(gpu=percent, memory=percent)

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: SimulatedDevice) -> list[int]:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            return [handle.envelope.memory_clock_mhz]

    def nvmlDeviceGetSupportedGraphicsClocks(  # noqa: N802
        self, handle: SimulatedDevice, memory_clock_mhz: int
    ) -> list[int]:
        with self._lock:
            self._check_alive(handle)
            if memory_clock_mhz != handle.envelope.memory_clock_mhz:
                raise pynvml.NVMLError(NVML_ERROR_NOT_FOUND)
            return handle.envelope.supported_sm_clocks_mhz

    def nvmlDeviceSetGpuLockedClocks(  # noqa: N802
        self, handle: SimulatedDevice, min_clock_mhz: int, max_clock_mhz: int
    ) -> None:
        """A range within the supported clocks is rounded onto them (down for the maximum, up
        for the minimum, never crossing); min > max, or a bound outside the supported clocks, is
        an invalid argument."""
        with self._lock:
            self._check_alive(handle)
            if handle.faults.clocks_not_supported:
                raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if handle.faults.no_permission:
                raise pynvml.NVMLError(NVML_ERROR_NO_PERMISSION)
            supported = handle.envelope.supported_sm_clocks_mhz
            if not supported[-1] <= min_clock_mhz <= max_clock_mhz <= supported[0]:
                raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            high = next((c for c in supported if c <= max_clock_mhz), supported[-1])
            low = next((c for c in reversed(supported) if c >= min_clock_mhz), supported[0])
            self._change_lock(handle, (min(low, high), high))

    def nvmlDeviceResetGpuLockedClocks(self, handle: SimulatedDevice) -> None:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            if handle.faults.clocks_not_supported:
                raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
            if handle.faults.no_permission:
                raise pynvml.NVMLError(NVML_ERROR_NO_PERMISSION)
            self._change_lock(handle, None)

    def _change_lock(self, handle: SimulatedDevice, locked_mhz: tuple[int, int] | None) -> None:
        """A new lock (None: unlocked); the SM clock reads as before for `clock_settle_seconds`,
        as a real GPU's does."""
        now = self._clock()
        handle.advance(now)
        handle.previous_sm_mhz = handle.sm_clock_mhz()
        handle.clock_settles_at = now + self.clock_settle_seconds
        handle.locked_sm_mhz = locked_mhz

    def nvmlDeviceGetClockInfo(self, handle: SimulatedDevice, clock_type: int) -> int:  # noqa: N802
        with self._lock:
            self._check_alive(handle)
            if clock_type in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
                if self._clock() < handle.clock_settles_at:
                    return handle.previous_sm_mhz
                return handle.sm_clock_mhz()
            if clock_type == pynvml.NVML_CLOCK_MEM:
                return handle.envelope.memory_clock_mhz
            raise pynvml.NVMLError(NVML_ERROR_INVALID_ARGUMENT)

    # ----- checks shared by the calls above -----

    def _require_init(self) -> None:
        if self._initialised <= 0:
            raise pynvml.NVMLError(NVML_ERROR_UNINITIALIZED)

    def _check_alive(self, handle: SimulatedDevice) -> None:
        self._require_init()
        if handle.faults.gpu_lost:
            raise pynvml.NVMLError(NVML_ERROR_GPU_IS_LOST)

    def _check_cappable(self, handle: SimulatedDevice) -> None:
        self._check_alive(handle)
        if handle.faults.not_supported:
            raise pynvml.NVMLError(NVML_ERROR_NOT_SUPPORTED)
