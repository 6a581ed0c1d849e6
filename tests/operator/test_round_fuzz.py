"""Fuzz: a planning round's decision never fails because of one object (issue 12).

Hypothesis generates LLMWorkloads, EnergyBudgets, Nodes, NodePowerProfiles and Pods as the API
server returns them, odd and invalid ones included (unknown or missing GPU products, quantities
that are not numbers, caps below the idle minimum, selectors that cannot be read, stale agents,
pods with malformed labels or limits, pods naming a pod they replace). The round's decision
(`core.decide`, without the API server: snapshot, plan, make-before-break moves, desired pods and
pod changes, the budget-safe power steps, statuses)
must never raise;
every budget's limits sum to at most its cap, or the budget is held and says why; and a valid
workload that nothing else concerns (its own node, outside every budget) is still placed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattsched_api import vocabulary
from wattsched_api.vocabulary import REPLACES_ANNOTATION
from wattsched_operator import core, desired, statuses
from wattsched_operator.core import ClusterView, build_input_function

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
GROUP_VERSION = "wattsched.io/v1alpha1"
PRODUCTS = (
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-H200",
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-L4",
    "NVIDIA-A10G",  # not in the catalogue
    "",
)
NODE_NAMES = tuple(f"gpu-{i}" for i in range(5))
WORKLOAD_NAMES = tuple(f"w{i}" for i in range(6))
PROBE_NODE = "probe-node"
PROBE = "probe/svc"
TOLERANCE_WATTS = 1e-3


def odd(valid: st.SearchStrategy[Any], *invalid: Any) -> st.SearchStrategy[Any]:
    """Mostly `valid` (9 in 10), sometimes one of the invalid values."""
    return st.tuples(st.sampled_from([False] * 9 + [True]), valid, st.sampled_from(invalid)).map(
        lambda drawn: drawn[2] if drawn[0] else drawn[1]
    )


@st.composite
def nodes(draw: st.DrawFn) -> list[dict[str, Any]]:
    bodies = []
    for name in draw(st.lists(st.sampled_from(NODE_NAMES), unique=True, max_size=5)):
        labels = {"rack": draw(st.sampled_from(["a", "b"]))}
        product = draw(st.sampled_from((*PRODUCTS, None)))
        if product is not None:
            labels["nvidia.com/gpu.product"] = product
        gpus = draw(odd(st.sampled_from(["8", "4", "2", "0"]), "eight", "8.5", 8, None, "-1"))
        allocatable: dict[str, Any] = {"cpu": "64"}
        if gpus is not None:
            allocatable["nvidia.com/gpu"] = gpus
        ready = draw(st.sampled_from(["True", "True", "False"]))
        bodies.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "uid": f"uid-{name}", "labels": labels},
                "spec": {"unschedulable": draw(st.booleans())} if draw(st.booleans()) else {},
                "status": {
                    "allocatable": allocatable,
                    "conditions": [{"type": "Ready", "status": ready}],
                },
            }
        )
    return bodies


@st.composite
def profiles(draw: st.DrawFn, node_names: list[str]) -> list[dict[str, Any]]:
    bodies = []
    for name in node_names:
        if not draw(st.sampled_from([False, True, True])):  # two in three nodes have an agent
            continue
        watts = draw(st.lists(st.sampled_from([60.0, 200.0, 300.0, 700.0]), max_size=8))
        age = draw(st.sampled_from([1, 5, 29, 31, 600]))
        agent: dict[str, Any] = {"ready": draw(odd(st.just(True), False)), "backend": "simulated"}
        if draw(odd(st.just(True), False)):
            agent["heartbeatTime"] = (NOW - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        generation = draw(st.integers(1, 3))
        bodies.append(
            {
                "apiVersion": GROUP_VERSION,
                "kind": "NodePowerProfile",
                "metadata": {"name": name, "generation": generation},
                "spec": {"nodeName": name, "idlePowerLimitWatts": min(watts, default=60.0)},
                "status": {
                    "observedGeneration": draw(odd(st.just(generation), 0)),
                    "agent": agent,
                    "gpus": [
                        {
                            "index": i,
                            "appliedWatts": w,
                            "targetWatts": draw(st.sampled_from([None, w])),
                            "maxWatts": draw(st.sampled_from([None, 400.0, 700.0])),
                        }
                        for i, w in enumerate(watts)
                    ],
                },
            }
        )
    return bodies


selectors = odd(
    st.one_of(
        st.builds(lambda rack: {"matchLabels": {"rack": rack}}, st.sampled_from(["a", "b"])),
        st.builds(
            lambda values: {
                "matchExpressions": [{"key": "rack", "operator": "In", "values": values}]
            },
            st.lists(st.sampled_from(["a", "b"]), min_size=1, unique=True),
        ),
    ),
    {"matchLabels": "rack=a"},
    {"matchExpressions": [{"key": "rack", "operator": "Near", "values": ["a"]}]},
    {"matchLabels": {"rack": ["a"]}},
    [],
)


@st.composite
def budgets(draw: st.DrawFn) -> list[dict[str, Any]]:
    bodies = []
    for index in range(draw(st.integers(0, 3))):
        cap = draw(odd(st.sampled_from([1, 500, 2000, 6000, 20000, 100000]), "lots", -5, 0, None))
        spec: dict[str, Any] = {"nodeSelector": draw(selectors)}
        if cap is not None:
            spec["powerCapWatts"] = cap
        bodies.append(
            {
                "apiVersion": GROUP_VERSION,
                "kind": "EnergyBudget",
                "metadata": {"name": f"b{index}", "uid": f"uid-b{index}", "generation": 1},
                "spec": spec,
            }
        )
    return bodies


def workload_body(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "LLMWorkload",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "generation": 1,
        },
        "spec": spec,
    }


@st.composite
def workloads(draw: st.DrawFn) -> list[dict[str, Any]]:
    bodies = []
    for name in draw(st.lists(st.sampled_from(WORKLOAD_NAMES), unique=True, max_size=6)):
        type_ = draw(odd(st.sampled_from(["Inference", "Training", "BatchInference"]), "Magic"))
        spec: dict[str, Any] = {
            "type": type_,
            "model": {
                "name": "m",
                "parametersBillions": draw(odd(st.sampled_from([1, 8, 70]), 0, "big", -1)),
            },
            "gpu": {"count": draw(odd(st.sampled_from([1, 2, 4, 8]), 0, 100, "two"))},
            "priority": draw(st.integers(-10, 100)),
            "energy": {"policy": draw(st.sampled_from(["Performance", "Balanced", "Efficiency"]))},
            "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}},
        }
        if draw(st.booleans()):
            spec["gpu"]["products"] = [draw(st.sampled_from(PRODUCTS[:5]))]
        if type_ == "Inference":
            spec["minReplicas"] = draw(st.integers(1, 2))
            spec["maxReplicas"] = draw(odd(st.integers(2, 4), 0))
            if draw(st.booleans()):
                spec["slo"] = {"tokensPerSecond": draw(st.sampled_from([10, 1000, 1e9]))}
        else:
            spec["replicas"] = draw(odd(st.integers(1, 3), 0))
            spec["slo"] = {"totalWork": {"tokens": draw(odd(st.just(1e9), -1, "lots"))}}
        if draw(st.sampled_from([False] * 9 + [True])):
            del spec[draw(st.sampled_from(["model", "gpu", "type"]))]
        body = workload_body("team", name, spec)
        if draw(st.booleans()):
            body["status"] = {"phase": draw(st.sampled_from(["Pending", "Running", "Placed"]))}
        bodies.append(body)
    return bodies


@st.composite
def pods(draw: st.DrawFn, node_names: list[str]) -> list[dict[str, Any]]:
    bodies = []
    for index in range(draw(st.integers(0, 6))):
        labels = {desired.LABEL_WORKLOAD: draw(st.sampled_from(WORKLOAD_NAMES))}
        replica = draw(st.sampled_from(["0", "1", "2", "x", None]))
        if replica is not None:
            labels[desired.LABEL_REPLICA] = replica
        annotations = {}
        limit = draw(st.sampled_from(["300", "700.5", "abc", None]))
        if limit is not None:
            annotations[desired.ANNOTATION_POWER_LIMIT] = limit
        # A make-before-break replacement names the pod it replaces (or nonsense).
        replaces = draw(st.sampled_from([None, "p0", "p1", f"p{index}", "", "x/y"]))
        if replaces is not None:
            annotations[REPLACES_ANNOTATION] = replaces
        node = draw(st.sampled_from([*node_names, None])) if node_names else None
        bodies.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"p{index}",
                    "namespace": "team",
                    "labels": labels,
                    "annotations": annotations,
                    "creationTimestamp": draw(
                        st.sampled_from(["2026-12-01T00:00:00Z", "yesterday", None])
                    ),
                },
                "spec": {"nodeName": node, "containers": [{"name": "main"}]},
                "status": {
                    "phase": draw(st.sampled_from(["Pending", "Running", "Failed"])),
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
    return bodies


def probe_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid workload on a node of its own that no generated budget selects."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": PROBE_NODE,
            "labels": {"rack": "probe", "nvidia.com/gpu.product": "NVIDIA-L40S"},
        },
        "status": {
            "allocatable": {"nvidia.com/gpu": "4"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    workload = workload_body(
        "probe",
        "svc",
        {
            "type": "Inference",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 1, "products": ["NVIDIA-L40S"]},
            "slo": {"tokensPerSecond": 10},
            "priority": 1000,
            "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}},
        },
    )
    return node, workload


def by_key(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keyed = {}
    for body in bodies:
        meta = body["metadata"]
        namespace = meta.get("namespace")
        keyed[f"{namespace}/{meta['name']}" if namespace else meta["name"]] = body
    return keyed


@st.composite
def clusters(draw: st.DrawFn) -> ClusterView:
    node_bodies = draw(nodes())
    names = [b["metadata"]["name"] for b in node_bodies]
    probe_node, probe = probe_objects()
    return ClusterView(
        workloads=by_key([*draw(workloads()), probe]),
        budgets=by_key(draw(budgets())),
        nodes=by_key([*node_bodies, probe_node]),
        profiles=by_key(draw(profiles(names))),
        pods=by_key(draw(pods(names))),
    )


def decide(view: ClusterView) -> None:
    """One round's decision (`core.decide`, no API server), with its invariants checked."""
    round_ = core.decide(core.Observed(view), NOW)
    assert round_.plan is not None
    result = round_.plan
    built = build_input_function(30.0)(view, frozenset(), {}, NOW)
    scopes = {b.name: b for b in built.plan_input.budgets}
    written = {w.object.name: w.status for w in round_.budget_statuses}
    for allocation in result.budgets:
        budget = scopes[allocation.name]
        ready = statuses.find_condition(written[allocation.name]["conditions"], "Ready")
        assert ready is not None
        if allocation.held:
            assert allocation.allocated_cap_watts > budget.power_cap_watts
            assert ready["reason"] == vocabulary.Reason.CAP_BELOW_FLOOR, ready
        else:
            assert allocation.allocated_cap_watts <= budget.power_cap_watts + TOLERANCE_WATTS
            assert ready["status"] == "True"
    for name in built.invalid_budgets:
        assert name in view.budgets
    placements: dict[str, list[Any]] = {}
    for placement in result.placements:
        placements.setdefault(placement.workload, []).append(placement)
    assert [p.node for p in placements.get(PROBE, [])] == [PROBE_NODE], result.unplaced
    probe_pods = [p for p in round_.create if p["metadata"]["namespace"] == "probe"]
    assert [p["metadata"]["annotations"][desired.ANNOTATION_NODE] for p in probe_pods] == [
        PROBE_NODE
    ]


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(clusters())
def test_a_round_never_fails_keeps_every_cap_and_places_unrelated_work(view: ClusterView) -> None:
    decide(view)
