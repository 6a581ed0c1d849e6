"""EnergyBudget (`wattsched.io/v1alpha1`, cluster-scoped): typed spec and status, parsed and
validated with the same rules and defaults as `crds/wattsched.io_energybudgets.yaml`, and the
label-selector matching that resolves a budget to its nodes.

Not for enforcing the cap: the optimizer keeps power limits under it; this module reads the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from wattsched_api.fields import (
    LABEL_KEY_RULE,
    LABEL_VALUE_RULE,
    Fields,
    JsonObject,
    describe,
    is_label_key,
    is_label_value,
    present,
)
from wattsched_api.meta import (
    Condition,
    ObjectMeta,
    object_to_dict,
    read_conditions,
    read_envelope,
    read_time,
)
from wattsched_api.vocabulary import EnergySource

KIND = "EnergyBudget"
PLURAL = "energybudgets"


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class Period(StrEnum):
    DAY = "Day"
    WEEK = "Week"
    MONTH = "Month"


def period_start(moment: datetime, period: Period) -> datetime:
    """The start (UTC midnight) of the calendar day, ISO week (Monday) or month holding `moment`:
    allowance periods are UTC calendar periods (`spec.timeZone` places schedule windows and
    carbon hours, not periods)."""
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.WEEK:
        return day - timedelta(days=day.weekday())
    if period is Period.MONTH:
        return day.replace(day=1)
    return day


def period_end(start: datetime, period: Period) -> datetime:
    """The end of the period that starts at `start` (a `period_start`): the next period's start."""
    if period is Period.DAY:
        return start + timedelta(days=1)
    if period is Period.WEEK:
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


class PlanStatusName(StrEnum):
    OPTIMAL = "Optimal"
    FEASIBLE = "Feasible"
    INFEASIBLE = "Infeasible"
    TIME_LIMIT = "TimeLimit"


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator is SelectorOperator.EXISTS:
            return self.key in labels
        if self.operator is SelectorOperator.DOES_NOT_EXIST:
            return self.key not in labels
        if self.operator is SelectorOperator.IN:
            return labels.get(self.key) in self.values
        return self.key not in labels or labels[self.key] not in self.values

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator.value}
        if self.values:
            out["values"] = list(self.values)
        return out


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector. The empty selector matches every node."""

    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match_labels.items()) and all(
            requirement.matches(labels) for requirement in self.match_expressions
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.match_expressions:
            out["matchExpressions"] = [r.to_dict() for r in self.match_expressions]
        return out


@dataclass(frozen=True)
class EnergyAllowance:
    kwh: float
    period: Period = Period.DAY

    def to_dict(self) -> dict[str, Any]:
        return {"kilowattHours": self.kwh, "period": self.period.value}


@dataclass(frozen=True)
class CarbonSettings:
    intensity_grams_per_kwh: float | None = None
    prometheus_query: str | None = None
    max_kg_per_period: float | None = None
    # The planning forecast: gCO2e/kWh per hour of the day in spec.timeZone (24 values or none).
    hourly_intensity_grams_per_kwh: tuple[float, ...] = ()
    forecast_prometheus_query: str | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("intensityGramsPerKilowattHour", self.intensity_grams_per_kwh),
            ("prometheusQuery", self.prometheus_query),
            (
                "hourlyIntensityGramsPerKilowattHour",
                list(self.hourly_intensity_grams_per_kwh) or None,
            ),
            ("forecastPrometheusQuery", self.forecast_prometheus_query),
            ("maxKgPerPeriod", self.max_kg_per_period),
        ]
        return present(pairs)


class Objective(StrEnum):
    CARBON = "Carbon"
    ENERGY = "Energy"


HOURS_PER_DAY = 24


@dataclass(frozen=True)
class CapWindow:
    """`spec.schedule[]`: a lower cap every day from `start` to `end` (minutes after midnight in
    spec.timeZone; `end` before `start` crosses midnight)."""

    start_minute: int
    end_minute: int
    power_cap_watts: float

    def covers(self, minute_of_day: int) -> bool:
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute_of_day < self.end_minute
        return minute_of_day >= self.start_minute or minute_of_day < self.end_minute

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": _clock_text(self.start_minute),
            "to": _clock_text(self.end_minute),
            "powerCapWatts": self.power_cap_watts,
        }


def _clock_text(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@dataclass(frozen=True)
class EnergyBudgetSpec:
    power_cap_watts: float
    node_selector: LabelSelector | None = None
    energy: EnergyAllowance | None = None
    carbon: CarbonSettings | None = None
    pue: float = 1.0
    # spec.unmanagedGpus.powerLimitWatts: the opt-in to capping other teams' GPUs in scope (W/GPU).
    unmanaged_gpu_limit_watts: float | None = None
    # IANA zone of `schedule` and the hourly carbon profile.
    time_zone: str = "UTC"
    schedule: tuple[CapWindow, ...] = ()
    objective: Objective = Objective.CARBON

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with `labels` is in scope (no or empty selector: every GPU node)."""
        return self.node_selector is None or self.node_selector.matches(labels)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.node_selector is not None:
            out["nodeSelector"] = self.node_selector.to_dict()
        out["powerCapWatts"] = self.power_cap_watts
        if self.energy is not None:
            out["energy"] = self.energy.to_dict()
        if self.carbon is not None:
            out["carbon"] = self.carbon.to_dict()
        out["pue"] = self.pue
        if self.unmanaged_gpu_limit_watts is not None:
            out["unmanagedGpus"] = {"powerLimitWatts": self.unmanaged_gpu_limit_watts}
        out["timeZone"] = self.time_zone
        if self.schedule:
            out["schedule"] = [window.to_dict() for window in self.schedule]
        out["objective"] = self.objective.value
        return out


@dataclass(frozen=True)
class LastPlan:
    time: str | None = None
    seconds: float | None = None
    status: PlanStatusName | None = None
    gap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("time", self.time),
            ("seconds", self.seconds),
            ("status", None if self.status is None else self.status.value),
            ("gap", self.gap),
        ]
        return present(pairs)


class CarbonIntensitySource(StrEnum):
    STATIC = "static"
    PROMETHEUS = "prometheus"


@dataclass(frozen=True)
class CarbonIntensityStatus:
    """`status.carbonIntensity`: the intensity the latest carbon increment used."""

    grams_per_kwh: float
    source: CarbonIntensitySource

    def to_dict(self) -> dict[str, Any]:
        return {"gramsPerKilowattHour": self.grams_per_kwh, "source": self.source.value}


@dataclass(frozen=True)
class EnergyBudgetStatus:
    observed_generation: int | None = None
    nodes: int | None = None
    allocated_cap_watts: float | None = None
    # The part of allocated_cap_watts held by pods wattsched did not create (left alone).
    unmanaged_watts: float | None = None
    expected_watts: float | None = None
    measured_watts: float | None = None
    headroom_watts: float | None = None
    energy_used_joules: float | None = None
    energy_used_kwh: float | None = None
    energy_source: EnergySource | None = None
    carbon_grams: float | None = None
    carbon_kg: float | None = None
    carbon_intensity: CarbonIntensityStatus | None = None
    remaining_kwh: float | None = None
    remaining_carbon_kg: float | None = None
    projected_kwh_at_period_end: float | None = None
    projected_carbon_kg_at_period_end: float | None = None
    period_start: str | None = None
    accounted_until: str | None = None
    last_plan: LastPlan | None = None
    conditions: tuple[Condition, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        pairs: list[tuple[str, object]] = [
            ("observedGeneration", self.observed_generation),
            ("nodes", self.nodes),
            ("allocatedCapWatts", self.allocated_cap_watts),
            ("unmanagedWatts", self.unmanaged_watts),
            ("expectedWatts", self.expected_watts),
            ("measuredWatts", self.measured_watts),
            ("headroomWatts", self.headroom_watts),
            ("energyUsedJoules", self.energy_used_joules),
            ("energyUsedKilowattHours", self.energy_used_kwh),
            ("energySource", None if self.energy_source is None else self.energy_source.value),
            ("carbonGrams", self.carbon_grams),
            ("carbonKg", self.carbon_kg),
            (
                "carbonIntensity",
                None if self.carbon_intensity is None else self.carbon_intensity.to_dict(),
            ),
            ("remainingKilowattHours", self.remaining_kwh),
            ("remainingCarbonKg", self.remaining_carbon_kg),
            ("projectedKilowattHoursAtPeriodEnd", self.projected_kwh_at_period_end),
            ("projectedCarbonKgAtPeriodEnd", self.projected_carbon_kg_at_period_end),
            ("periodStart", self.period_start),
            ("accountedUntil", self.accounted_until),
            ("lastPlan", None if self.last_plan is None else self.last_plan.to_dict()),
        ]
        out = present(pairs)
        if self.conditions:
            out["conditions"] = [c.to_dict() for c in self.conditions]
        return out


@dataclass(frozen=True)
class EnergyBudget:
    metadata: ObjectMeta
    spec: EnergyBudgetSpec
    status: EnergyBudgetStatus = field(default_factory=EnergyBudgetStatus)

    @property
    def name(self) -> str:
        return self.metadata.name

    def to_dict(self) -> dict[str, Any]:
        return object_to_dict(KIND, self.metadata, self.spec.to_dict(), self.status.to_dict())


# -- reading ---------------------------------------------------------------------------------------


def parse_energybudget(obj: JsonObject) -> EnergyBudget:
    """Read and validate an EnergyBudget; raises `ApiValidationError` naming object and field."""
    metadata, top = read_envelope(obj, kind=KIND, namespaced=False)
    spec = _read_spec(top.section("spec"))
    status_fields = top.optional_section("status")
    status = EnergyBudgetStatus() if status_fields is None else _read_status(status_fields)
    top.finish()
    return EnergyBudget(metadata=metadata, spec=spec, status=status)


def read_label_selector(selector: Fields) -> LabelSelector:
    requirements = []
    for item in selector.objects("matchExpressions", max_items=32) or []:
        operator = SelectorOperator(
            item.string("operator", max_length=16, enum=tuple(SelectorOperator))
        )
        values = item.strings("values", max_items=64, max_length=63)
        for index, value in enumerate(values):
            if not is_label_value(value):
                raise item.error(f"values[{index}]", f"{describe(value)} {LABEL_VALUE_RULE}")
        if (operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)) != bool(values):
            raise item.error(
                "values",
                "must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
            )
        key = item.string("key", max_length=317, min_length=1)
        if not is_label_key(key):
            raise item.error("key", f"{describe(key)} {LABEL_KEY_RULE}")
        requirements.append(
            LabelRequirement(
                key=key,
                operator=operator,
                values=values,
            )
        )
        item.finish()
    match_labels = selector.string_map("matchLabels", max_properties=64, max_length=63)
    for key, value in match_labels.items():
        if not is_label_key(key):
            raise selector.error("matchLabels", f"key {describe(key)} {LABEL_KEY_RULE}")
        if not is_label_value(value):
            raise selector.error(f"matchLabels.{key}", f"{describe(value)} {LABEL_VALUE_RULE}")
    result = LabelSelector(
        match_labels=match_labels,
        match_expressions=tuple(requirements),
    )
    selector.finish()
    return result


def _read_spec(spec: Fields) -> EnergyBudgetSpec:
    selector_fields = spec.optional_section("nodeSelector")
    energy = None
    energy_fields = spec.optional_section("energy")
    if energy_fields is not None:
        energy = EnergyAllowance(
            kwh=energy_fields.number(
                "kilowattHours", minimum=0, maximum=1e12, exclusive_minimum=True
            ),
            period=Period(
                energy_fields.string("period", max_length=8, enum=tuple(Period), default="Day")
            ),
        )
        energy_fields.finish()
    carbon = None
    carbon_fields = spec.optional_section("carbon")
    if carbon_fields is not None:
        carbon = CarbonSettings(
            intensity_grams_per_kwh=carbon_fields.optional_number(
                "intensityGramsPerKilowattHour", minimum=0, maximum=5000
            ),
            prometheus_query=carbon_fields.optional_string(
                "prometheusQuery", max_length=4096, min_length=1
            ),
            max_kg_per_period=carbon_fields.optional_number(
                "maxKgPerPeriod", minimum=0, maximum=1e12, exclusive_minimum=True
            ),
            hourly_intensity_grams_per_kwh=_hourly_profile(carbon_fields),
            forecast_prometheus_query=carbon_fields.optional_string(
                "forecastPrometheusQuery", max_length=4096, min_length=1
            ),
        )
        carbon_fields.finish()
        if carbon.intensity_grams_per_kwh is None and carbon.prometheus_query is None:
            raise spec.error(
                "carbon", "must set intensityGramsPerKilowattHour or prometheusQuery (or both)"
            )
        if carbon.max_kg_per_period is not None and energy is None:
            raise spec.error(
                "carbon",
                "spec.carbon.maxKgPerPeriod needs spec.energy (its period defines the period)",
            )
    result = EnergyBudgetSpec(
        power_cap_watts=spec.number(
            "powerCapWatts", minimum=0, maximum=1e9, exclusive_minimum=True
        ),
        node_selector=None if selector_fields is None else read_label_selector(selector_fields),
        energy=energy,
        carbon=carbon,
        pue=spec.number("pue", minimum=1.0, maximum=5.0, default=1.0),
        unmanaged_gpu_limit_watts=_unmanaged_gpu_limit_watts(spec),
        time_zone=_time_zone(spec),
        schedule=_schedule(spec),
        objective=Objective(
            spec.string("objective", max_length=8, enum=tuple(Objective), default="Carbon")
        ),
    )
    if any(w.power_cap_watts > result.power_cap_watts for w in result.schedule):
        raise spec.error(
            "schedule",
            "powerCapWatts must be at most spec.powerCapWatts (a schedule lowers the cap)",
        )
    spec.finish()
    return result


def _hourly_profile(carbon: Fields) -> tuple[float, ...]:
    """spec.carbon.hourlyIntensityGramsPerKilowattHour: 24 numbers from 0 to 5000, or none."""
    value = carbon.raw("hourlyIntensityGramsPerKilowattHour")
    if value is None:
        return ()
    field = "hourlyIntensityGramsPerKilowattHour"
    if not isinstance(value, list) or len(value) != HOURS_PER_DAY:
        raise carbon.error(field, "must have 24 values (one per hour of the day)")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item <= 5000:
            raise carbon.error(
                f"{field}[{index}]", f"must be a number from 0 to 5000, got {item!r}"
            )
    return tuple(float(item) for item in value)


def _time_zone(spec: Fields) -> str:
    name = spec.string("timeZone", max_length=64, min_length=1, default="UTC")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise spec.error(
            "timeZone", f"{describe(name)} is not an IANA time zone (e.g. UTC, Europe/Berlin)"
        ) from None
    return name


def _clock_minute(window: Fields, name: str) -> int:
    text = window.string(name, max_length=5, min_length=5)
    hours, colon, minutes = text.partition(":")
    if not (colon and hours.isdigit() and minutes.isdigit()) or not (
        0 <= int(hours) <= 23 and 0 <= int(minutes) <= 59
    ):
        raise window.error(name, f"{describe(text)} must be HH:MM on a 24-hour clock")
    return int(hours) * 60 + int(minutes)


def _schedule(spec: Fields) -> tuple[CapWindow, ...]:
    windows = []
    for window in spec.objects("schedule", max_items=16) or []:
        start, end = _clock_minute(window, "from"), _clock_minute(window, "to")
        if start == end:
            raise window.error(
                "to", "must differ from from (a window from 22:00 to 06:00 crosses midnight)"
            )
        windows.append(
            CapWindow(
                start,
                end,
                window.number("powerCapWatts", minimum=0, maximum=1e9, exclusive_minimum=True),
            )
        )
        window.finish()
    return tuple(windows)


def _unmanaged_gpu_limit_watts(spec: Fields) -> float | None:
    """spec.unmanagedGpus.powerLimitWatts (W per GPU), None when the budget does not opt in."""
    section = spec.optional_section("unmanagedGpus")
    if section is None:
        return None
    watts = section.number("powerLimitWatts", minimum=1, maximum=2000)
    section.finish()
    return watts


def _read_status(status: Fields) -> EnergyBudgetStatus:
    last_plan = None
    plan_fields = status.optional_section("lastPlan")
    if plan_fields is not None:
        plan_status = plan_fields.optional_string(
            "status", max_length=16, enum=tuple(PlanStatusName)
        )
        last_plan = LastPlan(
            time=read_time(plan_fields, "time"),
            seconds=plan_fields.optional_number("seconds", minimum=0, maximum=1e9),
            status=None if plan_status is None else PlanStatusName(plan_status),
            gap=plan_fields.optional_number("gap", minimum=0, maximum=1e30),
        )
        plan_fields.finish()
    big = 1e30
    energy_source = status.optional_string("energySource", max_length=16, enum=tuple(EnergySource))
    carbon_intensity = None
    intensity_fields = status.optional_section("carbonIntensity")
    if intensity_fields is not None:
        carbon_intensity = CarbonIntensityStatus(
            grams_per_kwh=intensity_fields.number("gramsPerKilowattHour", minimum=0, maximum=big),
            source=CarbonIntensitySource(
                intensity_fields.string("source", max_length=16, enum=tuple(CarbonIntensitySource))
            ),
        )
        intensity_fields.finish()
    result = EnergyBudgetStatus(
        observed_generation=status.optional_integer(
            "observedGeneration", minimum=0, maximum=2**63 - 1
        ),
        nodes=status.optional_integer("nodes", minimum=0, maximum=2**31),
        allocated_cap_watts=status.optional_number("allocatedCapWatts", minimum=0, maximum=big),
        unmanaged_watts=status.optional_number("unmanagedWatts", minimum=0, maximum=big),
        expected_watts=status.optional_number("expectedWatts", minimum=0, maximum=big),
        measured_watts=status.optional_number("measuredWatts", minimum=0, maximum=big),
        headroom_watts=status.optional_number("headroomWatts", minimum=-big, maximum=big),
        energy_used_joules=status.optional_number("energyUsedJoules", minimum=0, maximum=big),
        energy_used_kwh=status.optional_number("energyUsedKilowattHours", minimum=0, maximum=big),
        energy_source=None if energy_source is None else EnergySource(energy_source),
        carbon_grams=status.optional_number("carbonGrams", minimum=0, maximum=big),
        carbon_kg=status.optional_number("carbonKg", minimum=0, maximum=big),
        carbon_intensity=carbon_intensity,
        remaining_kwh=status.optional_number("remainingKilowattHours", minimum=-big, maximum=big),
        remaining_carbon_kg=status.optional_number("remainingCarbonKg", minimum=-big, maximum=big),
        projected_kwh_at_period_end=status.optional_number(
            "projectedKilowattHoursAtPeriodEnd", minimum=0, maximum=big
        ),
        projected_carbon_kg_at_period_end=status.optional_number(
            "projectedCarbonKgAtPeriodEnd", minimum=0, maximum=big
        ),
        period_start=read_time(status, "periodStart"),
        accounted_until=read_time(status, "accountedUntil"),
        last_plan=last_plan,
        conditions=read_conditions(status),
    )
    status.finish()
    return result
