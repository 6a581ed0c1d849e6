"""`wattsched plan (-f SNAPSHOT.yaml | --from-cluster) [--set ...] [--diff] [-o json|table]`: solve
one plan for cluster objects, offline or as a what-if against the live cluster.

Reads a multi-document YAML (or a `kind: List`) of Nodes, LLMWorkloads, EnergyBudgets and optionally
NodePowerProfiles and Pods, as `kubectl get -o yaml` prints them, or lists the same objects from the
cluster (`--from-cluster`, read-only); applies `--set` overrides (`whatif`); turns them into the
optimizer's input with `snapshot` (the same reading the operator uses: invalid LLMWorkloads are
skipped and listed, as the operator marks them InvalidSpec and plans the rest); where a budget has
an allowance, a cap schedule or a carbon forecast, plans the next `--horizon-hours` first
(`budget_horizon.plan_over_time`: flexible work may be deferred, and says until when and why);
prints the plan, and with `--diff` what it would change against the cluster now. A bad snapshot,
override or flag gives one error line naming the object and field and exit code 2; a cluster that
cannot be read, exit code 3 (4 where a CRD is missing). Not for changing a cluster: nothing here
writes to an API server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from wattsched_api.commandline import EXIT_USAGE, CommandParser, table
from wattsched_cli.cluster_read import ClusterReadError, connect, read_cluster
from wattsched_cli.whatif import (
    SET_SYNTAX,
    apply_overrides,
    diff_lines,
    parse_override,
    plan_diff,
)
from wattsched_operator.budget_horizon import (
    DEFAULT_HORIZON_HOURS,
    AllowanceOutlook,
    DeferredWork,
    OverTime,
    plan_over_time,
)
from wattsched_operator.rounds import HEARTBEAT_TIMEOUT_SECONDS
from wattsched_operator.snapshot import (
    ClusterObjects,
    Snapshot,
    SnapshotError,
    build_snapshot,
    parse_now,
    split_objects,
)
from wattsched_optimizer.horizon import HorizonInputError
from wattsched_optimizer.model import read_catalogue_file, use_catalogue
from wattsched_optimizer.planner import PlanInputError
from wattsched_optimizer.planner import plan as solve_plan
from wattsched_optimizer.problem import Plan, PlanOptions


def clock_range(sm_clock_mhz: int | None) -> dict[str, int] | None:
    """The SM clock range a plan locks a GPU to (a single clock: min = max), or None."""
    return None if sm_clock_mhz is None else {"min": sm_clock_mhz, "max": sm_clock_mhz}


def plan_to_json(
    plan: Plan,
    skipped: Sequence[str] = (),
    diff: dict[str, Any] | None = None,
    node_notes: Mapping[str, str] | None = None,
    *,
    deferred: Sequence[DeferredWork] = (),
    allowances: Mapping[str, AllowanceOutlook] | None = None,
) -> dict[str, Any]:
    """The `-o json` document (shape fixed by the optimizer issue, §3), plus `skipped` (the objects
    left out as invalid, each as the error that names it), `nodeNotes` (the GPU nodes left out of
    planning and why: snapshot.excluded_nodes), the locked SM clocks
    (`placements[].smClockRangeMegahertz` and, per GPU of a node,
    `nodes[].gpuSmClockRangesMegahertz`: null where clocks are left to the driver) and, with
    `--diff`, `diff`."""
    document: dict[str, Any] = {
        "status": plan.status.value,
        "objective": plan.objective,
        "bound": plan.bound,
        "gap": plan.gap,
        "solveSeconds": plan.solve_seconds,
        "placements": [
            {
                "workload": p.workload,
                "replica": p.replica,
                "rank": p.rank,
                "nodesPerReplica": p.nodes_per_replica,
                "node": p.node,
                "gpus": p.gpus,
                "variant": p.variant,
                "powerLimitWatts": p.power_limit_watts,
                "expectedWattsPerGPU": p.expected_watts_per_gpu,
                "expectedTokensPerSecond": p.expected_throughput,
                "smClockRangeMegahertz": clock_range(p.sm_clock_mhz),
            }
            for p in sorted(plan.placements, key=lambda p: (p.workload, p.replica, p.rank))
        ],
        "nodes": [
            {
                "node": node,
                "gpuPowerLimitsWatts": list(limits),
                "gpuSmClockRangesMegahertz": [
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
            {
                "workload": u.workload,
                "reason": u.reason_name,
                "message": u.reason,
                **({"budget": u.budget} if u.budget else {}),
            }
            for u in sorted(plan.unplaced, key=lambda u: u.workload)
        ],
        "shortfalls": [
            {
                "workload": s.workload,
                "demandTokensPerSecond": s.demand_tokens_per_second,
                "servedTokensPerSecond": round(s.served_tokens_per_second, 1),
                "servedShare": round(s.served_share, 4),
                "reason": s.reason,
                "constraint": s.constraint,
            }
            for s in plan.shortfalls
        ],
        "skipped": list(skipped),
        "nodeNotes": [
            {"node": node, "reason": reason} for node, reason in sorted((node_notes or {}).items())
        ],
        "deferred": [
            {
                "workload": d.workload,
                "cause": d.cause,
                "until": d.until,
                "message": d.message,
                "plannedSlots": list(d.planned_slots),
            }
            for d in deferred
        ],
        "allowances": [
            {
                "budget": name,
                **outlook.status_fields(),
                "allowanceExhausted": outlook.exhausted,
                "reason": outlook.reason,
                "message": outlook.message,
            }
            for name, outlook in sorted((allowances or {}).items())
        ],
    }
    if diff is not None:
        document["diff"] = diff
    return document


def plan_to_table(
    plan: Plan,
    skipped: Sequence[str] = (),
    diff: dict[str, Any] | None = None,
    node_notes: Mapping[str, str] | None = None,
    *,
    deferred: Sequence[DeferredWork] = (),
    allowances: Mapping[str, AllowanceOutlook] | None = None,
) -> str:
    """A human-readable rendering: summary, placements, budgets, allowances, unplaced and
    deferred workloads, nodes left out, skipped objects and, with `--diff`, the changes against
    the cluster now."""
    data = plan_to_json(plan, node_notes=node_notes, deferred=deferred, allowances=allowances)
    lines = [
        f"status {data['status']}  objective {plan.objective:.6g}  bound {plan.bound:.6g}  "
        f"gap {plan.gap:.2%}  solve {plan.solve_seconds:.2f} s",
        "",
    ]
    lines += table(
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
                str(p["replica"])
                + (f" ({p['rank']}/{p['nodesPerReplica']})" if p["nodesPerReplica"] > 1 else ""),
                p["node"],
                str(p["gpus"]),
                p["variant"],
                f"{p['powerLimitWatts']:.0f}",
                "-"
                if p["smClockRangeMegahertz"] is None
                else str(p["smClockRangeMegahertz"]["max"]),
                f"{p['expectedWattsPerGPU']:.0f}",
            ]
            for p in data["placements"]
        ],
    )
    lines.append("")
    lines += table(
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
    if data["allowances"]:
        lines.append("")
        lines += table(
            ["BUDGET", "LEFT(kWh)", "PROJECTED AT PERIOD END(kWh, modelled)", "ALLOWANCE"],
            [
                [
                    a["budget"],
                    f"{a.get('remainingKilowattHours', 0):.1f}",
                    f"{a.get('projectedKilowattHoursAtPeriodEnd', 0):.1f}",
                    "exhausted" if a["allowanceExhausted"] else "within",
                ]
                for a in data["allowances"]
            ],
        )
    if data["deferred"]:
        lines.append("")
        lines += table(
            ["DEFERRED", "MESSAGE"], [[d["workload"], d["message"]] for d in data["deferred"]]
        )
    unmanaged = [n for n in data["nodes"] if n["unmanagedGpus"]]
    if unmanaged:
        lines.append("")
        lines += table(
            ["NODE", "UNMANAGED GPUS (other teams' pods, left alone)", "AT LIMITS(W)"],
            [[n["node"], str(n["unmanagedGpus"]), f"{n['unmanagedWatts']:.0f}"] for n in unmanaged],
        )
    if data["unplaced"]:
        lines.append("")
        lines += table(
            ["UNPLACED", "REASON", "MESSAGE"],
            [[u["workload"], u["reason"], u["message"]] for u in data["unplaced"]],
        )
    if data["shortfalls"]:
        lines.append("")
        lines += table(
            ["SERVED IN PART", "REASON"],
            [[s["workload"], s["reason"]] for s in data["shortfalls"]],
        )
    if data["nodeNotes"]:
        lines.append("")
        lines += table(
            ["NODE", "TAKES NO WORK BECAUSE"],
            [[n["node"], n["reason"]] for n in data["nodeNotes"]],
        )
    if skipped:
        lines += ["", "SKIPPED (invalid; left out of the plan, as the operator leaves them out)"]
        lines += [f"  {error}" for error in skipped]
    if diff is not None:
        lines += ["", "CHANGES AGAINST THE CLUSTER NOW (modelled; pods matched by replica)"]
        lines += [f"  {line}" for line in diff_lines(diff)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched plan",
        description="Solve a placement-and-power plan for a snapshot of cluster objects, or for "
        "the live cluster with what-if overrides. Exit codes: 0 planned, 2 bad input, 3 the "
        "cluster cannot be read, 4 a CRD is not installed.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "-f",
        "--filename",
        help="multi-document YAML of Nodes, LLMWorkloads, EnergyBudgets, NodePowerProfiles, Pods "
        "(as `kubectl get -o yaml` prints them); - for stdin",
    )
    source.add_argument(
        "--from-cluster",
        action="store_true",
        help="read those objects from the cluster (read-only), as the operator does",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig for --from-cluster (default: $KUBECONFIG, ~/.kube/config, in-cluster)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KIND/NAME.FIELD=VALUE",
        help=f"what-if override, repeatable: {SET_SYNTAX}; KIND is energybudget (eb), "
        "llmworkload (llmw, NAME is NAMESPACE/NAME) or node; FIELD under spec or "
        'metadata.labels["KEY"]; VALUE is YAML (null removes the field)',
    )
    parser.add_argument(
        "--diff",
        action="store_true",
        help="also print which pods would move, stop or start and which power limits change, "
        "against the pods and NodePowerProfiles in the input",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("json", "table"),
        default="table",
        help="table for people, json for scripts",
    )
    parser.add_argument(
        "--now",
        help="the time deadlines are measured from (RFC 3339; default: the current time)",
    )
    parser.add_argument(
        "--power-levels",
        type=int,
        default=PlanOptions.power_levels,
        help="power limits the optimizer considers per GPU product (evenly spaced up to its "
        "maximum)",
    )
    parser.add_argument(
        "--time-limit-seconds",
        type=float,
        default=PlanOptions.time_limit_seconds,
        help="the solver's time limit; the best plan found by then is used",
    )
    parser.add_argument(
        "--solver",
        choices=("highs", "cbc"),
        default=PlanOptions.solver,
        help="MILP solver",
    )
    parser.add_argument(
        "--horizon-hours",
        type=float,
        default=DEFAULT_HORIZON_HOURS,
        help="hours the plan looks ahead for budgets with an allowance, a cap schedule or a "
        "carbon forecast (flexible work waits for clean hours or for the next period); 0 plans "
        "the present only",
    )
    parser.add_argument(
        "--catalogue-file",
        type=Path,
        help="YAML with extra GPU products (as the operator's --catalogue-file)",
    )
    return parser


# YAML aliases share one value among many places; expanded, a "billion laughs" document of a few
# hundred bytes holds 10^9 values, which any walk of it (validation, an error message) would try to
# visit. A snapshot of 10,000 workloads expands to a few million values; more is refused.
MAX_EXPANDED_VALUES = 10_000_000


def _read_documents(filename: str, stdin: TextIO) -> list[object]:
    try:
        text = stdin.read() if filename == "-" else Path(filename).read_text(encoding="utf-8")
    except OSError as error:
        raise SnapshotError(f"{filename}: cannot read: {error.strerror}") from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise SnapshotError(f"{filename}: not valid YAML: {error}") from None
    for index, document in enumerate(documents):
        problem = alias_problem(document, MAX_EXPANDED_VALUES)
        if problem is not None:
            raise SnapshotError(f"{filename}: document {index + 1}: {problem}")
    return documents


def _children(value: object) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [(str(key), child) for key, child in value.items()]
    if isinstance(value, list):
        return [(f"[{i}]", child) for i, child in enumerate(value)]
    return []


def alias_problem(document: object, max_values: int) -> str | None:
    """Why a loaded YAML document cannot be read (None when it can): a value that refers to
    itself, or YAML aliases that expand to more than `max_values` values; names the field.

    Counts the expanded size once per shared value (never expanding it), without recursion.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[object, bool]] = [(document, False)]
    while stack:
        value, children_done = stack.pop()
        children = [child for _, child in _children(value)]
        if not isinstance(value, dict | list) or (id(value) in sizes and not children_done):
            continue
        if children_done:
            in_progress.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes.get(id(child), 1) for child in children)
            continue
        if id(value) in in_progress:
            return "a value refers to itself through a YAML alias; write it out"
        in_progress.add(id(value))
        stack.append((value, True))
        for child in children:
            if isinstance(child, dict | list) and id(child) in in_progress:
                return "a value refers to itself through a YAML alias; write it out"
            stack.append((child, False))
    if sizes.get(id(document), 1) <= max_values:
        return None
    # Name the field: follow the largest part while it alone is over the limit.
    path, value = "", document
    while True:
        over = [
            (key, child) for key, child in _children(value) if sizes.get(id(child), 1) > max_values
        ]
        if not over:
            break
        key, value = max(over, key=lambda item: sizes.get(id(item[1]), 1))
        path += key if key.startswith("[") or not path else f".{key}"
    where = f"{path}: " if path else ""
    return (
        f"{where}YAML aliases expand to more than {max_values:,} values (an alias bomb); "
        "write the values out"
    )


@dataclass(frozen=True)
class PlanResult:
    """A solved plan, the objects left out as invalid, and the diff when asked for."""

    plan: Plan
    skipped: tuple[str, ...]
    diff: dict[str, Any] | None
    # GPU nodes left out of planning (snapshot.excluded_nodes): node -> why.
    node_notes: Mapping[str, str] = field(default_factory=dict)
    # Work the horizon holds back now, and each budget's allowance outlook.
    deferred: tuple[DeferredWork, ...] = ()
    allowances: Mapping[str, AllowanceOutlook] = field(default_factory=dict)


def _objects(args: argparse.Namespace, stdin: TextIO) -> ClusterObjects:
    if args.from_cluster:
        return read_cluster(connect(args.kubeconfig))
    objects = split_objects(_read_documents(args.filename, stdin))
    if not objects.nodes:
        raise SnapshotError(f"{args.filename}: the snapshot has no Node objects")
    return objects


def run(args: argparse.Namespace, stdin: TextIO) -> PlanResult:
    """Read the objects named by `args`, apply the overrides and solve.

    Raises SnapshotError (or the optimizer's PlanInputError) for bad input, ClusterReadError when
    the cluster cannot be read.
    """
    now = datetime.now(UTC) if args.now is None else parse_now(args.now)
    if args.power_levels < 1:
        raise SnapshotError(f"--power-levels: must be at least 1, got {args.power_levels}")
    if not 0 <= args.horizon_hours <= 168:
        raise SnapshotError(
            f"--horizon-hours: must be from 0 to 168 (a week), got {args.horizon_hours:g}"
        )
    if args.time_limit_seconds <= 0:
        raise SnapshotError(
            f"--time-limit-seconds: must be positive, got {args.time_limit_seconds}"
        )
    try:
        extended = read_catalogue_file(args.catalogue_file)
    except ValueError as error:
        raise SnapshotError(str(error)) from None
    use_catalogue(extended)
    overrides = [parse_override(text) for text in args.overrides]
    objects = apply_overrides(_objects(args, stdin), overrides)
    if args.from_cluster and not objects.nodes:
        raise SnapshotError("the cluster has no Node objects")
    options = PlanOptions(
        power_levels=args.power_levels,
        time_limit_seconds=args.time_limit_seconds,
        solver=args.solver,
    )
    snapshot: Snapshot = build_snapshot(
        objects,
        now=now,
        options=options,
        strict=False,
        # Live: a node whose agent has not confirmed counts at maximum power, as the operator
        # counts it. A file without NodePowerProfiles plans as if every agent were ready.
        agents_required=args.from_cluster,
        # With --from-cluster an agent silent for longer than the operator's default counts as not
        # ready, as the operator counts it.
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS if args.from_cluster else None,
    )
    if snapshot.ignored:  # a budget, profile or pod that cannot be read: the input is wrong
        raise SnapshotError(snapshot.ignored[0].message)
    for node in snapshot.excluded_nodes:  # planned without it, and said why
        print(f"wattsched plan: node {node.name} takes no work: {node.reason}", file=sys.stderr)
    if snapshot.budgets and args.horizon_hours > 0:
        try:
            timed = plan_over_time(
                snapshot.plan_input, snapshot.budgets, now, horizon_hours=args.horizon_hours
            )
        except HorizonInputError as error:
            raise SnapshotError(str(error)) from None
    else:
        timed = OverTime(snapshot.plan_input)
    plan = solve_plan(timed.plan_input)
    diff = plan_diff(snapshot.plan_input, plan, objects.profiles) if args.diff else None
    return PlanResult(
        plan=plan,
        skipped=tuple(str(e) for e in snapshot.rejected),
        diff=diff,
        node_notes={node.name: node.reason for node in snapshot.excluded_nodes},
        deferred=timed.deferred,
        allowances=timed.allowances,
    )


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed in one line
        return int(exit_request.code or 0)
    try:
        result = run(args, sys.stdin)
    except (SnapshotError, PlanInputError) as error:
        print(f"wattsched plan: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterReadError as error:
        print(f"wattsched plan: {error}", file=sys.stderr)
        return error.exit_code
    if args.output == "json":
        document = plan_to_json(
            result.plan,
            result.skipped,
            result.diff,
            result.node_notes,
            deferred=result.deferred,
            allowances=result.allowances,
        )
        print(json.dumps(document, indent=2))
    else:
        print(
            plan_to_table(
                result.plan,
                result.skipped,
                result.diff,
                result.node_notes,
                deferred=result.deferred,
                allowances=result.allowances,
            )
        )
    return 0
