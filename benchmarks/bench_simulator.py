"""Benchmark `wattsched simulate`: simulated seconds per wall-clock second, 16 and 1,000 nodes.

Prints, per policy, wall seconds, CPU seconds of this process (on a busy machine wall seconds
include waiting for a core; CPU seconds do not; HiGHS runs in-process on one thread), simulated
seconds per wall second (the goal: >= 10x real time on the one-hour traces with the 16-node sandbox
cluster), plan count and median plan seconds, and the ratio against real time and against
`spread-max` (no optimizer) measured in the same run. The
large case scales the sandbox's product mix to 1,000 nodes, with demand, job arrivals and the
budget scaled alike. Not a test: it asserts nothing; docs/evaluation.md records its output.

Run: `.venv/bin/python benchmarks/bench_simulator.py [--large-nodes 1000] [--large-duration 900]`
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from wattsched_simulator.carbon import CarbonIntensity
from wattsched_simulator.cli import PolicySettings, build_scenario, make_policy
from wattsched_simulator.cluster import SimBudget, SimNode, load_budgets, load_nodes
from wattsched_simulator.engine import Scenario, simulate
from wattsched_simulator.trace import default_trace_paths
from wattsched_simulator.truth import GroundTruth

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("spread-max", "binpack-max", "static-cap", "wattsched", "oracle")


def scaled_nodes(nodes: list[SimNode], count: int) -> list[SimNode]:
    """`count` nodes with the same product mix as `nodes`, named <original>-<copy>."""
    return [
        SimNode(
            name=f"{nodes[i % len(nodes)].name}-{i // len(nodes):03d}",
            labels=nodes[i % len(nodes)].labels,
            product_label=nodes[i % len(nodes)].product_label,
            planner_product=nodes[i % len(nodes)].planner_product,
            truth_product=nodes[i % len(nodes)].truth_product,
            gpu_count=nodes[i % len(nodes)].gpu_count,
        )
        for i in range(count)
    ]


def run(label: str, scenario: Scenario, policies: tuple[str, ...]) -> None:
    truth = GroundTruth()
    gpus = sum(node.gpu_count for node in scenario.nodes)
    print(
        f"\n{label}: {len(scenario.nodes)} nodes, {gpus} GPUs, {scenario.duration_seconds:.0f} s "
        f"simulated in {scenario.steps} steps, {len(scenario.jobs)} jobs"
    )
    print(
        f"{'policy':<12} {'wall s':>8} {'cpu s':>7} {'sim s / wall s':>15} {'x spread-max':>13} "
        f"{'plans':>6} {'plan s p50':>11} {'plan s max':>11}"
    )
    reference = None
    for name in policies:
        started = time.perf_counter()
        cpu_started = time.process_time()
        result = simulate(scenario, truth, make_policy(name, truth, PolicySettings()))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        speed = scenario.duration_seconds / wall
        if name == "spread-max":
            reference = speed
        ratio = f"{speed / reference:.2f}" if reference else "-"
        print(
            f"{name:<12} {wall:8.2f} {cpu:7.2f} {speed:15.1f} {ratio:>13} "
            f"{len(result.plan_seconds):6d} "
            f"{statistics.median(result.plan_seconds):11.4f} {max(result.plan_seconds):11.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--large-nodes", type=int, default=1000)
    parser.add_argument("--large-duration", type=float, default=900.0)
    parser.add_argument("--rate-scale", type=float, default=6.0)
    parser.add_argument("--jobs-per-hour", type=float, default=12.0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    policies = tuple(args.policies.split(","))
    nodes = load_nodes(REPO / "sandbox" / "nodes.yaml")
    budgets = load_budgets(REPO / "offline" / "simulation-budget.yaml", nodes)
    carbon = CarbonIntensity.constant(400.0, "bench")
    small = build_scenario(
        nodes=nodes,
        budgets=budgets,
        trace_paths=default_trace_paths(),
        duration_seconds=args.duration,
        rate_scale=args.rate_scale,
        jobs_per_hour=args.jobs_per_hour,
        seed=0,
        carbon=carbon,
        pue=1.0,
    )
    run("sandbox cluster, one-hour Azure traces", small, policies)
    factor = args.large_nodes / len(nodes)
    large_nodes = scaled_nodes(nodes, args.large_nodes)
    large_budget = SimBudget(
        "cluster",
        budgets[0].power_cap_watts * factor,
        frozenset(n.name for n in large_nodes),
        1.0,
        None,
    )
    large = build_scenario(
        nodes=large_nodes,
        budgets=[large_budget],
        trace_paths=default_trace_paths(),
        duration_seconds=args.large_duration,
        rate_scale=args.rate_scale * factor,
        jobs_per_hour=args.jobs_per_hour * factor,
        seed=0,
        carbon=carbon,
        pue=1.0,
    )
    run(f"{args.large_nodes} nodes (sandbox mix x {factor:.1f})", large, policies)


if __name__ == "__main__":
    main()
