"""Thin watch-event handlers: record events in the cache and mark the plan dirty when it matters.

EnergyBudgets, nodes and NodePowerProfiles come from kopf (async functions of kopf's keyword
arguments); LLMWorkloads and the operator's pods from the operator's own watches (`watch`, which
calls `workload_event` and `pod_event` with compact bodies): kopf is handed neither. Every handler
hands the event to `record`, a plain function tests call directly. Whether an event matters is
decided by `fingerprint`: the parts of an object the plan depends on (spec, membership,
readiness), not heartbeats or the statuses the operator writes itself; `departure` and
`confirmation` tell the loop when a change is only a workload leaving or an agent confirming
limits (the loop lets those settle into one plan).

Nothing puts a finalizer on LLMWorkloads (and `remove_old_finalizer` takes off the one older
versions put there, `wattsched.io/release-power`): a deleted workload goes at once, and
kube-controller-manager's garbage collector deletes its pods (each carries an ownerReference to
it), as for any owned pod. Nothing needed the workload to stay: a plan counts only the pods of
live workloads, so the GPUs of a deleted workload's pods are planned idle from the first round
after the deletion, whether the pods are gone yet or not, as they were while the finalizer ran;
a round that still finds such a pod deletes it (`desired.pod_changes`), so the pods go even without
the garbage collector.

Without the finalizer no update marks a workload as going before its pods go, and the operator's
pod watch can be ahead of its workload watch (two watches, each with its own stream): a round
would then create again the pods and Service of a workload that is gone (measured: 0.66 pods per
workload in a deletion of 300). So a pod deleted while the cache still holds its workload as live
(the first event that shows it going, or its deletion) makes the handler ask the API server for
the workload (`forget_if_gone`, one GET); a workload that is gone (or was re-created: another
uid) leaves the cache at once, and the watch's late events of it are ignored
(`OperatorMemo.gone`) until its own DELETED comes. Planning is `loop`'s job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from wattsched_api.nodepowerprofile import Holder
from wattsched_api.vocabulary import RELEASE_POWER_FINALIZER, TERMINAL_PHASES
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
from wattsched_operator.kube import (
    HTTP_NOT_FOUND,
    JSON_PATCH,
    Kube,
    KubeError,
    workloads_path,
)
from wattsched_operator.rounds import is_deleting

logger = logging.getLogger("wattsched.operator")


@dataclass
class OperatorMemo:
    """What the handlers share with the planning loop (kopf passes it as `memo`)."""

    cache: ClusterCache
    kube: Kube
    # Namespaces whose LLMWorkloads and pods this operator serves; empty means all.
    namespaces: frozenset[str] = frozenset()
    # Workloads found gone (key -> uid) whose DELETED watch event has not come yet.
    gone: dict[str, str] = field(default_factory=dict)

    def serves(self, body: Mapping[str, Any]) -> bool:
        namespace = (body.get("metadata") or {}).get("namespace")
        return not self.namespaces or namespace is None or namespace in self.namespaces


def fingerprint(kind: str, body: Mapping[str, Any]) -> object:
    """The parts of an object a plan depends on; a change in them makes the plan dirty."""
    meta = body.get("metadata") or {}
    deleting = is_deleting(body)
    if kind in {WORKLOADS, BUDGETS}:
        phase = (body.get("status") or {}).get("phase")
        # Of a workload's status a plan reads only whether it ended (and its progress, which
        # the round timer re-plans): its other phases are the operator's own output.
        if kind == WORKLOADS:
            return (meta.get("generation"), deleting, phase in TERMINAL_PHASES)
        return (meta.get("generation"), deleting, phase)
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
    agent applied and the generation it observed (which the round that wrote them waited for, or
    counted as on their way: a raise),
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


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


async def forget_if_gone(state: OperatorMemo, pod: Mapping[str, Any]) -> bool:
    """For a pod going (deleted, or being deleted) whose workload the cache holds as live:
    whether the API server still has that workload (same uid); if not, remove it from the cache
    and remember it as gone. Returns whether it was removed. An API error leaves the cache."""
    meta = pod.get("metadata") or {}
    namespace, name = meta.get("namespace"), (meta.get("labels") or {}).get(LABEL_WORKLOAD)
    key = f"{namespace}/{name}"
    owner = state.cache.get(WORKLOADS, key)
    if owner is None or is_deleting(owner):
        return False
    try:
        found = await asyncio.to_thread(state.kube.get, workloads_path(str(namespace), str(name)))
    except KubeError as error:
        if error.status != HTTP_NOT_FOUND:
            return False
        found = None
    if found is not None and _uid(found) == _uid(owner):
        return False
    state.gone[key] = _uid(owner)
    record(state.cache, WORKLOADS, "DELETED", owner)
    return True


async def workload_event(
    state: OperatorMemo, event_type: str | None, body: Mapping[str, Any]
) -> None:
    """One LLMWorkload event from the operator's own watch (`watch`), its body compact."""
    if not state.serves(body):
        return
    key = object_key(body)
    if key in state.gone and state.gone[key] == _uid(body):
        if event_type == "DELETED":
            del state.gone[key]
        return  # the watch is behind: the workload is already gone from the cache
    if event_type != "DELETED" and RELEASE_POWER_FINALIZER in _finalizers(body):
        await remove_old_finalizer(state, body)
    record(state.cache, WORKLOADS, event_type, body)


def _finalizers(body: Mapping[str, Any]) -> list[Any]:
    return list((body.get("metadata") or {}).get("finalizers") or [])


async def remove_old_finalizer(state: OperatorMemo, body: Mapping[str, Any]) -> None:
    """Take the finalizer older versions put on LLMWorkloads (`wattsched.io/release-power`) off
    `body` with a JSON patch that first tests it is still where it was (another controller's
    finalizers stay). A failure is logged; the workload's next event (or the next list) tries
    again."""
    meta = body.get("metadata") or {}
    index = _finalizers(body).index(RELEASE_POWER_FINALIZER)
    path = f"/metadata/finalizers/{index}"
    patch = [
        {"op": "test", "path": path, "value": RELEASE_POWER_FINALIZER},
        {"op": "remove", "path": path},
    ]
    target = workloads_path(str(meta.get("namespace")), str(meta.get("name")))
    try:
        await asyncio.to_thread(
            state.kube.request, "PATCH", target, patch, content_type=JSON_PATCH, parse=False
        )
    except KubeError as error:
        logger.info("could not remove %s from %s: %s", RELEASE_POWER_FINALIZER, target, error)


@kopf.on.event(GROUP, VERSION, "energybudgets")
async def budget_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, BUDGETS, event.get("type"), event["object"])


@kopf.on.event(GROUP, VERSION, "nodepowerprofiles")
async def profile_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, PROFILES, event.get("type"), event["object"])


@kopf.on.event("", "v1", "nodes")
async def node_event(*, event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    record(_memo(memo).cache, NODES, event.get("type"), event["object"])


async def pod_event(state: OperatorMemo, event_type: str | None, body: Mapping[str, Any]) -> None:
    """One event of an operator pod (labelled `wattsched.io/workload`) from the operator's own
    watch (`watch`), its body compact."""
    if state.serves(body):
        before = state.cache.get(PODS, object_key(body))
        going = event_type == "DELETED" or is_deleting(body)
        if going and (before is None or not is_deleting(before)):  # the first sign of it
            await forget_if_gone(state, body)
        record(state.cache, PODS, event_type, body)
