"""Make-before-break moves: which moves hand over, what a hand-over in progress does, and how
the pods, limits and planning input follow from it (pure: no API server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from wattsched_operator import handover
from wattsched_operator.cache import PODS, slim
from wattsched_operator.desired import (
    WorkloadObject,
    build_pod,
    desired_pods,
    moved_replicas,
    pace_deletions,
    planned_limits,
    pod_changes,
)
from wattsched_operator.handover import BudgetRoom, decide, replacement_name
from wattsched_operator.transition import NodePowerState, power_steps
from wattsched_optimizer.problem import Placement, Plan, PlanStatus, WorkloadType

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
KEY = "team-a/chat"


def workload() -> WorkloadObject:
    return WorkloadObject(
        namespace="team-a",
        name="chat",
        uid="uid-1",
        type=WorkloadType.INFERENCE,
        template={"spec": {"containers": [{"name": "server", "image": "vllm"}]}},
        precisions={"bf16": "bf16"},
    )


def placement(replica: int, node: str, watts: float = 300.0) -> Placement:
    return Placement(
        workload=KEY,
        replica=replica,
        node=node,
        gpus=1,
        variant="bf16",
        power_limit_watts=watts,
        expected_watts_per_gpu=watts,
        expected_throughput=1000.0,
    )


def pod(
    replica: int,
    node: str,
    *,
    name: str | None = None,
    ready: bool = True,
    watts: float = 300.0,
    replaces: str | None = None,
    created: datetime = NOW,
    deleting: bool = False,
) -> dict[str, Any]:
    """One of the operator's pods as the API server shows it: bound to `node`."""
    body = build_pod(workload(), placement(replica, node, watts), name=name, replaces=replaces)
    body["metadata"]["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    body["spec"]["nodeName"] = node
    body["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    return body


def key_of(body: dict[str, Any]) -> tuple[str, str]:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def room(headroom_watts: float, *nodes: str) -> BudgetRoom:
    return BudgetRoom("rack-a", headroom_watts, frozenset(nodes))


def decide_for(pods: list[dict[str, Any]], placements: list[Placement], **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "services": frozenset({KEY}),
        "lost_nodes": frozenset(),
        "node_gpus": {"gpu-a": 2, "gpu-b": 2},
        "idle_watts": {"gpu-a": 100.0, "gpu-b": 100.0},
        "budgets": [room(1000.0, "gpu-a", "gpu-b")],
        "now": NOW,
    }
    fields.update(overrides)
    return decide(pods, placements, **fields)


def test_a_replica_has_two_names_that_no_other_workload_can_take() -> None:
    assert replacement_name("chat-0", "chat", 0) == "chat-0-h"
    assert replacement_name("chat-0-h", "chat", 0) == "chat-0"
    # Workload `chat-0`'s names end in a digit, then `-h`: never `chat-0-h`.
    assert replacement_name("chat-0-1", "chat-0", 1) == "chat-0-1-h"


def test_a_moved_ready_replica_is_replaced_first_when_gpus_and_budget_allow() -> None:
    old = pod(0, "gpu-a")
    decision = decide_for([old], [placement(0, "gpu-b")])
    assert decision.names[(KEY, 0)] == "chat-0-h"
    assert decision.replaces[(KEY, 0)] == "chat-0"
    assert decision.keep == {("team-a", "chat-0")}
    assert decision.keep_limits == {"gpu-a": {("team-a", "chat-0"): 300.0}}
    assert decision.started == {KEY: ("chat-0: gpu-a -> gpu-b (chat-0-h first)",)}
    assert not decision.fallbacks

    want = desired_pods(
        {KEY: workload()},
        [placement(0, "gpu-b")],
        names=decision.names,
        replaces=decision.replaces,
    )
    changes = pod_changes([old], want, decision.keep)
    assert changes.delete == (), "the old pod stays until its replacement is Ready"
    (new,) = changes.create
    assert new["metadata"]["name"] == "chat-0-h"
    assert new["metadata"]["annotations"]["wattsched.io/replaces"] == "chat-0"
    assert new["metadata"]["labels"]["wattsched.io/workload"] == "chat", "the Service selects both"


def test_without_free_gpus_for_both_the_move_is_break_before_make_and_says_so() -> None:
    other = pod(0, "gpu-b", name="other-0")
    other["metadata"]["labels"]["wattsched.io/workload"] = "other"
    decision = decide_for([pod(0, "gpu-a"), other], [placement(0, "gpu-b")], node_gpus={"gpu-b": 1})
    assert (KEY, 0) not in decision.replaces
    assert decision.names[(KEY, 0)] == "chat-0", "same name: created once the old pod is gone"
    assert decision.fallbacks == {
        ("team-a", "chat-0"): "moved before its replacement was ready: no free GPUs on gpu-b "
        "for both"
    }


def test_without_budget_room_for_both_limits_the_move_is_break_before_make() -> None:
    # The plan counts the old pod's GPU at the 100 W idle limit; it draws up to 300 W meanwhile.
    tight = decide_for([pod(0, "gpu-a")], [placement(0, "gpu-b")], budgets=[room(199.0, "gpu-a")])
    assert tight.fallbacks == {
        ("team-a", "chat-0"): "moved before its replacement was ready: no room in budget rack-a "
        "for both"
    }
    enough = decide_for([pod(0, "gpu-a")], [placement(0, "gpu-b")], budgets=[room(200.0, "gpu-a")])
    assert not enough.fallbacks
    assert enough.replaces == {(KEY, 0): "chat-0"}


def test_budget_room_is_shared_by_the_hand_overs_of_one_round() -> None:
    pods = [pod(0, "gpu-a"), pod(1, "gpu-a")]
    decision = decide_for(
        pods,
        [placement(0, "gpu-b"), placement(1, "gpu-b")],
        budgets=[room(300.0, "gpu-a", "gpu-b")],
    )
    assert decision.replaces == {(KEY, 0): "chat-0"}
    assert set(decision.fallbacks) == {("team-a", "chat-1")}


def test_gangs_unready_pods_and_lost_nodes_move_as_before() -> None:
    placements = [placement(0, "gpu-b")]
    gang = decide_for([pod(0, "gpu-a")], placements, services=frozenset())
    unready = decide_for([pod(0, "gpu-a", ready=False)], placements)
    lost = decide_for([pod(0, "gpu-a")], placements, lost_nodes=frozenset({"gpu-a"}))
    for decision in (gang, unready, lost):
        assert not decision.replaces
        assert not decision.keep
        assert not decision.fallbacks
        assert decision.names[(KEY, 0)] == "chat-0"


def test_a_hand_over_in_progress_keeps_the_old_pod_until_the_replacement_is_ready() -> None:
    old = pod(0, "gpu-a")
    new = pod(0, "gpu-b", name="chat-0-h", ready=False, replaces="chat-0", watts=250.0)
    plan = [placement(0, "gpu-b", watts=250.0)]
    waiting = decide_for([old, new], plan)
    assert waiting.names[(KEY, 0)] == "chat-0-h"
    assert waiting.keep == {("team-a", "chat-0")}
    assert waiting.keep_limits == {"gpu-a": {("team-a", "chat-0"): 300.0}}
    assert not waiting.started, "a move is announced once"
    want = desired_pods({KEY: workload()}, plan, names=waiting.names)
    assert pod_changes([old, new], want, waiting.keep).delete == ()

    new["status"]["conditions"][0]["status"] = "True"
    done = decide_for([old, new], plan)
    assert done.finished == {("team-a", "chat-0")}
    changes = pod_changes([old, new], want, done.keep)
    assert changes.delete == (("team-a", "chat-0"),)
    # The old pod is no replica's move of its own: it goes now, and is not a `Moved` pod.
    current = {key_of(old): old, key_of(new): new}
    paced = pace_deletions(
        changes.delete,
        current,
        want,
        services=frozenset({KEY}),
        forced=frozenset(),
        lost_nodes=frozenset(),
    )
    assert paced.now == (("team-a", "chat-0"),)
    assert moved_replicas(current, want, paced.now) == {}


def test_a_replacement_not_ready_in_time_is_given_up_and_the_old_pod_stays() -> None:
    old = pod(0, "gpu-a")
    new = pod(0, "gpu-b", name="chat-0-h", ready=False, replaces="chat-0", created=NOW)
    later = NOW + timedelta(seconds=601)
    decision = decide_for([old, new], [placement(0, "gpu-b")], now=later)
    assert set(decision.given_up) == {("team-a", "chat-0-h")}
    assert "not Ready 601 s after its creation" in decision.given_up[("team-a", "chat-0-h")]
    assert decision.keep == {("team-a", "chat-0")}
    # Once the replacement is deleting, the old pod is the replica's pod again.
    gone = pod(0, "gpu-b", name="chat-0-h", ready=False, replaces="chat-0", deleting=True)
    assert handover.replica_pods([old, gone])[(KEY, 0)] is old
    assert handover.pending_handovers([old, gone]) == {}


def test_a_budget_over_its_cap_during_a_hand_over_evicts_the_old_pod() -> None:
    old = pod(0, "gpu-a")
    new = pod(0, "gpu-b", name="chat-0-h", ready=False, replaces="chat-0")
    decision = decide_for([old, new], [placement(0, "gpu-b")], budgets=[room(-50.0, "gpu-a")])
    assert decision.keep == frozenset()
    assert decision.fallbacks == {
        ("team-a", "chat-0"): "moved before its replacement was ready: budget rack-a has no "
        "room for both"
    }


def test_the_old_pod_keeps_its_limit_at_every_step_of_the_hand_over() -> None:
    """The profile of the old pod's node keeps its limit (the lowering step must not drop it to
    idle while it serves); the replacement gets its limit in the raising step."""
    old = pod(0, "gpu-a", watts=300.0)
    decision = decide_for([old], [placement(0, "gpu-b", watts=250.0)])
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0.0,
        bound=0.0,
        gap=0.0,
        solve_seconds=0.0,
        placements=(placement(0, "gpu-b", watts=250.0),),
        node_power_limits_watts={"gpu-a": (100.0, 100.0), "gpu-b": (250.0, 100.0)},
        budgets=(),
        unplaced=(),
        node_idle_limits_watts={"gpu-a": 100.0, "gpu-b": 100.0},
    )
    limits = planned_limits(plan, names=decision.names, kept=decision.keep_limits)
    assert limits["gpu-a"].pods == {("team-a", "chat-0"): 300.0}
    assert limits["gpu-b"].pods == {("team-a", "chat-0-h"): 250.0}
    current = {
        "gpu-a": NodePowerState.from_profile(
            {
                "spec": {
                    "idlePowerLimitWatts": 100.0,
                    "pods": [{"namespace": "team-a", "name": "chat-0", "powerLimitWatts": 300.0}],
                }
            }
        ),
        "gpu-b": NodePowerState.from_profile({"spec": {"idlePowerLimitWatts": 100.0, "pods": []}}),
    }
    steps = power_steps(current, limits)
    assert steps.lower == {}, "nothing is lowered: the old pod keeps 300 W"
    assert steps.raise_["gpu-b"].pods == {("team-a", "chat-0-h"): 250.0}


def test_planning_counts_the_old_pod_like_gpus_it_does_not_place_on() -> None:
    old = pod(0, "gpu-a", watts=300.0)
    new = pod(0, "gpu-b", name="chat-0-h", ready=False, replaces="chat-0")
    assert handover.leaving_by_node([old, new]) == {"gpu-a": (1, 300.0)}
    assert handover.leaving_by_node([old]) == {}


def test_the_operators_cache_keeps_what_the_gpu_check_reads() -> None:
    body = pod(0, "gpu-a")
    body["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "4"
    kept = slim(PODS, body)
    assert handover.pod_gpus(kept) == 1
    assert kept["spec"]["containers"][0]["resources"] == {
        "requests": {"nvidia.com/gpu": "1"},
        "limits": {"nvidia.com/gpu": "1"},
    }
