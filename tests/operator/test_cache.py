"""The operator's cache: what it keeps of each object, that repeated parts are kept once and
read-only, and that it follows watch events (an update replaces, a deletion removes)."""

from __future__ import annotations

import copy
import gc
import json
import tracemalloc
from typing import Any

import pytest

from wattsched_api import parse_llmworkload
from wattsched_operator import cache, frozen
from wattsched_operator.cache import (
    WORKLOADS,
    ClusterCache,
    FrozenDict,
    FrozenList,
    SharedValues,
    slim,
)
from wattsched_operator.handlers import record


def workload(name: str, status: dict[str, Any] | None = None, gpus: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": f"uid-{name}",
            "resourceVersion": "7",
            "generation": 1,
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {
            "type": "Inference",
            "model": {"name": "meta-llama/Llama-3.1-8B", "parametersBillions": 8},
            "gpu": {"count": gpus},
            "minReplicas": 1,
            "maxReplicas": 1,
            "slo": {"tokensPerSecond": 10},
            "template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}},
        },
    }
    if status is not None:
        body["status"] = status
    return body


def placed(node: str) -> dict[str, Any]:
    return {
        "phase": "Placed",
        "conditions": [
            {
                "type": "Placed",
                "status": "True",
                "reason": "Planned",
                "message": f"1 replica(s) on {node}",
                "lastTransitionTime": "2026-12-05T16:43:58Z",
                "observedGeneration": 1,
            }
        ],
    }


def without_managed_fields(body: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    return {**body, "metadata": meta}


def test_the_cache_keeps_what_the_core_reads_of_a_workload() -> None:
    body = workload("a", placed("n1"))
    kept = slim(WORKLOADS, body)
    assert kept == without_managed_fields(body)
    assert parse_llmworkload(kept) == parse_llmworkload(body)
    assert json.loads(json.dumps(kept)) == kept


def test_workloads_from_one_template_share_their_spec_and_equal_conditions() -> None:
    first = slim(WORKLOADS, workload("a", placed("n1")))
    second = slim(WORKLOADS, workload("b", placed("n1")))
    third = slim(WORKLOADS, workload("c", placed("n2")))
    assert first["spec"] is second["spec"] is third["spec"]
    assert first["status"] is second["status"]
    assert third["status"]["conditions"][0]["message"] == "1 replica(s) on n2"
    assert first["metadata"] is not second["metadata"]
    assert (first["metadata"]["name"], second["metadata"]["name"]) == ("a", "b")


def test_a_different_spec_is_not_shared() -> None:
    one = slim(WORKLOADS, workload("a", gpus=1))
    two = slim(WORKLOADS, workload("b", gpus=2))
    assert one["spec"] is not two["spec"]
    assert (one["spec"]["gpu"]["count"], two["spec"]["gpu"]["count"]) == (1, 2)


@pytest.mark.parametrize(
    "values", [[1, True, 1.0], [0, False, 0.0, None, "", [], {}], ["1", 1, [1], {"1": 1}]]
)
def test_values_equal_in_python_but_not_in_json_keep_their_type(values: list[Any]) -> None:
    shared = SharedValues()
    kept = [shared.share({"x": value}) for value in values]
    assert [json.dumps(k) for k in kept] == [json.dumps({"x": value}) for value in values]


def test_a_cached_body_refuses_changes_in_place_and_its_copies_accept_them() -> None:
    kept = slim(WORKLOADS, workload("a", placed("n1")))
    assert isinstance(kept, FrozenDict)
    assert isinstance(kept["status"]["conditions"], FrozenList)
    with pytest.raises(TypeError, match="read-only"):
        kept["spec"]["gpu"]["count"] = 2
    with pytest.raises(TypeError, match="read-only"):
        kept["status"].setdefault("phase", "Running")
    with pytest.raises(TypeError, match="read-only"):
        kept["status"]["conditions"].append({"type": "Ready"})
    mutable = copy.deepcopy(kept)
    mutable["spec"]["gpu"]["count"] = 2
    mutable["status"]["conditions"].append({"type": "Ready"})
    assert type(mutable) is dict
    assert type(mutable["status"]["conditions"]) is list
    shallow = dict(kept["status"])
    shallow["phase"] = "Running"
    assert kept["spec"]["gpu"]["count"] == 1
    assert kept["status"]["phase"] == "Placed"
    assert len(kept["status"]["conditions"]) == 1


def test_events_update_the_cached_body_and_a_deletion_removes_it() -> None:
    cache = ClusterCache()
    record(cache, WORKLOADS, "ADDED", workload("a"))
    assert "status" not in (cache.get(WORKLOADS, "team/a") or {})
    record(cache, WORKLOADS, "MODIFIED", workload("a", placed("n1")))
    kept = cache.get(WORKLOADS, "team/a")
    assert kept is not None
    assert kept["status"]["phase"] == "Placed"
    assert cache.view().workloads["team/a"] is kept
    record(cache, WORKLOADS, "DELETED", workload("a", placed("n1")))
    assert cache.get(WORKLOADS, "team/a") is None
    assert "team/a" not in cache.view().workloads


def test_values_nothing_holds_any_more_leave_the_table_and_held_ones_stay() -> None:
    shared = SharedValues()
    held = shared.share({"spec": {"n": -1}})
    for n in range(20_000):
        shared.share({"spec": {"n": n}})  # dropped at once by the caller
    assert len(shared) < 10_000
    assert shared.share({"spec": {"n": -1}})["spec"] is held["spec"]


def test_a_thousand_workloads_from_one_template_cost_a_fraction_of_their_bodies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fresh operator's table of shared values: the process-wide one holds what earlier tests
    # slimmed, and growing it past their entries (a larger dict) would count here.
    monkeypatch.setattr(cache, "_SHARED", cache.SharedValues())
    bodies = [workload(f"w{i:04d}", placed("n1")) for i in range(1000)]
    # Their strings interned before the window: Python's interned-string table is the
    # process's, and its growth past what earlier tests interned would count here.
    for body in bodies:
        cache.SharedValues().share(body)
    gc.collect()
    tracemalloc.start()
    try:
        kept = [slim(WORKLOADS, body) for body in bodies]
        # What slimming allocated and still holds, not what other threads left running by
        # earlier tests allocated meanwhile.
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, cache.__file__), tracemalloc.Filter(True, frozen.__file__)]
        )
        used = sum(stat.size for stat in snapshot.statistics("filename"))
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000
    # Measured: about 0.5 KB each (their metadata); 6.1 KB each before the parts were shared.
    assert used / len(kept) < 1500
