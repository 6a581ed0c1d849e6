"""EnergyBudgets over time: cap schedules in the budget's zone, the carbon forecast per slot, and
what is left of an allowance (renewed at the period's end, pro rata for a longer period)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from wattsched_api.energybudget import EnergyBudget, parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_operator.budget_horizon import (
    forecast_by_hours_ahead,
    horizon_input,
    plans_over_time,
)
from wattsched_operator.demand import HourlyDemand
from wattsched_optimizer.problem import (
    Budget,
    GpuNode,
    PlanInput,
    Precision,
    Variant,
    Workload,
    WorkloadType,
)

NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
PLAN_INPUT = PlanInput(
    nodes=(GpuNode("h0", "H100-80GB", 8),),
    workloads=(),
    budgets=(Budget("b", 30000, frozenset({"h0"})),),
)


def budget(spec: dict[str, Any], status: dict[str, Any] | None = None) -> EnergyBudget:
    body: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "b"},
        "spec": {"powerCapWatts": 30000, **spec},
    }
    if status is not None:
        body["status"] = status
    return parse_energybudget(body)


def test_a_schedule_lowers_the_cap_in_its_window_in_the_budgets_zone() -> None:
    # 17:00-21:00 in Berlin is 16:00-20:00 UTC in November: slots 14 to 17 from 02:00 UTC.
    eb = budget(
        {
            "timeZone": "Europe/Berlin",
            "schedule": [{"from": "17:00", "to": "21:00", "powerCapWatts": 10000}],
        }
    )
    horizon = horizon_input(PLAN_INPUT, {"b": eb}, NOW)
    caps = horizon.budgets["b"].cap_watts_by_slot
    assert [s for s, cap in enumerate(caps) if cap == 10000] == [14, 15, 16, 17]
    assert all(cap == 30000 for s, cap in enumerate(caps) if s not in range(14, 18))


def test_a_window_across_midnight_covers_both_sides() -> None:
    eb = budget({"schedule": [{"from": "23:00", "to": "01:00", "powerCapWatts": 5000}]})
    caps = horizon_input(PLAN_INPUT, {"b": eb}, NOW).budgets["b"].cap_watts_by_slot
    assert [s for s, cap in enumerate(caps) if cap == 5000] == [21, 22]


def test_the_forecast_query_comes_first_then_the_hourly_profile_then_the_static_value() -> None:
    profile = [float(100 + hour) for hour in range(24)]
    eb = budget(
        {
            "carbon": {
                "intensityGramsPerKilowattHour": 999,
                "hourlyIntensityGramsPerKilowattHour": profile,
                "forecastPrometheusQuery": "grid_forecast",
            }
        }
    )
    samples = [({"hours_ahead": "0"}, 50.0), ({"hours_ahead": "2"}, 70.0), ({}, 1.0)]
    forecast = forecast_by_hours_ahead(samples)
    assert forecast == {0: 50.0, 2: 70.0}
    horizon = horizon_input(PLAN_INPUT, {"b": eb}, NOW, forecasts={"b": forecast})
    carbon = horizon.budgets["b"].carbon_grams_per_kwh_by_slot
    assert carbon[:4] == (50.0, 103.0, 70.0, 105.0)
    static = budget({"carbon": {"intensityGramsPerKilowattHour": 999}})
    assert set(
        horizon_input(PLAN_INPUT, {"b": static}, NOW).budgets["b"].carbon_grams_per_kwh_by_slot
    ) == {999.0}


def test_a_daily_allowance_has_what_is_left_today_and_renews_at_midnight() -> None:
    eb = budget(
        {"energy": {"kilowattHours": 100, "period": "Day"}},
        {"energyUsedKilowattHours": 60, "periodStart": "2026-11-25T00:00:00Z"},
    )
    today, tomorrow = horizon_input(PLAN_INPUT, {"b": eb}, NOW).budgets["b"].periods
    assert (today.first_slot, today.end_slot, today.energy_kwh_left) == (0, 22, 40)
    # Tomorrow's allowance, for the 2 of its 24 hours inside the horizon.
    assert (tomorrow.first_slot, tomorrow.end_slot) == (22, 24)
    assert tomorrow.energy_kwh_left == pytest.approx(100 * 2 / 24)


def test_use_counted_for_an_earlier_period_does_not_count_against_this_one() -> None:
    eb = budget(
        {"energy": {"kilowattHours": 100, "period": "Day"}},
        {"energyUsedKilowattHours": 99, "periodStart": "2026-11-24T00:00:00Z"},
    )
    today = horizon_input(PLAN_INPUT, {"b": eb}, NOW).budgets["b"].periods[0]
    assert today.energy_kwh_left == 100


def test_a_weekly_allowance_lends_the_horizon_its_share() -> None:
    # Wednesday 02:00; the ISO week ends Monday 00:00: 118 h left, 24 of them in the horizon.
    eb = budget(
        {
            "energy": {"kilowattHours": 1000, "period": "Week"},
            "carbon": {"intensityGramsPerKilowattHour": 300, "maxKgPerPeriod": 500},
        },
        {"energyUsedKilowattHours": 410, "carbonKg": 100, "periodStart": "2026-11-23T00:00:00Z"},
    )
    (week,) = horizon_input(PLAN_INPUT, {"b": eb}, NOW).budgets["b"].periods
    assert week.energy_kwh_left == pytest.approx(590 * 24 / 118)
    assert week.carbon_kg_left == pytest.approx(400 * 24 / 118)


def test_only_budgets_with_something_over_time_use_the_horizon() -> None:
    assert not plans_over_time(
        [budget({}), budget({"carbon": {"intensityGramsPerKilowattHour": 300}})]
    )
    assert plans_over_time([budget({"energy": {"kilowattHours": 10}})])
    assert plans_over_time(
        [budget({"schedule": [{"from": "17:00", "to": "21:00", "powerCapWatts": 1}]})]
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"timeZone": "Mars/Olympus"},
            "EnergyBudget b: spec.timeZone: 'Mars/Olympus' is not an IANA time zone",
        ),
        (
            {"schedule": [{"from": "17:00", "to": "17:00", "powerCapWatts": 1}]},
            "EnergyBudget b: spec.schedule[0].to: must differ from from",
        ),
        (
            {"schedule": [{"from": "5pm", "to": "21:00", "powerCapWatts": 1}]},
            "spec.schedule[0].from",
        ),
        (
            {"schedule": [{"from": "17:00", "to": "21:00", "powerCapWatts": 40000}]},
            "spec.schedule: powerCapWatts must be at most spec.powerCapWatts",
        ),
        (
            {
                "carbon": {
                    "intensityGramsPerKilowattHour": 1,
                    "hourlyIntensityGramsPerKilowattHour": [1.0] * 23,
                }
            },
            "spec.carbon.hourlyIntensityGramsPerKilowattHour: must have 24 values",
        ),
    ],
)
def test_bad_schedules_and_profiles_are_one_line_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiValidationError) as error:
        budget(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_inference_demand_per_slot_is_the_same_hour_of_previous_days_else_the_most_known() -> None:
    history = HourlyDemand(days=2, headroom=1.0)
    day = 86400
    ten = NOW.replace(hour=10).timestamp()
    # Yesterday and the day before at 10:00: 800 and 1200 tokens/s (the hour's peak counts).
    history.record("t/chat", ten - day + 60, 500)
    history.record("t/chat", ten - day + 120, 800)
    history.record("t/chat", ten - 2 * day, 1200)
    history.record("t/chat", ten - 3 * day, 9999)  # beyond the days kept: forgotten on record
    workload = Workload(
        key="t/chat",
        type=WorkloadType.INFERENCE,
        model_parameters_billions=8,
        gpus_per_replica=1,
        variants=(Variant("bf16", Precision.BF16, 0),),
        max_replicas=4,
        tokens_per_second=300,
    )
    plan_input = dataclasses.replace(PLAN_INPUT, workloads=(workload,))
    eb = budget({"energy": {"kilowattHours": 100}})
    horizon = horizon_input(plan_input, {"b": eb}, NOW, hourly_demand=history)
    demand = horizon.inference_demand["t/chat"]
    assert demand[8] == pytest.approx(1000)  # 10:00 UTC: the mean of 800 and 1200
    # The first slot is now: the recent value. Later hours with no history: the most the
    # service is known to need, here its busiest recorded hour (1200), not its recent 300
    # tokens/s (a night is no forecast of a midday).
    assert demand[0] == 300
    assert set(demand[1:8]) == {1200}
    # Its energy is counted at what it is expected to need: there, its recent value.
    expected = horizon.inference_expected_demand["t/chat"]
    assert set(expected[:8]) == {300}
    assert expected[8] == pytest.approx(1000)
    declared = horizon_input(
        plan_input,
        {"b": eb},
        NOW,
        hourly_demand=history,
        declared_tokens_per_second={"t/chat": 1500},
    )
    assert set(declared.inference_demand["t/chat"][1:8]) == {1500}  # what it must absorb
    assert declared.inference_demand["t/chat"][8] == pytest.approx(1000)
    # A new service: no history at all; its recent value, or else what it declared.
    new = HourlyDemand(days=2, headroom=1.0)
    assert new.per_slot("t/new", [ten, ten + 3600], 300) == (300, 300)
    assert new.per_slot("t/new", [ten, ten + 3600], None, 700) == (700, 700)
    assert new.per_slot("t/new", [ten], None) is None
