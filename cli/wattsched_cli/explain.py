"""`wattsched explain [-n NAMESPACE] NAME [-o text|json|yaml]`: why an LLMWorkload is where it is.

Reads the workload, the NodePowerProfiles of its nodes, the EnergyBudgets and the workload's Events
from the cluster, and prints its placement (node, variant, per-GPU power limit, what the agent
applied), the budgets whose scope holds it with their headroom and allowance, the reason it is
unplaced or deferred (until when and why: the operator's horizon plan), and for
placed replicas what keeps their power limit where it is (a budget without room for the next
power level, `spec.energy.maxPowerWattsPerGPU`, the energy policy, or nothing: the GPU's maximum)
and why a replica's SM clocks are locked (its NodePowerProfile entry) with what that saves
(modelled: the catalogue's clock curve; the SM clock the agent reads back), in the operator's and
optimizer's words. `explanation` (a document) and `render` (its text) are pure functions of those
objects; `main` only fetches them. Not for changing anything.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from wattsched_api import parse_energybudget
from wattsched_api.commandline import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    CommandParser,
)
from wattsched_api.vocabulary import (
    DISRUPTION_EVENT_REASONS,
    GPU_PRODUCT_LABEL,
    ConditionType,
    Reason,
)
from wattsched_operator import replica_groups
from wattsched_operator.kube import (
    Kube,
    KubeError,
    budgets_path,
    default_namespace,
    profiles_path,
    workloads_path,
)
from wattsched_optimizer.model import (
    UnknownProductError,
    normalise_product,
    power_levels_watts,
    sm_clock_effect,
)
from wattsched_optimizer.problem import PlanOptions, WorkloadType

Body = Mapping[str, Any]


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in status.get("conditions") or []}


def _fmt_watts(watts: object) -> str:
    return "?" if watts is None else f"{float(str(watts)):.0f} W"


POLICY_CHOICE = {
    "Balanced": "the least expected energy per unit of work among plans that admit the same work",
    "Efficiency": "the most energy-efficient limit and variant its SLO allows",
    "Performance": "the GPU's maximum power limit",
}
WATTS_TOLERANCE = 0.5  # statuses round limits to 0.1 W


def _next_level_watts(product: str, limit_watts: float, ceiling_watts: float) -> float:
    """The next power level above `limit_watts` the optimizer could give a GPU (it offers the
    product's evenly spaced levels up to the ceiling, and the ceiling itself)."""
    levels = power_levels_watts(product, PlanOptions().power_levels)
    return min([w for w in levels if limit_watts + WATTS_TOLERANCE < w] + [ceiling_watts])


def limit_reasons(
    workload: Body,
    node_products: Mapping[str, str],
    budgets: Sequence[Body],
    budget_scopes: Mapping[str, frozenset[str]],
) -> list[str]:
    """Per group of placed replicas (same node product and limit): what keeps the limit there.

    In the optimizer's order: at the product's maximum nothing limits it; at
    `spec.energy.maxPowerWattsPerGPU` that field does; a budget over the replicas' nodes whose
    headroom is less than one replica one power level up would add binds; otherwise the energy
    policy chose the level (the optimizer's objective). `node_products`: node -> catalogue
    product (nodes missing from it are reported as unknown).
    """
    spec = workload.get("spec") or {}
    energy = spec.get("energy") or {}
    policy = str(energy.get("policy") or "Balanced")
    max_field = energy.get("maxPowerWattsPerGPU")
    max_per_gpu = None if max_field is None else float(max_field)
    groups: dict[tuple[str | None, float, int], list[Mapping[str, Any]]] = {}
    for p in (workload.get("status") or {}).get("placements") or []:
        key = (node_products.get(str(p["node"])), float(p["powerLimitWatts"]), int(p["gpus"]))
        groups.setdefault(key, []).append(p)
    # A replica that spans nodes has a placement per pod, all at its one limit.
    pods_per_replica = int((spec.get("gpu") or {}).get("nodesPerReplica") or 1)
    lines: list[str] = []
    for (product, limit, gpus), group in sorted(groups.items(), key=lambda g: str(g[0])):
        replicas = ", ".join(str(r) for r in sorted({int(p["replica"]) for p in group}))
        nodes = {str(p["node"]) for p in group}
        head = f"    replica(s) {replicas} at {limit:.0f} W per GPU"
        if product is None:
            lines.append(f"{head}: the node's GPU product is unknown to the catalogue")
            continue
        maximum = power_levels_watts(product, 1)[0]
        ceiling = maximum if max_per_gpu is None else min(maximum, max_per_gpu)
        if limit >= maximum - WATTS_TOLERANCE:
            lines.append(f"{head}, the {product} maximum: nothing limits its power")
            continue
        if limit >= ceiling - WATTS_TOLERANCE:
            lines.append(
                f"{head}: capped by spec.energy.maxPowerWattsPerGPU={ceiling:.0f} W"
                f" (the {product} allows {maximum:.0f} W)"
            )
            continue
        step = _next_level_watts(product, limit, ceiling)
        step_watts = pods_per_replica * gpus * (step - limit)
        over_nodes = [
            b
            for b in sorted(budgets, key=lambda b: str(b["metadata"]["name"]))
            if budget_scopes.get(str(b["metadata"]["name"]), frozenset()) & nodes
        ]
        binding = [
            (str(b["metadata"]["name"]), float(headroom))
            for b in over_nodes
            if (headroom := (b.get("status") or {}).get("headroomWatts")) is not None
            and float(headroom) + WATTS_TOLERANCE < step_watts
        ]
        if binding:
            lines += [
                f"{head}: limited by budget {name}: its headroom {headroom:.0f} W is less than"
                f" the {step_watts:.0f} W one replica at the next level ({step:.0f} W per GPU)"
                " would add"
                for name, headroom in binding
            ]
            continue
        lines.append(
            f"{head} of the {product}'s {maximum:.0f} W: chosen by energy policy {policy}"
            f" ({POLICY_CHOICE.get(policy, 'the optimizer objective')}); "
            + (
                "the budgets over its nodes have room for the next level"
                if over_nodes
                else "no budget covers its nodes"
            )
        )
    return lines


def clock_reasons(
    workload: Body, profiles: Mapping[str, Body], node_products: Mapping[str, str]
) -> list[str]:
    """Per placed replica whose NodePowerProfile entry locks its SM clocks: why, what the agent
    reads back on its GPUs, and the modelled saving (energy per token against the same replica
    unlocked at the same power limit). Replicas left to the driver are said so once."""
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    policy = str((spec.get("energy") or {}).get("policy") or "Balanced")
    spans = int((spec.get("gpu") or {}).get("nodesPerReplica") or 1) > 1
    lines: list[str] = []
    unlocked: list[str] = []
    for p in sorted(
        (workload.get("status") or {}).get("placements") or [],
        key=lambda p: (p["replica"], p.get("rank", 0)),
    ):
        node = str(p["node"])
        pod = replica_groups.member_name(name, int(p["replica"]), int(p.get("rank", 0)))
        profile = profiles.get(node) or {}
        entry = next(
            (
                e
                for e in (profile.get("spec") or {}).get("pods") or []
                if (e.get("namespace"), e.get("name")) == (namespace, pod)
            ),
            None,
        )
        clocks = None if entry is None else entry.get("smClockRangeMegahertz")
        if not clocks:
            if str(p["replica"]) not in unlocked:
                unlocked.append(str(p["replica"]))
            continue
        read = [
            g.get("smClockMegahertz")
            for g in (profile.get("status") or {}).get("gpus") or []
            if g.get("pod") == f"{namespace}/{pod}" and g.get("smClockMegahertz") is not None
        ]
        in_force = (
            f"the agent reads {min(read)}-{max(read)} MHz on its GPUs"
            if read
            else "no agent report of its clocks yet"
        )
        product = node_products.get(node)
        saving = "saving unknown (product not in the catalogue)"
        if product is not None:
            kept, draw = sm_clock_effect(product, WorkloadType.INFERENCE, int(clocks["max"]))
            saving = (
                f"modelled: {1 - draw / kept:.0%} less energy per token than unlocked at the same "
                f"limit, {kept:.0%} of the throughput"
            )
        lines.append(
            f"    {_pod_label(p, spans=spans)}: SM clocks locked at "
            f"{clocks['min']}-{clocks['max']} MHz "
            f"({in_force}): decode-bound inference under the {policy} policy draws less per token "
            f"at a lower clock while its SLO holds; {saving}"
        )
    if unlocked and lines:
        lines.append(f"    replica(s) {', '.join(unlocked)}: clocks left to the driver")
    elif unlocked:
        reason = (
            "the Performance policy never locks clocks"
            if policy == "Performance"
            else "no locked clock saves energy at its SLO"
            if spec.get("type") == "Inference"
            else "its work is compute-bound, where a lock saves no more than a power cap"
        )
        lines.append(f"    clocks left to the driver: {reason}")
    return lines


def explanation(
    workload: Body,
    profiles: Mapping[str, Body],
    budgets: Sequence[Body],
    events: Sequence[Body],
    budget_scopes: Mapping[str, frozenset[str]],
    *,
    node_products: Mapping[str, str],
) -> dict[str, Any]:
    """The explanation as a document (`-o json|yaml`; `render` prints the same as text).

    `budget_scopes`: budget name -> nodes its selector matches; `node_products`: node -> its GPU
    product in the catalogue's names.
    """
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    placements = status.get("placements") or []
    nodes = {str(p["node"]) for p in placements}
    document: dict[str, Any] = {
        "workload": f"{meta.get('namespace')}/{meta.get('name')}",
        "type": spec.get("type"),
        "gpusPerReplica": (spec.get("gpu") or {}).get("count"),
        "nodesPerReplica": int((spec.get("gpu") or {}).get("nodesPerReplica") or 1),
        "service": status.get("service"),
        "priority": spec.get("priority", 0),
        "phase": status.get("phase"),
        "message": status.get("message"),
        "placements": [],
        "power": None,
        "unplaced": None,
        "deferred": None,
        "heldBackByBudget": None,
        "powerLimitReasons": [],
        "smClockReasons": [],
        "objective": None,
        "budgets": [],
        "events": [],
    }
    for p in sorted(placements, key=lambda p: (p["replica"], p.get("rank", 0))):
        profile = profiles.get(str(p["node"])) or {}
        applied = [
            float(a)
            for g in (profile.get("status") or {}).get("gpus") or []
            if (a := g.get("appliedWatts")) is not None
        ]
        document["placements"].append(
            {
                "replica": p["replica"],
                "rank": p.get("rank", 0),
                "pod": replica_groups.member_name(
                    str(meta.get("name")), int(p["replica"]), int(p.get("rank", 0))
                ),
                "node": p["node"],
                "gpus": p["gpus"],
                "variant": p["variant"],
                "powerLimitWatts": p["powerLimitWatts"],
                "appliedWattsOnNode": [min(applied), max(applied)] if applied else None,
            }
        )
    power = status.get("power") or {}
    if power:
        document["power"] = {
            "capWatts": power.get("capWatts"),
            "expectedWatts": power.get("expectedWatts"),
            "measuredWatts": power.get("measuredWatts"),
        }
    conditions = _conditions(status)
    schedulable = conditions.get(ConditionType.SCHEDULABLE)
    limited = conditions.get(ConditionType.BUDGET_LIMITED)
    slo = conditions.get(ConditionType.SLO_MET)
    if (
        schedulable is not None
        and schedulable.get("status") == "False"
        and schedulable.get("reason") == Reason.DEFERRED
    ):
        document["deferred"] = schedulable.get("message")
    elif schedulable is not None and schedulable.get("status") == "False":
        document["unplaced"] = {
            "reason": schedulable.get("reason"),
            "message": schedulable.get("message"),
        }
    elif limited is not None and limited.get("status") == "True":
        document["heldBackByBudget"] = limited.get("message")
    if placements:
        document["powerLimitReasons"] = [
            line.strip() for line in limit_reasons(workload, node_products, budgets, budget_scopes)
        ]
        document["smClockReasons"] = [
            line.strip() for line in clock_reasons(workload, profiles, node_products)
        ]
    if slo is not None:
        document["objective"] = {
            "met": slo.get("status") == "True",
            "reason": slo.get("reason"),
            "message": slo.get("message"),
        }
    for b in sorted(budgets, key=lambda b: str(b["metadata"]["name"])):
        if nodes and not budget_scopes.get(str(b["metadata"]["name"]), frozenset()) & nodes:
            continue
        b_status = b.get("status") or {}
        document["budgets"].append(
            {
                "name": b["metadata"]["name"],
                "capWatts": (b.get("spec") or {}).get("powerCapWatts"),
                "allocatedCapWatts": b_status.get("allocatedCapWatts"),
                "headroomWatts": b_status.get("headroomWatts"),
                "remainingKilowattHours": b_status.get("remainingKilowattHours"),
                "projectedKilowattHoursAtPeriodEnd": b_status.get(
                    "projectedKilowattHoursAtPeriodEnd"
                ),
                "allowanceExhausted": (
                    _conditions(b_status).get(ConditionType.ALLOWANCE_EXHAUSTED) or {}
                ).get("status")
                == "True",
            }
        )
    recent = sorted(events, key=lambda e: str(e.get("lastTimestamp") or ""))[-5:]
    document["events"] = [
        {
            "lastTimestamp": e.get("lastTimestamp"),
            "type": e.get("type"),
            "reason": e.get("reason"),
            "message": e.get("message"),
        }
        for e in recent
    ]
    # The last moves and preemptions, whatever came after them: each says its cause.
    disruptions = [e for e in events if e.get("reason") in DISRUPTION_EVENT_REASONS]
    document["disruptions"] = [
        {
            "lastTimestamp": e.get("lastTimestamp"),
            "reason": e.get("reason"),
            "message": e.get("message"),
        }
        for e in sorted(disruptions, key=lambda e: str(e.get("lastTimestamp") or ""))[-3:]
    ]
    return document


def render(
    workload: Body,
    profiles: Mapping[str, Body],
    budgets: Sequence[Body],
    events: Sequence[Body],
    budget_scopes: Mapping[str, frozenset[str]],
    *,
    node_products: Mapping[str, str],
) -> str:
    """The explanation as text (the arguments of `explanation`)."""
    doc = explanation(
        workload, profiles, budgets, events, budget_scopes, node_products=node_products
    )
    spread = (
        f" GPU(s) per node x {doc['nodesPerReplica']} whole nodes of one product per replica"
        " (leader and workers)"
        if doc["nodesPerReplica"] > 1
        else " GPU(s) per replica"
    )
    lines = [
        f"LLMWorkload {doc['workload']}: {doc['type'] or '?'}, {doc['gpusPerReplica'] or '?'}"
        f"{spread}, priority {doc['priority']}",
        f"  phase: {doc['phase'] or 'not yet planned'}"
        + (f" ({doc['message']})" if doc["message"] else ""),
    ]
    if doc["placements"]:
        lines.append(
            "  placements (planned power limits are modelled; applied ones the agent reports):"
        )
        for p in doc["placements"]:
            applied = p["appliedWattsOnNode"]
            applied_text = (
                f"applied {applied[0]:.0f}-{applied[1]:.0f} W on the node"
                if applied
                else "no agent report yet"
            )
            lines.append(
                f"    {_pod_label(p, spans=doc['nodesPerReplica'] > 1)}: node {p['node']}, "
                f"{p['gpus']} GPU(s), variant "
                f"{p['variant']}, limit {_fmt_watts(p['powerLimitWatts'])} per GPU ({applied_text})"
            )
    if doc["service"]:
        selects = "its ready leaders" if doc["nodesPerReplica"] > 1 else "its ready replicas"
        lines.append(f"  service: {doc['service']} (selects {selects})")
    power = doc["power"]
    if power:
        lines.append(
            f"  power: limits sum {_fmt_watts(power['capWatts'])}, expected "
            f"{_fmt_watts(power['expectedWatts'])} (modelled)"
            + (
                f", measured {_fmt_watts(power['measuredWatts'])}"
                if power["measuredWatts"] is not None
                else ""
            )
        )
    if doc["unplaced"]:
        lines.append(
            f"  unplaced because of {doc['unplaced']['reason']}: {doc['unplaced']['message']}"
        )
    elif doc["deferred"]:
        lines.append(f"  deferred by the horizon plan: {doc['deferred']}")
    elif doc["heldBackByBudget"]:
        lines.append(f"  held back by a budget: {doc['heldBackByBudget']}")
    if doc["placements"]:
        lines.append("  what sets its power limit:")
        lines += [f"    {line}" for line in doc["powerLimitReasons"]]
        lines.append("  SM clocks:")
        lines += [f"    {line}" for line in doc["smClockReasons"]]
    objective = doc["objective"]
    if objective is not None:
        met = "met" if objective["met"] else "at risk"
        lines.append(f"  objective {met} ({objective['reason']}): {objective['message']}")
    if doc["budgets"]:
        lines.append("  budgets over its nodes:")
        lines += [
            f"    {b['name']}: cap {_fmt_watts(b['capWatts'])}"
            f", allocated {_fmt_watts(b['allocatedCapWatts'])}"
            f", headroom {_fmt_watts(b['headroomWatts'])}" + _allowance_text(b)
            for b in doc["budgets"]
        ]
    if doc["disruptions"]:
        lines.append("  last moves and preemptions (Event: cause, replicas):")
        lines += [
            f"    {e['lastTimestamp']} {e['reason']}: {e['message']}" for e in doc["disruptions"]
        ]
    if doc["events"]:
        lines.append("  recent events:")
        lines += [
            f"    {e['lastTimestamp']} {e['type']} {e['reason']}: {e['message']}"
            for e in doc["events"]
        ]
    return "\n".join(lines)


def _allowance_text(budget: Mapping[str, Any]) -> str:
    """A budget's energy allowance as explain shows it (empty without one)."""
    if budget.get("remainingKilowattHours") is None:
        return ""
    text = f", {budget['remainingKilowattHours']:g} kWh left this period"
    if budget.get("projectedKilowattHoursAtPeriodEnd") is not None:
        text += (
            f" ({budget['projectedKilowattHoursAtPeriodEnd']:g} kWh projected at its end, modelled)"
        )
    return text + (", allowance exhausted" if budget.get("allowanceExhausted") else "")


def products(nodes: Sequence[Body]) -> dict[str, str]:
    """Node -> catalogue product, from the GPU Feature Discovery label (unknown ones left out)."""
    found: dict[str, str] = {}
    for node in nodes:
        label = (node["metadata"].get("labels") or {}).get(GPU_PRODUCT_LABEL)
        if not label:
            continue
        try:
            found[str(node["metadata"]["name"])] = normalise_product(label)
        except UnknownProductError:
            continue
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched explain",
        description="Say why an LLMWorkload is where it is: placement, power limits and what sets "
        "them, the budgets over its nodes, why it is unplaced, recent events.",
    )
    parser.add_argument(
        "workload",
        metavar="NAME",
        help="the LLMWorkload: NAME, or NAMESPACE/NAME",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        help="its namespace (default: the kubeconfig context's namespace, else `default`)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "yaml"),
        default="text",
        help="text for people, json or yaml for scripts (the same facts)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: env KUBECONFIG, else ~/.kube/config or in-cluster)",
    )
    return parser


def workload_key(args: argparse.Namespace) -> tuple[str, str]:
    """(namespace, name) from `NAME` with -n or the context's namespace, or `NAMESPACE/NAME`."""
    namespace, slash, name = str(args.workload).rpartition("/")
    if not slash:
        return args.namespace or default_namespace(args.kubeconfig), name
    if not namespace or not name or "/" in namespace:
        raise CommandError(
            f"workload {args.workload!r}: expected NAME or NAMESPACE/NAME", EXIT_USAGE
        )
    if args.namespace and args.namespace != namespace:
        raise CommandError(
            f"workload {args.workload!r} is in namespace {namespace}, but -n says "
            f"{args.namespace}: give one of them",
            EXIT_USAGE,
        )
    return namespace, name


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    namespace, name = workload_key(args)
    kube = Kube(args.kubeconfig)
    try:
        workload = kube.get(workloads_path(namespace, name))
    except KubeError as error:
        if error.status == 404:
            raise CommandError(
                f"LLMWorkload {namespace}/{name} not found: `kubectl get llmw -n {namespace}` "
                "lists those there (is the namespace right? -n NAMESPACE)",
                EXIT_NOT_FOUND,
            ) from None
        raise
    profiles = {p["metadata"]["name"]: p for p in kube.list(profiles_path())}
    budgets = kube.list(budgets_path())
    nodes = kube.list("/api/v1/nodes")
    scopes = {
        str(b["metadata"]["name"]): frozenset(
            n["metadata"]["name"]
            for n in nodes
            if parse_energybudget(b).spec.selects(n["metadata"].get("labels") or {})
        )
        for b in budgets
    }
    events = [
        e
        for e in kube.list(f"/api/v1/namespaces/{namespace}/events")
        if (e.get("involvedObject") or {}).get("name") == name
        and (e.get("involvedObject") or {}).get("kind") == "LLMWorkload"
    ]
    arguments = (workload, profiles, budgets, events, scopes)
    if args.output == "text":
        print(render(*arguments, node_products=products(nodes)))
        return EXIT_OK
    document = explanation(*arguments, node_products=products(nodes))
    if args.output == "json":
        print(json.dumps(document, indent=2))
    else:
        print(yaml.safe_dump(document, sort_keys=False), end="")
    return EXIT_OK


def _pod_label(placement: Mapping[str, Any], *, spans: bool) -> str:
    """`replica 0` for a single-node replica's pod; `replica 0 leader` / `replica 0 worker 2` for
    the pods of a replica that spans nodes."""
    rank = int(placement.get("rank", 0))
    role = "" if not spans else " leader" if rank == 0 else f" worker {rank}"
    return f"replica {placement['replica']}{role}"
