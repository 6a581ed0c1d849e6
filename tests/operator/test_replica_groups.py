"""Pods of replicas that span nodes: names, rank labels, hostname/subdomain, the rendezvous env
under wattsched's, LeaderWorkerSet's and PyTorch's names, the headless Service per replica, and
the whole-replica restart when one pod fails."""

from __future__ import annotations

from typing import Any

from wattsched_operator import replica_groups
from wattsched_operator.desired import (
    WorkloadObject,
    build_pod,
    desired_pods,
    pace_deletions,
    planned_limits,
)
from wattsched_optimizer.problem import Placement, Plan, PlanStatus, WorkloadType


def workload(**overrides: Any) -> WorkloadObject:
    fields: dict[str, Any] = {
        "namespace": "team-a",
        "name": "llama-405b",
        "uid": "uid-1",
        "type": WorkloadType.INFERENCE,
        "template": {
            "spec": {
                "containers": [
                    {"name": "server", "image": "vllm", "env": [{"name": "A", "value": "1"}]},
                    {"name": "sidecar", "image": "proxy"},
                ]
            }
        },
        "precisions": {"bf16": "bf16"},
    }
    fields.update(overrides)
    return WorkloadObject(**fields)


def pod_of(replica: int, rank: int, node: str, nodes_per_replica: int = 2) -> Placement:
    return Placement(
        workload="team-a/llama-405b",
        replica=replica,
        node=node,
        gpus=8,
        variant="bf16",
        power_limit_watts=500.0,
        expected_watts_per_gpu=450.0,
        expected_throughput=100.0,
        rank=rank,
        nodes_per_replica=nodes_per_replica,
    )


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_leader_and_worker_pods_are_named_labelled_and_addressable() -> None:
    leader = build_pod(workload(), pod_of(1, 0, "h0"))
    worker = build_pod(workload(), pod_of(1, 1, "h1"))
    assert leader["metadata"]["name"] == "llama-405b-1"
    assert worker["metadata"]["name"] == "llama-405b-1-w1"
    for pod, rank in ((leader, "0"), (worker, "1")):
        labels = pod["metadata"]["labels"]
        assert labels["wattsched.io/replica"] == "1"
        assert labels["wattsched.io/rank"] == rank
        assert pod["spec"]["hostname"] == pod["metadata"]["name"]
        assert pod["spec"]["subdomain"] == "llama-405b-1"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_every_container_gets_consistent_rendezvous_env_under_every_name() -> None:
    pods = [build_pod(workload(), pod_of(0, rank, f"h{rank}", 4)) for rank in range(4)]
    for rank, pod in enumerate(pods):
        for container in pod["spec"]["containers"]:
            env = env_of(container)
            address = "llama-405b-0.llama-405b-0.team-a"
            assert env["WATTSCHED_LEADER_ADDRESS"] == env["LWS_LEADER_ADDRESS"] == address
            assert env["MASTER_ADDR"] == address
            assert env["WATTSCHED_GROUP_SIZE"] == env["LWS_GROUP_SIZE"] == "4"
            assert env["WORLD_SIZE"] == "4"
            assert env["WATTSCHED_RANK"] == env["LWS_WORKER_INDEX"] == str(rank)
            assert env["NODE_RANK"] == str(rank)
            assert env["MASTER_PORT"] == "29500"
    # The template's own env stays, after ours (so it may reference them).
    names = [e["name"] for e in pods[0]["spec"]["containers"][0]["env"]]
    assert names[-1] == "A"


def test_a_template_master_port_is_kept_and_other_rendezvous_names_are_ours() -> None:
    template = {
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "image": "pytorch",
                    "env": [
                        {"name": "MASTER_PORT", "value": "23456"},
                        {"name": "NODE_RANK", "value": "7"},
                    ],
                }
            ]
        }
    }
    pod = build_pod(workload(template=template), pod_of(0, 1, "h1"))
    env = pod["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "MASTER_PORT"] == ["23456"]
    assert [e["value"] for e in env if e["name"] == "NODE_RANK"] == ["1"]


def test_single_node_replicas_get_no_rendezvous() -> None:
    pod = build_pod(workload(), pod_of(0, 0, "h0", nodes_per_replica=1))
    assert pod["metadata"]["name"] == "llama-405b-0"
    assert "wattsched.io/rank" not in pod["metadata"]["labels"]
    assert "hostname" not in pod["spec"]
    assert "subdomain" not in pod["spec"]
    assert not set(env_of(pod["spec"]["containers"][0])) & set(replica_groups.RENDEZVOUS_ENV)


def test_each_pod_of_a_replica_gets_its_own_power_limit_entry_on_its_node() -> None:
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0,
        bound=0,
        gap=0,
        solve_seconds=0,
        placements=(pod_of(0, 0, "h0"), pod_of(0, 1, "h1")),
        node_power_limits_watts={"h0": (500.0,) * 8, "h1": (500.0,) * 8},
        budgets=(),
        unplaced=(),
    )
    limits = planned_limits(plan)
    assert limits["h0"].pods == {("team-a", "llama-405b-0"): 500.0}
    assert limits["h1"].pods == {("team-a", "llama-405b-0-w1"): 500.0}


def test_the_headless_service_selects_the_replica_and_is_owned_by_the_workload() -> None:
    service = replica_groups.headless_service("llama-405b", "team-a", "uid-1", 1)
    assert service["metadata"]["name"] == "llama-405b-1"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        "wattsched.io/workload": "llama-405b",
        "wattsched.io/replica": "1",
    }
    (owner,) = service["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "LLMWorkload",
        "llama-405b",
        "uid-1",
        True,
    )


def running(pod: dict[str, Any], phase: str = "Running", restarts: int = 0) -> dict[str, Any]:
    return {
        **pod,
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "server", "restartCount": restarts}],
        },
    }


def replica_pods() -> dict[tuple[str, str], dict[str, Any]]:
    placements = [pod_of(r, k, f"h{2 * r + k}") for r in (0, 1) for k in (0, 1)]
    return desired_pods({"team-a/llama-405b": workload()}, placements)


def test_a_failed_worker_stops_its_whole_replica_and_holds_its_recreation() -> None:
    want = replica_pods()
    pods = [running(p) for p in want.values()]
    failed = next(p for p in pods if p["metadata"]["name"] == "llama-405b-0-w1")
    failed["status"]["phase"] = "Failed"
    restart = replica_groups.group_restarts(pods, want)
    assert restart.delete == {("team-a", "llama-405b-0")}
    assert restart.hold == {("team-a", "llama-405b-0"), ("team-a", "llama-405b-0-w1")}


def test_a_container_restart_restarts_the_whole_replica_at_once() -> None:
    want = replica_pods()
    pods = [
        running(p, restarts=1 if p["metadata"]["name"] == "llama-405b-1" else 0)
        for p in want.values()
    ]
    restart = replica_groups.group_restarts(pods, want)
    assert restart.delete == {("team-a", "llama-405b-1"), ("team-a", "llama-405b-1-w1")}
    assert restart.hold == frozenset()


def test_healthy_replicas_and_single_node_pods_are_left_alone() -> None:
    want = replica_pods()
    pods = [running(p) for p in want.values()]
    single = build_pod(workload(name="chat"), pod_of(0, 0, "h9", nodes_per_replica=1))
    pods.append(running(single, phase="Failed"))
    assert replica_groups.group_restarts(pods, want) == replica_groups.GroupRestart(
        frozenset(), frozenset()
    )


def test_a_moved_pod_takes_the_rest_of_its_replica_along() -> None:
    want = replica_pods()
    pods = [running(p) for p in want.values()]
    delete = replica_groups.whole_replica_deletions([("team-a", "llama-405b-1-w1")], pods)
    assert delete == (("team-a", "llama-405b-1"), ("team-a", "llama-405b-1-w1"))
    assert replica_groups.whole_replica_deletions([], pods) == ()


def ready(pod: dict[str, Any]) -> dict[str, Any]:
    body = running(pod)
    body["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return body


def test_a_service_moves_one_spanning_replica_at_a_time_with_all_its_pods() -> None:
    want = replica_pods()
    current = {key: ready(pod) for key, pod in want.items()}
    # Both replicas move (their nodes change): replica 0's two pods go now, replica 1's wait.
    delete = sorted(want)
    paced = pace_deletions(
        delete,
        current,
        want,
        services=frozenset({"team-a/llama-405b"}),
        forced=frozenset(),
        lost_nodes=frozenset(),
    )
    assert sorted(paced.now) == [("team-a", "llama-405b-0"), ("team-a", "llama-405b-0-w1")]
    assert sorted(paced.later) == [("team-a", "llama-405b-1"), ("team-a", "llama-405b-1-w1")]
