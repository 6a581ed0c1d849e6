"""The performance and power model: GPU products, their power limits, and what a replica delivers.

For: the product catalogue (loaded once from `catalogue.yaml`, a citation per number; extended
at start-up with `read_catalogue_file` and `use_catalogue`), turning GPU Feature Discovery labels
into catalogue keys (`normalise_product`, `product_key`), products the catalogue lacks
(`discovered_product`, valid for one plan through `products_in_scope`), the discrete power levels
the optimizer chooses from, and `PerformanceModel`, the small interface the planner, the simulator
and telemetry calibration share: tokens/s of a replica and expected watts per GPU as functions of
the power limit. Not for: deciding anything (see `planner`) or reading telemetry (callers pass
corrections in through `CatalogueModel.calibrated`).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.resources
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
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
    # Highest SM clock (MHz); None: unknown, so the optimizer never locks this product's clocks.
    max_sm_clock_mhz: Sourced | None = None


@dataclass(frozen=True)
class WorkloadTypeSpec:
    tokens_per_second_per_gpu_1b: Sourced
    demand_fraction_of_max: Sourced
    # (limit / max watts, throughput / throughput at max), ascending in the first element.
    throughput_curve: tuple[tuple[float, float], ...]
    throughput_curve_source: str
    multi_gpu_exponent: Sourced
    # (SM clock / max SM clock, throughput fraction, busy-draw fraction), ascending; empty: locking
    # clocks does not pay for this type (compute-bound).
    clock_curve: tuple[tuple[float, float, float], ...] = ()
    clock_curve_source: str = ""


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
class UnknownProductDefaults:
    """What the catalogue assumes of a product it does not list (`unknown_product`)."""

    relative_speed: Mapping[WorkloadType, Sourced]
    idle_fraction_of_max: Sourced
    max_watts_before_agent: Sourced


@dataclass(frozen=True)
class Catalogue:
    sources: Mapping[str, str]
    products: Mapping[str, ProductSpec]
    workload_types: Mapping[WorkloadType, WorkloadTypeSpec]
    unknown: UnknownProductDefaults
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
        clock_raw = spec.get("sm_clock_curve")
        clock_points: tuple[tuple[float, float, float], ...] = ()
        if clock_raw is not None:
            clock_points = tuple(
                sorted((float(c), float(t), float(d)) for c, t, d in clock_raw["points"])
            )
            if clock_raw["source"] not in sources or not clock_points or clock_points[-1][0] != 1.0:
                raise ValueError(
                    f"catalogue.yaml {where}.sm_clock_curve: needs a known source and points "
                    "ending at clock fraction 1.0"
                )
        types[WorkloadType(type_name)] = WorkloadTypeSpec(
            tokens_per_second_per_gpu_1b=_sourced(
                spec["tokens_per_second_per_gpu_1b"], where, sources
            ),
            demand_fraction_of_max=_sourced(spec["demand_fraction_of_max"], where, sources),
            throughput_curve=points,
            throughput_curve_source=str(curve["source"]),
            multi_gpu_exponent=_sourced(spec["multi_gpu_exponent"], where, sources),
            clock_curve=clock_points,
            clock_curve_source=str(clock_raw["source"]) if clock_raw is not None else "",
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
            max_sm_clock_mhz=None
            if "max_sm_clock_mhz" not in spec
            else _sourced(spec["max_sm_clock_mhz"], f"{where}.max_sm_clock_mhz", sources),
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
    unknown_raw = raw["unknown_product"]
    unknown = UnknownProductDefaults(
        relative_speed={
            WorkloadType(t): _sourced(v, f"unknown_product.relative_speed.{t}", sources)
            for t, v in unknown_raw["relative_speed"].items()
        },
        idle_fraction_of_max=_sourced(
            unknown_raw["idle_fraction_of_max"], "unknown_product.idle_fraction_of_max", sources
        ),
        max_watts_before_agent=_sourced(
            unknown_raw["max_watts_before_agent"], "unknown_product.max_watts_before_agent", sources
        ),
    )
    if set(unknown.relative_speed) != set(types):
        raise ValueError("catalogue.yaml unknown_product.relative_speed: need every workload type")
    return Catalogue(
        sources=sources,
        products=products,
        workload_types=types,
        unknown=unknown,
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
def _shipped_raw() -> Mapping[str, Any]:
    text = (
        importlib.resources.files("wattsched_optimizer")
        .joinpath("catalogue.yaml")
        .read_text(encoding="utf-8")
    )
    raw: Mapping[str, Any] = yaml.safe_load(text)
    return raw


@functools.cache
def _shipped() -> Catalogue:
    return _parse_catalogue(_shipped_raw())


# The catalogue in force: the shipped one, or the shipped one extended at start-up.
_ACTIVE: dict[str, Catalogue] = {}


def catalogue() -> Catalogue:
    """The catalogue in force: the one shipped with the package (parsed once), or the one given
    to `use_catalogue`."""
    return _ACTIVE.get("in use") or _shipped()


def use_catalogue(extended: Catalogue | None) -> None:
    """Make `extended` (from `extended_catalogue`) the catalogue of this process; None: the
    shipped one. Called once at start-up."""
    if extended is None:
        _ACTIVE.clear()
    else:
        _ACTIVE["in use"] = extended


def extended_catalogue(
    extension: Mapping[str, Any], where: str = "catalogue extension"
) -> Catalogue:
    """The shipped catalogue plus `sources` and `products` (the shape of catalogue.yaml's
    sections; a product with a key the catalogue has replaces it), `unknown_product` replaced when
    given.

    For deployments that run GPUs the shipped catalogue lacks, without rebuilding the image (the
    operator's `--catalogue-file`, the chart's `operator.catalogue`). Raises ValueError naming
    the entry for a malformed extension (every number needs a source, as in the catalogue).
    """
    if not isinstance(extension, Mapping):
        raise ValueError(f"{where}: expected a mapping with sources and products")
    unknown_sections = sorted(set(extension) - {"sources", "products", "unknown_product"})
    if unknown_sections:
        raise ValueError(
            f"{where}: unknown section {unknown_sections[0]!r}; allowed: sources, products, "
            "unknown_product"
        )
    base = _shipped_raw()
    merged = {
        **base,
        "sources": {**base["sources"], **(extension.get("sources") or {})},
        "products": {**base["products"], **(extension.get("products") or {})},
        "unknown_product": extension.get("unknown_product") or base["unknown_product"],
    }
    try:
        return _parse_catalogue(merged)
    except KeyError as error:
        raise ValueError(f"{where}: a product needs the field {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{where}: {error}") from None


def read_catalogue_file(path: Path | None) -> Catalogue | None:
    """The catalogue extended with the products in `path` (None: no file), for `--catalogue-file`;
    ValueError naming the file and entry when it cannot be read or is malformed."""
    if path is None:
        return None
    try:
        extension = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ValueError(f"--catalogue-file {path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--catalogue-file {path}: not valid YAML: {error}") from None
    return extended_catalogue(extension, f"--catalogue-file {path}")


# Products the catalogue lacks, as the nodes describe them, for the plan being made.
_PLAN_PRODUCTS: ContextVar[Mapping[str, ProductSpec]] = ContextVar(
    "plan_products", default=MappingProxyType({})
)


@contextlib.contextmanager
def products_in_scope(products: Mapping[str, ProductSpec]) -> Iterator[None]:
    """Make `products` (from `discovered_product`) known to `product_spec` inside the block."""
    token = _PLAN_PRODUCTS.set(MappingProxyType({**_PLAN_PRODUCTS.get(), **products}))
    try:
        yield
    finally:
        _PLAN_PRODUCTS.reset(token)


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


def product_key(label: str) -> str:
    """The catalogue key of a GFD product label, or, for a product the catalogue lacks, the label
    normalised the same way (`NVIDIA-B200` -> `B200`)."""
    key = _label_key(label)
    return catalogue().aliases.get(key, key)


def product_spec(product: str) -> ProductSpec:
    """The catalogue entry of a normalised product name (or a discovered product in scope)."""
    spec = _PLAN_PRODUCTS.get().get(product) or catalogue().products.get(product)
    if spec is None:
        raise UnknownProductError(product, known_products())
    return spec


def discovered_product(
    key: str,
    *,
    memory_gib: float,
    min_watts: float,
    default_watts: float,
    max_watts: float,
) -> ProductSpec:
    """A product the catalogue lacks, as its node describes it: memory from the node's label, the
    power range as the agent read it from NVML, idle draw and speeds from `unknown_product`
    (modelled, to be corrected by calibration)."""
    defaults = catalogue().unknown
    power_source = "nvml-constraints"
    idle = defaults.idle_fraction_of_max
    return ProductSpec(
        name=key,
        labels=(),
        memory_gib=Sourced(memory_gib, "gfd-memory-label"),
        min_watts=Sourced(min_watts, power_source),
        default_watts=Sourced(default_watts, power_source),
        max_watts=Sourced(max_watts, power_source),
        idle_watts=Sourced(
            round(idle.value * max_watts, 1), idle.source, "idle_fraction_of_max x max_watts"
        ),
        relative_speed=dict(defaults.relative_speed),
    )


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


def sm_clock_levels_mhz(product: str, workload_type: WorkloadType) -> tuple[int, ...]:
    """The locked SM clocks worth offering for this work on this product (MHz, ascending): the
    points of the type's clock curve below the maximum clock. Empty where the type has no curve
    (compute-bound work) or the product's maximum SM clock is unknown."""
    maximum = product_spec(product).max_sm_clock_mhz
    curve = catalogue().workload_types[workload_type].clock_curve
    if maximum is None or not curve:
        return ()
    return tuple(round(fraction * maximum.value) for fraction, _, _ in curve if fraction < 1.0)


def sm_clock_effect(
    product: str, workload_type: WorkloadType, sm_clock_mhz: int | None
) -> tuple[float, float]:
    """(throughput, busy draw) of work with its SM clocks locked at `sm_clock_mhz`, each as a
    fraction of the same work unlocked at the same power limit; (1, 1) when unlocked or where the
    type has no clock curve. Modelled from the catalogue's `sm_clock_curve` (cited there)."""
    maximum = product_spec(product).max_sm_clock_mhz
    curve = catalogue().workload_types[workload_type].clock_curve
    if sm_clock_mhz is None or maximum is None or not curve:
        return (1.0, 1.0)
    fraction = sm_clock_mhz / maximum.value
    throughput = _interpolate(tuple((c, t) for c, t, _ in curve), fraction)
    draw = _interpolate(tuple((c, d) for c, _, d in curve), fraction)
    return (max(throughput, 0.01), max(draw, 0.01))


def clamp_power_limit_watts(product: str, power_limit_watts: float) -> float:
    """The limit NVML would accept: clamped into the product's [min, max]."""
    spec = product_spec(product)
    return min(max(power_limit_watts, spec.min_watts.value), spec.max_watts.value)


# One operating point of one (product, workload type): the per-GPU power limit NVML applies (W,
# clamped and rounded) and the locked SM clock (MHz; None: unlocked). The catalogue's curves are
# one shape per type; a product's true throughput against its limit and clock has its own (e.g.
# steeper at the lowest limits), so a single factor per type is right on average and wrong at
# the points an energy-minimising plan picks: the ones where the catalogue is most optimistic.
CalibrationPoint = tuple[str, WorkloadType, int, int | None]


def calibration_point(
    product: str, workload_type: WorkloadType, power_limit_watts: float, sm_clock_mhz: int | None
) -> CalibrationPoint:
    """The operating point a replica at this limit and clock runs at."""
    return (
        product,
        workload_type,
        round(clamp_power_limit_watts(product, power_limit_watts)),
        sm_clock_mhz,
    )


def bounded_factor(factor: float) -> float:
    """A correction factor clamped into CALIBRATION_BOUNDS."""
    low, high = CALIBRATION_BOUNDS
    return min(max(factor, low), high)


@dataclass(frozen=True)
class Calibration:
    """Multiplicative corrections of the modelled figures for one (product, workload type).

    Each factor is clamped into CALIBRATION_BOUNDS so that one bad measurement cannot make the
    model absurd.
    """

    throughput_factor: float = 1.0
    power_factor: float = 1.0

    def bounded(self) -> Calibration:
        return Calibration(
            throughput_factor=bounded_factor(self.throughput_factor),
            power_factor=bounded_factor(self.power_factor),
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
        *,
        sm_clock_mhz: int | None = None,
    ) -> float:
        """Tokens/s one replica of `gpus` GPUs delivers at this per-GPU power limit; with
        `sm_clock_mhz`, with its SM clocks locked there and drawing under the limit (the cap
        never triggers: the caller checks the locked draw fits)."""
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
    # Throughput factors measured at single operating points; where one is known it replaces
    # the (product, type) throughput factor at that point.
    point_throughput_factors: Mapping[CalibrationPoint, float] = field(default_factory=dict)

    def calibrated(
        self,
        corrections: Mapping[tuple[str, WorkloadType], Calibration],
        point_throughput_factors: Mapping[CalibrationPoint, float] | None = None,
    ) -> CatalogueModel:
        """A model with these corrections (each bounded) replacing the ones for the same keys."""
        merged = dict(self.corrections)
        merged.update({key: value.bounded() for key, value in corrections.items()})
        points = dict(self.point_throughput_factors)
        for point, factor in (point_throughput_factors or {}).items():
            points[point] = bounded_factor(factor)
        return CatalogueModel(corrections=merged, point_throughput_factors=points)

    def _correction(self, product: str, workload_type: WorkloadType) -> Calibration:
        return self.corrections.get((product, workload_type), Calibration())

    def throughput_factor(
        self,
        product: str,
        workload_type: WorkloadType,
        power_limit_watts: float,
        sm_clock_mhz: int | None = None,
    ) -> float:
        """The throughput correction at this operating point: its own where one was measured,
        else the (product, type) one."""
        if self.point_throughput_factors:  # none in an uncalibrated model: no key to build
            point = calibration_point(product, workload_type, power_limit_watts, sm_clock_mhz)
            factor = self.point_throughput_factors.get(point)
            if factor is not None:
                return factor
        return self._correction(product, workload_type).throughput_factor

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
        *,
        sm_clock_mhz: int | None = None,
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
        if sm_clock_mhz is None:
            fraction = self.throughput_fraction(product, workload_type, power_limit_watts)
        else:
            # Locked under the limit: the unlocked maximum's throughput times the clock's share.
            unlocked = self.throughput_fraction(
                product, workload_type, product_spec(product).max_watts.value
            )
            fraction = unlocked * sm_clock_effect(product, workload_type, sm_clock_mhz)[0]
        correction = self.throughput_factor(product, workload_type, power_limit_watts, sm_clock_mhz)
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
