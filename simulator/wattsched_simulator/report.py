"""Present a comparison: results.json, a terminal table and PNG plots (matplotlib, Agg backend).

`results.json` has `{"policies": {"<policy>": {gpuEnergyKWh, facilityEnergyKWh, carbonKg,
tokensPerJoule, sloAttainment, deadlineMisses, secondsOverBudget, preemptions, migrations,
planSecondsP50, ...}}}` plus `scenario` (what was simulated, the trace attribution, and that every
figure is modelled by the simulator's ground truth, not measured on hardware). Not for: running
simulations (`engine`) or choosing what to compare (`cli`).
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

from .engine import JOULES_PER_KWH, PolicyResult

# Points per plotted series: per-step series are averaged into this many buckets at most.
PLOT_POINTS = 720


def policy_metrics(result: PolicyResult) -> dict[str, Any]:
    """The per-policy entry of results.json."""
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
    results: Sequence[PolicyResult], scenario: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "policies": {result.policy: policy_metrics(result) for result in results},
        "scenario": dict(scenario),
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def table(document: Mapping[str, Any]) -> str:
    """A fixed-width table of the headline metrics, one row per policy."""
    columns = [
        ("policy", "{}", None),
        ("GPU kWh", "{:.2f}", "gpuEnergyKWh"),
        ("facility kWh", "{:.2f}", "facilityEnergyKWh"),
        ("CO2 kg", "{:.2f}", "carbonKg"),
        ("tokens/J", "{:.2f}", "tokensPerJoule"),
        ("SLO", "{:.2%}", "sloAttainment"),
        ("deadline miss", "{}", "deadlineMisses"),
        ("s over budget", "{:.0f}", "secondsOverBudget"),
        ("preempt", "{}", "preemptions"),
        ("migrate", "{}", "migrations"),
        ("plan s p50", "{:.3f}", "planSecondsP50"),
    ]
    policies: Mapping[str, Mapping[str, Any]] = document["policies"]
    rows = [[title for title, _, _ in columns]]
    for name, metrics in policies.items():
        rows.append(
            [name] + [fmt.format(metrics[key]) for _, fmt, key in columns[1:] if key is not None]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _bucket(
    series: np.ndarray[Any, np.dtype[np.float64]], step_seconds: float
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]]]:
    size = max(1, int(np.ceil(len(series) / PLOT_POINTS)))
    usable = len(series) // size * size
    values = series[:usable].reshape(-1, size).mean(axis=1)
    minutes = (np.arange(len(values), dtype=np.float64) * size + size / 2) * step_seconds / 60.0
    return minutes, np.asarray(values, dtype=np.float64)


def plot_power(results: Sequence[PolicyResult], caps: Mapping[str, float], path: Path) -> None:
    """Per policy: true GPU power over time, the sum of power limits, and each budget's cap."""
    fig, axes = plt.subplots(
        len(results), 1, figsize=(9, 1.9 * len(results) + 0.6), sharex=True, sharey=True
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
        ax.set_title(result.policy, fontsize=9, loc="left")
        ax.set_ylabel("kW")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes_list[0].legend(fontsize=7, loc="upper right", ncol=3)
    axes_list[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _bar(
    names: Sequence[str], values: Sequence[float], *, ylabel: str, title: str, path: Path, fmt: str
) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bars = ax.bar(names, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            fmt.format(value),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_plots(
    results: Sequence[PolicyResult],
    document: Mapping[str, Any],
    caps: Mapping[str, float],
    out_dir: Path,
) -> list[Path]:
    policies: Mapping[str, Mapping[str, Any]] = document["policies"]
    names = list(policies)
    paths = [
        out_dir / "power_vs_cap.png",
        out_dir / "energy_by_policy.png",
        out_dir / "slo_attainment.png",
    ]
    plot_power(results, caps, paths[0])
    _bar(
        names,
        [policies[n]["gpuEnergyKWh"] for n in names],
        ylabel="GPU energy (kWh, modelled)",
        title="GPU energy by policy",
        path=paths[1],
        fmt="{:.1f}",
    )
    _bar(
        names,
        [100.0 * policies[n]["sloAttainment"] for n in names],
        ylabel="demand served on time (%)",
        title="SLO attainment by policy (inference)",
        path=paths[2],
        fmt="{:.2f}",
    )
    return paths
