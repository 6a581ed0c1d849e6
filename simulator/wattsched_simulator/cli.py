"""`wattsched simulate`: replay traces through a simulated cluster and compare policies.

Parses arguments, builds one `Scenario` (cluster, budgets, trace demand, generated jobs), runs every
requested policy on it against the same ground truth, and writes `OUT/results.json`, the plots and
a table on the terminal. Bad input exits with code 2 and one message naming the file or flag.
Not for: the simulation itself (`engine`) or the policies (`baselines`, `controller`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from wattsched_api.commandline import CommandParser
from wattsched_operator import core, demand
from wattsched_operator.budget_horizon import DEFAULT_HORIZON_HOURS
from wattsched_optimizer.problem import EnergyPolicy, PlanOptions

from .baselines import DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH, baseline
from .carbon import DEFAULT_GRAMS_PER_KWH, CarbonIntensity, load_hourly_csv
from .cluster import ClusterError, SimBudget, SimNode, load_budgets, load_nodes
from .controller import OracleKnowledge, PlannerPolicy
from .engine import Policy, PolicyResult, Scenario, simulate
from .report import results_document, table, write_json, write_plots
from .telemetry import TelemetryConfig
from .trace import (
    DEMAND_PROFILES,
    FLAT_PROFILE,
    TRACE_ATTRIBUTION,
    TraceError,
    default_trace_paths,
    load_traces,
)
from .truth import GroundTruth
from .workloads import generate_jobs, services_from_traces

ALL_POLICIES = (
    "spread-max",
    "binpack-max",
    "static-cap",
    "carbon-threshold",
    "wattsched",
    "oracle",
)
# The longest --horizon-hours (as the operator's).
MAX_HORIZON_HOURS = 168


@dataclass(frozen=True)
class PolicySettings:
    static_cap_fraction: float = 0.7
    carbon_threshold_grams_per_kwh: float = DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH
    energy_policy: EnergyPolicy = EnergyPolicy.BALANCED
    # The operator's forecast headroom (`demand.HEADROOM`); another value is a what-if.
    headroom: float = demand.HEADROOM
    power_levels: int = 5
    plan_time_limit_seconds: float = 10.0
    # The operator's default; docs/evaluation.md shows the sensitivity.
    churn_threshold: float = PlanOptions().churn_threshold
    # Ablations of the planner: never lock SM clocks; only each workload's best-quality variant.
    sm_clocks: bool = True
    best_variant_only: bool = False
    # The operator's horizon (`--horizon-hours`; 0: one instant at a time, the carbon-agnostic
    # reference) and whether the scenario's hourly carbon curve is the budgets' forecast.
    horizon_hours: float = DEFAULT_HORIZON_HOURS
    carbon_forecast: bool = False


def make_policy(name: str, truth: GroundTruth, settings: PolicySettings) -> Policy:
    options = PlanOptions(
        power_levels=settings.power_levels,
        time_limit_seconds=settings.plan_time_limit_seconds,
        churn_threshold=settings.churn_threshold,
        sm_clocks=settings.sm_clocks,
    )
    if name == "wattsched":
        return PlannerPolicy(
            "wattsched",
            options,
            settings.energy_policy,
            headroom=settings.headroom,
            best_variant_only=settings.best_variant_only,
            settings=core.Settings(horizon_hours=settings.horizon_hours),
            carbon_forecast=settings.carbon_forecast,
        )
    if name == "oracle":
        return PlannerPolicy(
            "oracle",
            options,
            settings.energy_policy,
            oracle=OracleKnowledge(truth),
            best_variant_only=settings.best_variant_only,
        )
    return baseline(
        name, truth, settings.static_cap_fraction, settings.carbon_threshold_grams_per_kwh
    )


def build_scenario(
    *,
    nodes: Sequence[SimNode],
    budgets: Sequence[SimBudget],
    trace_paths: Sequence[Path],
    duration_seconds: float,
    rate_scale: float,
    jobs_per_hour: float,
    seed: int,
    carbon: CarbonIntensity,
    pue: float,
    step_seconds: float = 1.0,
    replan_interval_seconds: float = 60.0,
    startup_seconds: float = 60.0,
    latency_target_seconds: float = 5.0,
    deadline_share: float = 0.7,
    multi_node_share: float = 0.0,
    demand_profile: tuple[float, ...] = FLAT_PROFILE,
    deadline_slack_hours: tuple[float, float] | None = None,
    carbon_forecast: CarbonIntensity | None = None,
) -> Scenario:
    traces = load_traces(
        list(trace_paths),
        duration_seconds=duration_seconds,
        step_seconds=step_seconds,
        rate_scale=rate_scale,
        seed=seed,
        hourly_profile=demand_profile,
    )
    return Scenario(
        nodes=tuple(nodes),
        budgets=tuple(budgets),
        services=tuple(services_from_traces(traces)),
        jobs=tuple(
            generate_jobs(
                seed=seed,
                duration_seconds=duration_seconds,
                jobs_per_hour=jobs_per_hour,
                deadline_share=deadline_share,
                multi_node_share=multi_node_share,
                deadline_slack_hours=deadline_slack_hours,
            )
        ),
        duration_seconds=duration_seconds,
        carbon=carbon,
        carbon_forecast=carbon_forecast,
        pue=pue,
        step_seconds=step_seconds,
        replan_interval_seconds=replan_interval_seconds,
        startup_seconds=startup_seconds,
        latency_target_seconds=latency_target_seconds,
        telemetry=TelemetryConfig(),
        seed=seed,
    )


def run_policies(
    scenario: Scenario,
    truth: GroundTruth,
    names: Sequence[str],
    settings: PolicySettings,
    *,
    progress: bool,
) -> list[PolicyResult]:
    """Run each policy on the same scenario and truth, in order, with one progress bar."""
    results = []
    with tqdm(
        total=scenario.steps * len(names),
        unit="step",
        desc="simulating",
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5,
    ) as bar:

        def advance(_: int) -> None:
            bar.update()

        for name in names:
            bar.set_postfix_str(name)
            results.append(
                simulate(
                    scenario,
                    truth,
                    make_policy(name, truth, settings),
                    on_step=advance,
                )
            )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched simulate",
        description="Replay LLM request traces through a simulated GPU cluster and compare "
        "scheduling policies. Every figure is modelled by the simulator's ground truth. "
        f"Default traces: {TRACE_ATTRIBUTION}.",
    )
    parser.add_argument("--cluster", type=Path, required=True, help="YAML of Nodes")
    parser.add_argument("--budget", type=Path, help="YAML of EnergyBudgets (default: none)")
    parser.add_argument(
        "--trace",
        type=Path,
        nargs="+",
        help="request trace CSVs (default: the Azure 2023 traces "
        "in ../shared/data/azure-llm-inference-2023/)",
    )
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument(
        "--policies",
        default=",".join(ALL_POLICIES),
        help=f"comma-separated, from {', '.join(ALL_POLICIES)} (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the generated jobs and arrivals"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the traces' request rate (default 1)",
    )
    parser.add_argument(
        "--jobs-per-hour",
        type=float,
        default=12.0,
        help="mean arrival rate of generated batch jobs (default 12; 0 for none)",
    )
    parser.add_argument(
        "--deadline-share",
        type=float,
        default=0.7,
        help="share of generated jobs with a deadline (default 0.7)",
    )
    parser.add_argument(
        "--multi-node-share",
        type=float,
        default=0.0,
        help="share of generated 70B training jobs whose replica spans 2 whole 8-GPU nodes "
        "(spec.gpu.nodesPerReplica 2; default 0)",
    )
    parser.add_argument(
        "--deadline-slack-hours",
        metavar="MIN-MAX",
        help="each generated job's deadline is MIN-MAX hours (uniform) after it could finish at "
        "full speed (default: its nominal duration x 1.5-3.0); e.g. 6-36",
    )
    parser.add_argument(
        "--demand-profile",
        choices=sorted(DEMAND_PROFILES),
        default="flat",
        help="demand per hour of day over the repeated traces: flat (as recorded, default) or "
        "diurnal (an assumed day shape, averaging 1; see docs/evaluation.md)",
    )
    parser.add_argument(
        "--step",
        type=float,
        default=1.0,
        help="simulation step, seconds (5 s is enough for multi-day runs; see docs/evaluation.md)",
    )
    parser.add_argument(
        "--replan-interval",
        type=float,
        default=60.0,
        help="seconds between periodic decisions (default 60)",
    )
    parser.add_argument(
        "--startup",
        type=float,
        default=60.0,
        help="seconds for a new replica to become ready (default 60)",
    )
    parser.add_argument(
        "--latency-target",
        type=float,
        default=5.0,
        help="a token is on time if served within this many seconds (default 5)",
    )
    parser.add_argument(
        "--carbon-intensity",
        type=float,
        help="constant gCO2/kWh (default: the widest budget's "
        f"spec.carbon.intensityGramsPerKilowattHour, else {DEFAULT_GRAMS_PER_KWH:.0f})",
    )
    parser.add_argument(
        "--carbon-csv",
        type=Path,
        help="hourly curve: CSV with hour,gramsPerKWh; the wattsched policy's budgets see it as "
        "their carbon forecast (spec.carbon.forecastPrometheusQuery) when --horizon-hours > 0",
    )
    parser.add_argument(
        "--carbon-forecast-error",
        type=float,
        default=0.0,
        help="relative error of the forecast wattsched sees of the --carbon-csv curve: each hour "
        "times 1 + this x a standard normal draw (seeded by --seed; default 0, a perfect forecast)",
    )
    parser.add_argument(
        "--carbon-threshold",
        type=float,
        default=DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH,
        help="carbon-threshold policy: jobs wait while gCO2/kWh is above this, at most 24 h "
        f"(default {DEFAULT_CARBON_THRESHOLD_GRAMS_PER_KWH:g})",
    )
    parser.add_argument(
        "--horizon-hours",
        type=float,
        default=DEFAULT_HORIZON_HOURS,
        help="the wattsched policy's horizon (the operator's --horizon-hours, default "
        f"{DEFAULT_HORIZON_HOURS}); 0 plans one instant at a time (the carbon-agnostic reference)",
    )
    parser.add_argument("--pue", type=float, help="default: the widest budget's spec.pue, else 1.0")
    parser.add_argument(
        "--static-cap-fraction",
        type=float,
        default=0.7,
        help="static-cap policy: every GPU's limit as a fraction of its maximum",
    )
    parser.add_argument(
        "--energy-policy",
        choices=[p.value for p in EnergyPolicy],
        default=EnergyPolicy.BALANCED.value,
        help="spec.energy.policy of every simulated workload (default Balanced)",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=demand.HEADROOM,
        help="the demand forecast's headroom over the peak of the last 5 minutes of measured "
        f"tokens/s (default {demand.HEADROOM:g}, the operator's; another value is a what-if)",
    )
    parser.add_argument(
        "--power-levels",
        type=int,
        default=5,
        help="wattsched and oracle: evenly spaced power limits offered per GPU product",
    )
    parser.add_argument(
        "--no-sm-clocks",
        action="store_true",
        help="wattsched and the oracle never lock SM clocks (ablation)",
    )
    parser.add_argument(
        "--best-variant-only",
        action="store_true",
        help="wattsched and the oracle get only each workload's highest-quality variant (ablation)",
    )
    parser.add_argument(
        "--churn-threshold",
        type=float,
        default=PlanOptions().churn_threshold,
        help="PlanOptions.churn_threshold for wattsched and oracle (default: the optimizer's)",
    )
    parser.add_argument(
        "--truth-throughput-scale",
        type=float,
        default=1.0,
        help="scale every true throughput (the planner's prior is unchanged)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="write results.json only")
    return parser


def parse_slack_hours(text: str | None) -> tuple[float, float] | None:
    """`--deadline-slack-hours MIN-MAX` as (MIN, MAX) hours; ValueError naming the flag."""
    if text is None:
        return None
    low, dash, high = text.partition("-")
    try:
        bounds = (float(low), float(high)) if dash else None
    except ValueError:
        bounds = None
    if bounds is None or not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(
            f"--deadline-slack-hours={text!r}: must be MIN-MAX hours with 0 <= MIN <= MAX, "
            "e.g. 6-36"
        )
    return bounds


def _widest(budgets: Sequence[SimBudget]) -> SimBudget | None:
    return max(budgets, key=lambda b: (len(b.node_names), b.name), default=None)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = [name.strip() for name in args.policies.split(",") if name.strip()]
        unknown = [name for name in names if name not in ALL_POLICIES]
        if unknown or not names:
            raise ValueError(
                f"--policies: unknown {', '.join(unknown) or '(none given)'}; "
                f"allowed: {', '.join(ALL_POLICIES)}"
            )
        for flag, value in (
            ("--duration", args.duration),
            ("--step", args.step),
            ("--replan-interval", args.replan_interval),
            ("--latency-target", args.latency_target),
            ("--truth-throughput-scale", args.truth_throughput_scale),
        ):
            if value <= 0:
                raise ValueError(f"{flag}={value}: must be > 0")
        if args.startup < 0 or args.jobs_per_hour < 0:
            raise ValueError("--startup and --jobs-per-hour must be >= 0")
        if not 0 <= args.deadline_share <= 1:
            raise ValueError(f"--deadline-share={args.deadline_share}: must be in [0, 1]")
        if not 0 <= args.horizon_hours <= MAX_HORIZON_HOURS:
            raise ValueError(
                f"--horizon-hours={args.horizon_hours:g}: must be from 0 (one instant at a time) "
                f"to {MAX_HORIZON_HOURS} (a week)"
            )
        if not 0 <= args.multi_node_share <= 1:
            raise ValueError(f"--multi-node-share={args.multi_node_share}: must be in [0, 1]")
        slack_hours = parse_slack_hours(args.deadline_slack_hours)
        if args.carbon_forecast_error and args.carbon_csv is None:
            raise ValueError("--carbon-forecast-error needs --carbon-csv (the curve forecast)")
        nodes = load_nodes(args.cluster)
        budgets = load_budgets(args.budget, nodes) if args.budget else []
        widest = _widest(budgets)
        if args.carbon_csv is not None:
            carbon = load_hourly_csv(args.carbon_csv)
        elif args.carbon_intensity is not None:
            carbon = CarbonIntensity.constant(args.carbon_intensity, "--carbon-intensity")
        elif widest is not None and widest.carbon_intensity_grams_per_kwh is not None:
            carbon = CarbonIntensity.constant(
                widest.carbon_intensity_grams_per_kwh,
                f"EnergyBudget {widest.name} spec.carbon.intensityGramsPerKilowattHour",
            )
        else:
            carbon = CarbonIntensity.constant(DEFAULT_GRAMS_PER_KWH, "default")
        forecast = None
        if args.carbon_forecast_error:
            forecast = carbon.with_forecast_error(
                args.carbon_forecast_error,
                hours=math.ceil(args.duration / 3600) + MAX_HORIZON_HOURS + 1,
                seed=args.seed,
            )
        pue = args.pue if args.pue is not None else (widest.pue if widest else 1.0)
        if pue < 1.0:
            raise ValueError(f"--pue={pue}: must be >= 1.0")
        trace_paths = args.trace or default_trace_paths()
        scenario = build_scenario(
            nodes=nodes,
            budgets=budgets,
            trace_paths=trace_paths,
            duration_seconds=args.duration,
            rate_scale=args.rate_scale,
            jobs_per_hour=args.jobs_per_hour,
            multi_node_share=args.multi_node_share,
            seed=args.seed,
            carbon=carbon,
            pue=pue,
            step_seconds=args.step,
            replan_interval_seconds=args.replan_interval,
            startup_seconds=args.startup,
            latency_target_seconds=args.latency_target,
            deadline_share=args.deadline_share,
            demand_profile=DEMAND_PROFILES[args.demand_profile],
            deadline_slack_hours=slack_hours,
            carbon_forecast=forecast,
        )
        settings = PolicySettings(
            static_cap_fraction=args.static_cap_fraction,
            carbon_threshold_grams_per_kwh=args.carbon_threshold,
            energy_policy=EnergyPolicy(args.energy_policy),
            headroom=args.headroom,
            power_levels=args.power_levels,
            churn_threshold=args.churn_threshold,
            sm_clocks=not args.no_sm_clocks,
            best_variant_only=args.best_variant_only,
            horizon_hours=args.horizon_hours,
            carbon_forecast=args.carbon_csv is not None and args.horizon_hours > 0,
        )
        truth = GroundTruth().with_throughput_scale(args.truth_throughput_scale)
        # Build every policy once up front so a bad setting fails before the long run.
        for name in names:
            make_policy(name, truth, settings)
    except (ClusterError, TraceError, ValueError) as error:
        print(f"wattsched simulate: {error}", file=sys.stderr)
        return 2
    results = run_policies(
        scenario, truth, names, settings, progress=not args.no_progress and sys.stderr.isatty()
    )
    args.out.mkdir(parents=True, exist_ok=True)
    document = results_document(
        results, describe(scenario, args, carbon.source, trace_paths), budgets
    )
    write_json(document, args.out / "results.json")
    print(table(document))
    written = [args.out / "results.json"]
    if not args.no_plots:
        caps = {b.name: b.power_cap_watts for b in budgets}
        written += write_plots(results, document, caps, args.out, carbon)
    print(f"\nModelled by the simulator's ground truth, not measured. Traces: {TRACE_ATTRIBUTION}.")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def describe(
    scenario: Scenario, args: argparse.Namespace, carbon_source: str, traces: Sequence[Path]
) -> dict[str, Any]:
    """The `scenario` entry of results.json: enough to know what was run."""
    return {
        "source": "modelled (simulator ground truth), not measured",
        "traceAttribution": TRACE_ATTRIBUTION,
        "traces": [str(path) for path in traces],
        "cluster": str(args.cluster),
        "budget": str(args.budget) if args.budget else None,
        "nodes": len(scenario.nodes),
        "gpus": sum(node.gpu_count for node in scenario.nodes),
        "budgets": {b.name: b.power_cap_watts for b in scenario.budgets},
        "durationSeconds": scenario.duration_seconds,
        "stepSeconds": scenario.step_seconds,
        "rateScale": args.rate_scale,
        "meanDemandTokensPerSecond": {
            s.key: s.trace.mean_tokens_per_second for s in scenario.services
        },
        "jobs": len(scenario.jobs),
        "jobsPerHour": args.jobs_per_hour,
        "deadlineShare": args.deadline_share,
        "deadlineSlackHours": args.deadline_slack_hours,
        "demandProfile": args.demand_profile,
        "carbonForecastError": args.carbon_forecast_error,
        "carbonThreshold": args.carbon_threshold,
        "energyAllowances": {
            b.name: {"kilowattHours": b.energy_kwh, "period": b.energy_period.value}
            for b in scenario.budgets
            if b.energy_kwh is not None
        },
        "seed": scenario.seed,
        "replanIntervalSeconds": scenario.replan_interval_seconds,
        "startupSeconds": scenario.startup_seconds,
        "latencyTargetSeconds": scenario.latency_target_seconds,
        "pue": scenario.pue,
        "carbonIntensity": carbon_source,
        # The wattsched policy's horizon, and whether the carbon curve was its forecast.
        "horizonHours": args.horizon_hours,
        "carbonForecast": args.carbon_csv is not None and args.horizon_hours > 0,
        "energyPolicy": args.energy_policy,
        "churnThreshold": args.churn_threshold,
        "headroom": args.headroom,
        "truthThroughputScale": args.truth_throughput_scale,
    }
