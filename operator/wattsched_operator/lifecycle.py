"""A round's pod lifecycle, before the solve: which workloads finished or failed for good,
which failed replica pods wait for their backoff (`wattsched.io/failures`,
`wattsched.io/retry-after`) or are replaced, and which workloads the API server refused a pod for
(`PodRejected`) or whose spec cannot be read (`InvalidSpec`). Pure: the failure bookkeeping it
decides is returned as patches and Events for the shell to write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from wattsched_api.meta import format_time, read_timestamp
from wattsched_api.vocabulary import (
    FAILURE_COUNTED_ANNOTATION,
    FAILURES_ANNOTATION,
    RETRY_AFTER_ANNOTATION,
    TERMINAL_PHASES,
    ConditionType,
    EventReason,
    Phase,
    PodPhase,
)
from wattsched_operator import (
    statuses,
)
from wattsched_operator.rounds import (
    POD_KIND,
    WORKLOAD_KIND,
    Body,
    ClusterView,
    Event,
    MetadataPatch,
    ObjectRef,
    PodRejection,
    Settings,
    StatusWrite,
    backoff_seconds,
    finished,
    gang_size,
    is_deleting,
    is_gang,
    pod_id,
)


def _pod_failure(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            return (
                f"container {container.get('name')} exited {terminated.get('exitCode')}"
                f" ({terminated.get('reason') or 'Error'})"
            )
    return str(status.get("reason") or status.get("message") or "pod failed")


@dataclass
class Lifecycle:
    """Per-workload facts gathered before planning: finished, failed for good, waiting to retry,
    and the failure bookkeeping to write (annotations and Events)."""

    succeeded: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    delete_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    wake_at: float | None = None
    patches: list[MetadataPatch] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)


def advance(
    view: ClusterView,
    pods_by_workload: Mapping[str, list[Body]],
    now: datetime,
    monotonic: float,
    settings: Settings,
) -> Lifecycle:
    """Completion and failure handling: retries with backoff, then Failed."""
    life = Lifecycle()
    for key, body in view.workloads.items():
        phase = (body.get("status") or {}).get("phase")
        pods = pods_by_workload.get(key, [])
        if phase in TERMINAL_PHASES or is_deleting(body):
            life.keep_pods.update(pod_id(p) for p in pods if finished(p))
            continue
        views = [statuses.PodView.from_pod(p) for p in pods]
        done = statuses.succeeded_replicas(views)
        if is_gang(body) and len(done) >= gang_size(body):
            life.succeeded.add(key)
            life.keep_pods.update(pod_id(p) for p in pods)
            continue
        life.keep_pods.update(
            pod_id(p) for p in pods if (p.get("status") or {}).get("phase") == PodPhase.SUCCEEDED
        )
        annotations = body["metadata"].get("annotations") or {}
        # The annotations are the operator's, but anyone who may edit the workload can
        # change them: a value that is not ours counts as none.
        failures_text = str(annotations.get(FAILURES_ANNOTATION, "0"))
        failures = int(failures_text) if failures_text.isdigit() else 0
        retry_after = annotations.get(RETRY_AFTER_ANNOTATION)
        for pod in pods:
            if (pod.get("status") or {}).get("phase") != PodPhase.FAILED:
                continue
            pod_annotations = pod["metadata"].get("annotations") or {}
            if FAILURE_COUNTED_ANNOTATION not in pod_annotations:
                failures += 1
                retry_moment = now + timedelta(
                    seconds=backoff_seconds(failures, settings.backoff_seconds)
                )
                retry_after = format_time(retry_moment)
                _count_failure(life, body, pod, failures, retry_after)
            if failures > settings.backoff_limit:
                life.failed[key] = (
                    f"replica pods failed {failures} times (limit "
                    f"{settings.backoff_limit}); last: {_pod_failure(pod)}"
                )
                break
            due = read_timestamp(retry_after) or now
            if now >= due:
                life.delete_pods.add(pod_id(pod))
            else:
                life.keep_pods.add(pod_id(pod))
                wake = monotonic + (due - now).total_seconds()
                life.wake_at = wake if life.wake_at is None else min(life.wake_at, wake)
    return life


def _count_failure(
    life: Lifecycle, workload: Body, pod: Body, failures: int, retry_after: str
) -> None:
    """Count a failed pod once: the workload's failure count and retry time, a mark on the pod,
    and a `ReplicaFailed` Event."""
    life.patches.append(
        MetadataPatch(
            ObjectRef.of(WORKLOAD_KIND, workload),
            {
                "metadata": {
                    "annotations": {
                        FAILURES_ANNOTATION: str(failures),
                        RETRY_AFTER_ANNOTATION: retry_after,
                    }
                }
            },
        )
    )
    life.patches.append(
        MetadataPatch(
            ObjectRef.of(POD_KIND, pod),
            {"metadata": {"annotations": {FAILURE_COUNTED_ANNOTATION: "true"}}},
        )
    )
    life.events.append(
        Event(
            ObjectRef.of(WORKLOAD_KIND, workload),
            "Warning",
            EventReason.REPLICA_FAILED,
            f"pod {pod['metadata']['name']} failed ({_pod_failure(pod)}); failure {failures}, "
            f"retry after {retry_after}",
        )
    )


def refused_pods(
    active: Mapping[str, Body], rejections: dict[str, PodRejection], monotonic: float
) -> dict[str, str]:
    """Workloads whose pods the API server refused for their current generation, and whose
    backoff has not yet run out (those due are planned again; they stay in `rejections` until a
    pod of theirs is accepted, so a new refusal doubles the wait). Drops from `rejections` the
    workloads that are gone or whose spec changed."""
    refused: dict[str, str] = {}
    for key, rejection in list(rejections.items()):
        body = active.get(key)
        if body is None or int(body["metadata"].get("generation") or 1) != rejection.generation:
            del rejections[key]  # deleted, or its spec changed: try again
            continue
        if monotonic >= rejection.retry_at:
            continue
        refused[key] = f"the API server refused its replica pod: {rejection.message}"
    return refused


def rejected_statuses(
    view: ClusterView, rejected: Mapping[str, str], now: datetime, *, reason: str
) -> list[StatusWrite]:
    """Mark workloads that cannot be admitted: Admitted=False with the error, and an Event."""
    writes = []
    for key, message in rejected.items():
        body = view.workloads.get(key)
        if body is None:
            continue
        previous = body.get("status") or {}
        admitted = statuses.find_condition(previous.get("conditions") or [], ConditionType.ADMITTED)
        if admitted is not None and admitted.get("message") == message:
            continue
        condition = statuses.condition(
            previous.get("conditions") or [],
            ConditionType.ADMITTED,
            False,
            reason,
            message,
            now=now,
            observed_generation=int(body["metadata"].get("generation") or 1),
        )
        # Pending with nothing placed: a placement written before (the spec changed, the pod
        # was refused) goes, so phase, conditions and placements agree. (Merge patch: None
        # removes a field.)
        status = {
            "phase": Phase.PENDING,
            "conditions": [condition],
            "message": message,
            "placements": None,
            "nodes": None,
            "variant": None,
            "replicas": None,
            "power": None,
        }
        ref = ObjectRef.of(WORKLOAD_KIND, body)
        writes.append(StatusWrite(ref, status, (Event(ref, "Warning", reason, message),)))
    return writes
