"""Pods and NodePowerProfiles computed from a plan: names, GPU requests, env, ownership, diffs."""

from __future__ import annotations

from typing import Any

import pytest

from wattsched_operator.desired import (
    ANNOTATION_NODE,
    ANNOTATION_POWER_LIMIT,
    ANNOTATION_WORKLOAD_TYPE,
    WorkloadObject,
    build_pod,
    desired_pods,
    moved_replicas,
    node_power_profile,
    pace_deletions,
    planned_limits,
    pod_changes,
    pod_name,
)
from wattsched_operator.transition import NodeLimits
from wattsched_optimizer.problem import Placement, Plan, PlanStatus, WorkloadType


def workload(**overrides: Any) -> WorkloadObject:
    fields: dict[str, Any] = {
        "namespace": "team-a",
        "name": "llama",
        "uid": "uid-1",
        "type": WorkloadType.INFERENCE,
        "template": {
            "metadata": {"labels": {"app": "llama"}},
            "spec": {
                "containers": [
                    {"name": "server", "image": "vllm", "env": [{"name": "A", "value": "1"}]},
                    {"name": "sidecar", "image": "proxy"},
                ]
            },
        },
        "precisions": {"bf16": "bf16", "fp8": "fp8"},
    }
    fields.update(overrides)
    return WorkloadObject(**fields)


def placement(replica: int = 0, node: str = "gpu-h100-0", **overrides: Any) -> Placement:
    fields: dict[str, Any] = {
        "workload": "team-a/llama",
        "replica": replica,
        "node": node,
        "gpus": 2,
        "variant": "fp8",
        "power_limit_watts": 450.0,
        "expected_watts_per_gpu": 400.0,
        "expected_throughput": 1000.0,
    }
    fields.update(overrides)
    return Placement(**fields)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_pod_names_are_deterministic_per_replica() -> None:
    assert pod_name("llama", 0) == "llama-0"
    assert build_pod(workload(), placement(3))["metadata"]["name"] == "llama-3"
    assert build_pod(workload(), placement(3)) == build_pod(workload(), placement(3))


def test_pod_requests_gpus_on_first_container_and_pins_the_planned_node() -> None:
    pod = build_pod(workload(), placement(node="gpu-h100-5", gpus=4))
    server, sidecar = pod["spec"]["containers"]
    assert server["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert "resources" not in sidecar
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "gpu-h100-5"}
    assert "nodeName" not in pod["spec"], "kube-scheduler must still bind the pod"


def test_every_container_gets_variant_precision_and_power_limit_env() -> None:
    pod = build_pod(workload(), placement(variant="fp8", power_limit_watts=437.5))
    for container in pod["spec"]["containers"]:
        env = env_of(container)
        assert env["WATTSCHED_VARIANT"] == "fp8"
        assert env["WATTSCHED_PRECISION"] == "fp8"
        assert env["WATTSCHED_POWER_LIMIT_WATTS"] == "437.5"
    assert env_of(pod["spec"]["containers"][0])["A"] == "1"


def test_injected_env_comes_first_so_template_env_can_reference_it() -> None:
    referencing = {"name": "NOTE", "value": "runs at $(WATTSCHED_POWER_LIMIT_WATTS) W"}
    template = {
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "triton",
                    "env": [
                        referencing,
                        {"name": "WATTSCHED_VARIANT", "value": "set-by-the-user"},
                    ],
                }
            ]
        }
    }
    pod = build_pod(workload(template=template), placement(variant="fp8"))
    names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert names == [
        "WATTSCHED_VARIANT",
        "WATTSCHED_PRECISION",
        "WATTSCHED_POWER_LIMIT_WATTS",
        "NOTE",
    ]
    assert env_of(pod["spec"]["containers"][0])["WATTSCHED_VARIANT"] == "fp8"


def test_pod_is_labelled_and_owned_by_its_workload() -> None:
    pod = build_pod(workload(), placement(2))
    assert pod["metadata"]["labels"] == {
        "app": "llama",
        "wattsched.io/workload": "llama",
        "wattsched.io/replica": "2",
    }
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner["kind"] == "LLMWorkload"
    assert owner["uid"] == "uid-1"
    assert owner["controller"] is True


def test_batch_pods_do_not_restart_but_inference_pods_do() -> None:
    batch = build_pod(workload(type=WorkloadType.TRAINING), placement())
    serving = build_pod(workload(), placement())
    assert batch["spec"]["restartPolicy"] == "Never"
    assert serving["spec"]["restartPolicy"] == "Always"


def test_building_a_pod_leaves_the_template_untouched() -> None:
    source = workload()
    build_pod(source, placement())
    assert "resources" not in source.template["spec"]["containers"][0]
    assert source.template["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]


def test_a_template_without_containers_is_an_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"team-a/llama: spec\.template\.spec\.containers"):
        build_pod(workload(template={"spec": {"containers": []}}), placement())


def test_placements_of_unknown_workloads_make_no_pods() -> None:
    pods = desired_pods({"team-a/llama": workload()}, [placement(0), placement(1, workload="x/y")])
    assert list(pods) == [("team-a", "llama-0")]


def running(pod: dict[str, Any]) -> dict[str, Any]:
    return {**pod, "status": {"phase": "Running"}}


def test_unchanged_pods_are_left_alone() -> None:
    want = desired_pods({"team-a/llama": workload()}, [placement(0)])
    changes = pod_changes([running(want[("team-a", "llama-0")])], want)
    assert changes.delete == ()
    assert changes.create == ()
    assert not changes.relabel_power


def test_a_pod_of_an_earlier_workload_of_the_same_name_is_deleted_then_replaced() -> None:
    # Deleted and applied again before the garbage collector took the first one's pod.
    earlier = running(build_pod(workload(uid="uid-0"), placement(0)))
    want = desired_pods({"team-a/llama": workload(uid="uid-1")}, [placement(0)])
    changes = pod_changes([earlier], want)
    assert changes.delete == (("team-a", "llama-0"),)
    assert changes.create == (), "the new pod waits until the old one is gone"
    assert pod_changes([], want).create[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_a_moved_replica_is_deleted_and_recreated_under_the_same_name() -> None:
    before = running(build_pod(workload(), placement(0, node="gpu-a")))
    want = desired_pods({"team-a/llama": workload()}, [placement(0, node="gpu-b")])
    changes = pod_changes([before], want)
    assert changes.delete == (("team-a", "llama-0"),)
    assert changes.create == (), "the new pod waits until the old one is gone"
    after = pod_changes([], want)
    assert after.create[0]["metadata"]["annotations"][ANNOTATION_NODE] == "gpu-b"


def test_moves_name_the_replica_and_both_nodes_but_not_preemptions() -> None:
    moved = running(build_pod(workload(), placement(0, node="gpu-a")))
    restarted = running(build_pod(workload(), placement(1, node="gpu-a")))
    dropped = running(build_pod(workload(), placement(2, node="gpu-a")))
    want = desired_pods(
        {"team-a/llama": workload()},
        [placement(0, node="gpu-b"), placement(1, node="gpu-a", variant="bf16")],
    )
    current = [moved, restarted, dropped]
    changes = pod_changes(current, want)
    by_name = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in current}
    assert moved_replicas(by_name, want, changes.delete) == {
        "team-a/llama": [
            "llama-0: gpu-a -> gpu-b",
            "llama-1: gpu-a -> gpu-a (variant fp8 -> bf16)",
        ]
    }


def test_an_unplanned_pod_is_deleted_and_a_new_replica_created() -> None:
    current = [running(build_pod(workload(), placement(0)))]
    want = desired_pods({"team-a/llama": workload()}, [placement(1)])
    changes = pod_changes(current, want)
    assert changes.delete == (("team-a", "llama-0"),)
    assert [p["metadata"]["name"] for p in changes.create] == ["llama-1"]


def test_a_new_power_limit_only_re_annotates_the_pod() -> None:
    current = [running(build_pod(workload(), placement(0, power_limit_watts=450)))]
    want = desired_pods({"team-a/llama": workload()}, [placement(0, power_limit_watts=300)])
    changes = pod_changes(current, want)
    assert changes.delete == ()
    assert changes.create == ()
    assert changes.relabel_power == {("team-a", "llama-0"): "300"}
    assert want[("team-a", "llama-0")]["metadata"]["annotations"][ANNOTATION_POWER_LIMIT] == "300"


@pytest.mark.parametrize("workload_type", list(WorkloadType))
def test_a_pod_says_which_kind_of_work_it_runs(workload_type: WorkloadType) -> None:
    template = workload().template
    template["metadata"]["annotations"] = {ANNOTATION_WORKLOAD_TYPE: "Gaming"}  # ours wins
    pod = build_pod(workload(type=workload_type, template=template), placement(0))
    assert pod["metadata"]["annotations"][ANNOTATION_WORKLOAD_TYPE] == workload_type.value


def test_finished_and_terminating_pods_are_left_to_the_lifecycle_rules() -> None:
    done = {**build_pod(workload(), placement(0)), "status": {"phase": "Succeeded"}}
    leaving = build_pod(workload(), placement(1))
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    changes = pod_changes([done, leaving], {})
    assert changes.delete == ()
    assert changes.create == ()


def test_node_power_profile_names_each_replicas_pod_and_the_idle_limit() -> None:
    limits = NodeLimits(idle_watts=200.0, pods={("team", "chat-1"): 450.0, ("team", "chat-0"): 600})
    profile = node_power_profile("gpu-h100-0", limits)
    assert profile["metadata"] == {"name": "gpu-h100-0"}
    assert profile["spec"] == {
        "nodeName": "gpu-h100-0",
        "idlePowerLimitWatts": 200.0,
        "pods": [
            {"namespace": "team", "name": "chat-0", "powerLimitWatts": 600.0},
            {"namespace": "team", "name": "chat-1", "powerLimitWatts": 450.0},
        ],
    }


def test_an_empty_node_writes_an_empty_pod_list_so_a_merge_patch_clears_it() -> None:
    assert node_power_profile("n", NodeLimits(idle_watts=100.0))["spec"]["pods"] == []


def test_planned_limits_name_each_placed_replicas_pod() -> None:
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0,
        bound=0,
        gap=0,
        solve_seconds=0,
        placements=(placement(0), placement(1)),
        node_power_limits_watts={"gpu-h100-0": (400.0,) * 8, "gpu-h100-1": (200.0,) * 8},
        budgets=(),
        unplaced=(),
        node_idle_limits_watts={"gpu-h100-0": 200.0, "gpu-h100-1": 200.0},
    )
    limits = planned_limits(plan)
    assert limits["gpu-h100-1"] == NodeLimits(idle_watts=200.0)
    assert limits["gpu-h100-0"].idle_watts == 200.0
    assert limits["gpu-h100-0"].pods == {
        ("team-a", "llama-0"): 450.0,
        ("team-a", "llama-1"): 450.0,
    }


def ready(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        **pod,
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def three_replicas_moving(
    ready_flags: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], Any], tuple[Any, ...]]:
    """A service of three replicas on gpu-a, all planned onto gpu-b."""
    current = {}
    for replica, is_ready in enumerate(ready_flags):
        pod = build_pod(workload(), placement(replica, node="gpu-a"))
        current[("team-a", f"llama-{replica}")] = ready(pod) if is_ready else running(pod)
    want = desired_pods(
        {"team-a/llama": workload()}, [placement(r, node="gpu-b") for r in range(3)]
    )
    changes = pod_changes(current.values(), want)
    return current, want, changes.delete


def test_a_service_loses_one_replica_at_a_time_when_it_moves() -> None:
    current, want, delete = three_replicas_moving()
    paced = pace_deletions(
        delete,
        current,
        want,
        services=frozenset({"team-a/llama"}),
        forced=frozenset(),
        lost_nodes=frozenset(),
    )
    assert paced.now == (("team-a", "llama-0"),)
    assert paced.later == (("team-a", "llama-1"), ("team-a", "llama-2"))


def test_a_service_with_a_replica_not_ready_moves_only_that_one_this_round() -> None:
    # llama-1 serves nothing: it moves now; the Ready ones wait until it is Ready again.
    current, want, delete = three_replicas_moving((True, False, True))
    paced = pace_deletions(
        delete,
        current,
        want,
        services=frozenset({"team-a/llama"}),
        forced=frozenset(),
        lost_nodes=frozenset(),
    )
    assert paced.now == (("team-a", "llama-1"),)
    assert paced.later == (("team-a", "llama-0"), ("team-a", "llama-2"))


def test_a_budget_that_forces_it_moves_every_replica_at_once() -> None:
    current, want, delete = three_replicas_moving()
    paced = pace_deletions(
        delete,
        current,
        want,
        services=frozenset({"team-a/llama"}),
        forced=frozenset({"team-a/llama"}),
        lost_nodes=frozenset(),
    )
    assert len(paced.now) == 3
    assert paced.later == ()


def test_replicas_on_a_lost_node_and_gang_members_are_not_paced() -> None:
    current, want, delete = three_replicas_moving()
    lost = pace_deletions(
        delete,
        current,
        want,
        services=frozenset({"team-a/llama"}),
        forced=frozenset(),
        lost_nodes=frozenset({"gpu-a"}),
    )
    assert len(lost.now) == 3
    gang = pace_deletions(
        delete, current, want, services=frozenset(), forced=frozenset(), lost_nodes=frozenset()
    )
    assert len(gang.now) == 3


def test_a_scale_down_is_not_paced() -> None:
    current = {
        ("team-a", f"llama-{r}"): ready(build_pod(workload(), placement(r))) for r in range(3)
    }
    want = desired_pods({"team-a/llama": workload()}, [placement(0)])
    changes = pod_changes(current.values(), want)
    paced = pace_deletions(
        changes.delete,
        current,
        want,
        services=frozenset({"team-a/llama"}),
        forced=frozenset(),
        lost_nodes=frozenset(),
    )
    assert paced.now == (("team-a", "llama-1"), ("team-a", "llama-2"))


def test_a_replica_with_a_locked_clock_gets_its_range_in_the_profile_and_others_none() -> None:
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0,
        bound=0,
        gap=0,
        solve_seconds=0,
        placements=(placement(0, sm_clock_mhz=990), placement(1)),
        node_power_limits_watts={"gpu-h100-0": (450.0,) * 8},
        budgets=(),
        unplaced=(),
        node_idle_limits_watts={"gpu-h100-0": 200.0},
    )
    limits = planned_limits(plan)["gpu-h100-0"]
    assert limits.clocks == {("team-a", "llama-0"): (990, 990)}
    pods = node_power_profile("gpu-h100-0", limits)["spec"]["pods"]
    assert pods[0]["smClockRangeMegahertz"] == {"min": 990, "max": 990}
    assert "smClockRangeMegahertz" not in pods[1]
    assert NodeLimits.from_spec({"pods": pods}) == limits.__class__(
        idle_watts=None, pods=limits.pods, clocks=limits.clocks
    )
