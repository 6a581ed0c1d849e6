"""Which watch events make the plan dirty, and who leads among peered operators."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from wattsched_operator.cache import NODES, PODS, PROFILES, WORKLOADS, ClusterCache
from wattsched_operator.handlers import record
from wattsched_operator.run import leads

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def node(ready: str = "True", heartbeat: str = "t0", gpus: str = "8") -> dict[str, Any]:
    return {
        "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "NVIDIA-L4"}},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus},
            "conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat}],
        },
    }


def test_a_new_object_marks_the_plan_dirty() -> None:
    cache = ClusterCache()
    assert record(cache, NODES, "ADDED", node())
    assert cache.dirty.is_set()


def test_a_node_heartbeat_does_not_but_readiness_and_gpus_do() -> None:
    cache = ClusterCache()
    record(cache, NODES, None, node())
    assert not record(cache, NODES, "MODIFIED", node(heartbeat="t1"))
    assert record(cache, NODES, "MODIFIED", node(ready="False"))
    assert record(cache, NODES, "MODIFIED", node(ready="False", gpus="4"))


def test_the_operators_own_status_writes_do_not_but_spec_changes_do() -> None:
    cache = ClusterCache()
    body: dict[str, Any] = {"metadata": {"name": "w", "namespace": "ns", "generation": 1}}
    record(cache, WORKLOADS, "ADDED", body)
    with_status = {**body, "status": {"phase": "Pending", "message": "waiting"}}
    assert record(cache, WORKLOADS, "MODIFIED", with_status)  # phase appeared
    again = {**body, "status": {"phase": "Pending", "message": "other words"}}
    assert not record(cache, WORKLOADS, "MODIFIED", again)
    changed = {**again, "metadata": {**body["metadata"], "generation": 2}}
    assert record(cache, WORKLOADS, "MODIFIED", changed)


def test_an_agent_confirming_limits_matters_but_its_draw_readings_do_not() -> None:
    cache = ClusterCache()

    def profile(applied: float, draw: float, generation: int) -> dict[str, Any]:
        return {
            "metadata": {"name": "n1"},
            "status": {
                "observedGeneration": generation,
                "agent": {"ready": True, "heartbeatTime": f"t{draw}"},
                "gpus": [{"index": 0, "appliedWatts": applied, "drawWatts": draw}],
            },
        }

    record(cache, PROFILES, None, profile(300, 100, 1))
    assert not record(cache, PROFILES, "MODIFIED", profile(300, 120, 1))
    assert record(cache, PROFILES, "MODIFIED", profile(250, 120, 2))


def test_pod_phase_changes_and_deletions_matter() -> None:
    cache = ClusterCache()
    pod: dict[str, Any] = {"metadata": {"name": "w-0", "namespace": "ns"}, "status": {}}
    record(cache, PODS, "ADDED", pod)
    assert record(cache, PODS, "MODIFIED", {**pod, "status": {"phase": "Running"}})
    assert record(cache, PODS, "DELETED", pod)
    assert cache.get(PODS, "ns/w-0") is None
    assert not record(cache, PODS, "DELETED", pod)


def peer(priority: int, seen: datetime, lifetime: int = 15) -> dict[str, Any]:
    return {"priority": priority, "lastseen": seen.isoformat(), "lifetime": lifetime}


def test_the_highest_priority_live_peer_leads() -> None:
    peers = {"a": peer(10, NOW), "b": peer(20, NOW)}
    assert leads(peers, "b", 20, NOW)
    assert not leads(peers, "a", 10, NOW)


def test_a_peer_whose_keepalive_expired_no_longer_outranks() -> None:
    peers = {"a": peer(10, NOW), "b": peer(20, NOW - timedelta(seconds=30))}
    assert leads(peers, "a", 10, NOW)


def test_an_unregistered_operator_or_a_tie_never_leads() -> None:
    assert not leads({"b": peer(20, NOW)}, "a", 30, NOW)
    assert not leads({"a": peer(10, NOW), "b": peer(10, NOW)}, "a", 10, NOW)


def test_the_cache_keeps_what_the_operator_reads_and_drops_server_bookkeeping() -> None:
    cache = ClusterCache()
    pod: dict[str, Any] = {
        "metadata": {
            "name": "w-0",
            "namespace": "ns",
            "labels": {"wattsched.io/workload": "w", "wattsched.io/replica": "0"},
            "annotations": {
                "wattsched.io/power-limit-watts": "300",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            },
            "managedFields": [{"manager": "kube-scheduler"}],
        },
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "main", "image": "x", "env": [{"name": "A", "value": "1"}]}],
            "volumes": [{"name": "v"}],
        },
        "status": {
            "phase": "Failed",
            "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "False", "lastProbeTime": None}],
            "containerStatuses": [{"name": "main", "state": {"terminated": {"exitCode": 3}}}],
        },
    }
    record(cache, PODS, "ADDED", pod)
    kept = cache.get(PODS, "ns/w-0")
    assert kept is not None
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"wattsched.io/power-limit-watts": "300"}
    assert kept["metadata"]["labels"] == pod["metadata"]["labels"]
    assert kept["spec"] == {
        "nodeName": "n1",
        "containers": [{"name": "main", "env": [{"name": "A", "value": "1"}]}],
    }
    assert kept["status"]["phase"] == "Failed"
    assert kept["status"]["conditions"] == [{"type": "Ready", "status": "False"}]
    assert kept["status"]["containerStatuses"][0]["state"] == {"terminated": {"exitCode": 3}}
    assert "podIP" not in kept["status"]
