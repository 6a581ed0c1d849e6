"""`wattsched plan -f SNAPSHOT.yaml [-o json|table]`: solve one plan for a file of cluster objects.

Reads a multi-document YAML (or a `kind: List`) of Nodes, LLMWorkloads, EnergyBudgets and optionally
NodePowerProfiles and Pods, as `kubectl get -o yaml` prints them; turns them into the optimizer's
input with `snapshot` (the same reading the operator uses) and prints the plan. A bad snapshot gives
one error line naming the object and field and exit code 2. Not for changing a cluster: nothing here
talks to an API server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from wattsched_operator.snapshot import (
    SnapshotError,
    build_snapshot,
    parse_now,
    split_objects,
)
from wattsched_optimizer.model import read_catalogue_file, use_catalogue
from wattsched_optimizer.planner import PlanInputError
from wattsched_optimizer.planner import plan as solve_plan
from wattsched_optimizer.problem import Plan, PlanOptions

EXIT_BAD_INPUT = 2


def clock_range(sm_clock_mhz: int | None) -> dict[str, int] | None:
    """The SM clock range a plan locks a GPU to (a single clock: min = max), or None."""
    return None if sm_clock_mhz is None else {"min": sm_clock_mhz, "max": sm_clock_mhz}


def plan_to_json(plan: Plan, node_notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `-o json` document (shape fixed by the optimizer issue, §3), plus `nodeNotes`: why a
    node with GPUs takes no new work where the node alone does not say (snapshot.node_notes), and
    the locked SM clocks: `placements[].smClockRangeMHz` and, per GPU of a node,
    `nodes[].gpuSmClockRangesMHz` (null where clocks are left to the driver)."""
    return {
        "status": plan.status.value,
        "objective": plan.objective,
        "bound": plan.bound,
        "gap": plan.gap,
        "solveSeconds": plan.solve_seconds,
        "placements": [
            {
                "workload": p.workload,
                "replica": p.replica,
                "node": p.node,
                "gpus": p.gpus,
                "variant": p.variant,
                "powerLimitWatts": p.power_limit_watts,
                "expectedWattsPerGPU": p.expected_watts_per_gpu,
                "expectedTokensPerSecond": p.expected_throughput,
                "smClockRangeMHz": clock_range(p.sm_clock_mhz),
            }
            for p in sorted(plan.placements, key=lambda p: (p.workload, p.replica))
        ],
        "nodes": [
            {
                "node": node,
                "gpuPowerLimitsWatts": list(limits),
                "gpuSmClockRangesMHz": [
                    clock_range(clock)
                    for clock in plan.node_sm_clocks_mhz.get(node, (None,) * len(limits))
                ],
                "unmanagedGpus": plan.node_unmanaged.get(node, (0, 0.0))[0],
                "unmanagedWatts": plan.node_unmanaged.get(node, (0, 0.0))[1],
            }
            for node, limits in sorted(plan.node_power_limits_watts.items())
        ],
        "budgets": [
            {
                "name": b.name,
                "capWatts": b.cap_watts,
                "allocatedCapWatts": b.allocated_cap_watts,
                "unmanagedWatts": b.unmanaged_watts,
                "expectedWatts": b.expected_watts,
            }
            for b in sorted(plan.budgets, key=lambda b: b.name)
        ],
        "unplaced": [
            {"workload": u.workload, "reason": u.reason, "constraint": u.constraint}
            for u in sorted(plan.unplaced, key=lambda u: u.workload)
        ],
        "nodeNotes": [
            {"node": node, "reason": reason} for node, reason in sorted((node_notes or {}).items())
        ],
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def plan_to_table(plan: Plan, node_notes: Mapping[str, str] | None = None) -> str:
    """A human-readable rendering: summary, placements, budgets, unplaced workloads, node notes."""
    data = plan_to_json(plan, node_notes)
    lines = [
        f"status {data['status']}  objective {plan.objective:.6g}  bound {plan.bound:.6g}  "
        f"gap {plan.gap:.2%}  solve {plan.solve_seconds:.2f} s",
        "",
    ]
    lines += _table(
        [
            "WORKLOAD",
            "REPLICA",
            "NODE",
            "GPUS",
            "VARIANT",
            "LIMIT(W)",
            "SM-CLOCK(MHz)",
            "EXPECTED(W/GPU, modelled)",
        ],
        [
            [
                p["workload"],
                str(p["replica"]),
                p["node"],
                str(p["gpus"]),
                p["variant"],
                f"{p['powerLimitWatts']:.0f}",
                "-" if p["smClockRangeMHz"] is None else str(p["smClockRangeMHz"]["max"]),
                f"{p['expectedWattsPerGPU']:.0f}",
            ]
            for p in data["placements"]
        ],
    )
    lines.append("")
    lines += _table(
        ["BUDGET", "CAP(W)", "ALLOCATED(W)", "UNMANAGED(W)", "EXPECTED(W, modelled)"],
        [
            [
                b["name"],
                f"{b['capWatts']:.0f}",
                f"{b['allocatedCapWatts']:.0f}",
                f"{b['unmanagedWatts']:.0f}",
                f"{b['expectedWatts']:.0f}",
            ]
            for b in data["budgets"]
        ],
    )
    unmanaged = [n for n in data["nodes"] if n["unmanagedGpus"]]
    if unmanaged:
        lines.append("")
        lines += _table(
            ["NODE", "UNMANAGED GPUS (other teams' pods, left alone)", "AT LIMITS(W)"],
            [[n["node"], str(n["unmanagedGpus"]), f"{n['unmanagedWatts']:.0f}"] for n in unmanaged],
        )
    if data["unplaced"]:
        lines.append("")
        lines += _table(
            ["UNPLACED", "REASON"], [[u["workload"], u["reason"]] for u in data["unplaced"]]
        )
    if data["nodeNotes"]:
        lines.append("")
        lines += _table(
            ["NODE", "TAKES NO NEW WORK BECAUSE"],
            [[n["node"], n["reason"]] for n in data["nodeNotes"]],
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wattsched plan",
        description="Solve a placement-and-power plan for a snapshot of cluster objects.",
    )
    parser.add_argument(
        "-f",
        "--filename",
        required=True,
        help="multi-document YAML of Nodes, LLMWorkloads, EnergyBudgets, NodePowerProfiles, Pods "
        "(as `kubectl get -o yaml` prints them); - for stdin",
    )
    parser.add_argument("-o", "--output", choices=("json", "table"), default="table")
    parser.add_argument(
        "--now",
        help="the time deadlines are measured from (RFC 3339; default: the current time)",
    )
    parser.add_argument("--power-levels", type=int, default=PlanOptions.power_levels)
    parser.add_argument("--time-limit-seconds", type=float, default=PlanOptions.time_limit_seconds)
    parser.add_argument("--solver", choices=("highs", "cbc"), default=PlanOptions.solver)
    parser.add_argument(
        "--catalogue-file",
        type=Path,
        help="YAML with extra GPU products (as the operator's --catalogue-file)",
    )
    return parser


def _read_documents(filename: str, stdin: TextIO) -> list[object]:
    try:
        text = stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")
    except OSError as error:
        raise SnapshotError(f"{filename}: cannot read: {error.strerror}") from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise SnapshotError(f"{filename}: not valid YAML: {error}") from None


def run(args: argparse.Namespace, stdin: TextIO) -> tuple[Plan, Mapping[str, str]]:
    """Read the snapshot named by `args` and solve it; returns the plan and the node notes.

    Raises SnapshotError (or the optimizer's PlanInputError) for bad input.
    """
    now = datetime.now(UTC) if args.now is None else parse_now(args.now)
    if args.power_levels < 1:
        raise SnapshotError(f"--power-levels: must be at least 1, got {args.power_levels}")
    if args.time_limit_seconds <= 0:
        raise SnapshotError(
            f"--time-limit-seconds: must be positive, got {args.time_limit_seconds}"
        )
    try:
        extended = read_catalogue_file(args.catalogue_file)
    except ValueError as error:
        raise SnapshotError(str(error)) from None
    use_catalogue(extended)
    objects = split_objects(_read_documents(args.filename, stdin))
    if not objects.nodes:
        raise SnapshotError(f"{args.filename}: the snapshot has no Node objects")
    options = PlanOptions(
        power_levels=args.power_levels,
        time_limit_seconds=args.time_limit_seconds,
        solver=args.solver,
    )
    snapshot = build_snapshot(objects, now=now, options=options, strict=True)
    return solve_plan(snapshot.plan_input), snapshot.node_notes


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse already printed
        return int(exit_request.code or 0)
    try:
        plan, notes = run(args, sys.stdin)
    except (SnapshotError, PlanInputError) as error:
        print(f"wattsched plan: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output == "json":
        print(json.dumps(plan_to_json(plan, notes), indent=2))
    else:
        print(plan_to_table(plan, notes))
    return 0
