"""Which watch events make the plan dirty (and which are only departures or confirmations, which
the loop lets settle), and who leads among peered operators."""

from __future__ import annotations

import asyncio
import gc
import weakref
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf

from wattsched_operator.cache import NODES, PODS, PROFILES, WORKLOADS, Changes, ClusterCache
from wattsched_operator.core import build_input_function
from wattsched_operator.desired import LABEL_WORKLOAD
from wattsched_operator.handlers import OperatorMemo, pod_event, record, workload_event
from wattsched_operator.kube import HTTP_NOT_FOUND, KubeError, workloads_path
from wattsched_operator.loop import LoopSettings, PlanningLoop
from wattsched_operator.metrics import OperatorMetrics
from wattsched_operator.run import leads
from wattsched_optimizer.model import PerformanceModel
from wattsched_optimizer.planner import plan as optimizer_plan
from wattsched_optimizer.problem import Plan, PlanInput

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
    for phase in ("Pending", "Placed", "Running", "Preempted"):
        with_status = {**body, "status": {"phase": phase, "message": f"now {phase}"}}
        assert not record(cache, WORKLOADS, "MODIFIED", with_status), phase
    changed = {**with_status, "metadata": {**body["metadata"], "generation": 2}}
    assert record(cache, WORKLOADS, "MODIFIED", changed)
    ended = {**changed, "status": {"phase": "Succeeded"}}
    assert record(cache, WORKLOADS, "MODIFIED", ended)  # its GPUs are free for others


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


# -- departures: a mass deletion is planned once, not once per workload leaving ------------------


def workload_body(name: str, *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "generation": 1}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    return {"metadata": meta}


def pod_body(workload: str, *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{workload}-0",
        "namespace": "ns",
        "labels": {LABEL_WORKLOAD: workload},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T12:00:00Z"
    return {"metadata": meta, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}


def test_a_workload_leaving_and_its_pods_going_are_departures() -> None:
    cache = ClusterCache()
    record(cache, WORKLOADS, None, workload_body("w"))
    record(cache, PODS, None, pod_body("w"))
    record(cache, WORKLOADS, None, workload_body("stays"))
    record(cache, PODS, None, pod_body("stays"))
    cache.take_changes()
    assert not cache.dirty.is_set()

    assert record(cache, WORKLOADS, "MODIFIED", workload_body("w", deleting=True))
    assert record(cache, PODS, "MODIFIED", pod_body("w", deleting=True))
    assert record(cache, PODS, "DELETED", pod_body("w", deleting=True))
    assert record(cache, WORKLOADS, "DELETED", workload_body("w", deleting=True))
    assert cache.dirty.is_set()
    assert cache.changes.settling_only

    # A pod lost by a workload that stays must be placed again: not a departure.
    assert record(cache, PODS, "DELETED", pod_body("stays"))
    assert not cache.changes.settling_only


def test_a_new_workload_is_not_a_departure() -> None:
    cache = ClusterCache()
    record(cache, WORKLOADS, "ADDED", workload_body("new"))
    assert not cache.take_changes().settling_only
    # Taking the changes starts a new record.
    assert cache.changes.first_monotonic is None
    assert not cache.dirty.is_set()


def test_an_agent_confirming_limits_settles_but_an_agent_going_away_does_not() -> None:
    def profile(
        applied: float, generation: int, ready: bool = True, holder: str | None = None
    ) -> dict[str, Any]:
        gpu = {"index": 0, "appliedWatts": applied, "maxWatts": 700}
        return {
            "metadata": {"name": "n1", "generation": generation},
            "status": {
                "observedGeneration": generation,
                "agent": {"ready": ready},
                "gpus": [gpu | ({"holder": holder} if holder else {})],
            },
        }

    cache = ClusterCache()
    record(cache, PROFILES, None, profile(700, 1, holder="wattsched"))
    assert not cache.take_changes().settling_only  # a new profile: plan now
    # The GPU freed by a departing pod, lowered to its minimum: follows the operator's own writes.
    assert record(cache, PROFILES, "MODIFIED", profile(300, 2))
    assert cache.take_changes().settling_only
    # Another team's pod takes the GPU: plan now.
    assert record(cache, PROFILES, "MODIFIED", profile(300, 2, holder="other"))
    assert not cache.take_changes().settling_only
    assert record(cache, PROFILES, "MODIFIED", profile(300, 2, ready=False, holder="other"))
    assert not cache.take_changes().settling_only


def test_departures_settle_until_quiet_at_most_the_longest_wait() -> None:
    changes = Changes()
    assert changes.settle_seconds(100.0, quiet_seconds=2, longest_seconds=10) == 0
    changes.note(100.0, settles=True)
    assert changes.settle_seconds(100.5, quiet_seconds=2, longest_seconds=10) == 1.5
    changes.note(101.0, settles=True)
    assert changes.settle_seconds(101.0, quiet_seconds=2, longest_seconds=10) == 2.0
    assert changes.settle_seconds(103.0, quiet_seconds=2, longest_seconds=10) == 0
    # Departures that keep coming still get a plan 10 s after the first.
    for at in range(101, 112):
        changes.note(float(at), settles=True)
    assert changes.settle_seconds(109.5, quiet_seconds=2, longest_seconds=10) == 0.5
    assert changes.settle_seconds(110.0, quiet_seconds=2, longest_seconds=10) == 0
    # Any other change: plan without settling.
    changes = Changes()
    changes.note(100.0, settles=True)
    changes.note(100.1, settles=False)
    changes.note(100.2, settles=True)
    assert changes.settle_seconds(100.2, quiet_seconds=2, longest_seconds=10) == 0


def loop_on(cache: ClusterCache, **settings: Any) -> PlanningLoop:
    return PlanningLoop(
        cache=cache,
        kube=cast(Any, None),
        settings=LoopSettings(workers=1, **settings),
        build_input=cast(Any, None),
        plan_function=cast(Any, None),
        metrics=None,
        is_leader=cast(Any, None),
    )


def test_the_loop_waits_out_departures_but_not_an_arrival() -> None:
    settings = {
        "debounce_seconds": 0.0,
        "settle_quiet_seconds": 30.0,
        "settle_longest_seconds": 60.0,
    }

    async def main() -> None:
        cache = ClusterCache()
        loop = loop_on(cache, **settings)
        record(cache, WORKLOADS, None, workload_body("w"))
        record(cache, WORKLOADS, None, workload_body("other"))
        cache.take_changes()
        record(cache, WORKLOADS, "MODIFIED", workload_body("w", deleting=True))
        waiting = asyncio.create_task(loop._wait_for_work())
        await asyncio.sleep(0.5)
        assert not waiting.done(), "planned at once for a departure"
        # Another workload's spec changes: plan now.
        changed = workload_body("other")
        changed["metadata"]["generation"] = 2
        record(cache, WORKLOADS, "MODIFIED", changed)
        assert await asyncio.wait_for(waiting, timeout=5) == "plan"

    asyncio.run(main())


def test_without_departures_the_loop_plans_after_the_debounce() -> None:
    async def main() -> None:
        cache = ClusterCache()
        loop = loop_on(cache, debounce_seconds=0.0, settle_quiet_seconds=30.0)
        record(cache, WORKLOADS, "ADDED", workload_body("new"))
        assert await asyncio.wait_for(loop._wait_for_work(), timeout=5) == "plan"

    asyncio.run(main())


class FakeWorkloadApi:
    """`Kube.get` of LLMWorkloads: the bodies it holds by path, 404 for the rest; counts calls."""

    def __init__(self, *bodies: dict[str, Any]) -> None:
        self.bodies = {
            workloads_path(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in bodies
        }
        self.gets = 0

    def get(self, path: str) -> dict[str, Any]:
        self.gets += 1
        if path not in self.bodies:
            raise KubeError("GET", path, HTTP_NOT_FOUND, "not found")
        return self.bodies[path]


def live_workload(uid: str = "uid-1") -> dict[str, Any]:
    return {"metadata": {"namespace": "team", "name": "llama", "uid": uid, "generation": 1}}


def its_pod(**meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "team",
            "name": "llama-0",
            "labels": {LABEL_WORKLOAD: "llama"},
            **meta,
        },
        "spec": {"nodeName": "gpu-a"},
    }


def handled(state: OperatorMemo, kind: str, event_type: str, body: dict[str, Any]) -> None:
    handler = pod_event if kind == PODS else workload_event
    asyncio.run(handler(state, event_type, body))


def test_a_pod_going_while_its_workload_is_gone_takes_the_workload_out_of_the_cache() -> None:
    # The garbage collector deletes the pod of a workload whose deletion the watch has not shown.
    state = OperatorMemo(cache=ClusterCache(), kube=cast(Any, FakeWorkloadApi()))
    handled(state, WORKLOADS, "ADDED", live_workload())
    handled(state, PODS, "ADDED", its_pod())
    handled(state, PODS, "MODIFIED", its_pod(deletionTimestamp="t1"))
    assert state.cache.get(WORKLOADS, "team/llama") is None
    # The watch's late events of it do not bring it back; its own deletion ends that.
    handled(state, WORKLOADS, "MODIFIED", live_workload())
    assert state.cache.get(WORKLOADS, "team/llama") is None
    handled(state, WORKLOADS, "DELETED", live_workload())
    assert state.gone == {}
    handled(state, WORKLOADS, "ADDED", live_workload(uid="uid-2"))  # applied again
    assert state.cache.get(WORKLOADS, "team/llama") is not None


def test_a_pod_going_while_its_workload_lives_changes_nothing_and_asks_once() -> None:
    api = FakeWorkloadApi(live_workload())
    state = OperatorMemo(cache=ClusterCache(), kube=cast(Any, api))
    handled(state, WORKLOADS, "ADDED", live_workload())
    handled(state, PODS, "ADDED", its_pod())
    handled(state, PODS, "MODIFIED", its_pod(deletionTimestamp="t1"))
    handled(state, PODS, "DELETED", its_pod(deletionTimestamp="t1"))
    assert state.cache.get(WORKLOADS, "team/llama") is not None
    assert api.gets == 1  # the first sign only


def test_a_workload_applied_again_under_the_same_name_replaces_the_cached_one() -> None:
    state = OperatorMemo(
        cache=ClusterCache(), kube=cast(Any, FakeWorkloadApi(live_workload("new")))
    )
    handled(state, WORKLOADS, "ADDED", live_workload("old"))
    handled(state, PODS, "DELETED", its_pod())
    assert state.cache.get(WORKLOADS, "team/llama") is None
    assert state.gone == {"team/llama": "old"}


def test_kopf_watches_neither_llmworkloads_nor_pods() -> None:
    # The two kinds that grow with the workloads come through the operator's own watch
    # (`watch`), compact; kopf watches only budgets, nodes and NodePowerProfiles.
    registry = kopf.get_default_registry()
    selectors = [h.selector for h in registry._watching.get_all_handlers() if h.selector]
    watched = {s.plural or s.any_name for s in selectors}
    assert watched >= {"energybudgets", "nodes", "nodepowerprofiles"}
    assert not watched & {"llmworkloads", "pods"}


def test_the_last_rounds_input_is_let_go_when_the_next_round_starts() -> None:
    """Two rounds' inputs of every workload are never held at once: while a round solves,
    nothing references the input and plan of the round before it."""
    inputs: list[weakref.ref[PlanInput]] = []
    held_while_solving: list[bool] = []

    def plan_recording(plan_input: PlanInput, model: PerformanceModel) -> Plan:
        gc.collect()
        held_while_solving.append(any(ref() is not None for ref in inputs))
        inputs.append(weakref.ref(plan_input))
        return optimizer_plan(plan_input, model)

    async def leader() -> bool:
        return True

    async def two_rounds() -> None:
        loop = PlanningLoop(
            cache=ClusterCache(),
            kube=cast(Any, None),  # an empty cluster: the rounds write nothing
            settings=LoopSettings(workers=1),
            build_input=build_input_function(30.0),
            plan_function=plan_recording,
            metrics=OperatorMetrics(),
            is_leader=leader,
        )
        await loop.plan_once()
        assert loop.memory.last_round is not None  # read by accounting between plans
        await loop.plan_once()

    asyncio.run(two_rounds())
    assert held_while_solving == [False, False]
    assert inputs[0]() is None
    assert inputs[1]() is not None
