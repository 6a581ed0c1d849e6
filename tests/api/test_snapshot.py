"""Kubernetes objects become the optimizer's PlanInput by the documented rules: GPU nodes from
allocatable nvidia.com/gpu and the GFD product label, budgets resolved through their selectors,
agent readiness from NodePowerProfiles, workloads with every default applied, running replicas from
pods; bad objects give one error naming the object and field."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_api.llmworkload import LLMWorkloadStatus, parse_llmworkload
from wattsched_api.vocabulary import Phase
from wattsched_operator import snapshot
from wattsched_operator.cache import WORKLOADS, slim
from wattsched_operator.snapshot import (
    ClusterObjects,
    Snapshot,
    SnapshotError,
    build_snapshot,
    deadline_seconds,
    job_terms,
    split_objects,
    unknown_gpu_max_watts,
)
from wattsched_optimizer.problem import (
    CurrentPlacement,
    EnergyPolicy,
    PlanOptions,
    WorkAmount,
    WorkloadType,
    WorkUnit,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)


def node(
    name: str,
    product: str = "NVIDIA-H100-80GB-HBM3",
    gpus: str | None = "8",
    *,
    ready: str = "True",
    labels: dict[str, str] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    all_labels = {"nvidia.com/gpu.product": product, **(labels or {})}
    allocatable = {"cpu": "64"} if gpus is None else {"cpu": "64", "nvidia.com/gpu": gpus}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": all_labels},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def workload(name: str = "chat", namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "Inference",
        "model": {"name": "m", "parametersBillions": 8},
        "gpu": {"count": 1},
        "slo": {"tokensPerSecond": 100},
        "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
    }
    base.update(spec)
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": name, "namespace": namespace},
        "spec": base,
    }


def budget(name: str, cap: float, selector: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"powerCapWatts": cap}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": name},
        "spec": spec,
    }


def profile(
    node_name: str, *, ready: bool = True, heartbeat: str = "2026-11-25T01:59:50Z"
) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": node_name, "generation": 2},
        "spec": {"nodeName": node_name},
        "status": {
            "observedGeneration": 2,
            "agent": {"ready": ready, "heartbeatTime": heartbeat, "backend": "simulated"},
        },
    }


def pod(
    workload_name: str,
    replica: str,
    node_name: str | None,
    *,
    namespace: str = "team-a",
    phase: str = "Running",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    if node_name is not None:
        spec["nodeName"] = node_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{workload_name}-{replica}",
            "namespace": namespace,
            "labels": {"wattsched.io/workload": workload_name, "wattsched.io/replica": replica},
            "annotations": {"wattsched.io/variant": "bf16", "wattsched.io/power-limit-watts": "450"}
            if annotations is None
            else annotations,
        },
        "spec": spec,
        "status": {"phase": phase},
    }


def build(*objects: dict[str, Any], **options: Any) -> Any:
    return build_snapshot(split_objects(objects), now=NOW, **options)


def test_gpu_nodes_come_from_allocatable_gpus_and_the_normalised_product_label() -> None:
    nodes = build(
        node("a100", "NVIDIA-A100-SXM4-80GB", "4"), node("cpu-only", gpus=None)
    ).plan_input.nodes
    assert [(n.name, n.product, n.gpu_count) for n in nodes] == [("a100", "A100-80GB", 4)]


def test_not_ready_cordoned_and_deleting_nodes_are_not_schedulable() -> None:
    deleting = node("deleting")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-25T01:00:00Z"
    nodes = build(
        node("ok"), node("not-ready", ready="False"), node("cordoned", unschedulable=True), deleting
    ).plan_input.nodes
    assert {n.name: n.schedulable for n in nodes} == {
        "ok": True,
        "not-ready": False,
        "cordoned": False,
        "deleting": False,
    }


def test_a_cordoned_node_keeps_its_running_replicas_and_a_noexecute_taint_does_not() -> None:
    deleting = node("deleting")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-25T01:00:00Z"
    tainted = node("tainted")
    tainted["spec"] = {"taints": [{"key": "maintenance", "effect": "NoExecute"}]}
    no_schedule = node("no-schedule")
    no_schedule["spec"] = {"taints": [{"key": "maintenance", "effect": "NoSchedule"}]}
    nodes = build(
        node("ok"),
        node("not-ready", ready="False"),
        node("cordoned", unschedulable=True),
        deleting,
        tainted,
        no_schedule,
    ).plan_input.nodes
    assert {n.name: n.keeps_running for n in nodes} == {
        "ok": True,
        "not-ready": False,
        "cordoned": True,
        "deleting": False,
        "tainted": False,
        "no-schedule": True,
    }


def test_a_product_the_catalogue_lacks_is_excluded_until_its_agent_reports() -> None:
    """Combined issues 12b and 13: before its agent reports the GPUs' power range, a node of a
    product the catalogue lacks is excluded (no work), counted at the unknown maximum per GPU."""
    snapshot = build(
        node("gpu-x", "NVIDIA-Z9000", labels={"nvidia.com/gpu.memory": "97871"}),
        workload(gpu={"count": 1, "products": ["NVIDIA-Z9000"]}),
    )
    assert snapshot.plan_input.nodes == ()
    assert "Z9000" not in snapshot.plan_input.products
    reason, watts = excluded(snapshot)["gpu-x"]
    assert reason.startswith("Node gpu-x: GPU product 'Z9000' is not in the catalogue")
    assert watts == 8 * unknown_gpu_max_watts() == 8 * 2000
    [chat] = snapshot.plan_input.workloads
    assert chat.allowed_products == frozenset({"Z9000"})


def test_a_malformed_memory_label_excludes_the_node_naming_the_label() -> None:
    snapshot = build(node("gpu-x", labels={"nvidia.com/gpu.memory": "80GB"}))
    assert snapshot.plan_input.nodes == ()
    assert (
        "Node gpu-x: metadata.labels[\"nvidia.com/gpu.memory\"]: '80GB'"
        in (excluded(snapshot)["gpu-x"][0])
    )


def limits_profile(node_name: str, watts: list[float]) -> dict[str, Any]:
    """A profile whose agent confirmed these limits (each GPU's target, applied)."""
    body = profile(node_name)
    body["spec"]["idlePowerLimitWatts"] = min(watts)
    body["status"]["gpus"] = [
        {"index": i, "targetWatts": w, "appliedWatts": w} for i, w in enumerate(watts)
    ]
    return body


def excluded(snapshot: Snapshot) -> dict[str, tuple[str, float]]:
    return {n.name: (n.reason, n.counted_watts) for n in snapshot.excluded_nodes}


def test_an_unknown_gpu_product_excludes_only_that_node_and_its_budgets_count_it() -> None:
    """Issue 12 item 2: one node with an unknown product never stops planning."""
    rack = {"rack": "a"}
    snapshot = build(
        node("gpu-x", "NVIDIA-Z9000", labels=rack),
        node("ok", labels=rack),
        workload(),
        budget("rack-a", 20000, {"matchLabels": rack}),
    )
    assert [n.name for n in snapshot.plan_input.nodes] == ["ok"]
    reason, watts = excluded(snapshot)["gpu-x"]
    assert reason.startswith("Node gpu-x: GPU product 'Z9000' is not in the catalogue")
    assert watts == 8 * unknown_gpu_max_watts()  # no agent has reported its GPUs' maximum
    (rack_a,) = snapshot.plan_input.budgets
    assert rack_a.node_names == {"ok"}
    assert rack_a.uncontrolled_watts == 8 * unknown_gpu_max_watts()
    assert [w.key for w in snapshot.plan_input.workloads] == ["team-a/chat"]


def test_a_missing_product_label_excludes_the_node_counted_at_what_its_agent_reports() -> None:
    bare = node("gpu-y", gpus="2")
    del bare["metadata"]["labels"]["nvidia.com/gpu.product"]
    reported = limits_profile("gpu-y", [300.0, 300.0])
    reported["metadata"]["generation"] = 3  # the agent has not applied the latest spec
    reported["status"]["gpus"] = [
        {"index": 0, "maxWatts": 450.0, "appliedWatts": 300.0},
        {"index": 1, "maxWatts": 450.0, "appliedWatts": 300.0},
    ]
    snapshot = build(bare, reported)
    reason, watts = excluded(snapshot)["gpu-y"]
    assert 'metadata.labels["nvidia.com/gpu.product"] is missing' in reason
    assert watts == 900.0


def test_an_excluded_node_with_confirmed_limits_counts_at_them() -> None:
    unknown = node("gpu-x", "NVIDIA-Z9000", gpus="2")
    snapshot = build(unknown, limits_profile("gpu-x", [150.0, 250.0]))
    assert excluded(snapshot)["gpu-x"][1] == 400.0


@pytest.mark.parametrize("quantity", ["eight", "8.5", "-1", "8Gi"])
def test_malformed_gpu_quantity_excludes_the_node_naming_the_field(quantity: str) -> None:
    snapshot = build(node("gpu-z", gpus=quantity))
    assert snapshot.plan_input.nodes == ()
    assert 'Node gpu-z: status.allocatable["nvidia.com/gpu"]' in excluded(snapshot)["gpu-z"][0]


def test_budget_scope_is_the_gpu_nodes_its_selector_matches() -> None:
    rack_a = {"wattsched.io/rack": "rack-a"}
    budgets = build(
        node("a0", labels=rack_a),
        node("a1", labels=rack_a),
        node("b0", labels={"wattsched.io/rack": "rack-b"}),
        node("cpu", gpus=None, labels=rack_a),
        budget("cluster", 20000, {}),
        budget("everything", 20000),
        budget("rack-a", 9000, {"matchLabels": rack_a}),
        budget(
            "not-a",
            9000,
            {
                "matchExpressions": [
                    {"key": "wattsched.io/rack", "operator": "NotIn", "values": ["rack-a"]}
                ]
            },
        ),
    ).plan_input.budgets
    scopes = {b.name: sorted(b.node_names) for b in budgets}
    assert scopes == {
        "cluster": ["a0", "a1", "b0"],
        "everything": ["a0", "a1", "b0"],
        "not-a": ["b0"],
        "rack-a": ["a0", "a1"],
    }
    assert {b.name: b.power_cap_watts for b in budgets}["rack-a"] == 9000.0


def test_without_any_profile_offline_planning_counts_every_agent_ready() -> None:
    nodes = build(node("n0"), node("n1")).plan_input.nodes
    assert all(n.agent_ready for n in nodes)


def test_the_operator_requires_agents_even_without_profiles() -> None:
    nodes = build(node("n0"), agents_required=True).plan_input.nodes
    assert not nodes[0].agent_ready


def test_agent_readiness_comes_from_the_node_power_profile() -> None:
    nodes = build(
        node("ready"),
        node("no-profile"),
        node("agent-down"),
        node("stale"),
        node("unconfirmed"),
        profile("ready"),
        profile("agent-down", ready=False),
        profile("stale", heartbeat="2026-11-25T01:50:00Z"),
        profile("unconfirmed"),
        heartbeat_timeout_seconds=60,
        unconfirmed_nodes=frozenset({"unconfirmed"}),
    ).plan_input.nodes
    assert {n.name: n.agent_ready for n in nodes} == {
        "ready": True,
        "no-profile": False,
        "agent-down": False,
        "stale": False,
        "unconfirmed": False,
    }


def raised_profile(
    node_name: str,
    *,
    observed: int,
    generation: int = 3,
    ready: bool = True,
    heartbeat: str = "2026-11-25T01:59:50Z",
) -> dict[str, Any]:
    """A profile whose spec is at `generation` (a raise the operator wrote at 3) and whose agent
    applied `observed`."""
    body = profile(node_name, ready=ready, heartbeat=heartbeat)
    body["metadata"]["generation"] = generation
    body["status"]["observedGeneration"] = observed
    return body


def test_a_raise_on_its_way_counts_as_ready_only_over_the_generation_before_it() -> None:
    nodes = build(
        *(node(n) for n in ("on-its-way", "behind", "rewritten", "agent-down", "not-raised")),
        raised_profile("on-its-way", observed=2),
        raised_profile("behind", observed=1),  # the generation before the raise not applied
        raised_profile("rewritten", observed=2, generation=4),  # the spec changed since
        raised_profile("agent-down", observed=2, ready=False),
        raised_profile("not-raised", observed=2),
        heartbeat_timeout_seconds=60,
        raises_in_flight={n: 3 for n in ("on-its-way", "behind", "rewritten", "agent-down")},
    ).plan_input.nodes
    assert {n.name: n.agent_ready for n in nodes} == {
        "on-its-way": True,
        "behind": False,
        "rewritten": False,
        "agent-down": False,
        "not-raised": False,
    }


def test_a_raise_on_its_way_with_a_silent_agent_counts_at_maximum() -> None:
    [lost] = build(
        node("lost"),
        raised_profile("lost", observed=2, heartbeat="2026-11-25T01:59:00Z"),  # 60 s before NOW
        heartbeat_timeout_seconds=30,
        raises_in_flight={"lost": 3},
    ).plan_input.nodes
    assert not lost.agent_ready
    assert not lost.schedulable


def test_other_teams_gpus_count_at_a_raised_cap_the_agent_has_not_applied_yet() -> None:
    def counted(cap: float, *, observed: int) -> float:
        body = raised_profile("n0", observed=observed)
        body["spec"]["unmanagedPowerLimitWatts"] = cap
        body["status"]["deviceMapping"] = {"source": "PodResources"}
        body["status"]["gpus"] = [
            {
                "index": i,
                "pod": "ml/trainer",
                "holder": "other",
                "maxWatts": 700,
                "appliedWatts": 300,
            }
            for i in range(2)
        ]
        [gpu_node] = build(node("n0"), body, raises_in_flight={"n0": 3}).plan_input.nodes
        assert gpu_node.unmanaged_gpus == 2
        watts: float = gpu_node.unmanaged_watts
        return watts

    assert counted(450, observed=2) == 2 * 450.0  # raised from 300 W, not applied yet
    assert counted(450, observed=3) == 2 * 300.0  # applied: what the agent reads
    assert counted(200, observed=2) == 2 * 300.0  # lowered, not applied yet: still 300 W


def test_a_node_whose_agent_went_silent_takes_no_work_and_one_never_reported_still_does() -> None:
    nodes = build(
        node("lost"),
        node("fresh"),
        node("new"),
        profile("lost", heartbeat="2026-11-25T01:59:29Z"),  # 31 s before NOW
        profile("fresh", heartbeat="2026-11-25T01:59:31Z"),
        heartbeat_timeout_seconds=30,
    ).plan_input.nodes
    assert {n.name: (n.schedulable, n.agent_ready) for n in nodes} == {
        "lost": (False, False),
        "fresh": (True, True),
        "new": (True, False),
    }


def test_workload_reaches_the_optimizer_with_every_default_applied() -> None:
    (converted,) = build(
        node("n"),
        workload(
            "batch",
            type="BatchInference",
            slo={"totalWork": {"tokens": 1e9}, "deadline": "2026-11-26T02:00:00Z"},
            gpu={"count": 2, "minMemory": "30Gi", "products": ["NVIDIA-L40S", "H100-80GB"]},
            replicas=3,
        ),
    ).plan_input.workloads
    assert converted.key == "team-a/batch"
    assert converted.type is WorkloadType.BATCH_INFERENCE
    assert converted.preemptible is True
    assert converted.policy is EnergyPolicy.BALANCED
    assert (converted.replicas, converted.min_replicas, converted.max_replicas) == (3, 3, 3)
    assert converted.allowed_products == frozenset({"L40S", "H100-80GB"})
    assert [(v.name, v.min_memory_gib, v.quality) for v in converted.variants] == [
        ("bf16", 30.0, 1.0)
    ]
    assert converted.remaining_work == WorkAmount(WorkUnit.TOKENS, 1e9)
    assert converted.deadline_seconds == 86400.0
    assert converted.tokens_per_second is None


def test_inference_replica_range_and_steps_of_work_are_converted() -> None:
    objects = build(
        node("n"),
        workload("chat", minReplicas=2, maxReplicas=5, energy={"policy": "Performance"}),
        workload(
            "train",
            type="Training",
            slo={"totalWork": {"steps": 100, "tokensPerStep": 4096}},
            energy={"maxPowerWattsPerGPU": 500},
        ),
    ).plan_input.workloads
    chat, train = objects
    assert (chat.min_replicas, chat.max_replicas, chat.tokens_per_second) == (2, 5, 100.0)
    assert chat.policy is EnergyPolicy.PERFORMANCE
    assert train.remaining_work == WorkAmount(WorkUnit.STEPS, 100.0, tokens_per_step=4096.0)
    assert train.max_power_watts_per_gpu == 500.0
    assert train.deadline_seconds is None


def progress_status(completed_tokens: float) -> dict[str, Any]:
    return {
        "progress": {
            "completedTokens": completed_tokens,
            "source": "modelled",
            "updatedAt": "2026-11-25T01:59:00Z",
        }
    }


def test_a_job_is_given_its_total_work_in_tokens_less_the_tokens_its_status_says_are_done() -> None:
    steps = workload(
        "steps", type="Training", slo={"totalWork": {"steps": 100, "tokensPerStep": 4096}}
    )
    steps["status"] = progress_status(4096 * 90)
    tokens = workload("tokens", type="FineTuning", slo={"totalWork": {"tokens": 1e9}})
    tokens["status"] = progress_status(9e8)
    done = workload("done", type="BatchInference", slo={"totalWork": {"tokens": 1e6}})
    done["status"] = progress_status(2e6)
    fresh = workload("fresh", type="Training", slo={"totalWork": {"tokens": 5e8}})
    by_key = {
        w.key: w.remaining_work
        for w in build(node("n"), steps, tokens, done, fresh).plan_input.workloads
    }
    assert by_key == {
        "team-a/steps": WorkAmount(WorkUnit.TOKENS, 4096 * 10),
        "team-a/tokens": WorkAmount(WorkUnit.TOKENS, 1e9 - 9e8),
        "team-a/done": WorkAmount(WorkUnit.TOKENS, 0.0),
        "team-a/fresh": WorkAmount(WorkUnit.TOKENS, 5e8),  # nothing done yet: the total
    }


def test_gpu_hours_of_work_reduce_to_the_reference_gpus_tokens_per_hour() -> None:
    job = workload("gh", type="Training", slo={"totalWork": {"gpuHours": 10}})
    terms = job_terms(parse_llmworkload(job))
    assert terms is not None
    assert terms.total_tokens is not None
    job["status"] = progress_status(terms.total_tokens / 4)
    (converted,) = build(node("n"), job).plan_input.workloads
    assert converted.remaining_work is not None
    assert converted.remaining_work.unit is WorkUnit.TOKENS
    assert converted.remaining_work.amount == pytest.approx(terms.total_tokens * 0.75)


def test_a_job_without_total_work_runs_best_effort_with_no_deadline() -> None:
    job = workload("open", type="Training")
    del job["spec"]["slo"]
    (converted,) = build(node("n"), job).plan_input.workloads
    assert (converted.remaining_work, converted.deadline_seconds) == (None, None)
    terms = job_terms(parse_llmworkload(job))
    assert terms is not None
    assert terms.total_tokens is None


def test_a_deadline_without_total_work_names_the_field() -> None:
    job = workload("late", type="Training", slo={"deadline": "2026-11-26T00:00:00Z"})
    with pytest.raises(SnapshotError, match=r"spec\.slo\.deadline: needs spec\.slo\.totalWork"):
        build(node("n"), job)


def test_deadline_seconds_count_from_now_and_stop_at_zero() -> None:
    assert deadline_seconds(NOW + timedelta(hours=2), NOW) == 7200.0
    assert deadline_seconds(NOW - timedelta(hours=2), NOW) == 0.0


def test_finished_and_deleting_workloads_are_not_planned() -> None:
    done = workload("done")
    done["status"] = {"phase": "Succeeded"}
    leaving = workload("leaving")
    leaving["metadata"]["deletionTimestamp"] = "2026-11-25T01:00:00Z"
    keys = [w.key for w in build(node("n"), done, leaving, workload("live")).plan_input.workloads]
    assert keys == ["team-a/live"]


def test_invalid_workload_is_one_error_naming_object_and_field() -> None:
    with pytest.raises(
        SnapshotError,
        match=r"^LLMWorkload team-a/bad: spec.gpu.count: must be between 1 and 64, got 0$",
    ):
        build(node("n"), workload("bad", gpu={"count": 0}))


def test_an_allowed_product_the_catalogue_lacks_is_kept() -> None:
    chat = workload(gpu={"count": 1, "products": ["NVIDIA-L4", "NVIDIA-Z9000"]})
    snapshot = build(node("n"), chat)
    assert snapshot.plan_input.workloads[0].allowed_products == frozenset({"L4", "Z9000"})


def test_lenient_mode_leaves_out_invalid_workloads_and_reports_them() -> None:
    snapshot = build(node("n"), workload("bad", gpu={"count": 0}), workload("good"), strict=False)
    assert [w.key for w in snapshot.plan_input.workloads] == ["team-a/good"]
    assert [error.field for error in snapshot.rejected] == ["spec.gpu.count"]
    assert list(snapshot.workloads) == ["team-a/good"]


def test_running_replicas_become_current_placements() -> None:
    with_env = pod("chat", "4", "n0", annotations={})  # variant and limit from the container env
    with_env["spec"]["containers"][0]["env"] = [
        {"name": "WATTSCHED_VARIANT", "value": "fp8"},
        {"name": "WATTSCHED_POWER_LIMIT_WATTS", "value": "300"},
    ]
    current = build(
        node("n0"),
        workload("chat"),
        pod("chat", "0", "n0"),
        pod("chat", "1", None),  # not bound yet
        pod("chat", "2", "n0", phase="Succeeded"),
        pod("gone", "0", "n0"),  # its workload is not in the snapshot
        pod("chat", "3", "n0", namespace="team-b"),  # another namespace's "chat"
        with_env,
    ).plan_input.current
    assert current == (
        CurrentPlacement("team-a/chat", 0, "n0", "bf16", 450.0),
        CurrentPlacement("team-a/chat", 4, "n0", "fp8", 300.0),
    )


def test_in_a_make_before_break_move_the_replacement_is_the_replica_the_old_pod_counts() -> None:
    old = pod("chat", "0", "n0")
    old["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "2"}}
    new = pod("chat", "0", "n1")
    new["metadata"]["name"] = "chat-0-h"
    new["metadata"]["annotations"] = {
        **new["metadata"]["annotations"],
        "wattsched.io/power-limit-watts": "300",
        "wattsched.io/replaces": "chat-0",
    }
    plan_input = build(node("n0"), node("n1"), workload("chat"), old, new).plan_input
    assert plan_input.current == (CurrentPlacement("team-a/chat", 0, "n1", "bf16", 300.0),)
    n0 = next(n for n in plan_input.nodes if n.name == "n0")
    assert (n0.gpu_count, n0.unmanaged_gpus, n0.unmanaged_watts) == (6, 2, 900.0)
    # They are leaving: the plan over a horizon gives them back in its later slots.
    assert (n0.leaving_gpus, n0.leaving_watts) == (2, 900.0)
    settled = n0.settled()
    assert (settled.gpu_count, settled.unmanaged_gpus, settled.unmanaged_watts) == (8, 0, 0.0)
    # Once the replacement is gone (given up), the old pod is the replica again.
    new["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    plan_input = build(node("n0"), node("n1"), workload("chat"), old, new).plan_input
    assert plan_input.current == (CurrentPlacement("team-a/chat", 0, "n0", "bf16", 450.0),)
    assert next(n for n in plan_input.nodes if n.name == "n0").gpu_count == 8


def test_pod_without_a_power_limit_names_the_pod_and_annotation() -> None:
    with pytest.raises(
        SnapshotError,
        match=r'Pod team-a/chat-0: metadata.annotations\["wattsched.io/power-limit-watts"\] '
        "is missing",
    ):
        build(node("n0"), workload("chat"), pod("chat", "0", "n0", annotations={}))


def test_pod_with_a_malformed_replica_label_names_the_pod_and_label() -> None:
    with pytest.raises(
        SnapshotError, match=r'Pod team-a/chat-x: metadata.labels\["wattsched.io/replica"\]'
    ):
        build(node("n0"), workload("chat"), pod("chat", "x", "n0"))


def test_lists_are_flattened_and_other_kinds_ignored() -> None:
    objects = split_objects(
        [
            {"apiVersion": "v1", "kind": "List", "items": [node("n0"), workload()]},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
            None,
            {
                "apiVersion": "wattsched.io/v1alpha1",
                "kind": "EnergyBudgetList",
                "items": [budget("b", 1)],
            },
        ]
    )
    assert (len(objects.nodes), len(objects.workloads), len(objects.budgets)) == (1, 1, 1)


def test_a_document_that_is_not_an_object_is_an_error() -> None:
    with pytest.raises(SnapshotError, match="document 2: expected a Kubernetes object"):
        split_objects([node("n0"), ["not", "an", "object"]])


def test_plan_options_are_passed_through() -> None:
    options = PlanOptions(power_levels=3, time_limit_seconds=2.0)
    assert build(node("n0"), options=options).plan_input.options == options


def test_the_example_snapshot_reads_cleanly() -> None:
    documents = list(yaml.safe_load_all((REPO_ROOT / "offline" / "snapshot.yaml").read_text()))
    snapshot = build_snapshot(split_objects(documents), now=NOW)
    plan_input = snapshot.plan_input
    assert len(plan_input.nodes) == 6
    assert sum(not n.schedulable for n in plan_input.nodes) == 1
    assert all(n.agent_ready for n in plan_input.nodes)
    assert {b.name: len(b.node_names) for b in plan_input.budgets} == {"cluster": 6, "rack-a": 2}
    assert len(plan_input.workloads) == 5
    assert [c.workload for c in plan_input.current] == ["team-a/chat"]


def test_inputs_are_not_modified() -> None:
    objects = (node("n0"), workload(), budget("b", 1000))
    before = copy.deepcopy(objects)
    build_snapshot(
        ClusterObjects(nodes=objects[:1], workloads=objects[1:2], budgets=objects[2:]), now=NOW
    )
    assert objects == before


def test_a_new_resource_version_of_a_workload_is_read_again() -> None:
    first_version = workload("chat", priority=1)
    first_version["metadata"].update(uid="uid-chat", resourceVersion="10")
    second_version = copy.deepcopy(first_version)
    second_version["metadata"]["resourceVersion"] = "11"
    second_version["spec"]["priority"] = 9
    priorities = [
        build(node("n"), body).plan_input.workloads[0].priority
        for body in (first_version, second_version, first_version)
    ]
    assert priorities == [1, 9, 1]


def test_deadlines_of_a_cached_workload_still_follow_now() -> None:
    job = workload(
        "train",
        type="Training",
        slo={"totalWork": {"tokens": 1e9}, "deadline": "2026-11-25T04:00:00Z"},
    )
    job["metadata"].update(uid="uid-train", resourceVersion="3")
    seconds = [
        build_snapshot(split_objects([node("n"), job]), now=now).plan_input.workloads[0]
        for now in (NOW, NOW + timedelta(hours=1))
    ]
    assert [w.deadline_seconds for w in seconds] == [7200.0, 3600.0]


def test_a_wattsched_object_of_another_version_is_an_error_not_ignored() -> None:
    newer = budget("b", 1000)
    newer["apiVersion"] = "wattsched.io/v1beta1"
    with pytest.raises(
        SnapshotError, match=r"document 1 \(EnergyBudget\): apiVersion 'wattsched.io/v1beta1'"
    ):
        split_objects([newer])


def versioned(name: str, uid: str, version: str, completed_tokens: float) -> dict[str, Any]:
    body = workload(name, type="FineTuning", slo={"totalWork": {"tokens": 1e9}})
    body["metadata"] |= {"uid": uid, "resourceVersion": version}
    body["status"] = progress_status(completed_tokens)
    return body


def test_a_parsed_workload_keeps_of_its_status_only_the_phase_and_progress_planning_reads() -> None:
    body = versioned("tune", "5f0c1e0e-status-kept", "21", 1e8)
    body["status"] |= {
        "phase": "Running",
        "observedGeneration": 1,
        "replicas": {"desired": 1, "placed": 1, "ready": 1},
        "placements": [
            {
                "replica": 0,
                "rank": 0,
                "node": "n",
                "gpus": 1,
                "variant": "bf16",
                "powerLimitWatts": 350.0,
            }
        ],
        "power": {"capWatts": 700.0, "expectedWatts": 650.0},
        "energy": {"source": "modelled", "joules": 5e6, "kilowattHours": 1.4},
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Running",
                "message": "1/1 replica(s) ready",
                "lastTransitionTime": "2026-11-25T01:00:00Z",
            }
        ],
        "message": "1 replica(s) on n",
    }
    result = build(node("n"), body)
    (read,) = result.plan_input.workloads
    assert read.remaining_work == WorkAmount(WorkUnit.TOKENS, 1e9 - 1e8)
    status = result.workloads["team-a/tune"].status
    assert status == LLMWorkloadStatus(phase=Phase.RUNNING, progress=status.progress)
    assert status.progress is not None
    assert status.progress.completed_tokens == 1e8
    assert snapshot._read_cache["5f0c1e0e-status-kept"][1].status == status


def test_workloads_holding_one_read_only_spec_share_its_parsed_form() -> None:
    # The operator's cache keeps one read-only spec for the workloads made from one template.
    def cached(name: str, done: float, **spec: Any) -> Any:
        body = versioned(name, f"5f0c1e0e-shared-{name}", "3", done)
        body["spec"] |= spec
        return slim(WORKLOADS, body)

    a, b, c = cached("a", 1e8), cached("b", 2e8), cached("c", 1e8, priority=7)
    assert a["spec"] is b["spec"]
    result = build(node("n"), a, b, c)
    parsed = result.workloads
    assert parsed["team-a/a"].spec is parsed["team-a/b"].spec
    assert parsed["team-a/c"].spec is not parsed["team-a/a"].spec
    assert parsed["team-a/c"].spec.priority == 7
    read_a, read_b, read_c = result.plan_input.workloads
    assert [w.key for w in (read_a, read_b, read_c)] == ["team-a/a", "team-a/b", "team-a/c"]
    assert read_a.variants is read_b.variants
    assert read_a.remaining_work == WorkAmount(WorkUnit.TOKENS, 1e9 - 1e8)
    assert read_b.remaining_work == WorkAmount(WorkUnit.TOKENS, 1e9 - 2e8)
    assert dataclasses.replace(read_a, key="team-a/b", remaining_work=read_b.remaining_work) == (
        read_b
    )
    assert read_c.priority == 7
    # A spec that may change in place (a plain dict) is parsed for its workload alone.
    d, e = (versioned(name, f"5f0c1e0e-plain-{name}", "3", 1e8) for name in ("d", "e"))
    plain = build(node("n"), d, e).workloads
    assert plain["team-a/d"].spec is not plain["team-a/e"].spec


def test_the_parsed_specs_no_cached_body_holds_leave_the_table() -> None:
    def cached(first: int, count: int) -> list[Any]:
        return [
            slim(WORKLOADS, versioned(f"w{i}", f"5f0c1e0e-sweep-{i}", "1", 0.0) | {"spec": spec})
            for i, spec in (
                (i, workload(model={"name": f"m{i}", "parametersBillions": 8})["spec"])
                for i in range(first, first + count)
            )
        ]

    gone = cached(0, 1100)
    build(node("n"), *gone)
    held = gone[:10]
    first_read = {id(b["spec"]): snapshot._spec_reads.table[id(b["spec"])][1] for b in held}
    del gone
    # Past twice what the table held after its last sweep: the specs of `gone` leave.
    later = cached(2000, 1100)
    build(node("n"), *held, *later)
    assert len(snapshot._spec_reads.table) < 1100 + 10 + 100
    # The specs still held keep their parsed form, read once.
    assert all(snapshot._spec_reads.table[key][1] is spec for key, spec in first_read.items())


def test_each_version_of_a_workload_is_read_as_it_is_and_only_its_latest_stays_parsed() -> None:
    uid = "5f0c1e0e-parse-cache-test"
    seen = []
    for version, done in (("11", 1e8), ("12", 2e8), ("13", 3e8)):
        (read,) = build(node("n"), versioned("tune", uid, version, done)).plan_input.workloads
        seen.append(read.remaining_work)
    assert seen == [WorkAmount(WorkUnit.TOKENS, 1e9 - done) for done in (1e8, 2e8, 3e8)]
    # One parsed entry per object, the latest version's (a status write per round left one
    # behind for each version: 10,000 workloads held up to 50,000).
    assert [(key, entry[0]) for key, entry in snapshot._read_cache.items() if key == uid] == [
        (uid, "13")
    ]
