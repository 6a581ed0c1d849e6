"""`wattsched simulate`'s summary and plots: energy beside the work it bought, the cap columns that
tell policies apart, SLO per service, plots with titles, readable legends and energy per work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.engine import PolicyResult
from wattsched_simulator.report import (
    LEGEND_FONT_SIZE,
    kwh_per_million_tokens,
    power_carbon_figure,
    power_figure,
    results_document,
    table,
    write_plots,
)


def result(policy: str, **overrides: Any) -> PolicyResult:
    """A PolicyResult of 10 one-second steps, with the figures a test names."""
    fields: dict[str, Any] = {
        "policy": policy,
        "step_seconds": 1.0,
        "gpu_energy_joules": 3.6e6,  # 1 kWh
        "inference_energy_joules": 1.8e6,
        "job_energy_joules": 1.2e6,
        "job_carbon_grams": 150.0,
        "node_energy_joules": {},
        "facility_energy_joules": 4.5e6,
        "carbon_grams": 400.0,
        "inference_tokens_served": 1.0e6,
        "job_tokens_processed": 2.0e6,
        "on_time_tokens": {"default/chat": 99.0, "default/code": 80.0},
        "judged_tokens": {"default/chat": 100.0, "default/code": 100.0},
        "deadline_misses": 0,
        "jobs_finished": 3,
        "jobs_with_deadline": 4,
        "seconds_over_budget": 0.0,
        "seconds_limits_over_budget": 0.0,
        "preemptions": 0,
        "migrations": 0,
        "plan_seconds": [0.1],
        "decision_statuses": {},
        "cluster_power_watts": np.full(10, 5000.0),
        "budget_power_watts": {"rack": np.full(10, 5000.0)},
        "budget_limits_watts": {"rack": np.full(10, 6000.0)},
        "service_capacity_tokens_per_second": {},
        "wall_seconds": 1.0,
    }
    fields.update(overrides)
    return PolicyResult(**fields)


def two_policies() -> list[PolicyResult]:
    return [
        result(
            "spread-max",
            gpu_energy_joules=7.2e6,
            job_tokens_processed=31.8e6,
            seconds_limits_over_budget=3600.0,
            deadline_misses=1,
        ),
        result("wattsched", job_tokens_processed=19.3e6),
    ]


def rows(text: str, first_cell: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first_cell]]


def test_the_summary_shows_job_work_and_tokens_per_joule_beside_energy() -> None:
    text = table(results_document(two_policies(), {}))
    header = text.splitlines()[1]
    for heading in ("GPU kWh", "job Mtok", "job CO2 kg", "inference Mtok", "tokens/J", "kWh/Mtok"):
        assert heading in header
    spread, wattsched = (rows(text, name)[0] for name in ("spread-max", "wattsched"))
    # GPU kWh, facility kWh, CO2 kg, inference Mtok, job Mtok, job CO2 kg, tokens/J, kWh/Mtok
    assert spread[1] == "2.00"
    assert wattsched[1] == "1.00"
    assert spread[5] == "31.80"
    assert wattsched[5] == "19.30"
    assert wattsched[6] == "0.15"
    assert spread[7] == f"{(1.0e6 + 31.8e6) / 7.2e6:.3f}"
    assert wattsched[8] == f"{1.0 / 20.3:.3f}"


def test_the_summary_shows_seconds_with_limits_over_the_cap_and_deadline_misses() -> None:
    text = table(results_document(two_policies(), {}))
    assert "s limits>cap" in text
    assert "s draw>cap" in text
    spread, wattsched = (rows(text, name)[1] for name in ("spread-max", "wattsched"))
    # policy, deadline miss ("1 of 4"), SLO, s limits>cap, s draw>cap, ...
    assert spread[1:4] == ["1", "of", "4"]
    assert wattsched[1:4] == ["0", "of", "4"]
    assert spread[5] == "3600"
    assert wattsched[5] == "0"


def test_the_summary_shows_slo_attainment_per_service() -> None:
    text = table(results_document(two_policies(), {}))
    assert "service (SLO attainment)" in text
    assert rows(text, "default/chat") == [["default/chat", "99.00%", "99.00%"]]
    assert rows(text, "default/code") == [["default/code", "80.00%", "80.00%"]]


def test_energy_per_work_is_none_without_work() -> None:
    metrics = results_document(
        [result("idle", inference_tokens_served=0.0, job_tokens_processed=0.0)], {}
    )["policies"]["idle"]
    assert kwh_per_million_tokens(metrics) is None
    assert rows(table({"policies": {"idle": metrics}}), "idle")[0][-1] == "-"


def test_the_power_plot_has_a_title_per_panel_and_a_readable_legend() -> None:
    figure = power_figure(two_policies(), {"rack": 5500.0})
    assert "GPU power" in figure.get_suptitle()
    assert [ax.get_title(loc="left") for ax in figure.axes] == [
        "policy spread-max",
        "policy wattsched",
    ]
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["GPU draw (modelled)", "sum of power limits (rack)", "cap (rack)"]
    assert all(float(text.get_fontsize()) >= LEGEND_FONT_SIZE for text in legend.get_texts())


def test_plots_include_energy_per_unit_of_work(tmp_path: Path) -> None:
    results = two_policies()
    paths = write_plots(results, results_document(results, {}), {"rack": 5500.0}, tmp_path)
    assert tmp_path / "energy_per_work.png" in paths
    assert tmp_path / "power_cap_carbon.png" not in paths
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_with_an_hourly_carbon_curve_power_cap_and_intensity_are_plotted(tmp_path: Path) -> None:
    results = two_policies()
    curve = CarbonIntensity((300.0, 80.0), "test")
    paths = write_plots(results, results_document(results, {}), {"rack": 5500.0}, tmp_path, curve)
    assert paths[-1] == tmp_path / "power_cap_carbon.png"
    assert paths[-1].read_bytes()[:4] == b"\x89PNG"
    figure = power_carbon_figure(results, {"rack": 5500.0}, curve)
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["GPU draw (modelled)", "cap (rack)", "carbon intensity"]
    intensity = figure.axes[-1].get_lines()[0].get_ydata()
    assert set(np.asarray(intensity).tolist()) <= {300.0, 80.0}
