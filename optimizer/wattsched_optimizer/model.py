"""The performance and power model: GPU products, their power limits, and what a replica delivers.

For: the product catalogue (loaded once from `catalogue.yaml`, a citation per number), turning GPU
Feature Discovery labels into catalogue keys (`normalise_product`), the discrete power levels the
optimizer chooses from, and `PerformanceModel`, the small interface the planner, the simulator and
telemetry calibration share: tokens/s of a replica and expected watts per GPU as functions of the
power limit. Not for: deciding anything (see `planner`) or reading telemetry (callers pass
corrections in through `CatalogueModel.calibrated`).
"""

from __future__ import annotations

import bisect
import functools
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from wattsched_optimizer.problem import WorkloadType

REFERENCE_PRODUCT = "H100-80GB"
# Telemetry may move a modelled figure by at most this factor either way.
CALIBRATION_BOUNDS = (0.5, 2.0)


class UnknownProductError(ValueError):
    """A GPU product label that the catalogue does not know."""

    def __init__(self, label: str, known: tuple[str, ...]) -> None:
        super().__init__(
            f"unknown GPU product {label!r}: the catalogue knows {', '.join(known)} "
            "(labels as GPU Feature Discovery writes nvidia.com/gpu.product, e.g. "
            "NVIDIA-H100-80GB-HBM3); add the product to wattsched_optimizer/catalogue.yaml"
        )
        self.label = label
        self.known = known


@dataclass(frozen=True)
class Sourced:
    """A catalogue number and where it comes from (a key of the catalogue's `sources`)."""

    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class ProductSpec:
    name: str
    labels: tuple[str, ...]
    memory_gib: Sourced
    min_watts: Sourced
    default_watts: Sourced
    max_watts: Sourced
    idle_watts: Sourced
    relative_speed: Mapping[WorkloadType, Sourced]


@dataclass(frozen=True)
class WorkloadTypeSpec:
    tokens_per_second_per_gpu_1b: Sourced
    demand_fraction_of_max: Sourced
    # (limit / max watts, throughput / throughput at max), ascending in the first element.
    throughput_curve: tuple[tuple[float, float], ...]
    throughput_curve_source: str
    multi_gpu_exponent: Sourced


@dataclass(frozen=True)
class Measurement:
    """A published measurement the model is checked against (not fitted to): per-GPU draw of a
    replica, as a range in watts (e.g. small to large batch)."""

    product: str
    workload_type: WorkloadType
    params_billions: float
    gpus: int
    power_limit_watts: float
    watts_per_gpu_low: float
    watts_per_gpu_high: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class Catalogue:
    sources: Mapping[str, str]
    products: Mapping[str, ProductSpec]
    workload_types: Mapping[WorkloadType, WorkloadTypeSpec]
    # Normalised label -> catalogue key.
    aliases: Mapping[str, str] = field(default_factory=dict)
    measurements: tuple[Measurement, ...] = ()


def _sourced(raw: Any, where: str, sources: Mapping[str, str]) -> Sourced:
    if not isinstance(raw, dict) or "value" not in raw or "source" not in raw:
        raise ValueError(f"catalogue.yaml {where}: expected {{value, source}}, got {raw!r}")
    if raw["source"] not in sources:
        raise ValueError(f"catalogue.yaml {where}.source: {raw['source']!r} is not in sources")
    return Sourced(float(raw["value"]), str(raw["source"]), str(raw.get("note", "")))


def _label_key(label: str) -> str:
    key = label.strip().upper().replace(" ", "-").replace("_", "-")
    key = key.removeprefix("NVIDIA-")
    return key.removesuffix("-SHARED")


def _parse_catalogue(raw: Mapping[str, Any]) -> Catalogue:
    sources = {str(k): str(v) for k, v in raw["sources"].items()}
    types: dict[WorkloadType, WorkloadTypeSpec] = {}
    for type_name, spec in raw["workload_types"].items():
        where = f"workload_types.{type_name}"
        curve = spec["throughput_vs_limit_fraction"]
        points = tuple(sorted((float(x), float(y)) for x, y in curve["points"]))
        if len(points) < 2:
            raise ValueError(f"catalogue.yaml {where}: a curve needs at least two points")
        types[WorkloadType(type_name)] = WorkloadTypeSpec(
            tokens_per_second_per_gpu_1b=_sourced(
                spec["tokens_per_second_per_gpu_1b"], where, sources
            ),
            demand_fraction_of_max=_sourced(spec["demand_fraction_of_max"], where, sources),
            throughput_curve=points,
            throughput_curve_source=str(curve["source"]),
            multi_gpu_exponent=_sourced(spec["multi_gpu_exponent"], where, sources),
        )
    products: dict[str, ProductSpec] = {}
    aliases: dict[str, str] = {}
    for name, spec in raw["products"].items():
        where = f"products.{name}"
        product = ProductSpec(
            name=str(name),
            labels=tuple(str(label) for label in spec["labels"]),
            memory_gib=_sourced(spec["memory_gib"], f"{where}.memory_gib", sources),
            min_watts=_sourced(spec["min_watts"], f"{where}.min_watts", sources),
            default_watts=_sourced(spec["default_watts"], f"{where}.default_watts", sources),
            max_watts=_sourced(spec["max_watts"], f"{where}.max_watts", sources),
            idle_watts=_sourced(spec["idle_watts"], f"{where}.idle_watts", sources),
            relative_speed={
                WorkloadType(t): _sourced(v, f"{where}.relative_speed.{t}", sources)
                for t, v in spec["relative_speed"].items()
            },
        )
        if not (
            0 < product.min_watts.value <= product.default_watts.value <= product.max_watts.value
        ):
            raise ValueError(f"catalogue.yaml {where}: need 0 < min <= default <= max watts")
        if set(product.relative_speed) != set(types):
            raise ValueError(f"catalogue.yaml {where}.relative_speed: need every workload type")
        products[product.name] = product
        for label in (product.name, *product.labels):
            aliases[_label_key(label)] = product.name
    measurements = tuple(
        _measurement(entry, f"measurements[{index}]", sources, products)
        for index, entry in enumerate(raw.get("measurements") or [])
    )
    return Catalogue(
        sources=sources,
        products=products,
        workload_types=types,
        aliases=aliases,
        measurements=measurements,
    )


def _measurement(
    raw: Mapping[str, Any], where: str, sources: Mapping[str, str], products: Mapping[str, Any]
) -> Measurement:
    if raw["source"] not in sources:
        raise ValueError(f"catalogue.yaml {where}.source: {raw['source']!r} is not in sources")
    if raw["product"] not in products:
        raise ValueError(f"catalogue.yaml {where}.product: {raw['product']!r} is not a product")
    low, high = (float(w) for w in raw["watts_per_gpu"])
    if not 0 < low <= high:
        raise ValueError(f"catalogue.yaml {where}.watts_per_gpu: need 0 < low <= high")
    return Measurement(
        product=str(raw["product"]),
        workload_type=WorkloadType(raw["workload_type"]),
        params_billions=float(raw["params_billions"]),
        gpus=int(raw["gpus"]),
        power_limit_watts=float(raw["power_limit_watts"]),
        watts_per_gpu_low=low,
        watts_per_gpu_high=high,
        source=str(raw["source"]),
        note=str(raw.get("note", "")),
    )


@functools.cache
def catalogue() -> Catalogue:
    """The catalogue shipped with the package, parsed once."""
    text = (
        importlib.resources.files("wattsched_optimizer")
        .joinpath("catalogue.yaml")
        .read_text(encoding="utf-8")
    )
    return _parse_catalogue(yaml.safe_load(text))


def known_products() -> tuple[str, ...]:
    return tuple(sorted(catalogue().products))


def normalise_product(label: str) -> str:
    """Map a GFD `nvidia.com/gpu.product` value (or an NVML name) to a catalogue key.

    `NVIDIA-H100-80GB-HBM3` -> `H100-80GB`, `NVIDIA-A100-PCIE-40GB` -> `A100-PCIE-40GB`.
    Raises UnknownProductError naming the label and the known products.
    """
    product = catalogue().aliases.get(_label_key(label))
    if product is None:
        raise UnknownProductError(label, known_products())
    return product


def product_spec(product: str) -> ProductSpec:
    """The catalogue entry of a normalised product name."""
    spec = catalogue().products.get(product)
    if spec is None:
        raise UnknownProductError(product, known_products())
    return spec


def power_levels_watts(product: str, levels: int) -> tuple[float, ...]:
    """`levels` power limits evenly spaced from the product's minimum to its maximum, in watts.

    Rounded to whole watts; the last is always the maximum. `levels == 1` gives just the maximum.
    """
    if levels < 1:
        raise ValueError(f"power levels: need at least 1, got {levels}")
    spec = product_spec(product)
    low, high = spec.min_watts.value, spec.max_watts.value
    if levels == 1 or low == high:
        return (high,)
    step = (high - low) / (levels - 1)
    return tuple(sorted({float(round(low + step * i)) for i in range(levels - 1)} | {float(high)}))


def clamp_power_limit_watts(product: str, power_limit_watts: float) -> float:
    """The limit NVML would accept: clamped into the product's [min, max]."""
    spec = product_spec(product)
    return min(max(power_limit_watts, spec.min_watts.value), spec.max_watts.value)


@dataclass(frozen=True)
class Calibration:
    """Multiplicative corrections of the modelled figures for one (product, workload type).

    Each factor is clamped into CALIBRATION_BOUNDS so that one bad measurement cannot make the
    model absurd.
    """

    throughput_factor: float = 1.0
    power_factor: float = 1.0

    def bounded(self) -> Calibration:
        low, high = CALIBRATION_BOUNDS
        return Calibration(
            throughput_factor=min(max(self.throughput_factor, low), high),
            power_factor=min(max(self.power_factor, low), high),
        )


class PerformanceModel(Protocol):
    """What the planner needs to know about a replica; telemetry may calibrate it."""

    def throughput_tokens_per_second(  # noqa: PLR0917 (the interface's positional contract)
        self,
        product: str,
        workload_type: WorkloadType,
        params_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
    ) -> float:
        """Tokens/s one replica of `gpus` GPUs delivers at this per-GPU power limit."""
        ...

    def expected_power_watts(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        """Expected draw of one busy GPU at this power limit, in watts (never above the limit)."""
        ...

    def idle_power_watts(self, product: str) -> float:
        """Expected draw of one idle GPU, in watts."""
        ...


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear through `points`; flat above the last, extrapolated below the first."""
    if x >= points[-1][0]:
        return points[-1][1]
    upper = max(bisect.bisect_right([p[0] for p in points], x), 1)
    (x0, y0), (x1, y1) = points[upper - 1], points[upper]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class CatalogueModel:
    """The default `PerformanceModel`: catalogue figures, optionally with bounded corrections."""

    corrections: Mapping[tuple[str, WorkloadType], Calibration] = field(default_factory=dict)

    def calibrated(
        self, corrections: Mapping[tuple[str, WorkloadType], Calibration]
    ) -> CatalogueModel:
        """A model with these corrections (each bounded) replacing the ones for the same keys."""
        merged = dict(self.corrections)
        merged.update({key: value.bounded() for key, value in corrections.items()})
        return CatalogueModel(corrections=merged)

    def _correction(self, product: str, workload_type: WorkloadType) -> Calibration:
        return self.corrections.get((product, workload_type), Calibration())

    def throughput_fraction(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        """Throughput at this limit relative to throughput at the product's maximum limit."""
        spec = product_spec(product)
        fraction = clamp_power_limit_watts(product, power_limit_watts) / spec.max_watts.value
        curve = catalogue().workload_types[workload_type].throughput_curve
        return max(_interpolate(curve, fraction), 0.01)

    def throughput_tokens_per_second(  # noqa: PLR0917 (the interface's positional contract)
        self,
        product: str,
        workload_type: WorkloadType,
        params_billions: float,
        gpus: int,
        relative_throughput: float,
        power_limit_watts: float,
    ) -> float:
        if params_billions <= 0 or gpus < 1 or relative_throughput <= 0:
            raise ValueError(
                f"throughput: need params_billions > 0, gpus >= 1, relative_throughput > 0 "
                f"(got {params_billions}, {gpus}, {relative_throughput})"
            )
        type_spec = catalogue().workload_types[workload_type]
        speed = product_spec(product).relative_speed[workload_type].value
        per_gpu = type_spec.tokens_per_second_per_gpu_1b.value / params_billions
        scale: float = float(gpus) ** type_spec.multi_gpu_exponent.value
        fraction = self.throughput_fraction(product, workload_type, power_limit_watts)
        correction = self._correction(product, workload_type).throughput_factor
        return per_gpu * speed * scale * relative_throughput * fraction * correction

    def expected_power_watts(
        self, product: str, workload_type: WorkloadType, power_limit_watts: float
    ) -> float:
        spec = product_spec(product)
        limit = clamp_power_limit_watts(product, power_limit_watts)
        demand = catalogue().workload_types[workload_type].demand_fraction_of_max.value
        demand_watts = demand * spec.max_watts.value
        demand_watts *= self._correction(product, workload_type).power_factor
        return min(limit, max(spec.idle_watts.value, demand_watts))

    def idle_power_watts(self, product: str) -> float:
        return product_spec(product).idle_watts.value
