"""The decision core (`core.decide` and its companions): a round's decisions as data, from plain
bodies, a wall-clock `now` and a monotonic reading passed in, with no API server, clock or
telemetry client. What the shell applies is in the Round; what the next round needs is in its
memory, and the input memory is never changed."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from wattsched_api import vocabulary
from wattsched_api.vocabulary import Source
from wattsched_operator import core, desired, statuses
from wattsched_operator.readings import (
    Calibrator,
    EnergyReading,
    Measurement,
    TelemetrySnapshot,
)
from wattsched_optimizer.model import CatalogueModel, PerformanceModel, normalise_product
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import MoveReason, Placement, Plan, PlanInput, WorkloadType

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
HEARTBEAT = "2026-12-05T11:59:55Z"


def node(name: str, gpus: int = 4) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
        },
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def profile(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "NodePowerProfile",
        "metadata": {"name": name, "generation": 1},
        "spec": {"nodeName": name},
        "status": {
            "observedGeneration": 1,
            "agent": {"ready": True, "heartbeatTime": HEARTBEAT, "backend": "simulated"},
        },
    }


def service(name: str = "chat", status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "type": "Inference",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 1},
            "slo": {"tokensPerSecond": 100},
            "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}},
        },
    }
    if status is not None:
        body["status"] = status
    return body


def fine_tuning(name: str) -> dict[str, Any]:
    body = service(name)
    body["spec"] = {
        **body["spec"],
        "type": "FineTuning",
        "slo": {"totalWork": {"gpuHours": 40}},
    }
    return body


def replica_pod(
    workload: str, node_name: str, *, phase: str = "Running", annotations: dict[str, str] | None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{workload}-0",
            "namespace": "team",
            "labels": {"wattsched.io/workload": workload, "wattsched.io/replica": "0"},
            "annotations": {
                "wattsched.io/variant": "bf16",
                "wattsched.io/power-limit-watts": "300",
                desired.ANNOTATION_NODE: node_name,
                **(annotations or {}),
            },
        },
        "spec": {"nodeName": node_name, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": phase, "startTime": "2026-12-05T11:00:00Z"},
    }


def view(
    nodes: list[dict[str, Any]], workloads: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> core.ClusterView:
    return core.ClusterView(
        workloads={f"team/{w['metadata']['name']}": w for w in workloads},
        budgets={},
        nodes={n["metadata"]["name"]: n for n in nodes},
        profiles={n["metadata"]["name"]: profile(n["metadata"]["name"]) for n in nodes},
        pods={f"team/{p['metadata']['name']}": p for p in pods},
    )


def test_a_new_service_gets_a_pod_a_limit_and_a_placed_status_as_data() -> None:
    observed = core.Observed(view([node("l40s-0")], [service()], []), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    assert [p["metadata"]["name"] for p in round_.create] == ["chat-0"]
    assert round_.evict == ()
    # The new pod's limit is set before the pod exists (raised after creation).
    assert ("team", "chat-0") in round_.raise_["l40s-0"].pods
    [status] = round_.workload_statuses
    assert status.phase == vocabulary.Phase.PLACED
    assert status.write is not None
    # Admitted and placed in one round: one Event, Placed (one API write per workload less).
    assert [e.reason for e in status.write.events] == ["Placed"]
    assert round_.memory.last_round is not None
    assert round_.memory.ready_agents == frozenset({"l40s-0"})
    # The input memory is as it was: each round returns a new one.
    assert observed.memory.last_round is None


def test_a_services_service_and_status_service_come_with_its_first_ready_pod_and_stay() -> None:
    def decided(pods: list[dict[str, Any]], status: dict[str, Any] | None = None) -> Any:
        observed = core.Observed(view([node("l40s-0")], [service(status=status)], pods))
        round_ = core.decide(observed, NOW)
        assert round_.services is not None
        [written] = round_.workload_statuses
        assert written.write is not None
        return round_.services, written.write.status

    wanted, status = decided([])
    assert ("team", "chat") in wanted
    assert not wanted.may_create(("team", "chat"))
    assert "service" not in status
    pod = replica_pod("chat", "l40s-0", annotations=None)
    wanted, status = decided([pod])  # Running, not Ready
    assert not wanted.may_create(("team", "chat"))
    assert "service" not in status
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    wanted, status = decided([pod])
    assert wanted.may_create(("team", "chat"))
    assert status["service"] == "chat"
    # Named from then on, while no pod is Ready (a move, a restart).
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    wanted, status = decided([pod], status={**status, "phase": "Placed"})
    assert not wanted.may_create(("team", "chat"))
    assert status["service"] == "chat"


def test_a_rounds_status_holds_how_to_build_it_in_one_object_without_an_attribute_dict() -> None:
    # A round holds one per workload until the writer builds it (10,000 at once).
    round_ = core.decide(core.Observed(view([], [service()], []), monotonic=100.0), NOW)
    [status] = round_.workload_statuses
    assert status.build is not None
    assert status.inputs is not None
    decided = getattr(status.build, "__self__", None)
    assert decided is getattr(status.inputs, "__self__", None)
    assert decided is not None
    assert not hasattr(decided, "__dict__")
    assert status.write is not None
    assert status.write.status["phase"] == vocabulary.Phase.PENDING


def test_a_service_that_waits_is_admitted_at_once_and_placed_later() -> None:
    waiting = core.decide(core.Observed(view([], [service()], []), monotonic=100.0), NOW)
    [first] = waiting.workload_statuses
    assert first.write is not None
    assert first.phase == vocabulary.Phase.PENDING
    assert [e.reason for e in first.write.events] == ["Unschedulable", "Admitted"]
    admitted = service(status=dict(first.write.status))
    placed = core.decide(
        core.Observed(view([node("l40s-0")], [admitted], []), monotonic=101.0), NOW
    )
    [second] = placed.workload_statuses
    assert second.write is not None
    assert second.phase == vocabulary.Phase.PLACED
    assert [e.reason for e in second.write.events] == ["Placed"]


def test_services_are_sized_for_the_forecast_from_the_memorys_history() -> None:
    memory = core.Memory()
    memory.demand.record("team/chat", 90.0, 5000.0)
    seen: list[PlanInput] = []

    def recording_plan(plan_input: PlanInput, model: PerformanceModel) -> Plan:
        seen.append(plan_input)
        return plan(plan_input, model)

    observed = core.Observed(
        view([node("l40s-0")], [service()], []), memory=memory, monotonic=100.0
    )
    core.decide(observed, NOW, plan_function=recording_plan)
    # The highest reading of the window (one reading: no spread to add), not the declared 100.
    assert [w.tokens_per_second for w in seen[0].workloads] == [5000.0]
    # Outside the window (monotonic time is the caller's), the declared demand stands.
    core.decide(dataclasses.replace(observed, monotonic=1000.0), NOW, plan_function=recording_plan)
    assert [w.tokens_per_second for w in seen[1].workloads] == [100.0]


def test_a_fresh_reading_is_learned_into_the_next_memory_not_the_input() -> None:
    running = service(status={"phase": "Running"})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    reading = TelemetrySnapshot(
        NOW, Source.MEASURED, False, "", pod_tokens_per_second={("team", "chat-0"): 4000.0}
    )
    observed = core.Observed(
        view([node("l40s-0")], [running], [pod]),
        monotonic=100.0,
        telemetry=core.Readings(snapshot=reading, rate_window_seconds=60.0),
    )
    round_ = core.decide(observed, NOW)
    # One reading: its peak, no spread to add.
    assert round_.memory.demand.demand("team/chat", 100.0, None) == 4000.0
    assert observed.memory.demand.demand("team/chat", 100.0, None) is None
    # The running replica keeps its pod.
    assert round_.evict == ()
    assert round_.create == ()


def test_a_failed_replica_is_counted_once_then_deleted_when_its_backoff_is_over() -> None:
    running = service(status={"phase": "Running"})
    failed = replica_pod("chat", "l40s-0", phase="Failed", annotations=None)
    observed = core.Observed(view([node("l40s-0")], [running], [failed]), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    workload_patch, pod_patch = round_.patches
    assert workload_patch.object.kind == "LLMWorkload"
    assert workload_patch.patch["metadata"]["annotations"] == {
        vocabulary.FAILURES_ANNOTATION: "1",
        vocabulary.RETRY_AFTER_ANNOTATION: "2026-12-05T12:00:10Z",
    }
    assert (pod_patch.object.kind, pod_patch.object.name) == ("Pod", "chat-0")
    assert [e.reason for e in round_.events] == ["ReplicaFailed"]
    # Retried after the first backoff (10 s): the round wakes then; the pod stays until then.
    assert round_.wake_at == 110.0
    assert round_.delete == ()
    assert round_.create == ()

    counted = service(status={"phase": "Running"})
    counted["metadata"]["annotations"] = dict(workload_patch.patch["metadata"]["annotations"])
    marked = replica_pod(
        "chat",
        "l40s-0",
        phase="Failed",
        annotations={vocabulary.FAILURE_COUNTED_ANNOTATION: "true"},
    )
    later = core.Observed(view([node("l40s-0")], [counted], [marked]), monotonic=111.0)
    retried = core.decide(later, NOW + timedelta(seconds=11))
    assert retried.patches == ()
    assert retried.delete == (core.Deletion("team", "chat-0"),)


def test_a_refused_pod_is_reported_and_retried_only_after_its_backoff() -> None:
    observed = core.Observed(view([node("l40s-0")], [service()], []), monotonic=100.0)
    first = core.decide(observed, NOW)
    memory = core.after_apply(
        first,
        core.Applied(refused={"team/chat": "violates PodSecurity"}),
        view=observed.view,
        monotonic=100.0,
        settings=observed.settings,
    )
    assert memory.pod_rejections["team/chat"].retry_at == 110.0

    waiting = core.decide(dataclasses.replace(observed, memory=memory, monotonic=105.0), NOW)
    assert waiting.create == ()
    [rejected] = waiting.early_statuses
    admitted = statuses.find_condition(rejected.status["conditions"], "Admitted")
    assert admitted is not None
    assert (admitted["status"], admitted["reason"]) == ("False", "PodRejected")
    assert [e.reason for e in rejected.events] == ["PodRejected"]
    assert waiting.wake_at == 110.0

    due = core.decide(dataclasses.replace(observed, memory=memory, monotonic=110.0), NOW)
    assert [p["metadata"]["name"] for p in due.create] == ["chat-0"]
    # A second refusal of the same generation doubles the wait.
    again = core.after_apply(
        due,
        core.Applied(refused={"team/chat": "violates PodSecurity"}),
        view=observed.view,
        monotonic=110.0,
        settings=observed.settings,
    )
    assert again.pod_rejections["team/chat"].retry_at == 130.0


def test_a_pod_on_a_node_that_is_gone_moves_and_the_move_is_reported_with_its_cause() -> None:
    running = service(status={"phase": "Running"})
    stranded = replica_pod("chat", "gone-node", annotations=None)
    observed = core.Observed(view([node("l40s-0")], [running], [stranded]), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    assert round_.evict == (
        core.Eviction("team", "chat-0", "team/chat", node_gone=True, cause=MoveReason.NODE),
    )
    # The replacement has the same name: it is created once the old pod is gone.
    assert round_.create == ()
    report = round_.disruptions.report([("team", "chat-0")])
    assert report.moves == {"NodeLost": 1}
    [moved] = report.events
    assert (moved.reason, moved.object.name) == ("Moved", "chat")
    assert "cause NodeLost" in moved.message
    # A refused eviction (a PodDisruptionBudget) reports nothing.
    assert core.Disruptions().report([]).events == ()
    assert round_.disruptions.report([]).moves == {}


def test_an_accounting_round_writes_statuses_against_the_last_plan_and_moves_nothing() -> None:
    observed = core.Observed(view([node("l40s-0")], [service()], []), monotonic=100.0)
    planned = core.decide(observed, NOW)
    between = core.account(
        dataclasses.replace(observed, memory=planned.memory, monotonic=160.0),
        NOW + timedelta(seconds=60),
    )
    assert between.plan is None
    assert (between.create, between.evict, dict(between.lower)) == ((), (), {})
    assert [s.key for s in between.workload_statuses] == ["team/chat"]
    assert core.account(observed, NOW).workload_statuses == ()  # no plan yet: nothing


def test_a_failed_round_says_so_once_per_object_and_cause() -> None:
    observed = core.Observed(view([node("l40s-0")], [service()], []))
    failed = core.failed_round(observed, RuntimeError("solver crashed"), NOW)
    [write] = failed.early_statuses
    assert write.status["phase"] == vocabulary.Phase.PENDING
    assert [e.reason for e in write.events] == [vocabulary.EventReason.PLAN_FAILED]
    again = core.failed_round(
        dataclasses.replace(observed, memory=failed.memory), RuntimeError("solver crashed"), NOW
    )
    assert again.early_statuses == ()
    assert core.succeeded(failed.memory).failure_reported == {}


def test_calibration_learns_only_from_replicas_whose_limit_held_through_the_reading() -> None:
    """A reading whose window saw an earlier limit says nothing about the current one: after a
    limit change a replica is not sampled until two rate windows have passed (seen as a 4,000
    tokens/s replica at 300 W measured at 200 W, the correction would be twice too high)."""
    running = service(status={"phase": "Running"})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    placement = Placement("team/chat", 0, "l40s-0", 1, "bf16", 200.0, 190.0, 2000.0)
    reading = TelemetrySnapshot(
        NOW,
        Source.MEASURED,
        False,
        "",
        pod_watts={("team", "chat-0"): Measurement(280.0, "DCGM_FI_DEV_POWER_USAGE")},
        pod_tokens_per_second={("team", "chat-0"): 4000.0},
    )

    def learned(applied_since: datetime) -> bool:
        memory = core.Memory(
            applied_placements=(placement,),
            applied_since={("team/chat", 0): applied_since},
        )
        round_ = core.decide(
            core.Observed(
                view([node("l40s-0")], [running], [pod]),
                memory=memory,
                monotonic=100.0,
                telemetry=core.Readings(snapshot=reading, rate_window_seconds=60.0),
            ),
            NOW,
        )
        return round_.metrics.corrections is not None

    assert learned(NOW - timedelta(minutes=10))
    assert not learned(NOW - timedelta(seconds=90))


def test_a_replica_keeps_its_applied_since_while_its_placement_stays_the_same() -> None:
    running = service(status={"phase": "Running"})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    observed = core.Observed(view([node("l40s-0")], [running], [pod]), monotonic=0.0)
    first = core.decide(observed, NOW)
    [key] = first.memory.applied_since
    assert first.memory.applied_since[key] == NOW
    later = NOW + timedelta(seconds=20)  # the agents' heartbeat (11:59:55) is still fresh
    again = core.decide(dataclasses.replace(observed, memory=first.memory), later)
    assert again.plan is not None
    assert first.plan is not None
    assert again.plan.placements == first.plan.placements
    assert again.memory.applied_since[key] == NOW
    moved = dataclasses.replace(
        first.memory,
        applied_placements=tuple(
            dataclasses.replace(p, power_limit_watts=p.power_limit_watts + 25.0)
            for p in first.memory.applied_placements
        ),
    )
    changed = core.decide(dataclasses.replace(observed, memory=moved), later)
    assert changed.memory.applied_since[key] == later


def test_the_shell_is_told_what_to_read_and_the_readings_make_the_energy_measured() -> None:
    accounted = {"energy": {"accountedUntil": "2026-12-05T11:58:00Z", "source": "measured"}}
    running = service(status={"phase": "Running", **accounted})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    observed = core.Observed(view([node("l40s-0")], [running], [pod]), monotonic=100.0)

    requests = core.telemetry_requests(observed, NOW)
    start = datetime(2026, 12, 5, 11, 58, tzinfo=UTC)
    assert requests.nodes == ("l40s-0",)
    assert requests.pods == (("team", "chat-0"),)
    assert requests.end == NOW
    assert dict(requests.energy) == {start: ((), (("team", "chat-0"),))}

    joules = {("team", "chat-0"): Measurement(36_000.0, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")}
    reading = EnergyReading(start, NOW, Source.MEASURED, False, "", pod_joules=joules)
    snapshot = TelemetrySnapshot(NOW, Source.MEASURED, False, "")
    readings = core.Readings(snapshot=snapshot, energy={start: reading}, rate_window_seconds=60.0)
    round_ = core.decide(dataclasses.replace(observed, telemetry=readings), NOW)
    [count] = round_.metrics.workload_energy
    assert (count.name, count.joules, count.source) == ("team/chat", 36_000.0, "measured")
    [status] = round_.workload_statuses
    assert status.write is not None
    assert status.write.status["energy"]["accountedUntil"] == "2026-12-05T12:00:00Z"
    # Without the reading (Prometheus did not answer in time) the same increment is modelled.
    modelled = core.decide(
        dataclasses.replace(observed, telemetry=core.Readings(snapshot=snapshot)), NOW
    )
    assert [c.source for c in modelled.metrics.workload_energy] == ["modelled"]


def test_a_round_prepares_its_input_once_for_the_readings_and_the_decision() -> None:
    built: list[datetime] = []
    snapshot_reader = core.build_input_function(30.0)

    def build_input(
        cluster: core.ClusterView,
        unconfirmed: frozenset[str],
        raising: Mapping[str, int],
        now: datetime,
    ) -> core.PlannedInput:
        built.append(now)
        return snapshot_reader(cluster, unconfirmed, raising, now)

    observed = core.Observed(view([node("l40s-0")], [service()], []), monotonic=100.0)
    prepared = core.prepare(observed, NOW, build_input=build_input)
    requests = core.telemetry_requests(observed, NOW, prepared=prepared)
    readings = core.Readings(snapshot=TelemetrySnapshot(NOW, Source.MEASURED, False, ""))
    round_ = core.decide(dataclasses.replace(observed, telemetry=readings), NOW, prepared=prepared)

    assert built == [NOW]
    assert requests.nodes == ("l40s-0",)
    alone = core.decide(dataclasses.replace(observed, telemetry=readings), NOW)
    assert [p["metadata"]["name"] for p in round_.create] == ["chat-0"]
    assert round_.create == alone.create
    assert [w.write.status for w in round_.workload_statuses if w.write] == [
        w.write.status for w in alone.workload_statuses if w.write
    ]
    # A preparation is for its round only.
    with pytest.raises(ValueError, match="not this round"):
        core.decide(observed, NOW + timedelta(seconds=1), prepared=prepared)


def _chat_reading(tokens: float, queued: float | None) -> core.Readings:
    pod = ("team", "chat-0")
    snapshot = TelemetrySnapshot(
        NOW,
        Source.MEASURED,
        False,
        "",
        pod_tokens_per_second={pod: tokens},
        pod_queued_tokens={} if queued is None else {pod: queued},
    )
    return core.Readings(snapshot=snapshot, rate_window_seconds=60.0)


def test_a_queued_backlog_sizes_the_service_above_what_it_served() -> None:
    running = service(status={"phase": "Running"})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    observed = core.Observed(
        view([node("l40s-0")], [running], [pod]),
        monotonic=100.0,
        telemetry=_chat_reading(4000.0, queued=120_000.0),
    )
    round_ = core.decide(observed, NOW)
    # 4000 served + 120,000 waiting over the 60-s re-plan interval: served alone, 4000.
    assert round_.memory.demand.demand("team/chat", 100.0, None) == 6000.0


def test_a_demand_check_re_plans_a_service_whose_queue_outgrows_its_plan() -> None:
    running = service(status={"phase": "Running"})
    pod = replica_pod("chat", "l40s-0", annotations=None)
    cluster = view([node("l40s-0")], [running], [pod])
    planned = core.decide(
        core.Observed(cluster, monotonic=100.0, telemetry=_chat_reading(50.0, queued=0.0)), NOW
    )
    last = planned.memory.last_round
    assert last is not None
    capacity = sum(p.expected_throughput for p in last.plan.placements)

    # Serving what the plan gave it, no queue: no re-plan before the periodic one.
    calm = core.check_demand(
        core.Observed(
            cluster,
            memory=planned.memory,
            monotonic=115.0,
            telemetry=_chat_reading(capacity * 0.9, queued=0.0),
        )
    )
    assert not calm.replan_soon
    assert calm.plan is None
    assert (calm.create, calm.evict) == ((), ())

    # At capacity with a queue worth a fifth of it over an interval: re-plan now.
    busy = core.check_demand(
        core.Observed(
            cluster,
            memory=calm.memory,
            monotonic=130.0,
            telemetry=_chat_reading(capacity, queued=capacity * 60 * 0.2),
        )
    )
    assert busy.replan_soon
    # The reading is in the next memory: the re-plan sizes for it.
    # Its peak (capacity plus a fifth) plus two standard deviations of the window's readings.
    readings = [50.0, capacity * 0.9, capacity * 1.2]
    assert busy.memory.demand.demand("team/chat", 130.0, None) == pytest.approx(
        capacity * 1.2 + 2 * statistics.pstdev(readings)
    )
    # A stale reading (Prometheus down) asks for nothing.
    stale = core.check_demand(
        core.Observed(
            cluster,
            memory=planned.memory,
            monotonic=130.0,
            telemetry=core.Readings(
                snapshot=TelemetrySnapshot(NOW, Source.MODELLED, True, "down", unavailable=True)
            ),
        )
    )
    assert not stale.replan_soon


def test_a_service_replica_moved_by_its_spec_is_handed_over_make_before_break() -> None:
    a100 = node("a100-0")
    a100["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-A100-SXM4-80GB"
    chat = service(status={"phase": "Running"})
    chat["spec"]["gpu"]["products"] = ["NVIDIA-L40S"]
    old = replica_pod("chat", "a100-0", annotations=None)
    old["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    old["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    observed = core.Observed(view([node("l40s-0"), a100], [chat], [old]), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    # The replacement comes first, under the replica's other name; the old pod stays, at its
    # limit, and the workload stays Running.
    assert round_.evict == ()
    assert round_.delete == ()
    assert round_.moving == ()
    [new] = round_.create
    assert new["metadata"]["name"] == "chat-0-h"
    assert new["metadata"]["annotations"]["wattsched.io/replaces"] == "chat-0"
    kept = {**round_.lower, **round_.raise_}.get("a100-0")
    assert kept is None or kept.pods.get(("team", "chat-0")) == 300.0
    report = round_.disruptions.report([])
    assert report.moves == {"SpecChanged": 1}
    [moved] = report.events
    assert (moved.reason, moved.type) == ("Moved", "Normal")
    assert "make-before-break" in moved.message
    assert "chat-0: a100-0 -> l40s-0" in moved.message

    # The replacement is Ready: the old pod goes, with no Moving status and no second Event.
    new = {**new, "spec": {**new["spec"], "nodeName": "l40s-0"}}
    new["metadata"] = {**new["metadata"], "creationTimestamp": "2026-12-05T11:59:00Z"}
    new["status"] = {
        "phase": "Running",
        "startTime": "2026-12-05T11:59:00Z",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    observed = core.Observed(
        view([node("l40s-0"), a100], [chat], [old, new]), memory=round_.memory, monotonic=200.0
    )
    round_ = core.decide(observed, NOW)
    assert [(e.namespace, e.name, e.cause) for e in round_.evict] == [
        ("team", "chat-0", MoveReason.SPEC)
    ]
    assert round_.create == ()
    assert round_.moving == ()
    report = round_.disruptions.report([("team", "chat-0")])
    assert report.events == ()
    assert report.moves == {}


def test_a_replacement_not_ready_in_time_is_deleted_and_says_so() -> None:
    a100 = node("a100-0")
    a100["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-A100-SXM4-80GB"
    chat = service(status={"phase": "Running"})
    chat["spec"]["gpu"]["products"] = ["NVIDIA-L40S"]
    old = replica_pod("chat", "a100-0", annotations=None)
    old["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    new = replica_pod("chat", "l40s-0", annotations={"wattsched.io/replaces": "chat-0"})
    new["metadata"]["name"] = "chat-0-h"
    new["metadata"]["creationTimestamp"] = "2026-12-05T11:40:00Z"
    new["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    observed = core.Observed(view([node("l40s-0"), a100], [chat], [old, new]), monotonic=100.0)
    round_ = core.decide(observed, NOW)

    assert round_.delete == (core.Deletion("team", "chat-0-h"),)
    assert round_.evict == ()
    [warning] = round_.disruptions.report([]).events
    assert (warning.reason, warning.type) == ("ReplacementNotReady", "Warning")
    assert "not Ready 1200 s after its creation" in warning.message


def test_a_replica_that_spans_nodes_is_never_handed_over() -> None:
    a100s = [node(f"a100-{i}") for i in range(2)]
    for a100 in a100s:
        a100["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-A100-SXM4-80GB"
    chat = service(status={"phase": "Running"})
    chat["spec"]["gpu"] = {"count": 4, "nodesPerReplica": 2, "products": ["NVIDIA-L40S"]}
    pods = []
    for rank, a100 in enumerate(a100s):
        pod = replica_pod("chat", a100["metadata"]["name"], annotations=None)
        pod["metadata"]["name"] = "chat-0" if rank == 0 else "chat-0-w1"
        pod["metadata"]["labels"]["wattsched.io/rank"] = str(rank)
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        pods.append(pod)
    nodes = [node("l40s-0"), node("l40s-1"), *a100s]
    round_ = core.decide(core.Observed(view(nodes, [chat], pods), monotonic=100.0), NOW)

    # The whole replica moves, break-before-make: both pods go, none is created under `-h`.
    assert {e.name for e in round_.evict} == {"chat-0", "chat-0-w1"}
    assert not any(p["metadata"]["name"].endswith("-h") for p in round_.create)
    assert round_.disruptions.handovers.started == {}


def test_what_decides_a_status_stays_the_same_in_rounds_that_see_the_same_and_moves_with_it() -> (
    None
):
    """The key the writer skips an unchanged status by (`WorkloadStatus.inputs`)."""

    def inputs_of(
        workload: dict[str, Any],
        pods: list[dict[str, Any]],
        nodes: list[dict[str, Any]],
        now: datetime,
    ) -> int | None:
        round_ = core.decide(core.Observed(view(nodes, [workload], pods), monotonic=100.0), now)
        [status] = round_.workload_statuses
        assert status.inputs is not None
        return status.inputs(workload)

    def versioned(body: dict[str, Any], version: str) -> dict[str, Any]:
        return {**body, "metadata": {**body["metadata"], "resourceVersion": version}}

    chat = versioned(service(), "1")
    waiting = inputs_of(chat, [], [], NOW)
    assert waiting is not None
    assert inputs_of(chat, [], [], NOW) == waiting  # another round, the same
    # A minute on, accounting is due (the status has no energy yet): its figures move.
    assert inputs_of(chat, [], [], NOW + timedelta(minutes=1)) != waiting
    assert inputs_of(versioned(service(), "2"), [], [], NOW) != waiting
    placed = inputs_of(chat, [], [node("l40s-0")], NOW)
    assert placed not in {waiting, None}
    pod = versioned(replica_pod("chat", "l40s-0", annotations=None), "5")
    running = inputs_of(chat, [pod], [node("l40s-0")], NOW)
    assert running not in {placed, None}
    assert inputs_of(chat, [versioned(pod, "6")], [node("l40s-0")], NOW) != running
    assert inputs_of(service(), [], [], NOW) is None  # no resourceVersion: no key


def test_calibration_compares_each_sample_through_the_corrections_its_placement_had() -> None:
    """Four fine-tuning replicas measure 0.6 of the catalogue's tokens/s, round after round,
    with a calibrator that takes each reading whole (smoothing 1). The placements a round
    samples were planned with the corrections of the round before, so each sample is compared
    with the model through those: the correction is 0.6 from the first reading on. (Compared
    through the corrections learned since, a correction that fell reads the next samples as
    slower still: 0.6, 0.5, 0.5, 0.6, 0.72.)"""
    truth = 0.6
    base = CatalogueModel()
    product = normalise_product("NVIDIA-L40S")
    jobs = [fine_tuning(f"tune-{i}") for i in range(4)]
    memory = core.Memory(calibrator=Calibrator(smoothing=1.0))
    factors = []
    for step in range(6):
        now = NOW + timedelta(minutes=10 * step)
        pods, watts, tokens = [], {}, {}
        for placement in memory.applied_placements:
            name = placement.workload.split("/")[1]
            pod = replica_pod(name, placement.node, annotations=None)
            pods.append(pod)
            key = ("team", pod["metadata"]["name"])
            watts[key] = Measurement(
                base.expected_power_watts(
                    product, WorkloadType.FINE_TUNING, placement.power_limit_watts
                ),
                "DCGM_FI_DEV_POWER_USAGE",
            )
            tokens[key] = truth * base.throughput_tokens_per_second(
                product, WorkloadType.FINE_TUNING, 8, 1, 1.0, placement.power_limit_watts
            )
        reading = TelemetrySnapshot(
            now, Source.MEASURED, False, "", pod_watts=watts, pod_tokens_per_second=tokens
        )
        cluster = view([node("l40s-0")], jobs, pods)
        agent = cluster.profiles["l40s-0"]["status"]["agent"]
        agent["heartbeatTime"] = (now - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        round_ = core.decide(
            core.Observed(
                cluster,
                memory=memory,
                monotonic=600.0 * step,
                telemetry=core.Readings(snapshot=reading, rate_window_seconds=60.0),
            ),
            now,
        )
        assert round_.plan is not None
        assert len(round_.plan.placements) == 4
        memory = round_.memory
        correction = memory.calibrator.corrections().get((product, WorkloadType.FINE_TUNING))
        if correction is not None:
            factors.append(correction.throughput_factor)
    assert factors == pytest.approx([truth] * 5)
