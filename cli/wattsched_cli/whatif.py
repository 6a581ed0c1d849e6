"""What-if planning for `wattsched plan`: `--set` overrides on the objects a plan is made from,
and the difference between a plan and what the cluster runs now (`--diff`).

Pure functions of plain JSON objects; nothing here talks to an API server or solves.

`--set` syntax: `KIND/NAME.FIELD=VALUE`
- KIND: `energybudget` (`eb`), `llmworkload` (`llmw`) or `node`, any case.
- NAME: the object's name; an LLMWorkload's is `NAMESPACE/NAME`.
- FIELD: a path under `spec` or `metadata.labels`, dot-separated; `[N]` indexes a list and
  `["key"]` names a key that holds dots or slashes (`metadata.labels["wattsched.io/rack"]`).
- VALUE: a YAML value (`7000`, `Efficiency`, `true`, `[a, b]`); `null` removes the field.
An override is applied to a copy of the object, which is then read with the API's own rules, so
a value the CRD would refuse is refused here with the field named.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import yaml

from wattsched_api.errors import ApiValidationError
from wattsched_api.llmworkload import parse_llmworkload
from wattsched_operator.snapshot import (
    Body,
    ClusterObjects,
    SnapshotError,
    parse_budget,
)
from wattsched_optimizer.problem import CurrentPlacement, Placement, Plan, PlanInput

SET_SYNTAX = "KIND/NAME.FIELD=VALUE (e.g. energybudget/rack-a.spec.powerCapWatts=7000)"
# --set kind -> (kind, ClusterObjects field, namespaced)
_KINDS: dict[str, tuple[str, str, bool]] = {
    "energybudget": ("EnergyBudget", "budgets", False),
    "eb": ("EnergyBudget", "budgets", False),
    "llmworkload": ("LLMWorkload", "workloads", True),
    "llmw": ("LLMWorkload", "workloads", True),
    "node": ("Node", "nodes", False),
}
_SEGMENT = re.compile(r'\.([A-Za-z_][A-Za-z0-9_-]*)|\[([0-9]+)\]|\["([^"]+)"\]')
_FIELD_START = re.compile(r"\.(spec|metadata)(?=[.\[]|$)")
PathPart = str | int


@dataclass(frozen=True)
class Override:
    """One `--set`: the object (kind and name), the field path and the new value (None removes)."""

    text: str
    kind: str
    bucket: str
    name: str
    path: tuple[PathPart, ...]
    value: Any

    @property
    def field_name(self) -> str:
        out = ""
        for part in self.path:
            if isinstance(part, int):
                out += f"[{part}]"
            elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
                out += f".{part}" if out else part
            else:
                out += f'["{part}"]'
        return out


def _error(text: str, message: str) -> SnapshotError:
    return SnapshotError(f"--set {text}: {message}")


def parse_override(text: str) -> Override:
    """Read one `--set` argument (syntax in the module docstring); SnapshotError when malformed."""
    target, equals, value_text = text.partition("=")
    if not equals or "/" not in target:
        raise _error(text, f"expected {SET_SYNTAX}")
    kind_text, rest = target.split("/", 1)
    if kind_text.lower() not in _KINDS:
        raise _error(
            text,
            f"unknown kind {kind_text!r}; allowed: energybudget (eb), llmworkload (llmw), node",
        )
    kind, bucket, namespaced = _KINDS[kind_text.lower()]
    start = _FIELD_START.search(rest)
    if start is None or start.start() == 0:
        raise _error(text, f"expected {SET_SYNTAX}: the field starts with .spec or .metadata")
    name, field_text = rest[: start.start()], rest[start.start() :]
    if namespaced and name.count("/") != 1:
        raise _error(text, f"an LLMWorkload is named NAMESPACE/NAME, got {name!r}")
    if not namespaced and "/" in name:
        raise _error(text, f"a {kind} is cluster-scoped: its name has no namespace, got {name!r}")
    path: list[PathPart] = []
    position = 0
    while position < len(field_text):
        match = _SEGMENT.match(field_text, position)
        if match is None:
            raise _error(
                text,
                f"cannot read the field path at {field_text[position:]!r}: use .name, [index] "
                'or ["key"]',
            )
        key, index, quoted = match.groups()
        path.append(int(index) if index is not None else key if key is not None else quoted)
        position = match.end()
    if path[0] == "metadata" and (len(path) != 3 or path[1] != "labels"):
        raise _error(text, 'only metadata.labels["KEY"] may be set under metadata')
    if len(path) < 2:
        raise _error(text, "name a field inside spec (e.g. spec.powerCapWatts)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as error:
        raise _error(text, f"the value is not YAML: {str(error).splitlines()[0]}") from None
    return Override(text=text, kind=kind, bucket=bucket, name=name, path=tuple(path), value=value)


def _object_name(body: Body) -> str:
    metadata = body.get("metadata") or {}
    name = str(metadata.get("name"))
    namespace = metadata.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def _set(document: Any, override: Override) -> None:
    """Set (or, for a None value, remove) the override's field in `document`, in place."""
    node = document
    for depth, part in enumerate(override.path[:-1]):
        following = override.path[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise _error(override.text, f"index [{part}] is out of range ({size} item(s))")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise _error(
                override.text,
                f"{override.field_name}: {part!r} is inside a value that is not a map",
            )
        if node.get(part) is None:
            node[part] = [] if isinstance(following, int) else {}
        node = node[part]
    last = override.path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            size = len(node) if isinstance(node, list) else 0
            raise _error(override.text, f"index [{last}] is out of range ({size} item(s))")
        node[last] = override.value
    elif not isinstance(node, dict):
        raise _error(
            override.text, f"{override.field_name}: {last!r} is inside a value that is not a map"
        )
    elif override.value is None:
        node.pop(last, None)
    else:
        node[last] = override.value


def _validate(body: Body, override: Override) -> None:
    try:
        if override.kind == "EnergyBudget":
            parse_budget(body)
        elif override.kind == "LLMWorkload":
            parse_llmworkload(body)
    except (ApiValidationError, SnapshotError) as error:
        raise _error(override.text, str(error)) from None


def apply_overrides(objects: ClusterObjects, overrides: Sequence[Override]) -> ClusterObjects:
    """`objects` with each override applied to a copy of its object (the input is not changed).

    SnapshotError (one line, naming the `--set`) when the object is not there or the new value is
    not one the API allows.
    """
    buckets: dict[str, list[Body]] = {
        name: list(getattr(objects, name)) for name in ("nodes", "workloads", "budgets")
    }
    for override in overrides:
        items = buckets[override.bucket]
        index = next(
            (i for i, body in enumerate(items) if _object_name(body) == override.name), None
        )
        if index is None:
            known = sorted(_object_name(body) for body in items)
            raise _error(
                override.text,
                f"no {override.kind} named {override.name!r}"
                + (f"; there are: {', '.join(known[:10])}" if known else "; there are none"),
            )
        changed = copy.deepcopy(dict(items[index]))
        _set(changed, override)
        _validate(changed, override)
        items[index] = changed
    return replace(objects, **{name: tuple(items) for name, items in buckets.items()})


# -- diff ------------------------------------------------------------------------------------------


def _node_limits_now(profiles: Sequence[Body]) -> dict[str, list[float]]:
    """Per node, the per-GPU limits its NodePowerProfile asks for now, as its agent maps the spec's
    per-pod and idle limits to GPUs (`status.gpus[].targetWatts`, GPUs other teams hold left out,
    as the plan leaves them out), by GPU index."""
    limits: dict[str, list[float]] = {}
    for profile in profiles:
        spec = profile.get("spec") or {}
        gpus = sorted(
            (profile.get("status") or {}).get("gpus") or [], key=lambda g: int(g.get("index", 0))
        )
        node = str(spec.get("nodeName") or (profile.get("metadata") or {}).get("name"))
        limits[node] = [
            float(g["targetWatts"])
            for g in gpus
            if g.get("targetWatts") is not None and g.get("holder") != "other"
        ]
    return limits


def _gpus_changed(before: Sequence[float], after: Sequence[float]) -> int:
    """How many of the planned limits `after` no limit in force now matches (within 0.5 W): the
    plan lists limits in its own GPU order, the agent by index, so they are matched as sets."""
    remaining = sorted(before)
    changed = 0
    for watts in sorted(after):
        match = next((i for i, w in enumerate(remaining) if abs(w - watts) <= 0.5), None)
        if match is None:
            changed += 1
        else:
            remaining.pop(match)
    return changed


def plan_diff(plan_input: PlanInput, plan: Plan, profiles: Sequence[Body]) -> dict[str, Any]:
    """What applying `plan` would change against the cluster now.

    Pods are matched by workload, replica index and rank, as the operator matches them (entries
    of a replica that spans nodes also carry `rank`, 0 for its leader): a replica on
    another node, or with another variant, is a pod stopped and started (`moved`,
    `variantChanged`); one no longer planned is `stopped` (with the workload's unplaced reason when
    it has one); a new one is `started`; one that stays where it is, with the same variant and
    another per-GPU limit, is in `limitChanged`. `nodeLimits`: nodes whose planned per-GPU limits
    differ from what their NodePowerProfile asks for now, as its agent reports it per GPU (a node
    without a profile, or whose agent has not reported, has no limits now).
    """
    now: dict[tuple[str, int, int], CurrentPlacement] = {
        (c.workload, c.replica, c.rank): c for c in plan_input.current
    }
    planned: dict[tuple[str, int, int], Placement] = {
        (p.workload, p.replica, p.rank): p for p in plan.placements
    }
    spanning = {w.key for w in plan_input.workloads if w.spans_nodes}
    reasons = {u.workload: u.reason for u in plan.unplaced}
    moved, variant_changed, stopped, started, limit_changed = [], [], [], [], []
    for key in sorted(now.keys() | planned.keys()):
        workload, replica, rank = key
        before, after = now.get(key), planned.get(key)
        pod: dict[str, Any] = {"workload": workload, "replica": replica}
        if workload in spanning:
            pod["rank"] = rank
        if after is None and before is not None:
            stopped.append(
                {
                    **pod,
                    "node": before.node,
                    "reason": reasons.get(workload, "the plan places fewer replicas"),
                }
            )
        elif before is None and after is not None:
            started.append(
                {
                    **pod,
                    "node": after.node,
                    "variant": after.variant,
                    "powerLimitWatts": after.power_limit_watts,
                }
            )
        elif before is not None and after is not None:
            if before.node != after.node:
                moved.append(
                    {
                        **pod,
                        "fromNode": before.node,
                        "toNode": after.node,
                    }
                )
            elif before.variant != after.variant:
                variant_changed.append(
                    {
                        **pod,
                        "node": after.node,
                        "fromVariant": before.variant,
                        "toVariant": after.variant,
                    }
                )
            elif abs(before.power_limit_watts - after.power_limit_watts) > 0.5:
                limit_changed.append(
                    {
                        **pod,
                        "node": after.node,
                        "fromWatts": before.power_limit_watts,
                        "toWatts": after.power_limit_watts,
                    }
                )
    limits_now = _node_limits_now(profiles)
    node_limits = []
    for node, limits in sorted(plan.node_power_limits_watts.items()):
        before_limits = limits_now.get(node, [])
        after_limits = [float(w) for w in limits]
        changed = _gpus_changed(before_limits, after_limits)
        if changed or len(before_limits) != len(after_limits):
            node_limits.append(
                {
                    "node": node,
                    "fromWatts": sum(before_limits) if before_limits else None,
                    "toWatts": sum(after_limits),
                    "gpusChanged": changed,
                }
            )
    return {
        "moved": moved,
        "variantChanged": variant_changed,
        "stopped": stopped,
        "started": started,
        "limitChanged": limit_changed,
        "nodeLimits": node_limits,
    }


def diff_lines(diff: Mapping[str, Any]) -> list[str]:
    """`plan_diff` as text, one change per line; a line saying so when nothing would change."""
    lines = [
        f"move     {m['workload']} replica {m['replica']}: {m['fromNode']} -> {m['toNode']}"
        for m in diff["moved"]
    ]
    lines += [
        f"restart  {v['workload']} replica {v['replica']} on {v['node']}: variant "
        f"{v['fromVariant']} -> {v['toVariant']}"
        for v in diff["variantChanged"]
    ]
    lines += [
        f"stop     {s['workload']} replica {s['replica']} on {s['node']}: {s['reason']}"
        for s in diff["stopped"]
    ]
    lines += [
        f"start    {s['workload']} replica {s['replica']} on {s['node']} ({s['variant']}, "
        f"{s['powerLimitWatts']:.0f} W per GPU)"
        for s in diff["started"]
    ]
    lines += [
        f"limit    {c['workload']} replica {c['replica']} on {c['node']}: "
        f"{c['fromWatts']:.0f} -> {c['toWatts']:.0f} W per GPU"
        for c in diff["limitChanged"]
    ]
    lines += [
        f"node     {n['node']}: limits sum "
        + ("(none set)" if n["fromWatts"] is None else f"{n['fromWatts']:.0f}")
        + f" -> {n['toWatts']:.0f} W ({n['gpusChanged']} GPU(s) change)"
        for n in diff["nodeLimits"]
    ]
    return lines or ["no change: the plan keeps every pod and power limit as they are"]
