"""The simulator over days (issue 14): repeated traces shaped by a demand profile, a carbon forecast
with error, the carbon-threshold baseline, `--deadline-slack-hours`, the job CO2 and the energy
over a budget's allowance. Small scenarios, built here or from tiny files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.simulator.conftest import (
    FixedPolicy,
    flat_truth,
    h100_node,
    job,
    nominal_seconds,
    scenario,
    write_trace,
)
from wattsched_api.energybudget import Period
from wattsched_api.meta import parse_time
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator import cli, observed
from wattsched_simulator.baselines import baseline
from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.cluster import ClusterError, SimBudget, parse_budget
from wattsched_simulator.controller import PlannerPolicy
from wattsched_simulator.engine import JOULES_PER_KWH, Simulation, simulate
from wattsched_simulator.observed import budget_body, carbon_forecast
from wattsched_simulator.report import energy_by_period, energy_over_allowance_kwh, policy_metrics
from wattsched_simulator.telemetry import Sample
from wattsched_simulator.trace import DIURNAL_PROFILE, load_traces
from wattsched_simulator.truth import GroundTruth
from wattsched_simulator.workloads import generate_jobs

HOUR = 3600.0
DAY = 24 * HOUR
# -- demand over days ------------------------------------------------------------------------------


def test_a_run_longer_than_the_trace_repeats_it_every_whole_hour(tmp_path: Path) -> None:
    # Requests at 0 s and 1,800 s: the trace spans under an hour, so it repeats hourly.
    trace = write_trace(
        tmp_path / "chat.csv", [("2023-11-16 18:00:00.0", 0, 7), ("2023-11-16 18:30:00.0", 0, 5)]
    )
    (loaded,) = load_traces(
        [trace], duration_seconds=3 * HOUR, step_seconds=60.0, rate_scale=1, seed=0
    )
    demand = loaded.demand_tokens
    assert len(demand) == 180
    assert np.flatnonzero(demand).tolist() == [0, 30, 60, 90, 120, 150]
    assert demand[[0, 60, 120]].tolist() == [7, 7, 7]
    # Within the trace's own hour nothing changes (a one-hour run is as before).
    (hour,) = load_traces([trace], duration_seconds=HOUR, step_seconds=60.0, rate_scale=1, seed=0)
    assert np.flatnonzero(hour.demand_tokens).tolist() == [0, 30]


def test_the_diurnal_profile_multiplies_each_hour_and_averages_one(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "chat.csv", [("2023-11-16 18:00:00.0", 0, 10)])
    (flat,) = load_traces([trace], duration_seconds=DAY, step_seconds=600.0, rate_scale=1, seed=0)
    (shaped,) = load_traces(
        [trace],
        duration_seconds=DAY,
        step_seconds=600.0,
        rate_scale=1,
        seed=0,
        hourly_profile=DIURNAL_PROFILE,
    )
    hourly = shaped.demand_tokens.reshape(24, 6).sum(axis=1)
    assert hourly.tolist() == pytest.approx([10 * m for m in DIURNAL_PROFILE])
    assert sum(DIURNAL_PROFILE) / 24 == pytest.approx(1.0)
    assert shaped.demand_tokens.sum() == pytest.approx(flat.demand_tokens.sum(), rel=0.01)
    assert min(DIURNAL_PROFILE) < 0.5
    assert max(DIURNAL_PROFILE) > 1.4


# -- carbon ----------------------------------------------------------------------------------------


def test_a_forecast_with_error_is_seeded_noisy_and_never_negative() -> None:
    curve = CarbonIntensity((100.0, 300.0), "test")
    perfect = curve.with_forecast_error(0.0, hours=48, seed=1)
    assert [perfect.grams_per_kwh_at(h * HOUR) for h in range(4)] == [100, 300, 100, 300]
    noisy = curve.with_forecast_error(0.2, hours=48, seed=1)
    assert noisy == curve.with_forecast_error(0.2, hours=48, seed=1)
    assert noisy != curve.with_forecast_error(0.2, hours=48, seed=2)
    ratios = np.array([noisy.grams_per_kwh_at(h * HOUR) for h in range(48)]) / np.array(
        [curve.grams_per_kwh_at(h * HOUR) for h in range(48)]
    )
    assert 0.1 < float(np.std(ratios)) < 0.3
    wild = curve.with_forecast_error(5.0, hours=48, seed=1)
    assert min(wild.hourly_grams_per_kwh) >= 0.0
    with pytest.raises(ValueError, match="--carbon-forecast-error"):
        curve.with_forecast_error(-0.1, hours=48, seed=1)


def test_planners_see_the_forecast_and_the_engine_accounts_with_the_true_curve() -> None:
    curve = CarbonIntensity((100.0, 300.0), "test")
    forecast = CarbonIntensity((150.0, 250.0), "forecast")
    plain = scenario(nodes=[h100_node("n0", gpus=8)], duration_seconds=2 * HOUR, step_seconds=60.0)
    true_only = replace(plain, carbon=curve)
    with_forecast = replace(true_only, carbon_forecast=forecast)
    assert true_only.forecast_carbon is curve
    assert with_forecast.forecast_carbon is forecast
    # What the wattsched policy's forecast query answers (observed.carbon_forecast).
    assert carbon_forecast(with_forecast.forecast_carbon, 0.0, 2) == {0: 150.0, 1: 250.0, 2: 150.0}
    # An idle node: 0.6 kWh x PUE 1.5 per hour at 100 then 300 g/kWh, whatever the forecast.
    for sim in (true_only, with_forecast):
        result = simulate(sim, flat_truth(), FixedPolicy([]))
        assert policy_metrics(result)["carbonKg"] == pytest.approx(0.9 * 0.4)


def test_job_carbon_is_the_job_replicas_energy_times_pue_and_the_hours_intensity() -> None:
    # One job GPU at 0.97 x 700 W for two hours, over the curve 100, 300 g/kWh, PUE 1.5; the idle
    # GPU's energy is not the job's.
    sim = replace(
        scenario(
            nodes=[h100_node("n0", gpus=2)],
            jobs=[job("batch/train", 1e12)],
            duration_seconds=2 * HOUR,
            step_seconds=60.0,
        ),
        carbon=CarbonIntensity((100.0, 300.0), "test"),
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("batch/train", "n0")]))
    kwh_per_hour = 0.97 * 700.0 * HOUR / JOULES_PER_KWH
    metrics = policy_metrics(result)
    assert metrics["jobGpuEnergyKWh"] == pytest.approx(2 * kwh_per_hour)
    assert metrics["jobCarbonKg"] == pytest.approx(1.5 * kwh_per_hour * (100 + 300) / 1000)
    assert metrics["carbonKg"] > metrics["jobCarbonKg"]


# -- the energy allowance --------------------------------------------------------------------------


def budget_doc(**energy: object) -> dict[str, object]:
    return {
        "kind": "EnergyBudget",
        "metadata": {"name": "rack"},
        "spec": {"powerCapWatts": 5000, "pue": 1.25, "energy": energy},
    }


def test_a_budgets_energy_allowance_is_read_and_shown_to_the_operator() -> None:
    budget = parse_budget(budget_doc(kilowattHours=120, period="Day"), [h100_node("n0")], Path("b"))
    assert (budget.energy_kwh, budget.energy_period) == (120.0, Period.DAY)
    assert budget_body(budget)["spec"]["energy"] == {"kilowattHours": 120.0, "period": "Day"}
    none = replace(budget, energy_kwh=None)
    assert "energy" not in budget_body(none)["spec"]


@pytest.mark.parametrize(
    ("energy", "message"),
    [
        ({"kilowattHours": 0}, "spec.energy.kilowattHours=0 must be a number > 0"),
        ({"kilowattHours": 5, "period": "Year"}, "spec.energy.period='Year' \\(allowed: Day"),
    ],
)
def test_a_bad_energy_allowance_is_named(energy: dict[str, object], message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        parse_budget(budget_doc(**energy), [h100_node("n0")], Path("b"))


def test_energy_over_the_allowance_is_summed_per_day() -> None:
    # Two idle 8-GPU nodes (1.2 kW) for two days, then one GPU busy on day 2 only: the budget over
    # n0 (PUE 1.25) uses 8 x 75 W x 24 h x 1.25 = 18 kWh on day 1 and more on day 2.
    budget = SimBudget(
        "rack", 1e6, frozenset({"n0"}), 1.25, None, energy_kwh=20.0, energy_period=Period.DAY
    )
    sim = scenario(
        nodes=[h100_node("n0"), h100_node("n1")],
        jobs=[job("batch/t", 1e12, arrival_seconds=DAY)],
        budgets=[budget],
        duration_seconds=2 * DAY,
        step_seconds=300.0,
    )
    result = simulate(sim, flat_truth(100.0), FixedPolicy([("batch/t", "n0")]))
    days = energy_by_period(result, budget)
    assert list(days) == ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]
    day1, day2 = days.values()
    assert day1 == pytest.approx(8 * 75 * 24 * 1.25 / 1000)
    # (The first 5-minute step of day 2 is the replica's start-up, near idle.)
    assert day2 == pytest.approx((7 * 75 + 0.97 * 700) * 24 * 1.25 / 1000, rel=0.005)
    assert energy_over_allowance_kwh(result, [budget]) == pytest.approx(day2 - 20.0)
    assert policy_metrics(result, [budget])["energyOverAllowanceKWh"] == pytest.approx(day2 - 20)
    weekly = replace(budget, energy_period=Period.WEEK)
    assert energy_over_allowance_kwh(result, [weekly]) == pytest.approx(day1 + day2 - 20.0)
    assert energy_over_allowance_kwh(result, [replace(budget, energy_kwh=None)]) == 0.0


# -- the carbon-threshold baseline -----------------------------------------------------------------


def test_carbon_threshold_holds_jobs_while_dirty_and_releases_them_after_24_hours() -> None:
    # Dirty (300 g) for the first two hours of every 4; the threshold is 200 g.
    curve = CarbonIntensity((300.0, 300.0, 100.0, 100.0), "test")
    sim = replace(
        scenario(
            nodes=[h100_node("n0", gpus=2)],
            jobs=[job("batch/a", 100.0 * 600)],
            duration_seconds=4 * HOUR,
            step_seconds=60.0,
        ),
        carbon=curve,
    )
    policy = baseline("carbon-threshold", flat_truth(100.0), carbon_threshold_grams_per_kwh=200.0)
    result = simulate(sim, flat_truth(100.0), policy)
    assert result.jobs_finished == 1
    assert result.job_carbon_grams > 0
    # It ran only in the clean hours: all of its carbon at 100 g/kWh.
    assert result.job_carbon_grams == pytest.approx(
        result.job_energy_joules * 1.5 / JOULES_PER_KWH * 100.0
    )
    spread = simulate(sim, flat_truth(100.0), baseline("spread-max", flat_truth(100.0)))
    assert spread.job_carbon_grams == pytest.approx(
        spread.job_energy_joules * 1.5 / JOULES_PER_KWH * 300.0
    )
    # Always dirty: the job waits 24 h, then starts.
    dirty = CarbonIntensity.constant(300.0, "test")
    always = replace(sim, carbon=dirty, duration_seconds=26 * HOUR)
    held = simulate(always, flat_truth(100.0), policy)
    assert held.jobs_finished == 1
    started = np.flatnonzero(held.cluster_power_watts > 2 * 75.0 + 1)[0] * 60.0
    assert started == pytest.approx(DAY, abs=120.0)
    with pytest.raises(ValueError, match="--carbon-threshold=-1: must be >= 0"):
        baseline("carbon-threshold", flat_truth(), carbon_threshold_grams_per_kwh=-1.0)


# -- deadlines with slack in hours -----------------------------------------------------------------


def test_deadline_slack_hours_puts_each_deadline_that_long_after_the_nominal_finish() -> None:
    base = generate_jobs(seed=4, duration_seconds=10 * DAY, jobs_per_hour=2.0, deadline_share=1.0)
    jobs = generate_jobs(
        seed=4,
        duration_seconds=10 * DAY,
        jobs_per_hour=2.0,
        deadline_share=1.0,
        deadline_slack_hours=(6.0, 36.0),
    )
    # The same mix (arrivals, types, sizes), only the deadlines (and clipped work) differ.
    assert [(j.key, j.arrival_seconds) for j in jobs] == [(j.key, j.arrival_seconds) for j in base]
    slacks = []
    for generated in jobs:
        assert generated.deadline_seconds is not None
        assert generated.deadline_seconds <= 10 * DAY
        finish = generated.arrival_seconds + nominal_seconds(generated)
        if generated.deadline_seconds < 10 * DAY:
            slacks.append((generated.deadline_seconds - finish) / HOUR)
        else:
            assert generated.deadline_seconds - finish >= 0.5 * nominal_seconds(generated) - 1e-6
    assert min(slacks) >= 6.0 - 1e-9
    assert max(slacks) <= 36.0 + 1e-9
    assert np.mean(slacks) == pytest.approx(21.0, abs=2.5)


@pytest.mark.parametrize(
    ("text", "expected"), [("6-36", (6.0, 36.0)), ("0-0", (0.0, 0.0)), ("1.5-2", (1.5, 2.0))]
)
def test_deadline_slack_hours_parses_min_max(text: str, expected: tuple[float, float]) -> None:
    assert cli.parse_slack_hours(text) == expected


@pytest.mark.parametrize("text", ["36-6", "6", "a-b", "1-5-9", "6-"])
def test_bad_deadline_slack_hours_is_one_line_naming_the_flag(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        "kind: Node\nmetadata: {name: n0, labels: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}"
        "\nstatus: {allocatable: {nvidia.com/gpu: '8'}}\n"
    )
    code = cli.main(
        ["--cluster", str(nodes), "--out", str(tmp_path / "out"), "--deadline-slack-hours", text]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("wattsched simulate: --deadline-slack-hours=")
    assert "MIN-MAX" in err


def test_forecast_error_without_a_curve_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--cluster", "x", "--out", str(tmp_path), "--carbon-forecast-error", "0.1"])
    assert code == 2
    assert "--carbon-forecast-error needs --carbon-csv" in capsys.readouterr().err


def test_a_multi_day_run_reports_job_carbon_and_allowance_per_policy(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "chat.csv", [("2023-11-16 18:00:00.0", 100, 50)])
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        "kind: Node\nmetadata: {name: n0, labels: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}"
        "\nstatus: {allocatable: {nvidia.com/gpu: '8'}}\n"
    )
    budget = tmp_path / "budget.yaml"
    budget.write_text(
        "kind: EnergyBudget\nmetadata: {name: rack}\nspec: {powerCapWatts: 4000, pue: 1.2, "
        "energy: {kilowattHours: 1, period: Day}}\n"
    )
    curve = tmp_path / "curve.csv"
    curve.write_text("hour,gramsPerKWh\n" + "".join(f"{h},{100 + 10 * h}\n" for h in range(24)))
    out = tmp_path / "out"
    code = cli.main(
        [
            "--cluster", str(nodes), "--budget", str(budget), "--trace", str(trace),
            "--duration", str(2 * DAY), "--step", "600", "--jobs-per-hour", "0",
            "--carbon-csv", str(curve), "--demand-profile", "diurnal",
            "--policies", "spread-max,carbon-threshold", "--out", str(out), "--no-plots",
        ]
    )  # fmt: skip
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    for metrics in document["policies"].values():
        assert metrics["jobCarbonKg"] == 0.0
        # Eight H100s, idle or serving, use > 17 kWh a day (x PUE 1.2) against 1 kWh each day.
        days = metrics["facilityKWhByPeriod"]["rack"]
        assert list(days) == ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]
        assert min(days.values()) > 17.0
        assert sum(days.values()) == pytest.approx(metrics["facilityEnergyKWh"])
        assert metrics["energyOverAllowanceKWh"] == pytest.approx(sum(days.values()) - 2.0)
    assert document["scenario"]["energyAllowances"] == {
        "rack": {"kilowattHours": 1.0, "period": "Day"}
    }
    assert document["scenario"]["demandProfile"] == "diurnal"


# -- the wattsched policy over time ----------------------------------------------------------------


def test_wattsched_with_a_horizon_runs_a_flexible_job_in_the_clean_hours() -> None:
    # Dirty (400 g) for 4 hours, then clean (50 g); a one-hour job due in 10 hours. The horizon
    # (24 h, the curve as its forecast) waits for the clean hours; one instant at a time runs now.
    curve = CarbonIntensity((400.0,) * 4 + (50.0,) * 6, "test")
    budget = SimBudget("rack", 5000.0, frozenset({"n0"}), 1.0, None)
    rate = flat_truth().replica_tokens_per_second(
        product="H100-80GB",
        workload_type=WorkloadType.TRAINING,
        model_parameters_billions=8.0,
        gpus=1,
        relative_throughput=1.0,
        power_limit_watts=700.0,
    )
    flexible = replace(job("batch/train", rate * HOUR), deadline_seconds=10 * HOUR)
    sim = replace(
        scenario(
            nodes=[h100_node("n0", gpus=2)],
            jobs=[flexible],
            budgets=[budget],
            duration_seconds=10 * HOUR,
            step_seconds=60.0,
        ),
        carbon=curve,
        replan_interval_seconds=600.0,
    )
    carbon_kg = {}
    for hours in (24.0, 0.0):
        settings = cli.PolicySettings(horizon_hours=hours, carbon_forecast=hours > 0)
        policy = cli.make_policy("wattsched", flat_truth(), settings)
        result = simulate(sim, flat_truth(), policy)
        assert result.jobs_finished == 1
        assert result.deadline_misses == 0
        carbon_kg[hours] = policy_metrics(result)["jobCarbonKg"]
        grams_per_kwh = result.job_carbon_grams / (result.job_energy_joules * 1.5 / JOULES_PER_KWH)
        assert grams_per_kwh == pytest.approx(50.0 if hours else 400.0, rel=0.05)
    assert carbon_kg[24.0] < 0.2 * carbon_kg[0.0]


def _books_and_draw(truth: GroundTruth) -> tuple[float, float, str]:
    """A two-hour run of the wattsched policy: the budget's energy used as its status says, what
    its node drew by then (the engine's own integral) and the status's energy source."""
    budget = SimBudget("rack", 5000.0, frozenset({"n0"}), 1.0, None, 1000.0, Period.DAY)
    # Work for 1.5 hours at full speed, due in 2: it runs from the start.
    work_tokens = (
        1.5
        * HOUR
        * 2
        * truth.replica_tokens_per_second(
            product="H100-80GB",
            workload_type=WorkloadType.TRAINING,
            model_parameters_billions=8.0,
            gpus=2,
            relative_throughput=1.0,
            power_limit_watts=truth.product("H100-80GB").max_watts,
        )
    )
    sim = replace(
        scenario(
            nodes=[h100_node("n0", gpus=4)],
            jobs=[job("batch/train", work_tokens, deadline_seconds=2 * HOUR, gpus=2, replicas=2)],
            budgets=[budget],
            duration_seconds=2 * HOUR,
            step_seconds=10.0,
        ),
        replan_interval_seconds=300.0,
    )
    policy = cli.make_policy("wattsched", truth, cli.PolicySettings(horizon_hours=24.0))
    assert isinstance(policy, PlannerPolicy)
    simulation = Simulation(sim, truth, policy)
    simulation.run()
    status = policy._statuses[("EnergyBudget", "rack")]
    accounted = observed.seconds_at(parse_time(status["accountedUntil"]))
    samples = simulation.telemetry.visible(sim.duration_seconds + HOUR)
    drawn = next(s.node_joules["n0"] for s in samples if s.window_end_seconds == accounted)
    return status["energyUsedJoules"], drawn, str(status["energySource"])


def test_the_operators_energy_books_read_the_nodes_energy_counters() -> None:
    """The budget's energy used is what its node drew (the energy counter the operator's
    Prometheus query reads), not the plan's expected watts x time: the catalogue's watts are 4%
    (flat truth) and 10% (default truth) below these nodes' draw, and the books still match it."""
    for truth in (flat_truth(), replace(GroundTruth(), power_noise=0.0)):
        booked, drawn, source = _books_and_draw(truth)
        # The first interval (before the counter's second scrape) is modelled.
        assert source == "mixed"
        assert booked == pytest.approx(drawn, rel=0.005)


def test_a_node_energy_reading_is_the_counter_difference_extrapolated_like_promql() -> None:
    """Each end's counter value is its last visible sample plus the rate since
    (`telemetry.counter_value_at`); a node without two samples by a time is missing."""
    samples = [
        Sample(
            end,
            {},
            {},
            {},
            {},
            {},
            node_joules={"n0": 2000.0 * end, **({"n1": 5.0} if end > 40 else {})},
        )
        for end in (15.0, 30.0, 45.0, 60.0)
    ]
    reading = observed.energy_reading(
        samples, ["n0", "n1"], start=observed.at(35.0), end=observed.at(90.0)
    )
    assert reading.node_joules["n0"].value == pytest.approx(2000.0 * 55)
    assert reading.node_joules["n0"].metric == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    assert reading.missing_nodes == {"n1"}
    assert (reading.source, reading.stale) == ("measured", False)
