"""Energy and carbon running totals: due times, measured/modelled/mixed sources, carbon
from a static or queried intensity, and tokens per joule (pure functions of `accounting`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from wattsched_api.energybudget import Period
from wattsched_api.vocabulary import Source
from wattsched_operator.accounting import (
    JOULES_PER_KWH,
    BudgetTerms,
    CarbonIntensity,
    Increment,
    budget_energy,
    budget_start,
    increment,
    measured_sum,
    tokens_per_joule,
    workload_energy,
    workload_start,
)
from wattsched_operator.telemetry import Measurement, TelemetrySnapshot

NOW = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)  # a Wednesday
DCGM = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"


def test_a_total_is_due_once_per_interval_and_a_new_one_starts_now() -> None:
    assert workload_start({}, NOW, 60) == NOW
    recent = {"energy": {"accountedUntil": "2026-11-25T12:00:00Z"}}
    assert workload_start(recent, NOW, 60) is None
    assert workload_start(recent, NOW, 30) == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_a_new_period_is_due_at_once_and_starts_at_the_period_start() -> None:
    yesterday = {"accountedUntil": "2026-11-24T23:59:50Z"}
    assert budget_start(yesterday, NOW, Period.DAY, 3600) == datetime(2026, 11, 25, tzinfo=UTC)
    assert budget_start(yesterday, NOW, Period.WEEK, 86400) is None  # same week, not due yet


def test_an_increment_is_measured_when_known_else_the_model_over_the_seconds() -> None:
    assert increment(1234.0, 500.0, 10) == Increment(1234.0, "measured")
    assert increment(None, 500.0, 10) == Increment(5000.0, "modelled")
    readings = {"a": Measurement(1.0, DCGM), "b": Measurement(2.0, DCGM)}
    assert measured_sum(readings, ["a", "b"]) == 3.0
    assert measured_sum(readings, ["a", "c"]) is None
    assert measured_sum(readings, []) is None


def test_workload_energy_adds_increments_and_becomes_mixed_once_both_sources_add() -> None:
    first = workload_energy({}, None, now=NOW, initial_source="measured")
    assert first["joules"] == 0.0
    assert first["source"] == "measured"
    assert first["accountedUntil"] == "2026-11-25T12:00:30Z"
    later = NOW + timedelta(minutes=1)
    second = workload_energy(first, Increment(3.6e6, "measured"), now=later, initial_source="x")
    assert (second["joules"], second["kilowattHours"], second["source"]) == (3.6e6, 1.0, "measured")
    third = workload_energy(second, Increment(1.8e6, "modelled"), now=later, initial_source="x")
    assert (third["kilowattHours"], third["source"]) == (1.5, "mixed")


def test_workload_carbon_is_each_increments_kwh_times_pue_times_that_moments_intensity() -> None:
    start = workload_energy({}, None, now=NOW, initial_source="measured")
    clean = CarbonIntensity(100.0, "prometheus")
    dirty = CarbonIntensity(400.0, "prometheus")
    after_clean = workload_energy(
        start,
        Increment(JOULES_PER_KWH, "measured"),
        now=NOW,
        initial_source="x",
        pue=1.5,
        carbon=clean,
    )
    after_dirty = workload_energy(
        after_clean,
        Increment(JOULES_PER_KWH, "measured"),
        now=NOW,
        initial_source="x",
        pue=1.5,
        carbon=dirty,
    )
    assert after_clean["carbonGrams"] == pytest.approx(150.0)
    assert after_dirty["carbonGrams"] == pytest.approx(150.0 + 600.0)


def test_budget_energy_counts_pue_and_carbon_and_restarts_in_a_new_period() -> None:
    terms = BudgetTerms.from_spec(
        {
            "energy": {"kilowattHours": 100, "period": "Day"},
            "pue": 1.25,
            "carbon": {"intensityGramsPerKilowattHour": 400},
        }
    )
    carbon = terms.intensity(None)
    assert carbon == CarbonIntensity(400.0, "static")
    start = budget_energy({}, None, now=NOW, terms=terms, carbon=carbon, initial_source="measured")
    assert start["energyUsedKilowattHours"] == 0.0
    assert start["periodStart"] == "2026-11-25T00:00:00Z"
    used = budget_energy(
        start,
        Increment(2 * JOULES_PER_KWH, "measured"),
        now=NOW,
        terms=terms,
        carbon=carbon,
        initial_source="x",
    )
    assert used["energyUsedKilowattHours"] == pytest.approx(2.5)  # 2 kWh of GPU energy x PUE 1.25
    assert used["carbonKg"] == pytest.approx(1.0)  # 2.5 kWh x 400 g/kWh
    assert used["carbonIntensity"] == {"gramsPerKilowattHour": 400.0, "source": "static"}
    assert used["energySource"] == "measured"
    tomorrow = datetime(2026, 11, 26, 0, 1, tzinfo=UTC)
    next_day = budget_energy(
        used,
        Increment(JOULES_PER_KWH, "modelled"),
        now=tomorrow,
        terms=terms,
        carbon=carbon,
        initial_source="x",
    )
    assert next_day["periodStart"] == "2026-11-26T00:00:00Z"
    assert next_day["energyUsedKilowattHours"] == pytest.approx(1.25)
    assert next_day["energySource"] == "modelled"  # the new period has only modelled energy


def test_a_queried_intensity_wins_over_the_static_one_and_none_means_no_carbon() -> None:
    both = BudgetTerms.from_spec(
        {"carbon": {"intensityGramsPerKilowattHour": 400, "prometheusQuery": "grid_intensity"}}
    )
    assert both.intensity(120.0) == CarbonIntensity(120.0, "prometheus")
    assert both.intensity(None) == CarbonIntensity(400.0, "static")
    neither = BudgetTerms.from_spec({})
    assert neither.intensity(None) is None
    figures = budget_energy({}, None, now=NOW, terms=neither, carbon=None, initial_source="m")
    assert figures["carbonKg"] is None  # a merge patch that removes an earlier figure


def test_tokens_per_joule_is_measured_when_every_pod_has_both_figures_else_modelled() -> None:
    pods = [("ns", "w-0"), ("ns", "w-1")]
    reading = TelemetrySnapshot(
        time=NOW,
        source=Source.MEASURED,
        stale=False,
        reason="",
        pod_watts={pod: Measurement(200.0, DCGM) for pod in pods},
        pod_tokens_per_second={pods[0]: 600.0, pods[1]: 400.0},
    )
    assert tokens_per_joule(reading, pods, 900.0, 450.0) == (2.5, "measured")
    partial = TelemetrySnapshot(
        time=NOW,
        source=Source.MEASURED,
        stale=False,
        reason="",
        pod_watts={pod: Measurement(200.0, DCGM) for pod in pods},
        pod_tokens_per_second={pods[0]: 600.0},
    )
    assert tokens_per_joule(partial, pods, 900.0, 450.0) == (2.0, "modelled")
    assert tokens_per_joule(None, pods, 0.0, 0.0) is None


def test_budget_figures_for_people_are_rounded_while_the_running_totals_lose_nothing() -> None:
    terms = BudgetTerms.from_spec({"pue": 1.3, "carbon": {"intensityGramsPerKilowattHour": 350}})
    carbon = terms.intensity(None)
    figures = budget_energy({}, None, now=NOW, terms=terms, carbon=carbon, initial_source="m")
    # 2,880 increments of 15 s at 400 W (a day of small ones): each far below a watt-hour x PUE.
    for _ in range(2880):
        figures = budget_energy(
            figures,
            Increment(400 * 15, "modelled"),
            now=NOW,
            terms=terms,
            carbon=carbon,
            initial_source="m",
        )
    joules = 2880 * 400 * 15 * 1.3
    assert figures["energyUsedJoules"] == pytest.approx(joules, abs=1)
    assert figures["energyUsedKilowattHours"] == round(joules / 3.6e6, 3) == 6.24
    assert figures["carbonGrams"] == pytest.approx(joules / 3.6e6 * 350, abs=0.01)
    assert figures["carbonKg"] == 2.184
    assert len(str(figures["energyUsedKilowattHours"]).split(".")[1]) <= 3


def test_a_budget_status_from_before_the_joule_totals_goes_on_from_its_kwh_and_kg() -> None:
    terms = BudgetTerms.from_spec({"carbon": {"intensityGramsPerKilowattHour": 400}})
    carbon = terms.intensity(None)
    older = {
        "periodStart": "2026-11-25T00:00:00Z",
        "energyUsedKilowattHours": 0.690372222,
        "carbonKg": 0.25,
    }
    figures = budget_energy(
        older,
        Increment(0.5 * JOULES_PER_KWH, "measured"),
        now=NOW,
        terms=terms,
        carbon=carbon,
        initial_source="m",
    )
    assert figures["energyUsedKilowattHours"] == 1.19
    assert figures["energyUsedJoules"] == round(1.190372222 * JOULES_PER_KWH, 1)
    assert figures["carbonKg"] == 0.45


def test_workload_kwh_is_rounded_to_the_watt_hour() -> None:
    energy = workload_energy(
        {"joules": 2_485_339.9, "accountedUntil": "x", "source": "measured"},
        Increment(1000.0, "measured"),
        now=NOW,
        initial_source="measured",
    )
    assert energy["joules"] == 2_486_339.9
    assert energy["kilowattHours"] == 0.691


def test_tokens_per_joule_in_status_has_three_significant_digits() -> None:
    efficient = workload_energy({}, None, now=NOW, initial_source="m", efficiency=(22.7525, "m"))
    thrifty = workload_energy({}, None, now=NOW, initial_source="m", efficiency=(0.87791, "m"))
    assert (efficient["tokensPerJoule"], thrifty["tokensPerJoule"]) == (22.8, 0.878)
