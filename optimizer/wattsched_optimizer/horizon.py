"""The plan over a horizon: how much deadline work runs in each slot of the next hours, so that
every budget keeps its power cap in every slot, its kWh and kg CO2 allowances over its period, and
every deadline is met, at the least carbon (or energy).

For: `plan_horizon(HorizonInput) -> HorizonPlan`, a linear program over (workload, slot) solved
with HiGHS, and `first_slot_input`, which turns the plan's first slot into the one-instant
planner's input (`planner.plan`): deferred work is left out until its slot comes, inference in a
budget whose allowance runs short keeps its minimum-energy setting. Receding horizon: the caller
plans again every round and applies only the first slot.
Not for: placing replicas on nodes or choosing power limits (the one-instant planner does, under
the caps), reading forecasts or clocks (callers resolve them into per-slot numbers), Kubernetes.

The model (docs/optimization.md, "The plan over a horizon"): each workload runs at one reference
operating point (a service: the product it runs on; other work: of the products it fits, the one
with the least energy per token, wherever it runs now; its best-quality variant, the power level
with the least energy per token, or its Performance level), so its busy watts, cap watts and
tokens/s per replica are constants and the only decision is `x[w, s]`, the share of slot `s` it
runs. Inference serves its forecast demand per slot at its minimum-energy setting, a load; the
program may run a service for a share of a slot at a higher limit on fewer GPUs, at the energy
that costs (`_Narrowing`). Everything is linear; the solution is the LP optimum (no integer
rounding).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import highspy
import numpy as np

from wattsched_optimizer.formulation import _highs_available
from wattsched_optimizer.model import (
    CatalogueModel,
    PerformanceModel,
    power_levels_watts,
    product_spec,
    products_in_scope,
)
from wattsched_optimizer.options import (
    budget_base_watts,
    remaining_tokens,
    replica_tokens_per_second,
)
from wattsched_optimizer.problem import (
    EnergyPolicy,
    GpuNode,
    PlanInput,
    Variant,
    Workload,
    WorkloadType,
)

SECONDS_PER_HOUR = 3600.0
# HiGHS's presolve rule "column stuffing" (bit 19 of `presolve_rule_off`, HiGHS 1.16) is left
# out: on the benchmark instance with 60 workload shapes (thousands of alike columns) it took
# about 0.14 of the 0.21 s CPU of the solve and removed nothing the dual simplex needed (measured:
# 0.07 s without it, same optimum; no instance of docs/benchmarks.md got slower).
PRESOLVE_RULES_OFF = 1 << 19
# A share of a slot below this is "does not run" (the solver's zeros are not exact).
SHARE_EPSILON = 1e-6
# A missed deadline (per unit of the work's cost at the worst slot) and work not run (per unit of
# its cost) weigh this much more than the carbon or energy they would save: work is never given
# up to save carbon while a cap or an allowance leaves room for it.
WORK_WEIGHT = 10.0
# Each priority rank is worth this much more than the one below, up to MAX_PRIORITY_RANGE.
PRIORITY_FACTOR = 10.0
# A deadline's work is worth this much more than work without one of the same priority (and less
# than work of the next priority up).
DEADLINE_WEIGHT = PRIORITY_FACTOR**0.5
MAX_PRIORITY_RANGE = 1e6
# Ties between slots break towards the earliest (relative weight per slot of the objective).
EARLY_TIE_BREAK = 1e-4


class Objective(StrEnum):
    """What a budget's horizon minimises once caps, allowances and deadlines hold."""

    # kg CO2: the intensity forecast moves flexible work to clean hours (without a forecast, the
    # same as ENERGY).
    CARBON = "Carbon"
    # kWh: at one operating point per workload every slot costs the same, so work runs as soon as
    # the cap and the allowance let it (today's behaviour, with the allowance kept).
    ENERGY = "Energy"


class HorizonInputError(ValueError):
    """The horizon cannot be planned; the message names the budget or field."""


@dataclass(frozen=True)
class AllowancePeriod:
    """The part of an allowance period inside the horizon: slots `first_slot` up to (not
    including) `end_slot`, and what is left of the allowance for them (None: no allowance).

    For a period that ends after the horizon the caller passes the horizon's pro-rata share of
    what is left (`allowance_share`), so that one day cannot spend a week's allowance.
    """

    first_slot: int
    end_slot: int
    energy_kwh_left: float | None = None
    carbon_kg_left: float | None = None


@dataclass(frozen=True)
class BudgetHorizon:
    """One EnergyBudget over the horizon, resolved by the caller into per-slot numbers."""

    name: str
    # The cap in each slot: spec.powerCapWatts, or a schedule's lower cap where a window covers it.
    cap_watts_by_slot: tuple[float, ...]
    # Forecast grid intensity per slot (g CO2 / kWh); empty: unknown (carbon counts as 0).
    carbon_grams_per_kwh_by_slot: tuple[float, ...] = ()
    pue: float = 1.0
    periods: tuple[AllowancePeriod, ...] = ()
    objective: Objective = Objective.CARBON


@dataclass(frozen=True)
class HorizonInput:
    plan_input: PlanInput
    # Length of each slot, first slot first (the first usually ends at the next full hour).
    slot_seconds: tuple[float, ...]
    # Every budget of `plan_input.budgets` by name; a budget missing here keeps its cap in every
    # slot and has no allowance.
    budgets: Mapping[str, BudgetHorizon] = field(default_factory=dict)
    # Inference forecast demand (tokens/s) per slot by workload key; missing: its tokens_per_second.
    # What the service may need: its replicas' GPUs and power limits are held for it (caps, GPUs).
    inference_demand: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # What the service is expected to need, where that is less: its draw in the allowances (kWh,
    # kg CO2). Missing: `inference_demand`. Holding a slot's cap room for a peak that may come is
    # safe; counting that peak's energy as spent would defer work for an allowance that lasts.
    inference_expected_demand: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # Work whose pods each take a whole node and whose planned start (`planned_starts`) came
    # without it starting: its whole nodes were not there when its slot came (the GPU rows count
    # GPUs in aggregate, and smaller work that started in the hours before holds a part of every
    # node). It waits for no cleaner hour again (only for an allowance) and goes first among the
    # work of its priority, as work that cannot wait does (`first_slot_input`).
    overdue: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OperatingPoint:
    """The constants a workload runs at in the horizon (modelled)."""

    product: str
    replicas: int
    gpus: int  # replicas x GPUs per replica
    power_limit_watts: float
    busy_watts_per_gpu: float
    tokens_per_second: float  # all replicas together


@dataclass(frozen=True)
class WorkloadSchedule:
    """A deadline or batch workload's share of each slot it runs, and what that amounts to."""

    workload: str
    share_by_slot: tuple[float, ...]
    point: OperatingPoint
    # Tokens the deadline needs (all that is left; the plan may leave some for after the
    # horizon), the tokens planned in the horizon's slots, and the tokens missed (0 when the
    # plan meets the deadline with its margin to spare); None for work without a deadline.
    required_tokens: float | None
    planned_tokens: float
    missed_tokens: float
    # A budget it counts in is short of its allowance (the plan may leave its work out for it).
    allowance_short: bool = False
    # Its deadline leaves less than the margin to spare (`is_urgent`).
    urgent: bool = False

    @property
    def runs_now(self) -> bool:
        return self.share_by_slot[0] > SHARE_EPSILON

    @property
    def waits(self) -> bool:
        """Left out of the first slot. Work the plan expects to miss its deadline, or with less
        than its margin to spare, waits only for an allowance: it is handed to the one-instant
        planner, which places it if there is room now (forecasts err)."""
        if self.runs_now or not _has_work(self):
            return False
        return (self.missed_tokens <= 0 and not self.urgent) or self.allowance_short

    @property
    def next_slot(self) -> int | None:
        """The first slot after the first one it runs in, when it does not run now."""
        if self.runs_now:
            return None
        return next(
            (s for s, share in enumerate(self.share_by_slot) if share > SHARE_EPSILON), None
        )


@dataclass(frozen=True)
class BudgetOutlook:
    """What the horizon expects of a budget's allowances (modelled)."""

    name: str
    # Per allowance period in the horizon: kWh (x PUE) and kg CO2 the plan uses in it, the
    # allowance left at the start, and whether flexible work had to give way to it.
    energy_kwh_by_period: tuple[float, ...]
    carbon_kg_by_period: tuple[float, ...]
    # The allowance binds in the current period: flexible work is deferred or slowed for it.
    energy_short: bool = False
    carbon_short: bool = False
    # Inference and idle GPUs alone use more than is left: the allowance will be exceeded.
    energy_over_kwh: float = 0.0
    carbon_over_kg: float = 0.0


class HorizonStatus(StrEnum):
    OPTIMAL = "Optimal"
    # The solver returned no optimum: nothing is deferred (the one-instant planner runs as before).
    FAILED = "Failed"


@dataclass(frozen=True)
class HorizonPlan:
    status: HorizonStatus
    objective: float
    # The objective of the solver's dual values: a lower bound on the optimum (0 when Failed).
    dual_bound: float
    solve_seconds: float
    slot_seconds: tuple[float, ...]
    schedules: Mapping[str, WorkloadSchedule]
    budgets: Mapping[str, BudgetOutlook]
    # Inference workloads in a budget whose allowance is short: they keep their minimum-energy
    # setting (Efficiency).
    thrifty_inference: frozenset[str] = frozenset()
    timings_seconds: Mapping[str, float] = field(default_factory=dict)
    # Rows and columns of the program (for the benchmark).
    size: tuple[int, int] = (0, 0)

    def slot_start_seconds(self, slot: int) -> float:
        return float(sum(self.slot_seconds[:slot]))

    @property
    def gap(self) -> float:
        """Relative distance of the objective from its dual bound (0 at an LP optimum, up to the
        solver's tolerances); absolute where the objective is below 1 in size, so that an optimum
        of 0 (nothing to cost) does not turn the solver's round-off into a gap."""
        return abs(self.objective - self.dual_bound) / max(abs(self.objective), 1.0)

    @property
    def deferred(self) -> tuple[str, ...]:
        """Workloads with work left that do not run in the first slot, by key."""
        return tuple(key for key, schedule in sorted(self.schedules.items()) if schedule.waits)


def _has_work(schedule: WorkloadSchedule) -> bool:
    return schedule.required_tokens is None or schedule.required_tokens > 0


# -- slots -----------------------------------------------------------------------------------------


def hourly_slots(
    now_seconds_into_hour: float,
    horizon_hours: float,
    *,
    fine_hours: float | None = None,
    coarse_slot_hours: float = 1.0,
) -> tuple[float, ...]:
    """Slot lengths (s) for a horizon of `horizon_hours`: the first slot ends at the next full
    hour, then hourly slots up to `fine_hours` (default: all of it), then `coarse_slot_hours`
    slots (the last one shortened to end at the horizon)."""
    if horizon_hours <= 0:
        raise HorizonInputError(f"horizon hours: must be > 0, got {horizon_hours:g}")
    if coarse_slot_hours < 1:
        raise HorizonInputError(f"coarse slot hours: must be >= 1, got {coarse_slot_hours:g}")
    end = horizon_hours * SECONDS_PER_HOUR
    fine_end = end if fine_hours is None else min(end, fine_hours * SECONDS_PER_HOUR)
    first = SECONDS_PER_HOUR - (now_seconds_into_hour % SECONDS_PER_HOUR)
    slots = [min(first, end)]
    at = slots[0]
    while at < end - 1e-9:
        step = SECONDS_PER_HOUR if at < fine_end - 1e-9 else coarse_slot_hours * SECONDS_PER_HOUR
        length = min(step, end - at)
        slots.append(length)
        at += length
    return tuple(slots)


# -- operating points ------------------------------------------------------------------------------


# The budgets a workload counts in: (budget index, share of the workload that counts there).
Scope = tuple[tuple[int, float], ...]


class _Scopes:
    """Where a workload may run, by groups of alike nodes: the products it may use (its own when
    it runs; comma-separated) and the budgets
    it counts in, each with the share of it that counts there: of its replicas' nodes when it
    runs, else of the GPUs it may run on (1 where all of them are in the budget). The horizon
    cannot know the placement; the one-instant planner keeps every cap hard at placement."""

    def __init__(self, plan_input: PlanInput) -> None:
        budgets_of: dict[str, list[int]] = {}
        for index, budget in enumerate(plan_input.budgets):
            for name in budget.node_names:
                budgets_of.setdefault(name, []).append(index)
        self.node_budgets = {name: tuple(found) for name, found in budgets_of.items()}
        groups: dict[tuple[str, int, float, tuple[int, ...]], int] = {}
        for node in plan_input.nodes:
            memory = node.memory_gib
            if memory is None:
                memory = product_spec(node.product).memory_gib.value
            key = (node.product, node.gpu_count, memory, self.node_budgets.get(node.name, ()))
            groups[key] = groups.get(key, 0) + node.gpu_count
        self.groups = sorted(groups.items())
        self.node_by_name = {node.name: node for node in plan_input.nodes}
        self.running_on: dict[str, list[GpuNode]] = {}
        for current in plan_input.current:
            where = self.node_by_name.get(current.node)
            if where is not None:
                self.running_on.setdefault(current.workload, []).append(where)
        self._cache: dict[tuple[frozenset[str], int, float], tuple[str | None, Scope]] = {}

    def of(self, workload: Workload) -> tuple[str | None, Scope]:
        here = self.running_on.get(workload.key)
        if here:
            counts: dict[int, int] = {}
            for node in here:
                for i in self.node_budgets.get(node.name, ()):
                    counts[i] = counts.get(i, 0) + 1
            return here[0].product, tuple((i, counts[i] / len(here)) for i in sorted(counts))
        return self.may_use(workload)

    def may_use(self, workload: Workload) -> tuple[str | None, Scope]:
        """The products a workload may run on (comma-separated; None: none fits) and its
        budgets' shares of their GPUs, wherever it runs now."""
        # The least memory per GPU one of its variants needs (its best variant may need more:
        # the one-instant planner decides; this only excludes products nothing fits on).
        memory_need = min(
            (v.min_memory_gib if v.min_memory_gib > 0 else workload.min_memory_gib_per_gpu)
            for v in workload.variants
        )
        key = (workload.allowed_products, workload.gpus_per_pod, memory_need)
        if key not in self._cache:
            gpus: dict[str, int] = {}
            in_budget: dict[int, int] = {}
            for (product, node_gpus, memory, budgets), count in self.groups:
                if (
                    node_gpus < workload.gpus_per_pod
                    or memory < memory_need
                    or (workload.allowed_products and product not in workload.allowed_products)
                ):
                    continue
                gpus[product] = gpus.get(product, 0) + count
                for i in budgets:
                    in_budget[i] = in_budget.get(i, 0) + count
            total = sum(gpus.values())
            scope = tuple((i, in_budget[i] / total) for i in sorted(in_budget))
            self._cache[key] = (",".join(sorted(gpus)) or None, scope)
        products, scope = self._cache[key]
        return products, scope


# The operating points of workloads alike in everything a point depends on, computed once per
# plan: by workload shape (the points on each product it may use), and per replica by what the
# model's figures depend on (thousands of shapes share a few products, sizes and power ranges).
PointCache = dict[tuple[object, ...], list[OperatingPoint]]
ReplicaPointCache = dict[tuple[object, ...], tuple[float, float, float]]
# Per replica at one limit (`_replica_figures`): busy W per GPU and tokens/s.
LimitFigureCache = dict[tuple[object, ...], tuple[float, float]]


def _best_point(
    workload: Workload,
    products: str,
    model: PerformanceModel,
    levels: int,
    cache: PointCache,
    *,
    replicas: int,
    efficient: bool = False,
    replica_cache: ReplicaPointCache | None = None,
    figures: LimitFigureCache | None = None,
) -> OperatingPoint:
    """The operating point with the least modelled energy per token over the products the
    workload may run on (comma-separated; the first, alphabetically, on a tie), among those that
    meet its deadline running half the time (`DEADLINE_DUTY`), else all the time."""
    key = (
        products,
        replicas,
        efficient,
        workload.type,
        workload.model_parameters_billions,
        workload.gpus_per_replica,
        workload.variants,
        workload.min_quality,
        workload.policy,
        workload.max_power_watts_per_gpu,
    )
    points = cache.get(key)
    if points is None:
        points = [
            operating_point(
                workload,
                product,
                model,
                levels,
                replicas=replicas,
                efficient=efficient,
                cache=replica_cache,
                figures=figures,
            )
            for product in products.split(",")
        ]
        cache[key] = points
    tokens = remaining_tokens(model, workload)
    if workload.deadline_seconds is not None and tokens is not None:
        # Points that finish running half the time left leave the horizon room to move the work
        # (and the cap room for others); else those that finish running all the time.
        for duty in (DEADLINE_DUTY, 1.0):
            in_time = [
                p
                for p in points
                if p.tokens_per_second * workload.deadline_seconds * duty >= tokens
            ]
            if in_time:
                points = in_time
                break
        else:  # none meets the deadline: the fastest misses it least
            return max(points, key=lambda p: p.tokens_per_second)
    return min(points, key=lambda p: p.gpus * p.busy_watts_per_gpu / p.tokens_per_second)


def _levels(workload: Workload, product: str, levels: int, efficient: bool) -> list[float]:
    spec = product_spec(product)
    cap = spec.max_watts.value
    if workload.max_power_watts_per_gpu is not None:
        cap = min(cap, workload.max_power_watts_per_gpu)
    cap = max(cap, spec.min_watts.value)
    if workload.policy is EnergyPolicy.PERFORMANCE and not efficient:
        return [cap]
    return sorted({level for level in power_levels_watts(product, levels) if level <= cap} | {cap})


def _reference_variant(workload: Workload) -> Variant:
    """The variant the horizon plans a workload with: those meeting its minimum quality first,
    then the highest quality, then the fastest."""
    return max(
        workload.variants,
        key=lambda v: (v.quality >= workload.min_quality, v.quality, v.relative_throughput),
    )


def operating_point(
    workload: Workload,
    product: str,
    model: PerformanceModel,
    levels: int,
    *,
    replicas: int,
    efficient: bool = False,
    cache: ReplicaPointCache | None = None,
    figures: LimitFigureCache | None = None,
) -> OperatingPoint:
    """The workload's reference point on `product`: its best-quality variant, at the power level
    with the least modelled energy per token (Performance: its highest allowed level unless
    `efficient`, which inference under an allowance uses). `cache` keeps the chosen point of one
    plan (the levels are compared once per product, size, variant speed and power range),
    `figures` each level's figures (`_replica_figures`)."""
    variant = _reference_variant(workload)
    key = (
        product,
        levels,
        workload.type,
        workload.model_parameters_billions,
        workload.gpus_per_replica,
        variant.relative_throughput,
        workload.max_power_watts_per_gpu,
        workload.policy is EnergyPolicy.PERFORMANCE and not efficient,
    )
    found = cache.get(key) if cache is not None else None
    if found is None:
        best: tuple[float, float, float, float] | None = None
        for level in _levels(workload, product, levels, efficient):
            watts, rate = _replica_figures(workload, product, model, variant, level, figures)
            joules_per_token = watts * workload.gpus_per_replica / rate
            if best is None or joules_per_token < best[0] - 1e-12:
                best = (joules_per_token, level, watts, rate)
        assert best is not None  # _levels never returns an empty list
        found = best[1:]
        if cache is not None:
            cache[key] = found
    level, busy_watts, rate = found
    return OperatingPoint(
        product=product,
        replicas=replicas,
        gpus=replicas * workload.gpus_per_replica,
        power_limit_watts=level,
        busy_watts_per_gpu=busy_watts,
        tokens_per_second=rate * replicas,
    )


def point_at_limit(
    workload: Workload,
    product: str,
    level: float,
    *,
    model: PerformanceModel,
    figures: LimitFigureCache | None = None,
) -> OperatingPoint:
    """One replica of `workload` on `product` at the power limit `level` (its best-quality
    variant, as `operating_point`; `figures` as there)."""
    watts, rate = _replica_figures(
        workload, product, model, _reference_variant(workload), level, figures
    )
    return OperatingPoint(
        product=product,
        replicas=1,
        gpus=workload.gpus_per_replica,
        power_limit_watts=level,
        busy_watts_per_gpu=watts,
        tokens_per_second=rate,
    )


def _replica_figures(  # noqa: PLR0917 (one call shape for both callers)
    workload: Workload,
    product: str,
    model: PerformanceModel,
    variant: Variant,
    level: float,
    figures: LimitFigureCache | None,
) -> tuple[float, float]:
    """One replica of `workload` with `variant` on `product` at the limit `level` (modelled):
    the busy draw of each of its GPUs (W) and its tokens/s. `figures` keeps them for one plan
    (workloads alike in product, type, size, GPUs per replica and variant speed share them)."""
    key = (
        product,
        level,
        workload.type,
        workload.model_parameters_billions,
        workload.gpus_per_replica,
        variant.relative_throughput,
    )
    found = figures.get(key) if figures is not None else None
    if found is None:
        rate = replica_tokens_per_second(
            model, workload, product, relative_throughput=variant.relative_throughput, level=level
        )
        found = (model.expected_power_watts(product, workload.type, level), rate)
        if figures is not None:
            figures[key] = found
    return found


# A deadline job's operating point is chosen to finish running this share of the time left.
DEADLINE_DUTY = 0.5


# -- the program -----------------------------------------------------------------------------------


class _ProductWatts:
    """Per product, the modelled idle draw of a GPU and its lowest limit, looked up once per plan
    (thousands of nodes and workloads share a few products)."""

    def __init__(self, model: PerformanceModel) -> None:
        self.model = model
        self._idle: dict[str, float] = {}
        self._lowest: dict[str, float] = {}

    def idle(self, product: str) -> float:
        if product not in self._idle:
            self._idle[product] = self.model.idle_power_watts(product)
        return self._idle[product]

    def lowest_limit(self, product: str) -> float:
        if product not in self._lowest:
            self._lowest[product] = product_spec(product).min_watts.value
        return self._lowest[product]

    def above_floor(self, point: OperatingPoint) -> tuple[float, float]:
        """Per GPU at `point`: (W drawn above idle, W of limit above the product's lowest)."""
        return (
            point.busy_watts_per_gpu - self.idle(point.product),
            point.power_limit_watts - self.lowest_limit(point.product),
        )


def _budget_shares(
    entries: list[tuple[Workload, OperatingPoint, Scope]], budgets: int
) -> np.ndarray:
    """(budgets, entries): the share of each workload that counts in each budget."""
    part = np.zeros((budgets, len(entries)))
    for n, (_, _, scope) in enumerate(entries):
        for i, share in scope:
            part[i, n] = share
    return part


@dataclass
class _Rows:
    """Constraint rows: names and (lower, upper) bounds; coefficients are kept as triplets."""

    names: list[str] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)

    def add(self, name: str, lower: float, upper: float) -> int:
        self.names.append(name)
        self.lower.append(lower)
        self.upper.append(upper)
        return len(self.names) - 1


def _validate(horizon: HorizonInput) -> None:
    slots = len(horizon.slot_seconds)
    if slots == 0 or any(not 0 < s < math.inf for s in horizon.slot_seconds):
        raise HorizonInputError("slot_seconds: need at least one slot, each > 0 s")
    names = {b.name for b in horizon.plan_input.budgets}
    for name, budget in horizon.budgets.items():
        label = f"EnergyBudget {name}"
        if name not in names or budget.name != name:
            raise HorizonInputError(f"{label}: not a budget of the plan input")
        if len(budget.cap_watts_by_slot) != slots:
            raise HorizonInputError(f"{label}: cap_watts_by_slot needs {slots} values")
        if budget.carbon_grams_per_kwh_by_slot and len(budget.carbon_grams_per_kwh_by_slot) != (
            slots
        ):
            raise HorizonInputError(f"{label}: carbon_grams_per_kwh_by_slot needs {slots} values")
        if any(g < 0 for g in budget.carbon_grams_per_kwh_by_slot):
            raise HorizonInputError(f"{label}: carbon intensity must be >= 0 g/kWh")
        if budget.pue < 1:
            raise HorizonInputError(f"{label}: pue must be >= 1")
        for period in budget.periods:
            if not 0 <= period.first_slot < period.end_slot <= slots:
                raise HorizonInputError(
                    f"{label}: allowance period slots {period.first_slot}..{period.end_slot} "
                    f"outside 0..{slots}"
                )
    for key, demand in (
        *horizon.inference_demand.items(),
        *horizon.inference_expected_demand.items(),
    ):
        if len(demand) != slots or any(d < 0 for d in demand):
            raise HorizonInputError(
                f"LLMWorkload {key}: inference demand needs {slots} values >= 0"
            )


def plan_horizon(horizon: HorizonInput, model: PerformanceModel | None = None) -> HorizonPlan:
    """Plan the horizon (see the module docstring); the caller applies the first slot."""
    with products_in_scope(horizon.plan_input.products):
        return _plan_horizon(horizon, model if model is not None else CatalogueModel())


def _plan_horizon(horizon: HorizonInput, model: PerformanceModel) -> HorizonPlan:
    started = time.perf_counter()
    _validate(horizon)
    plan_input = horizon.plan_input
    slot_seconds = np.asarray(horizon.slot_seconds, dtype=float)
    slots = len(slot_seconds)
    slot_hours = slot_seconds / SECONDS_PER_HOUR
    levels = plan_input.options.power_levels
    nodes = plan_input.nodes
    budgets = plan_input.budgets
    settings = [
        horizon.budgets.get(
            b.name, BudgetHorizon(b.name, cap_watts_by_slot=(b.power_cap_watts,) * slots)
        )
        for b in budgets
    ]
    intensity_kg = np.zeros((len(budgets), slots))
    for i, setting in enumerate(settings):
        if setting.carbon_grams_per_kwh_by_slot:
            intensity_kg[i] = np.asarray(setting.carbon_grams_per_kwh_by_slot) / 1000.0
    pue = np.asarray([s.pue for s in settings])
    watts = _ProductWatts(model)
    # Floors that run whatever is planned: idle GPUs (energy) and the cap base (limits). The old
    # pods of make-before-break moves hold their GPUs and cap room now, in the first slot; they
    # are gone by the next, and their draw is their service's (counted with its demand).
    settled = dataclasses.replace(plan_input, nodes=tuple(node.settled() for node in nodes))
    base_now, base_later = budget_base_watts(plan_input), budget_base_watts(settled)
    settled_by_name = {node.name: node for node in settled.nodes}
    idle_watts = np.zeros(len(budgets))
    for i, budget in enumerate(budgets):
        total = budget.uncontrolled_watts
        for name in budget.node_names:
            node = settled_by_name.get(name)
            if node is not None:
                total += watts.idle(node.product) * node.gpu_count
                total += node.unmanaged_watts
        idle_watts[i] = total
    cap_headroom = np.asarray(
        [
            np.asarray(s.cap_watts_by_slot) - base_later.get(b.name, 0.0)
            for s, b in zip(settings, budgets, strict=True)
        ]
    ).reshape(len(budgets), slots)
    for i, b in enumerate(budgets):
        cap_headroom[i, 0] -= base_now.get(b.name, 0.0) - base_later.get(b.name, 0.0)
    scopes = _Scopes(plan_input)
    points: PointCache = {}
    replica_points: ReplicaPointCache = {}
    figures: LimitFigureCache = {}
    in_use = [n for n in nodes if n.schedulable or n.keeps_running]
    total_gpus = np.full(slots, float(sum(settled_by_name[n.name].gpu_count for n in in_use)))
    total_gpus[0] -= sum(n.leaving_gpus for n in in_use)

    # Workloads: inference is a load per slot; deadline and batch work get columns.
    inference: list[tuple[Workload, OperatingPoint, Scope]] = []
    flexible: list[tuple[Workload, OperatingPoint, Scope]] = []
    for workload in plan_input.workloads:
        product, scope = scopes.of(workload)
        if product is None:
            continue  # no node can run it: the one-instant planner says why
        inference_type = workload.type is WorkloadType.INFERENCE
        if not inference_type:
            # Deadline and batch work is planned at one point wherever it runs now: the point
            # decides how much of the time left it needs, so at the point of the product it runs
            # on, a job started on a faster product than its least-energy one saw hours to spare
            # and was stopped, and stopped it saw none and was started again, round after round.
            product = scopes.may_use(workload)[0] or product
        point = _best_point(
            workload,
            product,
            model,
            levels,
            points,
            replicas=1 if inference_type else workload.replicas,
            efficient=inference_type,
            replica_cache=replica_points,
            figures=figures,
        )
        # A service is sized at its least energy per token whatever limit it runs at now; the
        # program may run it at a higher limit on fewer GPUs (`_Narrowing`).
        (inference if inference_type else flexible).append((workload, point, scope))
    inference_scope = {workload.key: scope for workload, _, scope in inference}
    load = _inference_load(
        horizon, inference, len(budgets), watts, model=model, levels=levels, figures=figures
    )
    cap_headroom -= load.cap_watts
    load_watts = idle_watts[:, None] + load.busy_watts  # expected draw: idle + inference
    # GPUs left beside the services at their least energy (the rows' bound; below 0 where they
    # need more than there are), and at their fewest (what a slot can ever open to work).
    free_gpus = total_gpus - load.gpus.sum(axis=0)
    fewest_gpus = load.gpus - sum(step.gpus_freed for step in load.narrowing)
    most_free_gpus = total_gpus - fewest_gpus.sum(axis=0)

    rows = _Rows()
    whole_nodes = _whole_node_rows(
        rows,
        [(scopes.may_use(workload)[0], workload.gpus_per_pod) for workload, _, _ in flexible],
        [scopes.may_use(workload)[0] for workload, _, _ in inference],
        load.gpus,
        fewest_gpus,
        now=in_use,
        later=[settled_by_name[node.name] for node in in_use],
    )
    row_of_cap = [
        [
            rows.add(f"cap_{b.name}_{s}", -math.inf, max(0.0, cap_headroom[i, s]))
            for s in range(slots)
        ]
        for i, b in enumerate(budgets)
    ]
    row_of_gpus = [rows.add(f"gpus_{s}", -math.inf, free_gpus[s]) for s in range(slots)]
    # Allowance rows: (budget, period) -> row, with what is left for flexible work.
    energy_rows: dict[tuple[int, int], int] = {}
    carbon_rows: dict[tuple[int, int], int] = {}
    energy_over = np.zeros(len(budgets))
    carbon_over = np.zeros(len(budgets))
    load_kwh = load_watts * slot_hours[None, :] / 1000.0 * pue[:, None]
    load_kg = load_kwh * intensity_kg
    for i, setting in enumerate(settings):
        for p, period in enumerate(setting.periods):
            window = slice(period.first_slot, period.end_slot)
            if period.energy_kwh_left is not None:
                left = period.energy_kwh_left - float(load_kwh[i, window].sum())
                if p == 0:
                    energy_over[i] = max(0.0, -left)
                energy_rows[i, p] = rows.add(f"energy_{setting.name}_{p}", -math.inf, max(0, left))
            if period.carbon_kg_left is not None:
                left = period.carbon_kg_left - float(load_kg[i, window].sum())
                if p == 0:
                    carbon_over[i] = max(0.0, -left)
                carbon_rows[i, p] = rows.add(f"carbon_{setting.name}_{p}", -math.inf, max(0, left))
    objective_rate = np.zeros((len(budgets), slots))  # objective units per kWh, per budget
    for i, setting in enumerate(settings):
        # Carbon without a forecast has no view on time (0): the other budgets of the work
        # decide, or, when none has a view, energy.
        if setting.objective is Objective.ENERGY:
            objective_rate[i] = 1.0
        else:
            objective_rate[i] = intensity_kg[i]

    # Row of each (budget, slot) for the cap, the energy and the carbon allowance (-1: none).
    energy_row = np.full((len(budgets), slots), -1, dtype=np.int64)
    carbon_row = np.full((len(budgets), slots), -1, dtype=np.int64)
    for (i, p), row in energy_rows.items():
        period = settings[i].periods[p]
        energy_row[i, period.first_slot : period.end_slot] = row
    for (i, p), row in carbon_rows.items():
        period = settings[i].periods[p]
        carbon_row[i, period.first_slot : period.end_slot] = row
    work = _work(flexible, len(budgets), model, watts, {c.workload for c in plan_input.current})
    # A slot is closed to work that does not fit at once beside the services there (on their
    # fewest GPUs): the rows count GPU- and node-hours, and a gang bigger than what is left would
    # meet them by running part of the slot, on GPUs it never has all together. Work that runs
    # now keeps its first.
    fits = (work.gpus[:, None] <= most_free_gpus[None, :] + 1e-9) & (
        (work.gpus / work.gpus_per_pod)[:, None] <= whole_nodes.most_left + 1e-9
    )
    fits[:, 0] |= work.running
    cap_row = np.asarray(row_of_cap, dtype=np.int64).reshape(len(budgets), slots)
    gpus_row = np.asarray(row_of_gpus, dtype=np.int64)
    budget_rows = _BudgetRows(
        cap_row=cap_row,
        energy_row=energy_row,
        carbon_row=carbon_row,
        objective_rate=objective_rate,
        pue=pue,
        intensity_kg=intensity_kg,
    )
    program = _program(
        work,
        rows,
        budget_rows,
        slot_seconds=slot_seconds,
        gpus_row=gpus_row,
        node_row=whole_nodes.work_row,
        fits=fits,
        churn_threshold=plan_input.options.churn_threshold,
        startup_seconds=plan_input.options.startup_seconds,
    )
    columns = program.columns
    narrowing_columns = []  # per step: its column per service and slot
    for step in load.narrowing:
        step_columns, where = _narrowing_columns(
            step,
            load.part,
            budget_rows,
            first_column=len(columns.cost),
            slot_seconds=slot_seconds,
            gpus_row=gpus_row,
            node_rows=whole_nodes.service_rows,
        )
        columns += step_columns
        narrowing_columns.append(where)
    columns += _shortfall_columns(
        rows,
        np.concatenate([gpus_row, *(group_rows for group_rows, _ in whole_nodes.service_rows)]),
        first_column=len(columns.cost),
        price=SHORTFALL_FACTOR * max(1.0, float(np.abs(columns.cost).max(initial=0.0))),
    )
    built = time.perf_counter()

    solution = _solve(rows, columns)
    solved = time.perf_counter()
    status = HorizonStatus.OPTIMAL if solution is not None else HorizonStatus.FAILED
    values = solution.values if solution is not None else np.zeros(len(columns.cost))
    duals = solution.row_duals if solution is not None else np.zeros(len(rows.names))

    open_slot = program.slot_column >= 0
    shares = np.zeros((len(flexible), slots))
    shares[open_slot] = values[program.slot_column[open_slot]]
    has_miss = program.miss_column >= 0
    missed = np.zeros(len(flexible))
    missed[has_miss] = values[program.miss_column[has_miss]]
    if status is HorizonStatus.FAILED:
        shares[:, 0] = 1.0  # nothing deferred: the one-instant planner decides as before
    shares = np.where(shares > SHARE_EPSILON, shares, 0.0)
    planned_tokens = (shares * slot_seconds[None, :]).sum(axis=1) * work.tokens_per_second
    # kWh of flexible work per budget and slot (x PUE), and its kg CO2.
    flexible_kwh = (
        (work.part @ (shares * work.busy_kw[:, None])) * slot_hours[None, :] * pue[:, None]
    )
    # The services' kWh over their least where they run on fewer GPUs, with their load's.
    narrowed_kw = np.zeros_like(load.gpus)
    if status is HorizonStatus.OPTIMAL:  # else nothing is narrowed
        for step, where in zip(load.narrowing, narrowing_columns, strict=True):
            has_column = where >= 0
            narrowed_kw[has_column] += (
                values[where[has_column]] * step.busy_watts[has_column] / 1000
            )
    service_kwh = load_kwh + ((load.part @ narrowed_kw) * slot_hours[None, :] * pue[:, None])
    flexible_kg = flexible_kwh * intensity_kg
    service_kg = service_kwh * intensity_kg
    outlooks: dict[str, BudgetOutlook] = {}
    for i, setting in enumerate(settings):
        periods = range(len(setting.periods))
        windows = [
            slice(setting.periods[p].first_slot, setting.periods[p].end_slot) for p in periods
        ]
        energy = tuple(float((flexible_kwh[i, w] + service_kwh[i, w]).sum()) for w in windows)
        carbon = tuple(float((flexible_kg[i, w] + service_kg[i, w]).sum()) for w in windows)
        energy_short = (i, 0) in energy_rows and (
            energy_over[i] > 0 or abs(duals[energy_rows[i, 0]]) > 1e-9
        )
        carbon_short = (i, 0) in carbon_rows and (
            carbon_over[i] > 0 or abs(duals[carbon_rows[i, 0]]) > 1e-9
        )
        outlooks[setting.name] = BudgetOutlook(
            name=setting.name,
            energy_kwh_by_period=energy,
            carbon_kg_by_period=carbon,
            energy_short=bool(energy_short),
            carbon_short=bool(carbon_short),
            energy_over_kwh=float(energy_over[i]),
            carbon_over_kg=float(carbon_over[i]),
        )
    short = {
        i
        for i, b in enumerate(budgets)
        if outlooks[b.name].energy_short or outlooks[b.name].carbon_short
    }
    thrifty = frozenset(
        key for key, scope in inference_scope.items() if short & {i for i, _ in scope}
    )
    schedules: dict[str, WorkloadSchedule] = {}
    for f, (workload, point, scope) in enumerate(flexible):
        need = None if math.isnan(work.need[f]) else float(work.need[f])
        schedules[workload.key] = WorkloadSchedule(
            workload=workload.key,
            share_by_slot=tuple(shares[f].tolist()),
            point=point,
            required_tokens=need,
            planned_tokens=float(planned_tokens[f]),
            missed_tokens=0.0 if need is None else float(missed[f]) * need,
            allowance_short=bool(short & {i for i, _ in scope}),
            urgent=need is not None and bool(work.urgent[f]),
        )
    return HorizonPlan(
        status=status,
        objective=solution.objective if solution is not None else 0.0,
        dual_bound=solution.dual_bound if solution is not None else 0.0,
        solve_seconds=solved - built,
        slot_seconds=horizon.slot_seconds,
        schedules=schedules,
        budgets=outlooks,
        thrifty_inference=thrifty,
        timings_seconds={
            "build": built - started,
            "solve": solved - built,
            "extract": time.perf_counter() - solved,
            "total": time.perf_counter() - started,
        },
        size=(len(rows.names), len(columns.cost)),
    )


@dataclass(frozen=True)
class _WholeNodes:
    """The rows of whole nodes: per workload and slot its row (-1: none) and the most nodes
    the slot can leave it (inf: no row; the services at their fewest GPUs); per row group, its
    rows by slot and the nodes each GPU a service frees gives back there."""

    work_row: np.ndarray
    most_left: np.ndarray
    service_rows: list[tuple[np.ndarray, np.ndarray]]


def _whole_node_rows(
    rows: _Rows,
    flexible_pods: list[tuple[str | None, int]],
    service_products: list[str | None],
    service_gpus: np.ndarray,
    fewest_service_gpus: np.ndarray,
    *,
    now: list[GpuNode],
    later: list[GpuNode],
) -> _WholeNodes:
    """Rows for work whose pods each take a whole node (every node of the products it may use
    has exactly a pod's GPUs; `flexible_pods`: those products, comma-separated, and a pod's
    GPUs, per workload): per such group of nodes and slot, the nodes its pods take, within
    the nodes left whole there. The GPU rows count GPUs in aggregate, and a gang of whole nodes
    planned into hours where the services' GPUs leave enough GPUs, but spread over every node,
    never starts. A service's GPUs in a slot count on a group in the share of the GPUs it may
    use that the group's products hold (where it may be placed), packed onto as few nodes as
    they fill; nodes that hold another team's GPUs are not whole. The bound counts the services
    at `service_gpus` (below 0 where they fill more nodes than the group has); the GPUs they free
    running on fewer give nodes back in that share."""
    slots = service_gpus.shape[1]
    node_row = np.full((len(flexible_pods), slots), -1, dtype=np.int64)
    most_left = np.full((len(flexible_pods), slots), math.inf)
    service_rows: list[tuple[np.ndarray, np.ndarray]] = []
    sizes: dict[str, set[int]] = {}  # GPUs per node, by product
    product_gpus: dict[str, int] = {}
    for node in later:
        sizes.setdefault(node.product, set()).add(node.gpu_count)
        product_gpus[node.product] = product_gpus.get(node.product, 0) + node.gpu_count
    service_may_use = [found.split(",") if found else [] for found in service_products]
    groups: dict[tuple[frozenset[str], int], list[int]] = {}
    for f, (may_use, pod_gpus) in enumerate(flexible_pods):
        if _takes_whole_nodes(may_use, pod_gpus, sizes):
            products = frozenset(may_use.split(",")) if may_use else frozenset()
            groups.setdefault((products, pod_gpus), []).append(f)
    for (products, node_gpus), members in sorted(
        groups.items(), key=lambda item: (sorted(item[0][0]), item[0][1])
    ):
        share = np.asarray(
            [
                sum(product_gpus.get(p, 0) for p in found if p in products)
                / max(1, sum(product_gpus.get(p, 0) for p in found))
                for found in service_may_use
            ]
        ).reshape(-1, 1)
        whole = np.full(slots, float(_whole_nodes(later, products, node_gpus)))
        whole[0] = _whole_nodes(now, products, node_gpus)
        bound, most = (
            whole - np.ceil((share * gpus).sum(axis=0) / node_gpus - 1e-9)
            for gpus in (service_gpus, fewest_service_gpus)
        )
        name = ",".join(sorted(products))
        group_rows = np.asarray(
            [
                rows.add(f"nodes_{name}_{node_gpus}_{s}", -math.inf, float(bound[s]))
                for s in range(slots)
            ],
            dtype=np.int64,
        )
        node_row[members] = group_rows
        most_left[members] = np.maximum(most, 0.0)
        service_rows.append((group_rows, share[:, 0] / node_gpus))
    return _WholeNodes(node_row, most_left, service_rows)


def _whole_nodes(nodes: list[GpuNode], products: frozenset[str], node_gpus: int) -> int:
    """Schedulable nodes of these products with `node_gpus` GPUs and none of another team's."""
    return sum(
        1
        for node in nodes
        if node.schedulable
        and node.product in products
        and node.gpu_count == node_gpus
        and node.unmanaged_gpus == 0
    )


@dataclass(frozen=True)
class _Narrowing:
    """A service may run at a higher limit than its least energy per token, on fewer GPUs: what
    the one-instant planner does when work needs the GPUs (a service of the 48-hour simulation
    ran 6 replicas at 200 W while the jobs waited, 3 at 450 W while they ran). One step of it
    (`_inference_load` makes two), per service and slot: the GPUs it frees, the limits above
    the floor it adds (W) and the draw above idle it adds for the expected demand (W). The
    program takes it for a share of the slot (`_narrowing_columns`)."""

    gpus_freed: np.ndarray
    cap_watts: np.ndarray
    busy_watts: np.ndarray


@dataclass(frozen=True)
class _InferenceLoad:
    """What inference takes per budget and slot at its least energy per token: its limits
    above the floor (W), its draw above idle (W); per service and slot, its GPUs; and how it
    may run on fewer GPUs."""

    cap_watts: np.ndarray
    busy_watts: np.ndarray
    gpus: np.ndarray
    narrowing: tuple[_Narrowing, ...]
    part: np.ndarray  # (budgets, services): the share of each service in each budget


def _inference_load(
    horizon: HorizonInput,
    inference: list[tuple[Workload, OperatingPoint, Scope]],
    budget_count: int,
    watts: _ProductWatts,
    *,
    model: PerformanceModel,
    levels: int,
    figures: LimitFigureCache,
) -> _InferenceLoad:
    """Each service's replicas per slot, within its min and max replicas, at its point in
    `inference` and at each higher limit it may run at: GPUs and limits for its forecast
    demand (else its tokens/s), draw for what it is expected to need."""
    slots = len(horizon.slot_seconds)
    demand = np.zeros((len(inference), slots))
    expected = np.zeros((len(inference), slots))
    low = np.zeros(len(inference))
    high = np.zeros(len(inference))
    gpus_per_replica = np.zeros(len(inference))
    # Per setting (each service's point, then its higher limits): its service, tokens/s per
    # replica, W of limit above the floor and W drawn above idle per GPU.
    setting_service: list[int] = []
    per_replica: list[float] = []
    cap_per_gpu: list[float] = []
    busy_per_gpu: list[float] = []
    for n, (workload, point, _) in enumerate(inference):
        forecast = horizon.inference_demand.get(workload.key)
        demand[n] = forecast if forecast is not None else (workload.tokens_per_second or 0.0)
        likely = horizon.inference_expected_demand.get(workload.key)
        expected[n] = np.minimum(demand[n], likely) if likely is not None else demand[n]
        low[n], high[n] = workload.min_replicas, workload.max_replicas
        gpus_per_replica[n] = workload.gpus_per_replica
        above = [
            point_at_limit(workload, point.product, level, model=model, figures=figures)
            for level in _levels(workload, point.product, levels, efficient=True)
            if level > point.power_limit_watts
        ]
        for setting in (point, *above):
            busy, cap = watts.above_floor(setting)
            setting_service.append(n)
            per_replica.append(setting.tokens_per_second / setting.replicas)
            cap_per_gpu.append(cap)
            busy_per_gpu.append(busy)
    service = np.asarray(setting_service, dtype=np.int64)
    rate = np.asarray(per_replica)[:, None]
    replicas_needed = np.ceil(demand[service] / rate - 1e-9)
    gpus = np.clip(replicas_needed, low[service, None], high[service, None])
    gpus *= gpus_per_replica[service, None]
    replicas_expected = np.ceil(expected[service] / rate - 1e-9)
    busy_gpus = np.clip(replicas_expected, low[service, None], high[service, None])
    busy_gpus *= gpus_per_replica[service, None]
    cap = gpus * np.asarray(cap_per_gpu)[:, None]
    busy = busy_gpus * np.asarray(busy_per_gpu)[:, None]
    # Each service's first setting is its point, the others (J of them at most) higher limits.
    first = np.searchsorted(service, np.arange(len(inference)))
    count = np.diff(np.append(first, len(service)))
    higher = np.arange(1, max(2, int(count.max(initial=1))))[:, None]  # (J, 1)
    has = higher < count[None, :]  # (J, services)
    option = np.where(has, first[None, :] + higher, first[None, :])
    freed = np.where(has[..., None], gpus[first] - gpus[option], 0.0)  # (J, services, slots)
    cap_added = cap[option] - cap[first][None]
    busy_added = busy[option] - busy[first][None]
    frees = freed > 0
    # Step 1: the higher limit that adds the least draw per GPU freed (the most GPUs on a tie);
    # step 2: on to the one with the fewest GPUs (the least draw on a tie). Step 2 adds at least
    # as much per GPU as step 1, so the program takes it only after step 1.
    per_gpu = np.where(frees, busy_added / np.maximum(freed, 1.0), math.inf) - 1e-9 * freed
    cheapest = np.argmin(per_gpu, axis=0)[None]
    fewest = np.argmax(np.where(frees, freed - 1e-9 * busy_added, -math.inf), axis=0)[None]
    valid = frees.any(axis=0)

    def at(table: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        return np.where(valid, np.take_along_axis(table, chosen, axis=0)[0], 0.0)

    steps = []
    for before, after in ((None, cheapest), (cheapest, fewest)):
        step = [
            at(table, after) - (0.0 if before is None else at(table, before))
            for table in (freed, cap_added, busy_added)
        ]
        steps.append(_Narrowing(gpus_freed=step[0], cap_watts=step[1], busy_watts=step[2]))
    part = _budget_shares(inference, budget_count)
    return _InferenceLoad(
        cap_watts=part @ cap[first],
        busy_watts=part @ busy[first],
        gpus=gpus[first],
        narrowing=tuple(steps),
        part=part,
    )


# Deadline work keeps this much time to spare (the larger of the two): the forecast errs, work
# that arrives later takes the hours it was planned into, a gang waits for whole nodes, and the
# one-instant planner may place work later or at a lower limit than the horizon's point. The
# plan has it finish this much before its deadline; with less to spare it is urgent: handed to
# the one-instant planner, which runs it now wherever it fits.
DEADLINE_MARGIN_SECONDS = SECONDS_PER_HOUR
DEADLINE_MARGIN_SHARE = 0.25  # of the time the work needs at its point


def margin_seconds(needed_seconds: np.ndarray | float) -> np.ndarray:
    """The time to spare that work needing `needed_seconds` running keeps (elementwise)."""
    return np.maximum(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * np.asarray(needed_seconds))


def is_urgent(
    deadline_seconds: np.ndarray | float, needed_seconds: np.ndarray | float
) -> np.ndarray:
    """Whether work due in `deadline_seconds` that needs `needed_seconds` running has less
    than its margin to spare (elementwise)."""
    return np.asarray(needed_seconds + margin_seconds(needed_seconds) >= deadline_seconds)


@dataclass(frozen=True)
class _Work:
    """The deadline and batch workloads as arrays (index f, in input order), so that the program
    is built without a loop over them."""

    keys: list[str]
    part: np.ndarray  # (budgets, f): the share of each workload that counts in each budget
    gpus: np.ndarray
    gpus_per_pod: np.ndarray
    busy_kw: np.ndarray  # draw above idle while it runs
    cap_watts: np.ndarray  # limits above the floor while it runs
    tokens_per_second: np.ndarray
    need: np.ndarray  # tokens its deadline needs; NaN: no deadline (or no amount of work)
    deadline_seconds: np.ndarray  # inf where `need` is NaN
    urgent: np.ndarray  # less than its margin to spare (`is_urgent`)
    # What the plan aims for: the deadline less its margin, so that work planned into its last
    # hours still has the margin when it starts late or is held back; urgent work, the deadline.
    planned_deadline_seconds: np.ndarray
    weight: np.ndarray  # its priority's weight
    running: np.ndarray  # runs now: stopping it has a price
    preemptible: np.ndarray  # may be stopped at all (running work that is not is never deferred)


def _work(
    flexible: list[tuple[Workload, OperatingPoint, Scope]],
    budget_count: int,
    model: PerformanceModel,
    watts: _ProductWatts,
    running_keys: set[str],
) -> _Work:
    count = len(flexible)
    gpus, busy_kw, cap_watts, rate, need, deadline, priority = (np.zeros(count) for _ in range(7))
    for f, (workload, point, _) in enumerate(flexible):
        gpus[f] = point.gpus
        busy_per_gpu, cap_per_gpu = watts.above_floor(point)
        busy_kw[f] = point.gpus * busy_per_gpu / 1000.0
        cap_watts[f] = point.gpus * cap_per_gpu
        rate[f] = point.tokens_per_second
        tokens_left = remaining_tokens(model, workload)
        if workload.deadline_seconds is not None and tokens_left is not None:
            need[f], deadline[f] = tokens_left, workload.deadline_seconds
        else:
            need[f], deadline[f] = math.nan, math.inf
        priority[f] = workload.priority
    ranks = np.unique(priority)
    factor = PRIORITY_FACTOR
    if len(ranks) > 1:
        factor = min(factor, MAX_PRIORITY_RANGE ** (1 / (len(ranks) - 1)))
    weight = factor ** np.searchsorted(ranks, priority).astype(float)
    needed_seconds = need / np.maximum(rate, 1e-9)  # NaN without a deadline
    urgent = is_urgent(deadline, needed_seconds)
    margin = np.where(urgent | np.isnan(need), 0.0, margin_seconds(needed_seconds))
    return _Work(
        keys=[workload.key for workload, _, _ in flexible],
        part=_budget_shares(flexible, budget_count),
        gpus=gpus,
        gpus_per_pod=np.asarray([w.gpus_per_pod for w, _, _ in flexible], dtype=float),
        busy_kw=busy_kw,
        cap_watts=cap_watts,
        tokens_per_second=rate,
        need=need,
        deadline_seconds=deadline,
        urgent=urgent,
        planned_deadline_seconds=deadline - margin,
        weight=weight,
        running=np.asarray([w.key in running_keys for w, _, _ in flexible], dtype=bool),
        preemptible=np.asarray([w.preemptible for w, _, _ in flexible], dtype=bool),
    )


@dataclass(frozen=True)
class _BudgetRows:
    """What a column's limits and energy count in, per budget and slot: the rows of the cap and
    of the energy and carbon allowances (-1: none), and the objective units, PUE and kg CO2 per
    kWh."""

    cap_row: np.ndarray
    energy_row: np.ndarray
    carbon_row: np.ndarray
    objective_rate: np.ndarray
    pue: np.ndarray
    intensity_kg: np.ndarray

    def rate(self, part: np.ndarray) -> np.ndarray:
        """(items, slots): objective units per kWh of each item (`part`: its share in each
        budget); budgets without a view on time (rate 0) add nothing; where none has one, 1."""
        rate = np.zeros((part.shape[1], self.objective_rate.shape[1]))
        for i in range(len(self.pue)):
            rate += part[i][:, None] * self.objective_rate[i][None, :] * self.pue[i]
        rate[~rate.any(axis=1)] = 1.0
        return rate

    def entries(
        self,
        part: np.ndarray,
        item: np.ndarray,
        slot: np.ndarray,
        ids: np.ndarray,
        *,
        cap_watts: np.ndarray,
        kwh: np.ndarray,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, columns, values) of columns `ids`, each of an item and slot with `cap_watts`
        of limits and `kwh` of draw, in each budget by the item's share there (`part`)."""
        out = []
        for i in range(len(self.pue)):
            counts = part[i, item] > 0
            share, s_in, ids_in = part[i, item[counts]], slot[counts], ids[counts]
            out.append((self.cap_row[i, s_in], ids_in, share * cap_watts[counts]))
            kwh_in = share * kwh[counts] * self.pue[i]
            for table, values in (
                (self.energy_row, kwh_in),
                (self.carbon_row, kwh_in * self.intensity_kg[i, s_in]),
            ):
                found = table[i, s_in] >= 0
                out.append((table[i, s_in][found], ids_in[found], values[found]))
        return out


@dataclass(frozen=True)
class _Columns:
    """Columns of the program: min cost . x, 0 <= x <= upper, entries as triplets."""

    cost: np.ndarray
    upper: np.ndarray
    row_index: np.ndarray
    column_index: np.ndarray
    value: np.ndarray

    def __add__(self, other: _Columns) -> _Columns:
        """These columns, then `other`'s (numbered after them)."""
        return _Columns(
            *(
                np.concatenate((mine, theirs))
                for mine, theirs in (
                    (self.cost, other.cost),
                    (self.upper, other.upper),
                    (self.row_index, other.row_index),
                    (self.column_index, other.column_index),
                    (self.value, other.value),
                )
            )
        )


@dataclass(frozen=True)
class _Program:
    """The columns of the deadline and batch work, and where each workload's are."""

    columns: _Columns
    slot_column: np.ndarray  # (f, slot): its share of the slot; -1 where the slot is closed
    miss_column: np.ndarray  # (f,): the share of its deadline missed; -1: no deadline row


def _program(
    work: _Work,
    rows: _Rows,
    budget_rows: _BudgetRows,
    *,
    slot_seconds: np.ndarray,
    gpus_row: np.ndarray,
    node_row: np.ndarray,
    fits: np.ndarray,
    churn_threshold: float,
    startup_seconds: float,
) -> _Program:
    """The columns of the deadline and batch work, all at once: per workload its open slots,
    then, with a deadline, the work after the horizon and the miss; adds the deadline rows.

    Work that runs now pays for stopping: its first slot is cheaper by what a restart costs
    (`startup_seconds` of its draw with no progress, at the horizon's mean rate) plus
    `churn_threshold` of what the slot costs, so it stops only for a saving larger than both, as
    the one-instant planner moves a replica only for one larger than the churn threshold. Without
    it, work that costs the same in every slot (one budget, one intensity per slot) is a tie the
    solver breaks anew each round: jobs swapped in and out every round, each swap a restart.
    Running work that is not preemptible is never deferred: its first slot is worth running as
    work without a deadline is. A slot where `fits` is False is closed to the work."""
    slots = len(slot_seconds)
    slot_hours = slot_seconds / SECONDS_PER_HOUR
    slot_start = np.concatenate(([0.0], np.cumsum(slot_seconds)[:-1]))
    horizon_seconds = float(slot_seconds.sum())
    tie_break = 1.0 + EARLY_TIE_BREAK * np.arange(slots)
    kwh = work.busy_kw[:, None] * slot_hours[None, :]
    # Objective units per kWh in each slot: the budgets' rates, weighted by the share of the work
    # each one counts.
    rate = budget_rows.rate(work.part)
    cost = kwh * rate * tie_break[None, :]
    # Scale of the work's worth: its energy in the most expensive slot of the horizon.
    worth_per_kwh = WORK_WEIGHT * rate.max(axis=1) * tie_break[-1] * work.weight
    with_deadline = ~np.isnan(work.need)
    # No deadline: running is worth more than what it costs.
    cost = np.where(
        with_deadline[:, None], cost, cost - worth_per_kwh[:, None] * kwh - 1e-6 * slot_hours
    )
    open_seconds = np.clip(
        work.planned_deadline_seconds[:, None] - slot_start[None, :], 0.0, slot_seconds[None, :]
    )
    upper = np.where(fits, open_seconds / slot_seconds[None, :], 0.0)
    # The price of stopping, per share of the first slot it is open for (the whole price when
    # the work runs through the slot, none of it when it runs none of the slot).
    restart = startup_seconds / SECONDS_PER_HOUR * work.busy_kw * rate.mean(axis=1)
    first_open = np.maximum(upper[:, 0], SHARE_EPSILON)
    stop_price = np.where(
        work.preemptible,
        restart / first_open + churn_threshold * np.abs(cost[:, 0]),
        worth_per_kwh * kwh[:, 0],
    )
    cost[:, 0] -= np.where(work.running, stop_price, 0.0)
    after = np.where(
        with_deadline, np.maximum(0.0, work.planned_deadline_seconds - horizon_seconds), 0.0
    )

    # Column numbers: each workload's open slots, then its after and miss columns.
    is_open = upper > 0
    open_count = is_open.sum(axis=1)
    has_row = with_deadline & (np.nan_to_num(work.need) > 0)
    has_after = has_row & (after > 0)
    count = open_count + has_row + has_after
    first = np.cumsum(count) - count
    slot_column = np.where(is_open, first[:, None] + np.cumsum(is_open, axis=1) - 1, -1)
    f_open, s_open = np.nonzero(is_open)
    ids = slot_column[f_open, s_open]
    after_column = (first + open_count)[has_after]
    miss_column = np.where(has_row, first + open_count + has_after, -1)
    columns = int(count.sum())
    column_cost = np.empty(columns)
    column_upper = np.ones(columns)
    column_cost[ids] = cost[f_open, s_open]
    column_upper[ids] = upper[f_open, s_open]

    whole = node_row[f_open, s_open] >= 0
    entry_rows = [gpus_row[s_open], node_row[f_open, s_open][whole]]
    entry_columns = [ids, ids[whole]]
    entry_values = [work.gpus[f_open], (work.gpus / work.gpus_per_pod)[f_open][whole]]
    for in_rows, in_columns, values in budget_rows.entries(
        work.part, f_open, s_open, ids, cap_watts=work.cap_watts[f_open], kwh=kwh[f_open, s_open]
    ):
        entry_rows.append(in_rows)
        entry_columns.append(in_columns)
        entry_values.append(values)

    # The deadline: the slots, the time after the horizon (at the horizon's mean cost: work
    # waits past it only where the horizon has no cheaper slot), or a miss.
    deadline_row = np.full(len(work.keys), -1, dtype=np.int64)
    for f in np.nonzero(has_row)[0]:
        deadline_row[f] = rows.add(f"deadline_{work.keys[f]}", 1.0, math.inf)
    need = np.where(has_row, work.need, 1.0)
    in_row = has_row[f_open]
    entry_rows.append(deadline_row[f_open[in_row]])
    entry_columns.append(ids[in_row])
    entry_values.append(
        work.tokens_per_second[f_open[in_row]] * slot_seconds[s_open[in_row]] / need[f_open[in_row]]
    )
    entry_rows.append(deadline_row[has_after])
    entry_columns.append(after_column)
    entry_values.append((work.tokens_per_second * after / need)[has_after])
    mean_cost = np.mean(cost / slot_hours[None, :], axis=1) * after / SECONDS_PER_HOUR
    column_cost[after_column] = (mean_cost * tie_break[-1])[has_after]
    entry_rows.append(deadline_row[has_row])
    entry_columns.append(miss_column[has_row])
    entry_values.append(np.ones(int(has_row.sum())))
    hours_needed = need / work.tokens_per_second / SECONDS_PER_HOUR
    miss = DEADLINE_WEIGHT * worth_per_kwh * work.busy_kw * np.maximum(hours_needed, 1e-3) + 1.0
    column_cost[miss_column[has_row]] = miss[has_row]

    return _Program(
        columns=_Columns(
            cost=column_cost,
            upper=column_upper,
            row_index=np.concatenate(entry_rows).astype(np.int32),
            column_index=np.concatenate(entry_columns).astype(np.int32),
            value=np.concatenate(entry_values).astype(float),
        ),
        slot_column=slot_column,
        miss_column=miss_column,
    )


def _narrowing_columns(
    narrowing: _Narrowing,
    part: np.ndarray,
    budget_rows: _BudgetRows,
    *,
    first_column: int,
    slot_seconds: np.ndarray,
    gpus_row: np.ndarray,
    node_rows: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[_Columns, np.ndarray]:
    """Per service and slot where running at a higher limit frees GPUs (`_Narrowing`), the
    share of the slot it runs there: it gives back those GPUs (and whole nodes, in the share of
    its GPUs the group holds), takes that setting's limits and energy over its least (`part`:
    each service's share per budget) and costs that energy at the slot's rate. The columns are
    numbered from `first_column`; returns them and each one's column per slot (-1: none)."""
    slots = len(slot_seconds)
    slot_hours = slot_seconds / SECONDS_PER_HOUR
    tie_break = 1.0 + EARLY_TIE_BREAK * np.arange(slots)
    n_open, s_open = np.nonzero(narrowing.gpus_freed > 0)
    ids = first_column + np.arange(len(n_open))
    column = np.full(narrowing.gpus_freed.shape, -1, dtype=np.int64)
    column[n_open, s_open] = ids
    kwh = narrowing.busy_watts[n_open, s_open] / 1000.0 * slot_hours[s_open]
    rate = budget_rows.rate(part)

    freed = narrowing.gpus_freed[n_open, s_open]
    entry_rows = [gpus_row[s_open]]
    entry_columns = [ids]
    entry_values = [-freed]
    for group_rows, nodes_per_gpu in node_rows:
        counts = nodes_per_gpu[n_open] > 0
        entry_rows.append(group_rows[s_open[counts]])
        entry_columns.append(ids[counts])
        entry_values.append(-freed[counts] * nodes_per_gpu[n_open[counts]])
    for in_rows, in_columns, values in budget_rows.entries(
        part, n_open, s_open, ids, cap_watts=narrowing.cap_watts[n_open, s_open], kwh=kwh
    ):
        entry_rows.append(in_rows)
        entry_columns.append(in_columns)
        entry_values.append(values)
    return (
        _Columns(
            cost=kwh * rate[n_open, s_open] * tie_break[s_open],
            upper=np.ones(len(n_open)),
            row_index=np.concatenate(entry_rows).astype(np.int32),
            column_index=np.concatenate(entry_columns).astype(np.int32),
            value=np.concatenate(entry_values).astype(float),
        ),
        column,
    )


# What a GPU (or whole node) the services lack costs, relative to the costliest column: more
# than any work's miss or any narrowing, so that it never makes room for work.
SHORTFALL_FACTOR = 10.0


def _shortfall_columns(
    rows: _Rows, row_ids: np.ndarray, first_column: int, price: float
) -> _Columns:
    """Where the services at their least energy take more GPUs (or whole nodes) than there are
    (a row of `row_ids` with an upper bound below 0), a column for what they lack, up to that
    much, at `price` each: the program stays feasible when running them on fewer cannot make
    up for it (the cap or an allowance), and never plans work onto what they lack."""
    upper = np.asarray(rows.upper)[row_ids]
    short = upper < 0
    count = int(short.sum())
    return _Columns(
        cost=np.full(count, price),
        upper=-upper[short],
        row_index=row_ids[short].astype(np.int32),
        column_index=(first_column + np.arange(count)).astype(np.int32),
        value=-np.ones(count),
    )


@dataclass(frozen=True)
class _Solution:
    values: np.ndarray
    objective: float
    # The dual objective of HiGHS's dual values: a lower bound on the optimum.
    dual_bound: float
    row_duals: np.ndarray


def _solve(rows: _Rows, program: _Columns) -> _Solution | None:
    """Solve the program with HiGHS (dual simplex); None when it finds no optimum."""
    columns = len(program.cost)
    lower = np.asarray(rows.lower)
    upper = np.asarray(rows.upper)
    if columns == 0:
        return _Solution(np.zeros(0), 0.0, 0.0, np.zeros(len(rows.names)))
    # An upper-bound row no choice of shares can break (the most it can reach, every column with
    # a positive entry at its upper bound, stays within the bound) is handed over empty: HiGHS's
    # presolve would drop it too, but only after reading its entries (most of them when caps and
    # allowances have room).
    most = np.bincount(
        program.row_index,
        weights=np.maximum(program.value, 0.0) * program.upper[program.column_index],
        minlength=len(rows.names),
    )
    slack = (most <= upper) & (lower == -math.inf)
    kept = (program.value != 0.0) & ~slack[program.row_index]
    program = dataclasses.replace(
        program,
        row_index=program.row_index[kept],
        column_index=program.column_index[kept],
        value=program.value[kept],
    )
    # Column-wise, rows ascending within each column.
    order = np.argsort(
        program.column_index.astype(np.int64) * len(rows.names) + program.row_index,
        kind="stable",
    )
    column_index = program.column_index[order]
    starts = np.searchsorted(column_index, np.arange(columns + 1)).astype(np.int32)
    lp = highspy.HighsLp()
    lp.num_col_ = columns
    lp.num_row_ = len(rows.names)
    lp.col_cost_ = program.cost
    lp.col_lower_ = np.zeros(columns)
    lp.col_upper_ = program.upper
    lp.row_lower_ = lower
    lp.row_upper_ = upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = starts
    lp.a_matrix_.index_ = program.row_index[order]
    lp.a_matrix_.value_ = program.value[order]
    lp.row_names_ = rows.names
    _highs_available()  # constructs HiGHS once with stdout closed: its banner is not printed
    solver = highspy.Highs()  # type: ignore[no-untyped-call]
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("threads", 1)
    solver.setOptionValue("random_seed", 0)
    solver.setOptionValue("presolve_rule_off", PRESOLVE_RULES_OFF)
    solver.passModel(lp)
    solver.run()
    if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    solution = solver.getSolution()
    row_duals = np.asarray(solution.row_dual)
    column_duals = np.asarray(solution.col_dual)
    # Each dual value prices the bound it pushes against (a lower bound where positive); a bound
    # at infinity has a zero dual in an optimum, up to HiGHS's dual feasibility tolerance.
    row_bound = np.where(row_duals > 0, lower, upper)
    priced = np.isfinite(row_bound)
    column_bound = np.where(column_duals > 0, 0.0, program.upper)
    dual_bound = float(row_duals[priced] @ row_bound[priced] + column_duals @ column_bound)
    return _Solution(
        values=np.asarray(solution.col_value),
        objective=float(solver.getInfo().objective_function_value),
        dual_bound=dual_bound,
        row_duals=row_duals,
    )


# -- the first slot --------------------------------------------------------------------------------


class DeferralCause(StrEnum):
    # A later slot is cleaner (carbon objective) and the deadline leaves time.
    CARBON = "Carbon"
    # The period's kWh or kg CO2 allowance has no room now.
    ALLOWANCE = "Allowance"
    # A cap leaves no room for it now (e.g. a demand-response window).
    CAP = "PowerCap"


@dataclass(frozen=True)
class Deferral:
    """A workload with work left that the horizon does not run in the first slot."""

    workload: str
    cause: DeferralCause
    # Seconds from now until the slot it runs in; None: not within the horizon.
    until_seconds: float | None
    # The budget that decided (the first of its budgets with a short allowance or a forecast).
    budget: str | None = None
    # Forecast intensity (g/kWh) now and in the slot it runs in, where the budget has a forecast.
    grams_per_kwh_now: float | None = None
    grams_per_kwh_then: float | None = None


def planned_starts(horizon: HorizonInput, plan: HorizonPlan) -> dict[str, float]:
    """When the plan starts each workload whose pods each take a whole node and that does not
    run now: seconds from now to the start of the first slot it has work in (0: this round
    hands it to the one-instant planner). The caller keeps the earliest it was given and marks
    the workload overdue once a round at or after that time has passed (`HorizonInput.overdue`).
    Work the plan runs in no slot of the horizon has no planned start."""
    plan_input = horizon.plan_input
    running = {c.workload for c in plan_input.current}
    scopes = _Scopes(plan_input)
    sizes: dict[str, set[int]] = {}
    for node in plan_input.nodes:
        sizes.setdefault(node.product, set()).add(node.gpu_count)
    starts = {}
    for workload in plan_input.workloads:
        schedule = plan.schedules.get(workload.key)
        if workload.key in running or schedule is None or not _has_work(schedule):
            continue
        if not _takes_whole_nodes(scopes.may_use(workload)[0], workload.gpus_per_pod, sizes):
            continue
        slot = 0 if not schedule.waits else schedule.next_slot
        if slot is not None:
            starts[workload.key] = plan.slot_start_seconds(slot)
    return starts


def _takes_whole_nodes(may_use: str | None, pod_gpus: int, sizes: Mapping[str, set[int]]) -> bool:
    """Every node of the products a workload may use (comma-separated) that fits its pod has
    exactly the pod's GPUs."""
    products = may_use.split(",") if may_use else []
    return {count for p in products for count in sizes.get(p, ()) if count >= pod_gpus} == {
        pod_gpus
    }


def _may_defer(workload: Workload, running: set[str]) -> bool:
    """Running work that is not preemptible is never stopped for the horizon."""
    return workload.key not in running or workload.preemptible


def deferrals(horizon: HorizonInput, plan: HorizonPlan) -> tuple[Deferral, ...]:
    """Why each deferred workload waits, and until when (by workload key)."""
    plan_input = horizon.plan_input
    running = {c.workload for c in plan_input.current}
    by_key = {w.key: w for w in plan_input.workloads}
    scopes = _Scopes(plan_input)
    out = []
    for key in plan.deferred:
        workload = by_key[key]
        if not _may_defer(workload, running):
            continue
        schedule = plan.schedules[key]
        scope = [plan_input.budgets[i].name for i, _ in scopes.of(workload)[1]]
        short = [b for b in scope if plan.budgets[b].energy_short or plan.budgets[b].carbon_short]
        slot = schedule.next_slot
        until = None if slot is None else plan.slot_start_seconds(slot)
        forecast = [
            b
            for b in scope
            if b in horizon.budgets and horizon.budgets[b].carbon_grams_per_kwh_by_slot
        ]
        budget = short[0] if short else (forecast[0] if forecast else (scope[0] if scope else None))
        now_g = then_g = None
        if budget is not None and budget in horizon.budgets:
            profile = horizon.budgets[budget].carbon_grams_per_kwh_by_slot
            if profile:
                now_g = profile[0]
                then_g = profile[slot] if slot is not None else None
        if short:
            cause = DeferralCause.ALLOWANCE
        elif now_g is not None and then_g is not None and then_g < now_g:
            cause = DeferralCause.CARBON
        else:
            cause = DeferralCause.CAP
        out.append(Deferral(key, cause, until, budget, now_g, then_g))
    return tuple(out)


def first_slot_input(horizon: HorizonInput, plan: HorizonPlan) -> PlanInput:
    """The one-instant planner's input for the first slot: deferred work left out (running
    non-preemptible work excepted, and overdue work unless an allowance is short), inference in
    a budget whose allowance is short at its minimum-energy setting (Efficiency), and deadline
    work that cannot wait (urgent, with no room by its deadline in the plan, or overdue) first
    among the work of its priority: one above it, so that the one-instant planner may preempt
    work of its priority that can wait. The horizon counts the whole nodes the services leave,
    not where smaller jobs go: a gang of whole nodes may still find them held by smaller jobs
    that could have run later (then it is overdue from the next round on: `planned_starts`)."""
    plan_input = horizon.plan_input
    running = {c.workload for c in plan_input.current}
    by_key = {w.key: w for w in plan_input.workloads}
    waiting = {
        key
        for key in plan.deferred
        if _may_defer(by_key[key], running)
        and (key not in horizon.overdue or plan.schedules[key].allowance_short)
    }
    pressing = {
        key
        for key, schedule in plan.schedules.items()
        if _has_work(schedule)
        and (schedule.urgent or schedule.missed_tokens > 0 or key in horizon.overdue)
    }
    workloads = tuple(
        dataclasses.replace(w, policy=EnergyPolicy.EFFICIENCY)
        if w.key in plan.thrifty_inference
        else dataclasses.replace(w, priority=w.priority + 1)
        if w.key in pressing
        else w
        for w in plan_input.workloads
        if w.key not in waiting
    )
    current = tuple(c for c in plan_input.current if c.workload not in waiting)
    return dataclasses.replace(plan_input, workloads=workloads, current=current)
