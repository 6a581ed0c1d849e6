"""The simulator's ground truth: how much a GPU really draws and really serves at a power limit.

This is what the simulated cluster *does*; it is deliberately separate from the optimizer's prior
(`wattsched_optimizer.model`), which is what the planner *believes*. Both start from the same
published measurements, but the ground truth has its own per-product deviations, a per-node
silicon spread and per-step noise, so a planner that trusted its prior blindly would be wrong by a
realistic amount. Not for: planning (the planner never imports this module; the oracle policy uses
it only to correct its prior, see `controller`).

Sources (numbers rounded):
- ML.ENERGY leaderboard v3, Llama-3.1-8B on one H100: batch 8 486 W / 1,070 tok/s, batch 64
  610 W / 5,147 tok/s, batch 256 691 W / 9,010 tok/s. Online serving capacity is the batch-64
  point; (draw - idle)/(full - idle) = load^k through the batch-8 point gives k = 0.17.
- Splitwise (Patel et al., ISCA 2024): idle 75 W (H100) and 63 W (A100); a 70% cap keeps decode
  throughput and leaves prefill at ~77%; A100 decodes 1.4-1.5x slower than H100.
- Zeus (You et al., NSDI 2023) training power-limit sweeps: throughput 98/94/90/84/70% at cap
  fractions 0.9/0.8/0.7/0.6/0.5.
- Datasheet power ranges (min/max W as NVML reports them) and memory bandwidth / dense BF16 FLOPs
  for the speed ratios between products (H100 SXM 3.35 TB/s, 989 TFLOPs; H200 4.8 TB/s; A100
  2.0/1.6 TB/s, 312 TFLOPs; L40S 0.86 TB/s; L4 0.3 TB/s). The ground truth's ratios differ from
  the optimizer's catalogue on purpose, within what published comparisons disagree by: A100 and
  L40S compute-bound speed 0.40 and 0.25 (catalogue 0.45 and 0.37), L4 0.10 (0.12), H200 decode
  1.35 (1.43).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from wattsched_optimizer.problem import WorkloadType

# Tensor-parallel efficiency per replica spanning more than one GPU.
MULTI_GPU_EFFICIENCY = 0.9

# Throughput fraction kept at a power-limit fraction of the maximum.
# Compute-bound work (training, fine-tuning, large-batch inference): Zeus' sweep, extended
# linearly below 0.5 (assumption).
COMPUTE_BOUND_CURVE: tuple[tuple[float, float], ...] = (
    (0.2, 0.28),
    (0.3, 0.42),
    (0.4, 0.56),
    (0.5, 0.70),
    (0.6, 0.84),
    (0.7, 0.90),
    (0.8, 0.94),
    (0.9, 0.98),
    (1.0, 1.00),
)
# Online inference (decode-dominated token mix): Splitwise's 70% point (decode unchanged, prefill
# 77%) weighted for a decode-heavy mix; below 0.7 assumed to fall like Zeus' curve (assumption).
DECODE_BOUND_CURVE: tuple[tuple[float, float], ...] = (
    (0.2, 0.30),
    (0.3, 0.45),
    (0.4, 0.65),
    (0.5, 0.80),
    (0.6, 0.90),
    (0.7, 0.96),
    (0.8, 0.99),
    (1.0, 1.00),
)


@dataclass(frozen=True)
class TypeTruth:
    """How one workload type behaves on an H100 at full power, per GPU, for an 8B model."""

    tokens_per_second_8b: float
    full_load_fraction: float  # draw at full load / max watts, with no cap below it
    curve: tuple[tuple[float, float], ...]
    decode_bound: bool  # speed across products follows memory bandwidth, not FLOPs


# Online inference at batch 64 (ML.ENERGY: 5,147 tok/s at 610 W = 0.87 of 700 W): the most a
# replica serves while keeping interactive latency. Batch inference at batch 256 (9,010 tok/s,
# 691 W). Training: 40% MFU of 989 TFLOPs / (6 x 8e9 FLOPs per token) ~ 8,240 tok/s, drawing
# 0.97 of the limit (Zeus' unconstrained runs sit just under TDP).
DEFAULT_TYPES: Mapping[WorkloadType, TypeTruth] = {
    WorkloadType.INFERENCE: TypeTruth(5147.0, 0.87, DECODE_BOUND_CURVE, True),
    WorkloadType.BATCH_INFERENCE: TypeTruth(9010.0, 0.99, COMPUTE_BOUND_CURVE, False),
    WorkloadType.TRAINING: TypeTruth(0.40 * 989e12 / (6 * 8e9), 0.97, COMPUTE_BOUND_CURVE, False),
    WorkloadType.FINE_TUNING: TypeTruth(
        0.40 * 989e12 / (6 * 8e9), 0.97, COMPUTE_BOUND_CURVE, False
    ),
}


def interpolate(curve: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation, clamped to the curve's ends."""
    xs = [point[0] for point in curve]
    if x <= xs[0]:
        return curve[0][1]
    if x >= xs[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class ProductTruth:
    """What one GPU product really does. Speeds are relative to an H100 SXM."""

    min_watts: float
    max_watts: float
    idle_watts: float
    memory_gib: float
    decode_speed: float
    compute_speed: float


# Keys are the simulator's own product names (see `truth_product`), not the optimizer's.
DEFAULT_PRODUCTS: Mapping[str, ProductTruth] = {
    "H100-80GB": ProductTruth(200, 700, 75, 80, 1.00, 1.00),
    "H200": ProductTruth(200, 700, 80, 141, 1.35, 1.05),
    "A100-80GB": ProductTruth(100, 400, 63, 80, 0.68, 0.40),
    "A100-40GB": ProductTruth(100, 400, 55, 40, 0.58, 0.40),
    "A100-PCIE-40GB": ProductTruth(150, 250, 35, 40, 0.58, 0.33),
    "L40S": ProductTruth(100, 350, 35, 48, 0.28, 0.25),
    "L4": ProductTruth(40, 72, 16, 24, 0.10, 0.10),
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
    load_power_exponent: float = 0.17
    # Standard deviation of a node's multiplicative power deviation (silicon lottery, cooling).
    node_power_spread: float = 0.03
    # Standard deviation of per-step multiplicative power noise of a busy replica.
    power_noise: float = 0.01
    # Draw of a GPU whose replica is starting (loading weights), as a multiple of idle.
    startup_idle_multiple: float = 1.5

    def product(self, name: str) -> ProductTruth:
        return self.products[name]

    def with_throughput_scale(self, scale: float) -> GroundTruth:
        return replace(self, throughput_scale=scale)

    def throughput_fraction(self, workload_type: WorkloadType, limit_fraction: float) -> float:
        """Share of full-power throughput kept at power limit = limit_fraction x max."""
        return interpolate(self.types[workload_type].curve, limit_fraction)

    def replica_tokens_per_second(
        self,
        *,
        product: str,
        workload_type: WorkloadType,
        model_parameters_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
    ) -> float:
        """True tokens/s of one replica at full load and the given per-GPU power limit."""
        spec = self.products[product]
        kind = self.types[workload_type]
        speed = spec.decode_speed if kind.decode_bound else spec.compute_speed
        size_factor = 8.0 / model_parameters_billions
        parallel = gpus * (MULTI_GPU_EFFICIENCY if gpus > 1 else 1.0)
        fraction = self.throughput_fraction(workload_type, power_limit_watts / spec.max_watts)
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
