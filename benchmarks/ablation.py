"""The evaluation's ablation: where each share of wattsched's saving comes from.

Runs `wattsched simulate` (the evaluation's scenario, `docs/evaluation.md`) on the held-out seeds
with four planner configurations, each adding one technique to the previous: placement only
(every replica at the maximum power limit, no clock locks, each workload's best-quality variant),
plus power caps, plus locked SM clocks, plus variants (wattsched as shipped), and `spread-max` as
the reference. Prints a Markdown table of GPU energy, inference GPU energy, SLO attainment and
deadline misses per seed, and each step's share of the saving over `spread-max`, in total and for
inference. Every figure is modelled (the simulator's ground truth). Not a test.

Run: `.venv/bin/python benchmarks/ablation.py [--seeds 3 4 5] [--energy-policy Efficiency]
[--without-budget]`
(about 5 s per run on one core).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET = ["--budget", str(REPO / "offline" / "simulation-budget.yaml")]
COMMON = [
    "--cluster",
    str(REPO / "sandbox" / "nodes.yaml"),
    "--rate-scale",
    "6",
    "--jobs-per-hour",
    "12",
    "--deadline-share",
    "1.0",
    "--no-plots",
    "--no-progress",
]
STEPS: tuple[tuple[str, list[str]], ...] = (
    ("placement only", ["--power-levels", "1", "--no-sm-clocks", "--best-variant-only"]),
    ("+ caps", ["--no-sm-clocks", "--best-variant-only"]),
    ("+ clocks", ["--best-variant-only"]),
    ("+ variants", []),
)


def run(
    seed: int, policy: str, energy_policy: str, extra: list[str], out: Path
) -> dict[str, float]:
    wattsched = str(Path(sys.executable).with_name("wattsched"))
    command = [wattsched, "simulate", *COMMON, *BUDGET, "--seed", str(seed)]
    command += ["--energy-policy", energy_policy, "--policies", policy, "--out", str(out), *extra]
    subprocess.run(command, check=True, capture_output=True)
    result: dict[str, float] = json.loads((out / "results.json").read_text())["policies"][policy]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--energy-policy", default="Efficiency")
    parser.add_argument(
        "--without-budget", action="store_true", help="no EnergyBudget (placement only can serve)"
    )
    args = parser.parse_args()
    if args.without_budget:
        BUDGET.clear()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            base = run(seed, "spread-max", args.energy_policy, [], Path(scratch) / f"s{seed}")
            results = [
                run(seed, "wattsched", args.energy_policy, extra, Path(scratch) / f"{seed}-{i}")
                for i, (_, extra) in enumerate(STEPS)
            ]
            rows.append((seed, base, results))
    print(
        "| seed | configuration | GPU kWh | vs spread-max | inference GPU kWh | vs spread-max "
        "| SLO | deadline misses |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seed, base, results in rows:
        print(
            f"| {seed} | spread-max | {base['gpuEnergyKWh']:.2f} | | "
            f"{base['inferenceGpuEnergyKWh']:.2f} | | {base['sloAttainment']:.2%} "
            f"| {base['deadlineMisses']:.0f} |"
        )
        for (name, _), result in zip(STEPS, results, strict=True):
            total = result["gpuEnergyKWh"] / base["gpuEnergyKWh"] - 1
            inference = result["inferenceGpuEnergyKWh"] / base["inferenceGpuEnergyKWh"] - 1
            print(
                f"| {seed} | {name} | {result['gpuEnergyKWh']:.2f} | {total:+.1%} | "
                f"{result['inferenceGpuEnergyKWh']:.2f} | {inference:+.1%} | "
                f"{result['sloAttainment']:.2%} | {result['deadlineMisses']:.0f} |"
            )
    print()
    print("Share of the inference saving over spread-max from each step (mean over seeds):")
    for index, (name, _) in enumerate(STEPS):
        shares = []
        for _, base, results in rows:
            saving = base["inferenceGpuEnergyKWh"] - results[-1]["inferenceGpuEnergyKWh"]
            before = (
                base["inferenceGpuEnergyKWh"]
                if index == 0
                else results[index - 1]["inferenceGpuEnergyKWh"]
            )
            step = before - results[index]["inferenceGpuEnergyKWh"]
            shares.append(step / saving if saving else 0.0)
        print(f"- {name}: {sum(shares) / len(shares):.1%}")


if __name__ == "__main__":
    main()
