"""Read the simulated cluster (Nodes) and its EnergyBudgets from Kubernetes-style YAML.

Nodes use the format `wattsched plan` reads and the sandbox creates (sandbox/nodes.yaml): the GFD
label `nvidia.com/gpu.product` and `status.allocatable["nvidia.com/gpu"]`. Budgets are
`wattsched.io/v1alpha1` EnergyBudget objects; only the fields a simulation uses are read
(`nodeSelector`, `powerCapWatts`, `pue`, `carbon.intensityGramsPerKilowattHour`, the energy
allowance `energy.kilowattHours` per `energy.period`). Files may hold
several documents or a `List`. Not for: validating objects the way the API server does (the CRD
schema does that); errors here name the object and field and stop the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wattsched_api.energybudget import Period
from wattsched_api.vocabulary import GPU_PRODUCT_LABEL, GPU_RESOURCE
from wattsched_optimizer import model

from .truth import truth_product


class ClusterError(ValueError):
    """A Node or EnergyBudget cannot be simulated; the message names the object and field."""


@dataclass(frozen=True)
class SimNode:
    name: str
    labels: Mapping[str, str]
    product_label: str
    planner_product: str  # as the optimizer normalises it
    truth_product: str  # as the ground truth names it
    gpu_count: int


@dataclass(frozen=True)
class SimBudget:
    name: str
    power_cap_watts: float
    node_names: frozenset[str]
    pue: float
    carbon_intensity_grams_per_kwh: float | None
    # spec.energy: facility kWh (GPU energy x PUE) allowed per period; None: no allowance.
    energy_kwh: float | None = None
    energy_period: Period = Period.DAY


def _documents(path: Path) -> list[dict[str, Any]]:
    try:
        loaded = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, yaml.YAMLError) as error:
        raise ClusterError(f"{path}: cannot read YAML: {error}") from error
    docs: list[dict[str, Any]] = []
    for doc in loaded:
        if not isinstance(doc, dict):
            raise ClusterError(
                f"{path}: every document must be a mapping, got {type(doc).__name__}"
            )
        if str(doc.get("kind", "")).endswith("List"):
            docs.extend(item for item in doc.get("items") or [] if isinstance(item, dict))
        else:
            docs.append(doc)
    return docs


def _name(doc: Mapping[str, Any], kind: str, path: Path) -> str:
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ClusterError(f"{path}: a {kind} has no metadata.name")
    return name


def parse_node(doc: Mapping[str, Any], path: Path) -> SimNode | None:
    """A GPU node, or None for a node without GPUs (not part of any simulation)."""
    name = _name(doc, "Node", path)
    labels = {str(k): str(v) for k, v in ((doc.get("metadata") or {}).get("labels") or {}).items()}
    allocatable = (doc.get("status") or {}).get("allocatable") or {}
    raw_count = allocatable.get(GPU_RESOURCE)
    if raw_count is None:
        return None
    try:
        gpu_count = int(str(raw_count))
    except ValueError as error:
        raise ClusterError(
            f"Node {name}: status.allocatable[{GPU_RESOURCE!r}]={raw_count!r} must be an integer"
        ) from error
    if gpu_count <= 0:
        return None
    label = labels.get(GPU_PRODUCT_LABEL)
    if not label:
        raise ClusterError(f"Node {name}: metadata.labels[{GPU_PRODUCT_LABEL!r}] is missing")
    try:
        planner_product = model.normalise_product(label)
        simulated_product = truth_product(label)
    except (KeyError, ValueError) as error:
        raise ClusterError(
            f"Node {name}: metadata.labels[{GPU_PRODUCT_LABEL!r}]: {error}"
        ) from error
    return SimNode(name, labels, label, planner_product, simulated_product, gpu_count)


def load_nodes(path: Path) -> list[SimNode]:
    nodes = []
    for doc in _documents(path):
        if doc.get("kind") != "Node":
            continue
        node = parse_node(doc, path)
        if node is not None:
            nodes.append(node)
    if not nodes:
        raise ClusterError(f"{path}: no Node with allocatable {GPU_RESOURCE}")
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ClusterError(f"{path}: Node names must be unique")
    return nodes


def _matches(selector: Mapping[str, Any], labels: Mapping[str, str], where: str) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(str(key)) != str(value):
            return False
    for index, expression in enumerate(selector.get("matchExpressions") or []):
        key = str(expression.get("key"))
        operator = expression.get("operator")
        values = [str(v) for v in expression.get("values") or []]
        if operator == "In":
            ok = labels.get(key) in values
        elif operator == "NotIn":
            ok = labels.get(key) not in values
        elif operator == "Exists":
            ok = key in labels
        elif operator == "DoesNotExist":
            ok = key not in labels
        else:
            raise ClusterError(
                f"{where}: spec.nodeSelector.matchExpressions[{index}].operator={operator!r} "
                "(allowed: In, NotIn, Exists, DoesNotExist)"
            )
        if not ok:
            return False
    return True


def parse_budget(doc: Mapping[str, Any], nodes: Iterable[SimNode], path: Path) -> SimBudget:
    name = _name(doc, "EnergyBudget", path)
    where = f"EnergyBudget {name}"
    spec = doc.get("spec") or {}
    cap = spec.get("powerCapWatts")
    if not isinstance(cap, int | float) or isinstance(cap, bool) or cap <= 0:
        raise ClusterError(f"{where}: spec.powerCapWatts={cap!r} must be a number > 0 (watts)")
    pue = spec.get("pue", 1.0)
    if not isinstance(pue, int | float) or isinstance(pue, bool) or pue < 1.0:
        raise ClusterError(f"{where}: spec.pue={pue!r} must be a number >= 1.0")
    intensity = (spec.get("carbon") or {}).get("intensityGramsPerKilowattHour")
    if intensity is not None and (not isinstance(intensity, int | float) or intensity < 0):
        raise ClusterError(
            f"{where}: spec.carbon.intensityGramsPerKilowattHour={intensity!r} "
            "must be a number >= 0"
        )
    energy = spec.get("energy") or {}
    kwh = energy.get("kilowattHours")
    if energy and (not isinstance(kwh, int | float) or isinstance(kwh, bool) or kwh <= 0):
        raise ClusterError(f"{where}: spec.energy.kilowattHours={kwh!r} must be a number > 0")
    period = energy.get("period", Period.DAY.value)
    if period not in {p.value for p in Period}:
        raise ClusterError(
            f"{where}: spec.energy.period={period!r} (allowed: "
            f"{', '.join(p.value for p in Period)})"
        )
    selector = spec.get("nodeSelector") or {}
    scope = frozenset(node.name for node in nodes if _matches(selector, node.labels, where))
    return SimBudget(
        name,
        float(cap),
        scope,
        float(pue),
        None if intensity is None else float(intensity),
        energy_kwh=float(kwh) if isinstance(kwh, int | float) else None,
        energy_period=Period(period),
    )


def load_budgets(path: Path, nodes: list[SimNode]) -> list[SimBudget]:
    budgets = [
        parse_budget(doc, nodes, path)
        for doc in _documents(path)
        if doc.get("kind") == "EnergyBudget"
    ]
    if not budgets:
        raise ClusterError(f"{path}: no EnergyBudget")
    return budgets
