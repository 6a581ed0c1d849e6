"""Thin kopf handlers: record watch events in the cache and mark the plan dirty when it matters.

Every handler is an async function of kopf's keyword arguments that hands the event to `record`, a
plain function tests call directly. Whether an event matters is decided by `fingerprint`: the parts
of an object the plan depends on (spec, membership, readiness), not heartbeats or the statuses the
operator writes itself; `departure` and `confirmation` tell the loop when a change is only a
workload leaving or an agent confirming limits (the loop lets those settle into one plan). The
LLMWorkload deletion handler is the finalizer: it removes the workload's pods and waits for them to
go, and the next plan releases their power. Planning is `loop`'s job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from wattsched_api.nodepowerprofile import Holder
from wattsched_operator.cache import (
    BUDGETS,
    NODES,
    PODS,
    PROFILES,
    WORKLOADS,
    ClusterCache,
    object_key,
)
from wattsched_operator.desired import GPU_RESOURCE, GROUP, LABEL_WORKLOAD, VERSION
from wattsched_operator.kube import Kube, pods_path
from wattsched_operator.rounds import is_deleting


@dataclass
class OperatorMemo:
    """What the handlers share with the planning loop (kopf passes it as `memo`)."""

    cache: ClusterCache
    kube: Kube
    # Namespaces whose LLMWorkloads and pods this operator serves; empty means all.
    namespaces: frozenset[str] = frozenset()

    def serves(self, body: Mapping[str, Any]) -> bool:
        namespace = (body.get("metadata") or {}).get("namespace")
        return not self.namespaces or namespace is None or namespace in self.namespaces


def fingerprint(kind: str, body: Mapping[str, Any]) -> object:
    """The parts of an object a plan depends on; a change in them makes the plan dirty."""
    meta = body.get("metadata") or {}
    deleting = is_deleting(body)
    if kind in {WORKLOADS, BUDGETS}:
        return (meta.get("generation"), deleting, (body.get("status") or {}).get("phase"))
    if kind == NODES:
        status = body.get("status") or {}
        ready = next(
            (c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
            None,
        )
        labels = tuple(sorted((meta.get("labels") or {}).items()))
        gpus = (status.get("allocatable") or {}).get(GPU_RESOURCE)
        taints = tuple(
            (t.get("key"), t.get("effect")) for t in (body.get("spec") or {}).get("taints") or []
        )
        unschedulable = (body.get("spec") or {}).get("unschedulable")
        return (labels, gpus, ready, taints, unschedulable, deleting)
    if kind == PROFILES:
        status = body.get("status") or {}
        return (
            (status.get("agent") or {}).get("ready"),
            status.get("observedGeneration"),
            (status.get("deviceMapping") or {}).get("source"),
            tuple(
                (g.get("index"), g.get("appliedWatts"), g.get("holder"), g.get("maxWatts"))
                for g in status.get("gpus") or []
            ),
        )
    if kind == PODS:
        status = body.get("status") or {}
        ready = next(
            (c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
            None,
        )
        return (status.get("phase"), (body.get("spec") or {}).get("nodeName"), ready, deleting)
    raise ValueError(f"unknown kind {kind!r}")


def departure(
    cache: ClusterCache, kind: str, event_type: str | None, body: Mapping[str, Any]
) -> bool:
    """Whether an event only says that a workload is leaving: the workload being deleted or gone,
    or a pod of a workload being deleted or no longer known. A pod lost by a workload that stays
    is not (its replica must be placed again)."""
    if kind == WORKLOADS:
        return event_type == "DELETED" or is_deleting(body)
    if kind == PODS:
        meta = body.get("metadata") or {}
        name = (meta.get("labels") or {}).get(LABEL_WORKLOAD)
        owner = cache.get(WORKLOADS, f"{meta.get('namespace')}/{name}")
        return owner is None or is_deleting(owner)
    return False


def confirmation(kind: str, before: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """Whether a profile changed only in what follows the operator's own writes: the limits its
    agent applied and the generation it observed (which the round that wrote them waited for),
    and GPUs passing between free and held by wattsched's pods (which the pods' own events
    report). A GPU taken by another team's pod, an agent going away, a new mapping are not."""
    if kind != PROFILES or before is None:
        return False

    def lasting(profile: Mapping[str, Any]) -> object:
        status = profile.get("status") or {}
        return (
            (status.get("agent") or {}).get("ready"),
            (status.get("deviceMapping") or {}).get("source"),
            tuple(
                (g.get("index"), g.get("holder") == Holder.OTHER, g.get("maxWatts"))
                for g in status.get("gpus") or []
            ),
        )

    return lasting(before) == lasting(body)


def record(cache: ClusterCache, kind: str, event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Store one watch event; mark the plan dirty if the event changes what a plan depends on.

    Returns whether it did. `event_type` is the watch event's type (None for the initial listing).
    """
    before = cache.get(kind, object_key(body))
    deleted = event_type == "DELETED"
    if deleted:
        cache.remove(kind, body)
        changed = before is not None
    else:
        cache.upsert(kind, body)
        changed = before is None or fingerprint(kind, before) != fingerprint(kind, body)
    if changed:
        # Only for a change that counts: a heartbeat or the operator's own status looks nothing up.
        settles = departure(cache, kind, event_type, body) or (
            not deleted and confirmation(kind, before, body)
        )
        cache.mark_dirty(settles=settles)
    return changed


def _memo(memo: Any) -> OperatorMemo:
    state = memo.state
    assert isinstance(state, OperatorMemo)
    return state


@kopf.on.event(GROUP, VERSION, "llmworkloads")
async def workload_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    state = _memo(memo)
    if state.serves(event["object"]):
        record(state.cache, WORKLOADS, event.get("type"), event["object"])


@kopf.on.event(GROUP, VERSION, "energybudgets")
async def budget_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, BUDGETS, event.get("type"), event["object"])


@kopf.on.event(GROUP, VERSION, "nodepowerprofiles")
async def profile_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, PROFILES, event.get("type"), event["object"])


@kopf.on.event("", "v1", "nodes")
async def node_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, NODES, event.get("type"), event["object"])


@kopf.on.event("", "v1", "pods", labels={LABEL_WORKLOAD: kopf.PRESENT})
async def pod_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    state = _memo(memo)
    if state.serves(event["object"]):
        record(state.cache, PODS, event.get("type"), event["object"])


# How long the finalizer waits for a deleted workload's pods to go, watching the cache (no API
# calls), before handing back to kopf: each kopf retry writes its progress on the object.
RELEASE_WAIT_SECONDS = 60.0
RELEASE_POLL_SECONDS = 0.2


@kopf.on.delete(GROUP, VERSION, "llmworkloads")
async def release_workload(*, name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    """Finalizer: delete the workload's pods and wait for them to go (the next plan lowers the
    freed limits; the deletion's watch event already made the plan dirty, as a departure). The
    wait looks up the pods in the cache, so deleting a workload writes no retries, and a thousand
    waits copy nothing."""
    state = _memo(memo)
    assert namespace is not None, "LLMWorkloads are namespaced"
    if state.namespaces and namespace not in state.namespaces:
        return
    pods = await _delete_pods(state, namespace, name)
    deadline = asyncio.get_running_loop().time() + RELEASE_WAIT_SECONDS
    while pods:
        if any(state.cache.get(PODS, f"{namespace}/{pod}") is not None for pod in pods):
            if asyncio.get_running_loop().time() > deadline:
                raise kopf.TemporaryError(
                    f"waiting for {len(pods)} pod(s) of {namespace}/{name} to go", delay=5
                )
            await asyncio.sleep(RELEASE_POLL_SECONDS)
            continue
        # The cache saw them go (or never saw them): the API server has the last word.
        pods = await _delete_pods(state, namespace, name)


async def _delete_pods(state: OperatorMemo, namespace: str, workload: str) -> set[str]:
    """Delete the workload's pods not already going; the names of all that are still there."""
    selector = f"{LABEL_WORKLOAD}={workload}"
    pods = await asyncio.to_thread(state.kube.list, pods_path(namespace), selector)
    for pod in pods:
        if not (pod.get("metadata") or {}).get("deletionTimestamp"):
            await asyncio.to_thread(
                state.kube.delete, pods_path(namespace, pod["metadata"]["name"])
            )
    return {pod["metadata"]["name"] for pod in pods}
