"""EnergyBudgets over time, for the horizon plan: from parsed budgets and a clock to the optimizer's
`HorizonInput` (slots, the cap per slot from `spec.schedule`, the carbon forecast per slot, what
is left of each allowance), and from its `HorizonPlan` back to what people read: the deferral
sentences ("Deferred until 13:00 UTC: 140 g/kWh then vs 420 now"), each budget's remaining and
projected allowance and its `AllowanceExhausted` condition.

For: `wattsched plan` and the operator's round (the same functions, so both plan alike).
Not for: reading Prometheus (the caller passes forecast samples already read: see
`forecast_by_hours_ahead`) or writing statuses (the caller writes what `budget_outlook` returns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from wattsched_api.energybudget import EnergyBudget, period_end, period_start
from wattsched_api.meta import parse_time
from wattsched_api.vocabulary import Reason
from wattsched_operator.demand import HourlyDemand
from wattsched_optimizer.horizon import (
    AllowancePeriod,
    BudgetHorizon,
    Deferral,
    DeferralCause,
    HorizonInput,
    HorizonPlan,
    deferrals,
    first_slot_input,
    hourly_slots,
    plan_horizon,
    planned_starts,
)
from wattsched_optimizer.horizon import Objective as HorizonObjective
from wattsched_optimizer.model import PerformanceModel
from wattsched_optimizer.problem import PlanInput, WorkloadType

DEFAULT_HORIZON_HOURS = 24
# The cap of a slot is the lowest cap of any window that overlaps it, checked at this step.
WINDOW_CHECK_MINUTES = 5


def plans_over_time(budgets: Iterable[EnergyBudget]) -> bool:
    """Whether any budget gives the horizon something to plan: an allowance, a cap schedule or a
    carbon forecast. Without one, the one-instant planner alone decides (as before)."""
    for budget in budgets:
        spec = budget.spec
        carbon = spec.carbon
        if spec.energy is not None or spec.schedule:
            return True
        if carbon is not None and (
            carbon.max_kg_per_period is not None
            or carbon.hourly_intensity_grams_per_kwh
            or carbon.forecast_prometheus_query is not None
        ):
            return True
    return False


def forecast_by_hours_ahead(samples: Iterable[tuple[Mapping[str, str], float]]) -> dict[int, float]:
    """The forecast query's samples (labels, gCO2e/kWh) by hours ahead: the shape documented for
    `spec.carbon.forecastPrometheusQuery`, one series per hour with label `hours_ahead`. Samples
    without a whole, non-negative `hours_ahead` or with a negative value are left out."""
    out: dict[int, float] = {}
    for labels, value in samples:
        text = labels.get("hours_ahead", "")
        if text.isdigit() and value >= 0:
            out[int(text)] = float(value)
    return out


def _slot_starts(now: datetime, slot_seconds: tuple[float, ...]) -> list[datetime]:
    starts, at = [], now
    for length in slot_seconds:
        starts.append(at)
        at += timedelta(seconds=length)
    return starts


def _caps(
    budget: EnergyBudget, starts: list[datetime], slot_seconds: tuple[float, ...]
) -> tuple[float, ...]:
    zone = ZoneInfo(budget.spec.time_zone)
    caps = []
    for start, length in zip(starts, slot_seconds, strict=True):
        cap = budget.spec.power_cap_watts
        for offset in range(0, max(1, int(length // 60)), WINDOW_CHECK_MINUTES):
            local = (start + timedelta(minutes=offset)).astimezone(zone)
            minute = local.hour * 60 + local.minute
            for window in budget.spec.schedule:
                if window.covers(minute):
                    cap = min(cap, window.power_cap_watts)
        caps.append(cap)
    return tuple(caps)


def _carbon(
    budget: EnergyBudget,
    starts: list[datetime],
    now: datetime,
    forecast: Mapping[int, float],
) -> tuple[float, ...]:
    """Intensity per slot: the forecast query's hour, else the hourly profile's (local hour),
    else the static intensity; empty when the budget has none of them."""
    carbon = budget.spec.carbon
    if carbon is None:
        return ()
    zone = ZoneInfo(budget.spec.time_zone)
    profile = carbon.hourly_intensity_grams_per_kwh
    static = carbon.intensity_grams_per_kwh
    if not profile and not forecast and static is None:
        return ()
    hour_now = now.replace(minute=0, second=0, microsecond=0)
    values = []
    for start in starts:
        ahead = int((start - hour_now).total_seconds() // 3600)
        if ahead in forecast:
            values.append(forecast[ahead])
        elif profile:
            values.append(profile[start.astimezone(zone).hour])
        else:
            values.append(static if static is not None else 0.0)
    return tuple(values)


def period_bounds(budget: EnergyBudget, now: datetime) -> tuple[datetime, datetime] | None:
    """The current allowance period [start, end) in UTC, None without `spec.energy`."""
    energy = budget.spec.energy
    if energy is None:
        return None
    period = energy.period
    start = period_start(now, period)
    return start, period_end(start, period)


def _used(budget: EnergyBudget, start: datetime) -> tuple[float, float]:
    """(kWh, kg CO2) the status says were used in the period starting at `start` (0 when the
    status describes an earlier period: the allowance has renewed)."""
    status = budget.status
    # The API model has checked the date-time (RFC 3339).
    counted_from = None if status.period_start is None else parse_time(status.period_start)
    if counted_from is None or counted_from < start:
        return 0.0, 0.0
    return status.energy_used_kwh or 0.0, status.carbon_kg or 0.0


def _periods(
    budget: EnergyBudget, now: datetime, starts: list[datetime], horizon_end: datetime
) -> tuple[AllowancePeriod, ...]:
    bounds = period_bounds(budget, now)
    energy = budget.spec.energy
    if bounds is None or energy is None:
        return ()
    start, end = bounds
    carbon = budget.spec.carbon
    max_kg = carbon.max_kg_per_period if carbon is not None else None
    used_kwh, used_kg = _used(budget, start)
    inside = sum(1 for s in starts if s < end)
    # A period that ends after the horizon lends the horizon its share of what is left.
    share = 1.0
    if end > horizon_end:
        share = (horizon_end - now).total_seconds() / (end - now).total_seconds()
    periods = [
        AllowancePeriod(
            0,
            inside,
            energy_kwh_left=max(0.0, energy.kwh - used_kwh) * share,
            carbon_kg_left=None if max_kg is None else max(0.0, max_kg - used_kg) * share,
        )
    ]
    if inside < len(starts):
        next_end = period_bounds_after(budget, end)
        share = 1.0
        if next_end > horizon_end:
            share = (horizon_end - end).total_seconds() / (next_end - end).total_seconds()
        periods.append(
            AllowancePeriod(
                inside,
                len(starts),
                energy_kwh_left=energy.kwh * share,
                carbon_kg_left=None if max_kg is None else max_kg * share,
            )
        )
    return tuple(periods)


def period_bounds_after(budget: EnergyBudget, start: datetime) -> datetime:
    """The end of the period that starts at `start`."""
    bounds = period_bounds(budget, start)
    assert bounds is not None  # only called for budgets with spec.energy
    return bounds[1]


def horizon_input(
    plan_input: PlanInput,
    budgets: Mapping[str, EnergyBudget],
    now: datetime,
    *,
    horizon_hours: float = DEFAULT_HORIZON_HOURS,
    forecasts: Mapping[str, Mapping[int, float]] | None = None,
    hourly_demand: HourlyDemand | None = None,
    declared_tokens_per_second: Mapping[str, float] | None = None,
    overdue: frozenset[str] = frozenset(),
) -> HorizonInput:
    """The horizon's input for the budgets of `plan_input` at `now` (forecasts by budget name:
    gCO2e/kWh by hours ahead, from `forecast_by_hours_ahead`; inference demand per slot from
    `hourly_demand`: in hours it has no history of, the most of each service's `tokens_per_second`
    (its recent forecast), its busiest recorded hour and its declared tokens/s, by key in
    `declared_tokens_per_second`, and its expected demand, in those hours its recent forecast;
    `overdue`: `HorizonInput.overdue`)."""
    now = now.astimezone(UTC)
    into_hour = now.minute * 60 + now.second + now.microsecond / 1e6
    slot_seconds = hourly_slots(into_hour, horizon_hours)
    starts = _slot_starts(now, slot_seconds)
    horizon_end = now + timedelta(seconds=sum(slot_seconds))
    settings = {}
    for planned in plan_input.budgets:
        budget = budgets.get(planned.name)
        if budget is None:
            continue
        settings[planned.name] = BudgetHorizon(
            planned.name,
            _caps(budget, starts, slot_seconds),
            _carbon(budget, starts, now, (forecasts or {}).get(planned.name, {})),
            pue=budget.spec.pue,
            periods=_periods(budget, now, starts, horizon_end),
            objective=HorizonObjective(budget.spec.objective.value),
        )
    demand: dict[str, tuple[float, ...]] = {}
    expected: dict[str, tuple[float, ...]] = {}
    if hourly_demand is not None:
        epochs = [start.timestamp() for start in starts]
        for workload in plan_input.workloads:
            if workload.type is not WorkloadType.INFERENCE:
                continue
            recent = workload.tokens_per_second
            per_slot = hourly_demand.per_slot(
                workload.key, epochs, recent, (declared_tokens_per_second or {}).get(workload.key)
            )
            if per_slot is not None:
                demand[workload.key] = per_slot
            likely = hourly_demand.expected_per_slot(workload.key, epochs, recent)
            if likely is not None:
                expected[workload.key] = likely
    return HorizonInput(plan_input, slot_seconds, settings, demand, expected, overdue)


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M UTC")


def deferral_message(deferral: Deferral, now: datetime, budgets: Mapping[str, EnergyBudget]) -> str:
    """One sentence: until when the work waits and why."""
    until = (
        "beyond the horizon"
        if deferral.until_seconds is None
        else _clock(now + timedelta(seconds=deferral.until_seconds))
    )
    head = f"Deferred until {until}"
    if deferral.cause is DeferralCause.CARBON:
        return (
            f"{head}: {deferral.grams_per_kwh_then:.0f} g/kWh then vs "
            f"{deferral.grams_per_kwh_now:.0f} now"
        )
    budget = budgets.get(deferral.budget or "")
    if deferral.cause is DeferralCause.ALLOWANCE and budget is not None and budget.spec.energy:
        bounds = period_bounds(budget, now)
        used_kwh, used_kg = _used(budget, bounds[0]) if bounds else (0.0, 0.0)
        carbon = budget.spec.carbon
        kg = (
            ""
            if carbon is None or carbon.max_kg_per_period is None
            else (f", {used_kg:.1f} of {carbon.max_kg_per_period:g} kg CO2")
        )
        return (
            f"{head}: EnergyBudget {budget.name} has no allowance left for it this "
            f"{budget.spec.energy.period.value.lower()} ({used_kwh:.1f} of "
            f"{budget.spec.energy.kwh:g} kWh used{kg})"
        )
    return f"{head}: the power cap of EnergyBudget {deferral.budget} leaves no room now"


@dataclass(frozen=True)
class AllowanceOutlook:
    """What a budget's status says about its allowances (the horizon's figures are modelled)."""

    remaining_kwh: float | None
    remaining_carbon_kg: float | None
    projected_kwh_at_period_end: float | None
    projected_carbon_kg_at_period_end: float | None
    # The AllowanceExhausted condition: status, reason, message.
    exhausted: bool
    reason: str
    message: str

    def status_fields(self) -> dict[str, float]:
        pairs = [
            ("remainingKilowattHours", self.remaining_kwh),
            ("remainingCarbonKg", self.remaining_carbon_kg),
            ("projectedKilowattHoursAtPeriodEnd", self.projected_kwh_at_period_end),
            ("projectedCarbonKgAtPeriodEnd", self.projected_carbon_kg_at_period_end),
        ]
        return {key: round(value, 3) for key, value in pairs if value is not None}


def budget_outlook(
    budget: EnergyBudget,
    horizon: HorizonInput,
    plan: HorizonPlan,
    now: datetime,
    deferred_messages: Mapping[str, str],
) -> AllowanceOutlook | None:
    """Remaining and projected allowance and the AllowanceExhausted condition; None without
    `spec.energy` (no period, no allowance)."""
    bounds = period_bounds(budget, now)
    energy = budget.spec.energy
    if bounds is None or energy is None or budget.name not in plan.budgets:
        return None
    start, end = bounds
    used_kwh, used_kg = _used(budget, start)
    outlook = plan.budgets[budget.name]
    # The horizon's part of the period, scaled to the whole rest of it when it ends later.
    horizon_end = now + timedelta(seconds=sum(horizon.slot_seconds))
    scale = 1.0
    if end > horizon_end:
        scale = (end - now).total_seconds() / (horizon_end - now).total_seconds()
    planned_kwh = outlook.energy_kwh_by_period[0] if outlook.energy_kwh_by_period else 0.0
    planned_kg = outlook.carbon_kg_by_period[0] if outlook.carbon_kg_by_period else 0.0
    carbon = budget.spec.carbon
    max_kg = carbon.max_kg_per_period if carbon is not None else None
    short = outlook.energy_short or outlook.carbon_short
    reason = Reason.ENERGY_ALLOWANCE if outlook.energy_short else Reason.CARBON_ALLOWANCE
    if short:
        waiting = [f"{key}: {text}" for key, text in sorted(deferred_messages.items())]
        message = (
            f"The {energy.period.value.lower()}'s allowance has no room for all flexible work "
            f"({used_kwh:.1f} of {energy.kwh:g} kWh used)"
            + (f"; {'; '.join(waiting)}" if waiting else "")
        )
    else:
        reason, message = (
            Reason.WITHIN_ALLOWANCE,
            (
                f"{used_kwh:.1f} of {energy.kwh:g} kWh used; the plan keeps the rest of the "
                f"{energy.period.value.lower()} within the allowance"
            ),
        )
    return AllowanceOutlook(
        remaining_kwh=energy.kwh - used_kwh,
        remaining_carbon_kg=None if max_kg is None else max_kg - used_kg,
        projected_kwh_at_period_end=used_kwh + planned_kwh * scale,
        projected_carbon_kg_at_period_end=(
            None if carbon is None else used_kg + planned_kg * scale
        ),
        exhausted=short,
        reason=reason,
        message=message,
    )


@dataclass(frozen=True)
class DeferredWork:
    """A workload the horizon plan holds back now."""

    workload: str
    cause: str  # Carbon, Allowance or PowerCap
    until: str | None  # RFC 3339 (UTC); None: beyond the horizon
    message: str
    # Where the horizon plans it: the start (RFC 3339, UTC) of every slot it runs in.
    planned_slots: tuple[str, ...] = ()


@dataclass(frozen=True)
class OverTime:
    """One round's horizon step: the one-instant planner's input (deferred work left out), what
    is deferred and why, and each budget's allowance outlook (by budget name)."""

    plan_input: PlanInput
    deferred: tuple[DeferredWork, ...] = ()
    allowances: Mapping[str, AllowanceOutlook] = field(default_factory=dict)
    # When the plan starts each waiting workload of whole-node pods (`horizon.planned_starts`).
    planned_starts: Mapping[str, datetime] = field(default_factory=dict)


def rfc3339_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_over_time(
    plan_input: PlanInput,
    budgets: Mapping[str, EnergyBudget],
    now: datetime,
    *,
    horizon_hours: float = DEFAULT_HORIZON_HOURS,
    forecasts: Mapping[str, Mapping[int, float]] | None = None,
    hourly_demand: HourlyDemand | None = None,
    declared_tokens_per_second: Mapping[str, float] | None = None,
    overdue: frozenset[str] = frozenset(),
    model: PerformanceModel | None = None,
) -> OverTime:
    """The horizon step of a round (`wattsched plan` and the operator alike): plan the horizon
    and return its first slot. Without a horizon, or with no budget that plans over time, the
    input unchanged. `overdue`: work of whole-node pods whose planned start came without it
    starting (`overdue_work`); `model`: the one the round's plan uses (calibrated from
    telemetry; None: the catalogue's). Raises HorizonInputError for input the horizon cannot
    plan."""
    if horizon_hours <= 0 or not plans_over_time(budgets.values()):
        return OverTime(plan_input)
    horizon = horizon_input(
        plan_input,
        budgets,
        now,
        horizon_hours=horizon_hours,
        forecasts=forecasts,
        hourly_demand=hourly_demand,
        declared_tokens_per_second=declared_tokens_per_second,
        overdue=overdue,
    )
    result = plan_horizon(horizon, model)
    deferred = tuple(
        DeferredWork(
            workload=d.workload,
            cause=d.cause.value,
            until=None
            if d.until_seconds is None
            else rfc3339_utc(now + timedelta(seconds=d.until_seconds)),
            message=deferral_message(d, now, budgets),
            planned_slots=tuple(
                rfc3339_utc(now + timedelta(seconds=result.slot_start_seconds(slot)))
                for slot, share in enumerate(result.schedules[d.workload].share_by_slot)
                if share > 0
            ),
        )
        for d in deferrals(horizon, result)
    )
    messages = {d.workload: d.message for d in deferred}
    allowances = {}
    for name, budget in sorted(budgets.items()):
        outlook = budget_outlook(budget, horizon, result, now, messages)
        if outlook is not None:
            allowances[name] = outlook
    starts = {
        key: now + timedelta(seconds=seconds)
        for key, seconds in planned_starts(horizon, result).items()
    }
    return OverTime(first_slot_input(horizon, result), deferred, allowances, starts)


def overdue_work(
    planned: Mapping[str, datetime], last_round_at: datetime | None, waiting: Iterable[str]
) -> tuple[frozenset[str], dict[str, datetime]]:
    """Which `waiting` work (whole-node pods, not running) is overdue: a round at or after its
    earliest planned start (`planned`, kept from round to round) has passed and it did not start.
    Returns the overdue keys and the planned starts still kept (of waiting work only)."""
    kept = {key: planned[key] for key in waiting if key in planned}
    if last_round_at is None:
        return frozenset(), kept
    return frozenset(key for key, start in kept.items() if start <= last_round_at), kept
