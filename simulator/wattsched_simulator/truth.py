"""The simulator's ground truth: how much a GPU really draws and really serves at a power limit.

This is what the simulated cluster *does*; it is deliberately separate from the optimizer's prior
(`wattsched_optimizer.model`), which is what the planner *believes*. Both start from the same
published measurements, but the ground truth has its own per-product deviations, a per-node
silicon spread and per-step noise, so a planner that trusted its prior blindly would be wrong by a
realistic amount. Not for: planning (the planner never imports this module; the oracle policy uses
it only to correct its prior, see `controller`).

The numbers, with their sources (ML.ENERGY, Splitwise, Zeus, datasheets), live in one data file,
`wattsched_ground_truth/ground_truth.yaml`, which this module reads into `DEFAULT_PRODUCTS`,
`DEFAULT_TYPES` and `GroundTruth`'s defaults. The node agent's simulated NVML backend reads the
same file, so a sandbox GPU draws what a simulated one does (the two components may not import
each other; they share the data, not code).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import yaml

from wattsched_ground_truth import interpolate
from wattsched_optimizer.problem import WorkloadType

GROUND_TRUTH_SOURCE = "wattsched_ground_truth/ground_truth.yaml"


def _load_table() -> Mapping[str, Any]:
    text = resources.files("wattsched_ground_truth").joinpath("ground_truth.yaml").read_text()
    table: Mapping[str, Any] = yaml.safe_load(text)
    return table


_TABLE = _load_table()


def _curve(name: str) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in _TABLE["curves"][name])


# Tensor-parallel efficiency per replica spanning more than one GPU.
MULTI_GPU_EFFICIENCY = float(_TABLE["multiGpuEfficiency"])

# Throughput fraction kept at a power-limit fraction of the maximum (compute-bound: Zeus' sweep;
# decode-bound online inference: Splitwise's 70% point; see the data file).
COMPUTE_BOUND_CURVE = _curve("computeBound")
DECODE_BOUND_CURVE = _curve("decodeBound")


def _clock_curve(name: str | None) -> tuple[tuple[float, float, float], ...]:
    if name is None:
        return ()
    return tuple((float(c), float(t), float(d)) for c, t, d in _TABLE["clockCurves"][name])


@dataclass(frozen=True)
class TypeTruth:
    """How one workload type behaves on an H100 at full power, per GPU, for an 8B model."""

    tokens_per_second_8b: float
    full_load_fraction: float  # draw at full load / max watts, with no cap below it
    curve: tuple[tuple[float, float], ...]
    decode_bound: bool  # speed across products follows memory bandwidth, not FLOPs
    # (SM clock / max SM clock, throughput kept, busy draw kept); empty: compute-bound.
    clock_curve: tuple[tuple[float, float, float], ...] = ()


DEFAULT_TYPES: Mapping[WorkloadType, TypeTruth] = {
    WorkloadType(name): TypeTruth(
        float(fields["tokensPerSecond8b"]),
        float(fields["fullLoadFraction"]),
        _curve(str(fields["curve"])),
        bool(fields["decodeBound"]),
        _clock_curve(fields.get("clockCurve")),
    )
    for name, fields in _TABLE["types"].items()
}


@dataclass(frozen=True)
class ProductTruth:
    """What one GPU product really does. Speeds are relative to an H100 SXM."""

    min_watts: float
    max_watts: float
    idle_watts: float
    memory_gib: float
    decode_speed: float
    compute_speed: float
    max_sm_clock_mhz: float


# Keys are the simulator's own product names (see `truth_product`), not the optimizer's.
DEFAULT_PRODUCTS: Mapping[str, ProductTruth] = {
    str(name): ProductTruth(
        float(fields["minWatts"]),
        float(fields["maxWatts"]),
        float(fields["idleWatts"]),
        float(fields["memoryGiB"]),
        float(fields["decodeSpeed"]),
        float(fields["computeSpeed"]),
        float(fields["maxSmClockMHz"]),
    )
    for name, fields in _TABLE["products"].items()
}


def truth_product(label: str) -> str:
    """Map a GFD `nvidia.com/gpu.product` label to a ground-truth product name.

    Independent of the optimizer's normaliser on purpose. Raises ValueError for unknown products.
    """
    upper = label.upper().replace("_", "-").replace(" ", "-")
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100-80GB"
    if "A100" in upper and "PCIE" in upper and "40GB" in upper:
        return "A100-PCIE-40GB"
    if "A100" in upper:
        return "A100-40GB" if "40GB" in upper else "A100-80GB"
    if "L40S" in upper:
        return "L40S"
    if upper.endswith("-L4") or upper == "L4":
        return "L4"
    raise ValueError(
        f"nvidia.com/gpu.product={label!r}: no ground truth for this product "
        f"(known: {', '.join(DEFAULT_PRODUCTS)})"
    )


@dataclass(frozen=True)
class GroundTruth:
    """The true performance and power of every product, plus how much reality scatters."""

    products: Mapping[str, ProductTruth] = field(default_factory=lambda: dict(DEFAULT_PRODUCTS))
    types: Mapping[WorkloadType, TypeTruth] = field(default_factory=lambda: dict(DEFAULT_TYPES))
    # Multiplies every true throughput: the knob tests turn to show the planner does not see it.
    throughput_scale: float = 1.0
    # Online inference draw at load x (share of the replica's full-power capacity), uncapped:
    # idle + (full - idle) * x ** exponent; fitted to ML.ENERGY's batch 8 and batch 64 points.
    load_power_exponent: float = float(_TABLE["loadPowerExponent"])
    # Standard deviation of a node's multiplicative power deviation (silicon lottery, cooling).
    node_power_spread: float = float(_TABLE["nodePowerSpread"])
    # Standard deviation of per-step multiplicative power noise of a busy replica.
    power_noise: float = float(_TABLE["powerNoise"])
    # Draw of a GPU whose replica is starting (loading weights), as a multiple of idle.
    startup_idle_multiple: float = float(_TABLE["startupIdleMultiple"])

    def product(self, name: str) -> ProductTruth:
        return self.products[name]

    def with_throughput_scale(self, scale: float) -> GroundTruth:
        return replace(self, throughput_scale=scale)

    def throughput_fraction(self, workload_type: WorkloadType, limit_fraction: float) -> float:
        """Share of full-power throughput kept at power limit = limit_fraction x max."""
        return interpolate(self.types[workload_type].curve, limit_fraction)

    def clock_effect(
        self, product: str, workload_type: WorkloadType, sm_clock_mhz: float | None
    ) -> tuple[float, float]:
        """(throughput kept, busy draw kept) with the SM clock locked at `sm_clock_mhz`, relative
        to the same work unlocked; (1, 1) unlocked or for work with no clock curve."""
        curve = self.types[workload_type].clock_curve
        if sm_clock_mhz is None or not curve:
            return (1.0, 1.0)
        fraction = sm_clock_mhz / self.products[product].max_sm_clock_mhz
        throughput = interpolate(tuple((c, t) for c, t, _ in curve), fraction)
        draw = interpolate(tuple((c, d) for c, _, d in curve), fraction)
        return (throughput, draw)

    def limit_and_clock_fractions(
        self,
        product: str,
        workload_type: WorkloadType,
        power_limit_watts: float,
        sm_clock_mhz: float | None,
    ) -> tuple[float, float]:
        """(throughput kept vs full power unlocked, full-load draw in watts) at this limit and
        clock. A locked clock whose full-load draw fits under the limit sets both (the cap never
        triggers); otherwise the cap throttles the clock itself and the lock adds nothing."""
        full = self.full_load_watts(product, workload_type)
        max_watts = self.products[product].max_watts
        capped = self.throughput_fraction(workload_type, power_limit_watts / max_watts)
        kept, draw = self.clock_effect(product, workload_type, sm_clock_mhz)
        if sm_clock_mhz is None or full * draw > power_limit_watts:
            return capped, full
        return kept, full * draw

    def replica_tokens_per_second(
        self,
        *,
        product: str,
        workload_type: WorkloadType,
        model_parameters_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
        sm_clock_mhz: float | None = None,
    ) -> float:
        """True tokens/s of one replica at full load, the given per-GPU power limit and (None:
        unlocked) locked SM clock."""
        spec = self.products[product]
        kind = self.types[workload_type]
        speed = spec.decode_speed if kind.decode_bound else spec.compute_speed
        size_factor = 8.0 / model_parameters_billions
        parallel = gpus * (MULTI_GPU_EFFICIENCY if gpus > 1 else 1.0)
        fraction, _ = self.limit_and_clock_fractions(
            product, workload_type, power_limit_watts, sm_clock_mhz
        )
        return (
            kind.tokens_per_second_8b
            * speed
            * size_factor
            * parallel
            * relative_throughput
            * fraction
            * self.throughput_scale
        )

    def full_load_watts(self, product: str, workload_type: WorkloadType) -> float:
        """Per-GPU draw at full load with no power limit below it."""
        return self.products[product].max_watts * self.types[workload_type].full_load_fraction
