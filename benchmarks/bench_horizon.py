"""Benchmark of the plan over a horizon (`horizon.plan_horizon`) on generated clusters.

For: printing, per instance, the machine's load average (before and after: other work on the
machine inflates wall times), the horizon's wall and CPU seconds (median of `--repeat`) and its
build/solve/extract phases, the program's size, its status and its gap (objective against the
dual bound of HiGHS's dual values), and in the same run the baseline: the one-instant planner
(`planner.plan`, what every round runs today) on the same instance, and the horizon with the
`Energy` objective (carbon-agnostic: work as soon as caps and allowances let it) to compare the
job CO2 the two objectives plan (modelled). Not a test: it asserts nothing and only prints figures.

Run: `.venv/bin/python benchmarks/bench_horizon.py [--nodes 1000] [--workloads 2000]
[--templates 2000] [--slots 24] [--repeat 5] [--allowance-share 0.7] [--fine-hours H
--coarse-slot-hours C]`. The instance is `bench_optimizer.generate`'s (8-GPU nodes, 4 products,
4 racks and a cluster budget) with its deadline jobs due in 24 h instead of 4 h (same work);
every budget gets a solar-shaped carbon curve (modelled, not a published series: 420 g/kWh at
night, down to 140 g/kWh at 13:00; the first slot at `--start-hour`, default 06:00), PUE 1.2, and
a daily energy allowance of `--allowance-share` (default 70%) of what the budget would draw at
its cap (at 70% no allowance binds on the default instance: GPUs do; at 30% they bind). Slots are
hourly (`--slots` of them) unless `--fine-hours` is given: hourly slots up to then, then slots of
`--coarse-slot-hours` up to `--slots` hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A sibling script (python puts its folder on sys.path; mypy does not know it).
from bench_optimizer import generate  # type: ignore[import-not-found]

from wattsched_optimizer.horizon import (
    AllowancePeriod,
    BudgetHorizon,
    HorizonInput,
    HorizonPlan,
    Objective,
    hourly_slots,
    plan_horizon,
)
from wattsched_optimizer.planner import plan


def solar_curve(start_hour: int, slots: int) -> tuple[float, ...]:
    """g CO2/kWh per hour from `start_hour`: 420 at night, a dip to 140 at 13:00 (modelled)."""
    return tuple(
        420.0 - 280.0 * max(0.0, 1.0 - abs(((start_hour + s) % 24) - 13) / 5.0)
        for s in range(slots)
    )


def slot_curve(start_hour: int, slot_seconds: tuple[float, ...]) -> tuple[float, ...]:
    """The solar curve's mean over the hours of each slot (slots are whole hours here)."""
    hourly = solar_curve(start_hour, round(sum(slot_seconds) / 3600))
    out, at = [], 0
    for length in slot_seconds:
        hours = round(length / 3600)
        out.append(statistics.fmean(hourly[at : at + hours]))
        at += hours
    return tuple(out)


def instance(
    nodes: int,
    workloads: int,
    templates: int,
    slots: int,
    start_hour: int,
    *,
    allowance_share: float = 0.7,
    fine_hours: float | None = None,
    coarse_slot_hours: float = 1.0,
) -> HorizonInput:
    plan_input = generate(nodes, workloads, templates)
    # The generator's jobs are due in 4 h at 60% of their full speed; here in 24 h with the same
    # work (10%), so that the horizon has room to move them.
    stretched = tuple(
        w
        if w.deadline_seconds is None
        else dataclasses.replace(w, deadline_seconds=w.deadline_seconds * 6)
        for w in plan_input.workloads
    )
    plan_input = dataclasses.replace(plan_input, workloads=stretched)
    slot_seconds = hourly_slots(
        0, slots, fine_hours=fine_hours, coarse_slot_hours=coarse_slot_hours
    )
    curve = slot_curve(start_hour, slot_seconds)
    settings = {
        b.name: BudgetHorizon(
            b.name,
            (b.power_cap_watts,) * len(slot_seconds),
            curve,
            pue=1.2,
            periods=(
                AllowancePeriod(
                    0,
                    len(slot_seconds),
                    energy_kwh_left=allowance_share * b.power_cap_watts / 1000 * 1.2 * slots,
                ),
            ),
        )
        for b in plan_input.budgets
    }
    return HorizonInput(plan_input, slot_seconds, settings)


def job_carbon_kg(horizon: HorizonInput, result: HorizonPlan) -> float:
    """Planned job CO2 over the horizon (modelled), at the cluster budget's curve and PUE."""
    setting = horizon.budgets["cluster"]
    total = 0.0
    for schedule in result.schedules.values():
        point = schedule.point
        kw = point.gpus * point.busy_watts_per_gpu / 1000
        for s, share in enumerate(schedule.share_by_slot):
            hours = horizon.slot_seconds[s] / 3600
            total += share * kw * hours * setting.pue * setting.carbon_grams_per_kwh_by_slot[s]
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--workloads", type=int, default=2000)
    parser.add_argument("--templates", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=24, help="hours of the horizon")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--start-hour", type=int, default=6, help="hour of day of the first slot")
    parser.add_argument("--allowance-share", type=float, default=0.7)
    parser.add_argument("--fine-hours", type=int, default=None)
    parser.add_argument("--coarse-slot-hours", type=int, default=1)
    args = parser.parse_args()
    print(f"load average before (1, 5, 15 min): {os.getloadavg()}; CPUs: {os.cpu_count()}")
    horizon = instance(
        args.nodes,
        args.workloads,
        args.templates,
        args.slots,
        args.start_hour,
        allowance_share=args.allowance_share,
        fine_hours=args.fine_hours,
        coarse_slot_hours=args.coarse_slot_hours,
    )
    print(
        f"## horizon: {args.nodes * 8} GPUs, {args.workloads} workloads "
        f"({args.templates} templates), {len(horizon.slot_seconds)} slots over {args.slots} h, "
        f"allowance {args.allowance_share:.0%} of the cap's energy"
    )
    plan_horizon(horizon)  # once before timing: imports and first-call costs
    totals, cpu = [], []
    phases: dict[str, list[float]] = {"build": [], "solve": [], "extract": []}
    result = None
    for _ in range(args.repeat):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = plan_horizon(horizon)
        totals.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        for name, seconds in phases.items():
            seconds.append(result.timings_seconds[name])
    assert result is not None
    median = {name: statistics.median(seconds) for name, seconds in phases.items()}
    print(
        f"horizon: median {statistics.median(totals):.3f} s wall, {statistics.median(cpu):.3f} s "
        f"CPU (min {min(totals):.3f}, max {max(totals):.3f}, n={args.repeat}); median build "
        f"{median['build']:.3f} s, solve {median['solve']:.3f} s, extract "
        f"{median['extract']:.3f} s (wall); {result.size[0]} rows x {result.size[1]} columns; "
        f"status {result.status}; gap {result.gap:.1e} (objective {result.objective:.6g}, dual "
        f"bound {result.dual_bound:.6g})"
    )
    deferred = len(result.deferred)
    missed = sum(1 for s in result.schedules.values() if s.missed_tokens > 0)
    short = sorted(name for name, b in result.budgets.items() if b.energy_short)
    print(
        f"deferred now {deferred}, deadline work missed {missed}, budgets whose energy allowance "
        f"binds: {', '.join(short) or 'none'}"
    )
    agnostic_input = dataclasses.replace(
        horizon,
        budgets={
            name: dataclasses.replace(b, objective=Objective.ENERGY)
            for name, b in horizon.budgets.items()
        },
    )
    agnostic = plan_horizon(agnostic_input)
    carbon, reference = job_carbon_kg(horizon, result), job_carbon_kg(horizon, agnostic)
    print(
        f"planned job CO2 over the horizon (modelled): Carbon objective {carbon:,.0f} kg, "
        f"Energy objective (as soon as possible) {reference:,.0f} kg"
        + (f" ({(reference - carbon) / reference:.1%} less)" if reference > 0 else "")
    )
    instant = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        plan(horizon.plan_input)
        instant.append(time.perf_counter() - started)
    print(
        f"baseline, the one-instant planner on the same instance: median "
        f"{statistics.median(instant):.3f} s wall (n={args.repeat}); the horizon adds "
        f"{statistics.median(totals) / statistics.median(instant):.2f}x its time per round"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
