"""`wattsched explain <namespace>/<name>`: say why an LLMWorkload is where it is.

Reads the workload, the NodePowerProfiles of its nodes, the EnergyBudgets and the workload's Events
from the cluster, and prints its placement (node, variant, per-GPU power limit, what the agent
applied), the budgets whose scope holds it with their headroom, and the constraint that binds or
the reason it is unplaced, in the operator's and optimizer's words. `render` is a pure function of
those objects; `main` only fetches them. Not for changing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from wattsched_operator.api import parse_energybudget
from wattsched_operator.kube import Kube, KubeError, budgets_path, profiles_path, workloads_path

Body = Mapping[str, Any]


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in status.get("conditions") or []}


def _fmt_watts(watts: object) -> str:
    return "?" if watts is None else f"{float(str(watts)):.0f} W"


def render(
    workload: Body,
    profiles: Mapping[str, Body],
    budgets: Sequence[Body],
    events: Sequence[Body],
    budget_scopes: Mapping[str, frozenset[str]],
) -> str:
    """The explanation as text. `budget_scopes`: budget name -> nodes its selector matches."""
    meta = workload.get("metadata") or {}
    spec = workload.get("spec") or {}
    status = workload.get("status") or {}
    key = f"{meta.get('namespace')}/{meta.get('name')}"
    lines = [
        f"LLMWorkload {key}: {spec.get('type', '?')}, {(spec.get('gpu') or {}).get('count', '?')}"
        f" GPU(s) per replica, priority {spec.get('priority', 0)}",
        f"  phase: {status.get('phase') or 'not yet planned'}"
        + (f" ({status['message']})" if status.get("message") else ""),
    ]
    placements = status.get("placements") or []
    nodes = sorted({str(p["node"]) for p in placements})
    if placements:
        lines.append(
            "  placements (planned power limits are modelled; applied ones the agent reports):"
        )
        for p in sorted(placements, key=lambda p: p["replica"]):
            profile = profiles.get(str(p["node"])) or {}
            applied = [
                g.get("appliedWatts") for g in (profile.get("status") or {}).get("gpus") or []
            ]
            applied_text = (
                f"applied {min(float(a) for a in applied if a is not None):.0f}-"
                f"{max(float(a) for a in applied if a is not None):.0f} W on the node"
                if any(a is not None for a in applied)
                else "no agent report yet"
            )
            lines.append(
                f"    replica {p['replica']}: node {p['node']}, {p['gpus']} GPU(s), variant "
                f"{p['variant']}, limit {_fmt_watts(p['powerLimitWatts'])} per GPU ({applied_text})"
            )
    power = status.get("power") or {}
    if power:
        lines.append(
            f"  power: limits sum {_fmt_watts(power.get('capWatts'))}, expected "
            f"{_fmt_watts(power.get('expectedWatts'))} (modelled)"
            + (
                f", measured {_fmt_watts(power['measuredWatts'])}"
                if power.get("measuredWatts") is not None
                else ""
            )
        )
    conditions = _conditions(status)
    schedulable = conditions.get("Schedulable")
    limited = conditions.get("BudgetLimited")
    if schedulable is not None and schedulable.get("status") == "False":
        lines.append(
            f"  unplaced because of {schedulable.get('reason')}: {schedulable.get('message')}"
        )
    elif limited is not None and limited.get("status") == "True":
        lines.append(f"  held back by a budget: {limited.get('message')}")
    elif placements:
        lines.append("  binding: none reported; the optimizer placed every planned replica")
    relevant = [
        b
        for b in budgets
        if not nodes or budget_scopes.get(str(b["metadata"]["name"]), frozenset()) & set(nodes)
    ]
    if relevant:
        lines.append("  budgets over its nodes:")
        for b in sorted(relevant, key=lambda b: str(b["metadata"]["name"])):
            b_status = b.get("status") or {}
            cap = (b.get("spec") or {}).get("powerCapWatts")
            lines.append(
                f"    {b['metadata']['name']}: cap {_fmt_watts(cap)}"
                f", allocated {_fmt_watts(b_status.get('allocatedCapWatts'))}"
                f", headroom {_fmt_watts(b_status.get('headroomWatts'))}"
            )
    recent = sorted(events, key=lambda e: str(e.get("lastTimestamp") or ""))[-5:]
    if recent:
        lines.append("  recent events:")
        lines += [
            f"    {e.get('lastTimestamp')} {e.get('type')} {e.get('reason')}: {e.get('message')}"
            for e in recent
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="wattsched explain", description="Say why an LLMWorkload is where it is."
    )
    parser.add_argument("workload", help="<namespace>/<name>")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    args = parser.parse_args(argv)
    if "/" not in args.workload:
        parser.error(f"workload {args.workload!r}: expected <namespace>/<name>")
    namespace, name = args.workload.split("/", 1)
    kube = Kube(args.kubeconfig)
    try:
        workload = kube.get(workloads_path(namespace, name))
    except KubeError as error:
        print(f"wattsched explain: LLMWorkload {namespace}/{name}: {error}", file=sys.stderr)
        return 1
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
    print(render(workload, profiles, budgets, events, scopes))
    return 0
