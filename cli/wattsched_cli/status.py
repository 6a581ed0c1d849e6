"""`wattsched status` (also `kubectl wattsched status`): energy scheduling on one screen.

Per EnergyBudget: cap, allocated (sum of planned GPU power limits), measured draw, headroom, energy
used this period, the allowance left and the energy projected to the period's end (the operator's
horizon plan's projection when the status has one, else the current draw held to the end) and an
exhausted allowance's condition; the workloads
that are not placed, with the reason the operator gives; recent moves and preemptions (the
operator's Events); GPU nodes whose agent has not confirmed its limits; and failed planning rounds
(budgets whose last plan is old or infeasible, and, with `--operator-metrics-url`, the operator's
own error counter). `render` is a pure function of the objects; `main` only reads them (like
`wattsched explain`, read-only). Not for changing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from prometheus_client.parser import text_string_to_metric_families

from wattsched_api.commandline import EXIT_USAGE, CommandParser, table
from wattsched_api.energybudget import Period, period_end, period_start
from wattsched_api.errors import ApiValidationError
from wattsched_api.meta import read_timestamp
from wattsched_api.nodepowerprofile import parse_nodepowerprofile
from wattsched_api.vocabulary import TERMINAL_PHASES, ConditionType, EventReason, Phase, Source
from wattsched_cli.cluster_read import ClusterReadError, connect, list_objects, read_cluster
from wattsched_operator.accounting import JOULES_PER_KWH
from wattsched_operator.kube import Kube, KubeError
from wattsched_operator.rounds import HEARTBEAT_TIMEOUT_SECONDS
from wattsched_operator.snapshot import Body, ClusterObjects, SnapshotError, gpu_count

# Event reasons the operator posts on LLMWorkloads when it moves or preempts replicas.
MOVE_REASONS = (EventReason.MOVED, EventReason.PREEMPTED)
# 3 x the operator's default `--replan-interval-seconds 60`. An agent silent for longer than
# the operator's `--heartbeat-timeout-seconds` default (rounds.HEARTBEAT_TIMEOUT_SECONDS) counts
# as not confirmed, as the operator counts it.
STALE_PLAN_SECONDS = 180.0
RECENT_SECONDS = 3600.0


@dataclass(frozen=True)
class OperatorCounters:
    """What the operator's /metrics says about its rounds (None where the series is absent)."""

    failed_rounds: float | None
    plans_by_status: Mapping[str, float]


def _watts(value: object) -> str:
    return "-" if value is None else f"{float(str(value)):,.0f}"


def _kwh(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


@dataclass(frozen=True)
class Allowance:
    """An EnergyBudget's energy this period: used, allowed, left and projected at the period end.

    The projection adds the budget's current power (measured when the status has it, else the
    plan's expected watts: modelled) times PUE over the time left in the period.
    """

    used_kwh: float | None
    allowed_kwh: float | None
    left_kwh: float | None
    projected_kwh: float | None
    period_end: datetime | None
    source: str


def allowance(budget: Body, now: datetime) -> Allowance:
    spec = budget.get("spec") or {}
    status = budget.get("status") or {}
    energy = spec.get("energy") or {}
    allowed = float(energy["kilowattHours"]) if energy.get("kilowattHours") is not None else None
    used = status.get("energyUsedKilowattHours")
    used_kwh = float(used) if used is not None else None
    period = Period(energy.get("period") or Period.DAY)
    start = read_timestamp(status.get("periodStart")) or period_start(now, period)
    end = period_end(start, period)
    measured = status.get("measuredWatts")
    watts = measured if measured is not None else status.get("expectedWatts")
    source = Source.MEASURED if measured is not None else Source.MODELLED
    projected = None
    planned = status.get("projectedKilowattHoursAtPeriodEnd")
    if planned is not None:  # the operator's horizon plan: deferred work and cleaner hours in it
        projected = float(planned)
    elif used_kwh is not None and watts is not None:
        accounted = read_timestamp(status.get("accountedUntil")) or now
        seconds_left = max(0.0, (end - accounted).total_seconds())
        pue = float(spec.get("pue") or 1.0)
        projected = used_kwh + float(watts) * pue * seconds_left / JOULES_PER_KWH
    return Allowance(
        used_kwh=used_kwh,
        allowed_kwh=allowed,
        left_kwh=None if allowed is None or used_kwh is None else allowed - used_kwh,
        projected_kwh=projected,
        period_end=end if allowed is not None or projected is not None else None,
        source=source,
    )


def _budget_section(budgets: Sequence[Body], now: datetime) -> list[str]:
    if not budgets:
        return ["BUDGETS: none (kubectl apply an EnergyBudget; see examples/)"]
    rows = []
    notes = []
    for budget in sorted(budgets, key=lambda b: str(b["metadata"]["name"])):
        name = str(budget["metadata"]["name"])
        status = budget.get("status") or {}
        figures = allowance(budget, now)
        left = _kwh(figures.left_kwh)
        if figures.allowed_kwh is not None:
            left = f"{left} of {_kwh(figures.allowed_kwh)}"
        projected = _kwh(figures.projected_kwh)
        if (
            figures.projected_kwh is not None
            and figures.allowed_kwh is not None
            and figures.projected_kwh > figures.allowed_kwh
        ):
            projected += " (over)"
            notes.append(
                f"{name}: projected to use {_kwh(figures.projected_kwh)} kWh by "
                f"{figures.period_end:%Y-%m-%d %H:%M} UTC, above its "
                f"{_kwh(figures.allowed_kwh)} kWh"
            )
        exhausted = _condition(budget, ConditionType.ALLOWANCE_EXHAUSTED)
        if exhausted is not None and exhausted.get("status") == "True":
            notes.append(f"{name}: {ConditionType.ALLOWANCE_EXHAUSTED}: {exhausted.get('message')}")
        rows.append(
            [
                name,
                _watts((budget.get("spec") or {}).get("powerCapWatts")),
                _watts(status.get("allocatedCapWatts")),
                _watts(status.get("measuredWatts")),
                _watts(status.get("headroomWatts")),
                _kwh(figures.used_kwh),
                left,
                projected,
                figures.source if status else "-",
            ]
        )
    lines = ["BUDGETS (allocated: sum of planned GPU power limits; energy this period, x PUE)"]
    lines += table(
        [
            "NAME",
            "CAP(W)",
            "ALLOCATED(W)",
            "MEASURED(W)",
            "HEADROOM(W)",
            "USED(KWH)",
            "LEFT(KWH)",
            "PROJECTED(KWH)",
            "POWER SOURCE",
        ],
        rows,
    )
    return lines + [f"  ! {note}" for note in notes]


def _condition(body: Body, type_: str) -> Mapping[str, Any] | None:
    return next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == type_),
        None,
    )


def _key(body: Body) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _pending_section(workloads: Sequence[Body]) -> list[str]:
    rows = []
    for workload in sorted(workloads, key=_key):
        status = workload.get("status") or {}
        phase = status.get("phase")
        if phase in {*TERMINAL_PHASES, Phase.RUNNING, Phase.PLACED}:
            continue
        admitted = _condition(workload, ConditionType.ADMITTED)
        schedulable = _condition(workload, ConditionType.SCHEDULABLE)
        if admitted is not None and admitted.get("status") == "False":
            reason, message = admitted.get("reason"), admitted.get("message")
        elif schedulable is not None and schedulable.get("status") == "False":
            reason, message = schedulable.get("reason"), schedulable.get("message")
        elif phase is None:
            reason, message = "NotYetPlanned", "the operator has not planned it yet"
        else:
            reason, message = phase, status.get("message") or ""
        rows.append([_key(workload), str(phase or "-"), str(reason), str(message or "")])
    active = [w for w in workloads if (w.get("status") or {}).get("phase") not in TERMINAL_PHASES]
    head = f"WORKLOADS NOT PLACED: {len(rows)} of {len(active)} active"
    if not rows:
        return [head]
    return [head, *table(["WORKLOAD", "PHASE", "REASON", "MESSAGE"], rows)]


def _event_time(event: Body) -> datetime | None:
    for field_name in ("lastTimestamp", "eventTime", "firstTimestamp"):
        moment = read_timestamp(event.get(field_name))
        if moment is not None:
            return moment
    return read_timestamp((event.get("metadata") or {}).get("creationTimestamp"))


def _events_section(events: Sequence[Body], now: datetime, limit: int) -> list[str]:
    recent = []
    for event in events:
        involved = event.get("involvedObject") or {}
        moment = _event_time(event)
        if (
            involved.get("kind") == "LLMWorkload"
            and event.get("reason") in MOVE_REASONS
            and moment is not None
            and (now - moment).total_seconds() <= RECENT_SECONDS
        ):
            recent.append((moment, event))
    recent.sort(key=lambda pair: pair[0])
    head = f"MOVES AND PREEMPTIONS IN THE LAST HOUR: {len(recent)}"
    if not recent:
        return [head]
    rows = [
        [
            _age(moment, now),
            f"{(e.get('involvedObject') or {}).get('namespace')}/"
            f"{(e.get('involvedObject') or {}).get('name')}",
            str(e.get("reason")),
            str(e.get("message") or ""),
        ]
        for moment, e in recent[-limit:]
    ]
    shown = "" if len(recent) <= limit else f" (latest {limit})"
    return [head + shown, *table(["WHEN", "WORKLOAD", "REASON", "MESSAGE"], rows)]


def unconfirmed_nodes(
    nodes: Sequence[Body], profiles: Sequence[Body], now: datetime, heartbeat_timeout_seconds: float
) -> list[tuple[str, str]]:
    """(node, why) for every GPU node whose agent has not confirmed its limits, as the operator
    judges it: no NodePowerProfile, agent not ready, spec generation not applied, Applied not
    True, or no heartbeat within the timeout. Such a node counts at maximum power in plans."""
    by_node: dict[str, Body] = {}
    for body in profiles:
        node = (body.get("spec") or {}).get("nodeName") or body["metadata"]["name"]
        by_node[str(node)] = body
    found = []
    for node in sorted(nodes, key=lambda n: str(n["metadata"]["name"])):
        name = str(node["metadata"]["name"])
        try:
            if gpu_count(node) == 0:
                continue
        except SnapshotError:
            continue
        found_body = by_node.get(name)
        if found_body is None:
            found.append((name, "no NodePowerProfile yet (the operator writes one when it plans)"))
            continue
        try:
            profile = parse_nodepowerprofile(found_body)
        except ApiValidationError as error:
            found.append((name, f"NodePowerProfile unreadable: {error}"))
            continue
        agent = profile.status.agent
        generation = profile.metadata.generation
        observed = profile.status.observed_generation
        heartbeat = agent.heartbeat if agent else None
        if agent is None:
            found.append((name, "no agent has reported (is the agent DaemonSet running here?)"))
        elif not agent.ready:
            found.append((name, "the agent reports not ready"))
        elif generation is not None and (observed is None or observed < generation):
            found.append(
                (name, f"limits of generation {generation} not applied yet (agent at {observed})")
            )
        elif not profile.limits_confirmed:
            found.append((name, "the agent says its limits are not Applied"))
        elif heartbeat is None or (now - heartbeat).total_seconds() > heartbeat_timeout_seconds:
            found.append((name, f"last heartbeat {_age(heartbeat, now)}"))
    return found


def _nodes_section(
    nodes: Sequence[Body], profiles: Sequence[Body], now: datetime, heartbeat_timeout: float
) -> list[str]:
    gpu_nodes = 0
    for node in nodes:
        try:
            gpu_nodes += gpu_count(node) > 0
        except SnapshotError:
            continue
    found = unconfirmed_nodes(nodes, profiles, now, heartbeat_timeout)
    head = (
        f"NODES WHOSE AGENT HAS NOT CONFIRMED ITS LIMITS: {len(found)} of {gpu_nodes} GPU nodes"
        + (" (each counts at maximum power in plans)" if found else "")
    )
    if not found:
        return [head]
    return [head, *table(["NODE", "WHY"], [[n, why] for n, why in found])]


def _rounds_section(
    budgets: Sequence[Body],
    now: datetime,
    stale_seconds: float,
    counters: OperatorCounters | None,
    metrics_error: str | None,
) -> list[str]:
    lines = ["PLANNING ROUNDS"]
    last_plans = []
    for budget in budgets:
        plan = (budget.get("status") or {}).get("lastPlan") or {}
        last_plans.append((str(budget["metadata"]["name"]), read_timestamp(plan.get("time")), plan))
    latest = max((t for _, t, _ in last_plans if t is not None), default=None)
    if not budgets:
        lines.append("  no EnergyBudget: budgets carry the last plan's time and status")
    elif latest is None:
        lines.append("  ! no plan recorded on any budget: is the operator running?")
    else:
        latest_plan = next(p for _, t, p in last_plans if t == latest)
        solve_seconds = float(latest_plan.get("seconds") or 0)
        gap = float(latest_plan.get("gap") or 0)
        lines.append(
            f"  last plan {_age(latest, now)}: {latest_plan.get('status', '?')}, solved in "
            f"{solve_seconds:.2f} s, gap {gap:.2%}"
        )
        if (now - latest).total_seconds() > stale_seconds:
            lines.append(
                f"  ! no plan for over {stale_seconds:.0f} s: rounds are failing or the operator "
                "is down (check its log)"
            )
    for name, _, plan in sorted(last_plans):
        if plan.get("status") == "Infeasible":
            lines.append(
                f"  ! budget {name}: the last plan was Infeasible (nothing placed or raised)"
            )
    if counters is not None:
        failed = "-" if counters.failed_rounds is None else f"{counters.failed_rounds:.0f}"
        plans = ", ".join(f"{s} {n:.0f}" for s, n in sorted(counters.plans_by_status.items()))
        lines.append(
            f"  operator metrics: {failed} failed rounds since it started; plans: {plans or 'none'}"
        )
    elif metrics_error is not None:
        lines.append(f"  operator metrics not read: {metrics_error}")
    else:
        lines.append("  failed rounds since the operator started: pass --operator-metrics-url")
    return lines


def render(
    objects: ClusterObjects,
    events: Sequence[Body],
    now: datetime,
    *,
    counters: OperatorCounters | None = None,
    metrics_error: str | None = None,
    stale_plan_seconds: float = STALE_PLAN_SECONDS,
    heartbeat_timeout_seconds: float = HEARTBEAT_TIMEOUT_SECONDS,
    events_limit: int = 10,
) -> str:
    """The status screen for these objects at `now`."""
    sections = [
        [f"wattsched status at {now:%Y-%m-%d %H:%M:%S} UTC"],
        _budget_section(objects.budgets, now),
        _pending_section(objects.workloads),
        _events_section(events, now, events_limit),
        _nodes_section(objects.nodes, objects.profiles, now, heartbeat_timeout_seconds),
        _rounds_section(objects.budgets, now, stale_plan_seconds, counters, metrics_error),
    ]
    return "\n\n".join("\n".join(section) for section in sections)


def parse_operator_metrics(text: str) -> OperatorCounters:
    """The operator's counters from its /metrics text (Prometheus exposition format)."""
    failed: float | None = None
    plans: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "wattsched_reconcile_errors_total"
                and sample.labels.get("step") == "plan"
            ):
                failed = sample.value
            elif sample.name == "wattsched_plans_total":
                plans[sample.labels.get("status", "?")] = sample.value
    return OperatorCounters(failed_rounds=failed, plans_by_status=plans)


def read_operator_metrics(url: str) -> OperatorCounters:
    """GET the operator's /metrics; OSError/ValueError with a one-line reason when it fails."""
    target = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(target, timeout=10) as response:
        return parse_operator_metrics(response.read().decode())


def list_events(kube: Kube) -> list[dict[str, Any]]:
    """Events on LLMWorkloads in every namespace (a field selector keeps the list small)."""
    query = {"fieldSelector": "involvedObject.kind=LLMWorkload", "limit": "500"}
    items: list[dict[str, Any]] = []
    while True:
        try:
            page = kube.request("GET", "/api/v1/events", query=query)
        except (KubeError, urllib3.exceptions.HTTPError, OSError):
            # Fall back to the checked listing, which turns a failure into one line.
            return list_objects(kube, "/api/v1/events")
        items += page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items
        query["continue"] = token


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched status",
        description="The cluster's energy scheduling on one screen: budgets, unplaced workloads, "
        "recent moves and preemptions, unconfirmed nodes, failed rounds. Read-only. Exit codes: "
        "0 shown, 2 bad flags, 3 the cluster could not be read, 4 the wattsched CRDs are not "
        "installed.",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig to read the cluster with (default: $KUBECONFIG, ~/.kube/config, "
        "in-cluster)",
    )
    parser.add_argument(
        "--operator-metrics-url",
        default="",
        help="the operator's metrics endpoint (e.g. http://localhost:9090 after `kubectl "
        "port-forward svc/wattsched-operator 9090`), for its failed-round counter; empty: not read",
    )
    parser.add_argument(
        "--stale-plan-seconds",
        type=float,
        default=STALE_PLAN_SECONDS,
        help="a last plan older than this is flagged (3 x the operator's default re-plan interval)",
    )
    parser.add_argument(
        "--heartbeat-timeout-seconds",
        type=float,
        default=HEARTBEAT_TIMEOUT_SECONDS,
        help="an agent silent for longer counts as not confirmed (the operator's default)",
    )
    parser.add_argument(
        "--events", type=int, default=10, help="how many recent moves and preemptions to list"
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed in one line
        return int(exit_request.code or 0)
    if args.events < 1 or args.stale_plan_seconds <= 0 or args.heartbeat_timeout_seconds <= 0:
        print(
            "wattsched status: --events, --stale-plan-seconds and --heartbeat-timeout-seconds "
            "must be positive",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        kube = connect(args.kubeconfig)
        objects = read_cluster(kube)
        events = list_events(kube)
    except ClusterReadError as error:
        print(f"wattsched status: {error}", file=sys.stderr)
        return error.exit_code
    counters = None
    metrics_error = None
    if args.operator_metrics_url:
        try:
            counters = read_operator_metrics(args.operator_metrics_url)
        except (OSError, ValueError, urllib.error.URLError) as error:
            metrics_error = f"{args.operator_metrics_url}: {str(error).splitlines()[0]}"
    print(
        render(
            objects,
            events,
            datetime.now(UTC),
            counters=counters,
            metrics_error=metrics_error,
            stale_plan_seconds=args.stale_plan_seconds,
            heartbeat_timeout_seconds=args.heartbeat_timeout_seconds,
            events_limit=args.events,
        )
    )
    return 0
