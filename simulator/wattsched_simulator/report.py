"""Present a comparison: results.json, a terminal table and PNG plots (matplotlib, Agg backend).

`results.json` has `{"policies": {"<policy>": {gpuEnergyKWh, facilityEnergyKWh, carbonKg,
tokensPerJoule, sloAttainment, deadlineMisses, secondsOverBudget, preemptions, migrations,
planSecondsP50, jobCarbonKg, energyOverAllowanceKWh, ...}}}` plus `scenario` (what was
simulated, the trace attribution, and that every figure is modelled by the simulator's ground
truth, not measured on hardware). The terminal summary puts energy beside the work done (tokens,
tokens per joule, kWh per million tokens, job CO2) and shows deadline misses, seconds with power
limits over a cap and kWh over an allowance; every plot has a title, and one shows
energy per unit of work. Not for: running simulations (`engine`) or choosing what to compare
(`cli`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from wattsched_api.energybudget import period_start

from .carbon import CarbonIntensity
from .cluster import SimBudget
from .engine import JOULES_PER_KWH, PolicyResult
from .observed import at

# Points per plotted series: per-step series are averaged into this many buckets at most.
PLOT_POINTS = 720


def energy_by_period(result: PolicyResult, budget: SimBudget) -> dict[str, float]:
    """A budget's facility kWh (its nodes' GPU energy x its PUE, as the operator accounts
    `energyUsedKilowattHours`) per allowance period (`spec.energy.period`, UTC calendar periods
    from the run's start at `observed.EPOCH`), by the period's start (RFC 3339)."""
    power = result.budget_power_watts.get(budget.name)
    if power is None or not len(power):
        return {}
    dt = result.step_seconds
    hours = (np.arange(len(power)) * dt // 3600).astype(np.int64)
    joules = np.bincount(hours, weights=power * dt)
    out: dict[str, float] = {}
    for hour, hour_joules in enumerate(joules):
        start = period_start(at(hour * 3600.0), budget.energy_period)
        key = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        out[key] = out.get(key, 0.0) + float(hour_joules) * budget.pue / JOULES_PER_KWH
    return out


def energy_over_allowance_kwh(result: PolicyResult, budgets: Sequence[SimBudget]) -> float:
    """kWh used above the allowance, summed over budgets with `spec.energy` and their periods."""
    return sum(
        max(0.0, used - budget.energy_kwh)
        for budget in budgets
        if budget.energy_kwh is not None
        for used in energy_by_period(result, budget).values()
    )


def policy_metrics(result: PolicyResult, budgets: Sequence[SimBudget] = ()) -> dict[str, Any]:
    """The per-policy entry of results.json (`budgets`: for the energy allowances)."""
    joules = result.gpu_energy_joules
    useful = result.inference_tokens_served + result.job_tokens_processed
    steps = len(result.cluster_power_watts)
    return {
        "gpuEnergyKWh": joules / JOULES_PER_KWH,
        "facilityEnergyKWh": result.facility_energy_joules / JOULES_PER_KWH,
        "carbonKg": result.carbon_grams / 1000.0,
        "tokensPerJoule": useful / joules if joules > 0 else 0.0,
        "sloAttainment": result.slo_attainment,
        "deadlineMisses": result.deadline_misses,
        "secondsOverBudget": result.seconds_over_budget,
        "preemptions": result.preemptions,
        "migrations": result.migrations,
        # Job replicas' GPU energy x PUE x the intensity of when it was drawn.
        "jobCarbonKg": result.job_carbon_grams / 1000.0,
        "energyOverAllowanceKWh": energy_over_allowance_kwh(result, budgets),
        "planSecondsP50": statistics.median(result.plan_seconds) if result.plan_seconds else 0.0,
        # More keys (allowed by the format):
        "planSecondsMax": max(result.plan_seconds, default=0.0),
        "plans": len(result.plan_seconds),
        "planStatuses": dict(sorted(result.decision_statuses.items())),
        "secondsLimitsOverBudget": result.seconds_limits_over_budget,
        "meanPowerWatts": float(result.cluster_power_watts.mean()) if steps else 0.0,
        "peakPowerWatts": float(result.cluster_power_watts.max()) if steps else 0.0,
        "inferenceTokensServed": result.inference_tokens_served,
        "inferenceGpuEnergyKWh": result.inference_energy_joules / JOULES_PER_KWH,
        "jobTokensProcessed": result.job_tokens_processed,
        "jobGpuEnergyKWh": result.job_energy_joules / JOULES_PER_KWH,
        "facilityKWhByPeriod": {
            budget.name: energy_by_period(result, budget)
            for budget in budgets
            if budget.energy_kwh is not None
        },
        "jobsFinished": result.jobs_finished,
        "jobsWithDeadline": result.jobs_with_deadline,
        "sloAttainmentByService": {
            key: (result.on_time_tokens[key] / judged if judged > 0 else 1.0)
            for key, judged in result.judged_tokens.items()
        },
        "simulatedSecondsPerWallSecond": (
            steps * result.step_seconds / result.wall_seconds if result.wall_seconds > 0 else 0.0
        ),
    }


def results_document(
    results: Sequence[PolicyResult],
    scenario: Mapping[str, Any],
    budgets: Sequence[SimBudget] = (),
) -> dict[str, Any]:
    return {
        "policies": {result.policy: policy_metrics(result, budgets) for result in results},
        "scenario": dict(scenario),
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _fixed_width(rows: Sequence[Sequence[str]]) -> str:
    """Rows as a fixed-width table: the first column left-aligned, the others right-aligned, a rule
    under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def work_tokens(metrics: Mapping[str, Any]) -> float:
    """The work a policy did: inference tokens served plus job tokens processed."""
    return float(metrics["inferenceTokensServed"]) + float(metrics["jobTokensProcessed"])


def kwh_per_million_tokens(metrics: Mapping[str, Any]) -> float | None:
    """GPU energy per unit of work (kWh per million tokens); None when no work was done."""
    tokens = work_tokens(metrics)
    return float(metrics["gpuEnergyKWh"]) / (tokens / 1e6) if tokens > 0 else None


# The headline tables: (heading, format, results.json key). Energy beside the work it bought, then
# the objectives and the cap: `s limits>cap` (secondsLimitsOverBudget, the sum of power limits in a
# budget above its cap: what wattsched guarantees never happens) and `s draw>cap`
# (secondsOverBudget, modelled draw above the cap).
ENERGY_COLUMNS = (
    ("GPU kWh", "{:.2f}", "gpuEnergyKWh"),
    ("facility kWh", "{:.2f}", "facilityEnergyKWh"),
    ("CO2 kg", "{:.2f}", "carbonKg"),
    ("inference Mtok", "{:.2f}", "inferenceTokensServed"),
    ("job Mtok", "{:.2f}", "jobTokensProcessed"),
    ("job CO2 kg", "{:.2f}", "jobCarbonKg"),
    ("tokens/J", "{:.3f}", "tokensPerJoule"),
)
OBJECTIVE_COLUMNS = (
    ("SLO", "{:.2%}", "sloAttainment"),
    ("s limits>cap", "{:.0f}", "secondsLimitsOverBudget"),
    ("s draw>cap", "{:.0f}", "secondsOverBudget"),
    ("kWh>allowance", "{:.1f}", "energyOverAllowanceKWh"),
    ("preempt", "{}", "preemptions"),
    ("migrate", "{}", "migrations"),
    ("plan s p50", "{:.3f}", "planSecondsP50"),
)
_MILLIONS = {"inferenceTokensServed", "jobTokensProcessed"}


def _cell(metrics: Mapping[str, Any], fmt: str, key: str) -> str:
    value = metrics[key]
    return fmt.format(value / 1e6 if key in _MILLIONS else value)


def table(document: Mapping[str, Any]) -> str:
    """The summary printed by `wattsched simulate`: per policy, energy beside the work done
    (tokens, tokens per joule, kWh per million tokens); deadline misses, SLO and seconds over the
    cap; then SLO attainment per inference service. Every figure is modelled."""
    policies: Mapping[str, Mapping[str, Any]] = document["policies"]
    energy_rows = [["policy", *(title for title, _, _ in ENERGY_COLUMNS), "kWh/Mtok"]]
    objective_rows = [["policy", "deadline miss", *(title for title, _, _ in OBJECTIVE_COLUMNS)]]
    for name, metrics in policies.items():
        per_work = kwh_per_million_tokens(metrics)
        energy_rows.append(
            [
                name,
                *(_cell(metrics, fmt, key) for _, fmt, key in ENERGY_COLUMNS),
                "-" if per_work is None else f"{per_work:.3f}",
            ]
        )
        objective_rows.append(
            [
                name,
                f"{metrics['deadlineMisses']} of {metrics['jobsWithDeadline']}",
                *(_cell(metrics, fmt, key) for _, fmt, key in OBJECTIVE_COLUMNS),
            ]
        )
    sections = [
        "Energy and the work it bought (tokens: inference served + job tokens processed)",
        _fixed_width(energy_rows),
        "",
        "Objectives and the cap (s limits>cap: power limits summed above a budget's cap; "
        "s draw>cap: draw above it)",
        _fixed_width(objective_rows),
    ]
    services = sorted({key for m in policies.values() for key in m["sloAttainmentByService"]})
    if services:
        service_rows = [["service (SLO attainment)", *policies]]
        service_rows += [
            [
                service,
                *(
                    "-"
                    if service not in metrics["sloAttainmentByService"]
                    else f"{metrics['sloAttainmentByService'][service]:.2%}"
                    for metrics in policies.values()
                ),
            ]
            for service in services
        ]
        sections += ["", _fixed_width(service_rows)]
    return "\n".join(sections)


def _bucket(
    series: np.ndarray[Any, np.dtype[np.float64]], step_seconds: float
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]]]:
    size = max(1, int(np.ceil(len(series) / PLOT_POINTS)))
    usable = len(series) // size * size
    values = series[:usable].reshape(-1, size).mean(axis=1)
    minutes = (np.arange(len(values), dtype=np.float64) * size + size / 2) * step_seconds / 60.0
    return minutes, np.asarray(values, dtype=np.float64)


# Legend and label sizes readable at the saved resolution.
LEGEND_FONT_SIZE = 9
TITLE_FONT_SIZE = 11


def power_figure(results: Sequence[PolicyResult], caps: Mapping[str, float]) -> Figure:
    """Per policy: modelled GPU draw over time, the sum of power limits, and each budget's cap;
    one legend for all panels, below them."""
    fig, axes = plt.subplots(
        len(results), 1, figsize=(9, 2.0 * len(results) + 1.4), sharex=True, sharey=True
    )
    axes_list = list(np.atleast_1d(axes))
    for ax, result in zip(axes_list, results, strict=True):
        minutes, power = _bucket(result.cluster_power_watts, result.step_seconds)
        ax.plot(minutes, power / 1000.0, color="tab:blue", lw=1.0, label="GPU draw (modelled)")
        for name, limits in result.budget_limits_watts.items():
            minutes_l, limit_values = _bucket(limits, result.step_seconds)
            ax.plot(
                minutes_l,
                limit_values / 1000.0,
                color="tab:orange",
                lw=0.9,
                ls="--",
                label=f"sum of power limits ({name})",
            )
        for name, cap in caps.items():
            ax.axhline(cap / 1000.0, color="tab:red", lw=1.0, label=f"cap ({name})")
        ax.set_title(f"policy {result.policy}", fontsize=LEGEND_FONT_SIZE + 1, loc="left")
        ax.set_ylabel("kW")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes_list[-1].set_xlabel("minutes")
    fig.suptitle(
        "GPU power against the budget caps, per policy (modelled)", fontsize=TITLE_FONT_SIZE
    )
    handles, labels = axes_list[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(3, len(labels)),
        fontsize=LEGEND_FONT_SIZE,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def power_carbon_figure(
    results: Sequence[PolicyResult], caps: Mapping[str, float], carbon: CarbonIntensity
) -> Figure:
    """Per policy over the run, in hours: modelled GPU draw, each budget's cap and the grid's
    carbon intensity (right axis), so that one sees when each policy ran its work."""
    fig, axes = plt.subplots(
        len(results), 1, figsize=(10, 2.2 * len(results) + 1.4), sharex=True, sharey=True
    )
    axes_list = list(np.atleast_1d(axes))
    for ax, result in zip(axes_list, results, strict=True):
        minutes, power = _bucket(result.cluster_power_watts, result.step_seconds)
        hours = minutes / 60.0
        ax.plot(hours, power / 1000.0, color="tab:blue", lw=1.0, label="GPU draw (modelled)")
        for name, cap in caps.items():
            ax.axhline(cap / 1000.0, color="tab:red", lw=1.0, label=f"cap ({name})")
        ax.set_ylabel("kW")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"policy {result.policy}", fontsize=LEGEND_FONT_SIZE + 1, loc="left")
        intensity_ax = ax.twinx()
        end_hours = len(result.cluster_power_watts) * result.step_seconds / 3600.0
        grid_hours = np.arange(0.0, end_hours + 1e-9, 0.25)
        intensity_ax.step(
            grid_hours,
            [carbon.grams_per_kwh_at(h * 3600.0) for h in grid_hours],
            where="post",
            color="tab:green",
            lw=1.0,
            label="carbon intensity",
        )
        intensity_ax.set_ylabel("gCO2/kWh")
        intensity_ax.set_ylim(bottom=0)
    axes_list[-1].set_xlabel("hours")
    fig.suptitle(
        "GPU power, cap and grid carbon intensity, per policy (modelled)", fontsize=TITLE_FONT_SIZE
    )
    handles, labels = axes_list[0].get_legend_handles_labels()
    twin_handles, twin_labels = fig.axes[-1].get_legend_handles_labels()
    fig.legend(
        handles + twin_handles,
        labels + twin_labels,
        loc="lower center",
        ncol=3,
        fontsize=LEGEND_FONT_SIZE,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_power(results: Sequence[PolicyResult], caps: Mapping[str, float], path: Path) -> None:
    fig = power_figure(results, caps)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def bar_figure(
    names: Sequence[str], values: Sequence[float], *, ylabel: str, title: str, fmt: str
) -> Figure:
    """One bar per policy, each labelled with its value."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(names, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            fmt.format(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=LEGEND_FONT_SIZE,
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=TITLE_FONT_SIZE)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _bar(
    names: Sequence[str], values: Sequence[float], *, ylabel: str, title: str, path: Path, fmt: str
) -> None:
    fig = bar_figure(names, values, ylabel=ylabel, title=title, fmt=fmt)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_plots(
    results: Sequence[PolicyResult],
    document: Mapping[str, Any],
    caps: Mapping[str, float],
    out_dir: Path,
    carbon: CarbonIntensity | None = None,
) -> list[Path]:
    """The plots of a run; with an hourly carbon curve (`carbon` of more than one value) also
    power_cap_carbon.png (`power_carbon_figure`)."""
    policies: Mapping[str, Mapping[str, Any]] = document["policies"]
    names = list(policies)
    paths = [
        out_dir / "power_vs_cap.png",
        out_dir / "energy_by_policy.png",
        out_dir / "energy_per_work.png",
        out_dir / "slo_attainment.png",
    ]
    plot_power(results, caps, paths[0])
    _bar(
        names,
        [policies[n]["gpuEnergyKWh"] for n in names],
        ylabel="GPU energy (kWh, modelled)",
        title="GPU energy by policy (modelled)",
        path=paths[1],
        fmt="{:.1f}",
    )
    _bar(
        names,
        [kwh_per_million_tokens(policies[n]) or 0.0 for n in names],
        ylabel="GPU kWh per million tokens",
        title="GPU energy per unit of work by policy (modelled; lower is better)",
        path=paths[2],
        fmt="{:.3f}",
    )
    _bar(
        names,
        [100.0 * policies[n]["sloAttainment"] for n in names],
        ylabel="demand served on time (%)",
        title="SLO attainment by policy (inference, modelled)",
        path=paths[3],
        fmt="{:.2f}",
    )
    if carbon is not None and len(set(carbon.hourly_grams_per_kwh)) > 1:
        paths.append(out_dir / "power_cap_carbon.png")
        fig = power_carbon_figure(results, caps, carbon)
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths
