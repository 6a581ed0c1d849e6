"""The operator's in-memory view of the cluster, fed by kopf's watch events.

Holds the latest body of every LLMWorkload, EnergyBudget, GPU node, NodePowerProfile and operator
pod, and a dirty flag that tells the planning loop something changed (with `Changes`: when, and
whether it was only departures and confirmations, which the loop lets settle before planning).
Handlers only write here; the loop reads a consistent copy (`view()`). Not a source of truth: a
periodic full list (`replace`) heals anything a paused or restarted watch missed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wattsched_api.vocabulary import GPU_RESOURCE
from wattsched_operator.core import Body, ClusterView

__all__ = ["Body", "ClusterView"]

WORKLOADS = "llmworkloads"
BUDGETS = "energybudgets"
NODES = "nodes"
PROFILES = "nodepowerprofiles"
PODS = "pods"
KINDS = (WORKLOADS, BUDGETS, NODES, PROFILES, PODS)


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


# Strings up to this length are interned: keys, enum values, condition types, names and times
# repeat across thousands of objects, and one copy of each halves a cached workload's memory.
_INTERNED_MAX_LENGTH = 64


# Levels `_compact` descends (two Python frames each): every well-formed object is shallower, and
# below this a value is kept as it came, so a hostile object thousands of levels deep (the API
# server accepts up to 10,000) cannot exhaust the stack here.
_COMPACT_MAX_DEPTH = 64


def _compact(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value whose keys and short strings are interned (shared)."""
    if depth >= _COMPACT_MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {sys.intern(k): _compact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v, depth + 1) for v in value]
    if isinstance(value, str) and len(value) <= _INTERNED_MAX_LENGTH:
        return sys.intern(value)
    return value


def slim(kind: str, body: Mapping[str, Any]) -> Body:
    """The parts of an object the operator reads, compact; the rest is dropped to keep memory small.

    Every kind loses `metadata.managedFields` and kubectl's last-applied annotation (a second
    copy of the spec). Pods keep only identity, labels, annotations, owner, node, their
    containers' names, env and GPU requests, and their phase, start time, conditions and
    container states and restart counts. Keys and short strings are interned, so the many objects
    of a large cluster share them.
    """
    slimmed: Body = _compact(_slim(kind, body))
    return slimmed


def _slim(kind: str, body: Mapping[str, Any]) -> Body:
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    slimmed = {**body, "metadata": meta}
    if kind != PODS:
        return slimmed
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        "metadata": meta,
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": [
                {"name": c.get("name"), "env": c.get("env") or [], **_gpu_resources(c)}
                for c in spec.get("containers") or []
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "startTime": status.get("startTime"),
            "reason": status.get("reason"),
            "message": status.get("message"),
            "conditions": [
                {"type": c.get("type"), "status": c.get("status")}
                for c in status.get("conditions") or []
            ],
            "containerStatuses": [
                {
                    "name": c.get("name"),
                    "state": c.get("state") or {},
                    "restartCount": c.get("restartCount") or 0,
                }
                for c in status.get("containerStatuses") or []
            ],
        },
    }


def _gpu_resources(container: Mapping[str, Any]) -> dict[str, Any]:
    """A container's `nvidia.com/gpu` requests and limits, when it has any."""
    resources = container.get("resources") or {}
    kept = {
        section: {GPU_RESOURCE: amounts[GPU_RESOURCE]}
        for section in ("requests", "limits")
        if isinstance(amounts := resources.get(section), Mapping) and GPU_RESOURCE in amounts
    }
    return {"resources": kept} if kept else {}


def object_key(body: Mapping[str, Any]) -> str:
    """`namespace/name` for namespaced objects, `name` for cluster-scoped ones."""
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


@dataclass
class Changes:
    """The changes since the planning loop last took them: when the first and the last came, and
    whether every one can settle: a departure (a workload being deleted or gone, a pod of such a
    workload) or an agent confirming the limits the operator wrote.

    Departures free GPUs and power, but nothing waits on them (the finalizer removes the pods
    itself), and a round that changed limits already waited for their confirmations. So while only
    such changes arrive, the loop lets them settle and plans once for many (`settle_seconds`)
    instead of re-planning the rest of the cluster per workload leaving, and again for the
    confirmations of each of those plans.
    """

    first_monotonic: float | None = None
    last_monotonic: float | None = None
    settling_only: bool = True

    def note(self, monotonic: float, *, settles: bool) -> None:
        if self.first_monotonic is None:
            self.first_monotonic = monotonic
        self.last_monotonic = monotonic
        self.settling_only = self.settling_only and settles

    def settle_seconds(
        self, monotonic: float, *, quiet_seconds: float, longest_seconds: float
    ) -> float:
        """How much longer the loop waits before planning: none unless every change so far can
        settle; then until `quiet_seconds` passed without one, at most `longest_seconds` after the
        first (a mass deletion still releases power as it goes)."""
        if self.first_monotonic is None or self.last_monotonic is None or not self.settling_only:
            return 0.0
        quiet_at = self.last_monotonic + quiet_seconds
        latest = self.first_monotonic + longest_seconds
        return max(0.0, min(quiet_at, latest) - monotonic)


@dataclass
class ClusterCache:
    objects: dict[str, dict[str, Body]] = field(default_factory=lambda: {k: {} for k in KINDS})
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    changes: Changes = field(default_factory=Changes)
    # Bumped on every change; the loop compares it to skip statuses nothing touched.
    version: int = 0

    def upsert(self, kind: str, body: Mapping[str, Any]) -> None:
        self.objects[kind][object_key(body)] = slim(kind, body)
        self.version += 1

    def remove(self, kind: str, body: Mapping[str, Any]) -> None:
        self.objects[kind].pop(object_key(body), None)
        self.version += 1

    def replace(self, kind: str, slimmed_bodies: Iterable[Body]) -> None:
        """Replace everything of one kind with a fresh list from the API server, each body
        already `slim` (the list slims page by page: `Kube.list(..., keep=...)`)."""
        self.objects[kind] = {object_key(b): b for b in slimmed_bodies}
        self.version += 1

    def get(self, kind: str, key: str) -> Body | None:
        return self.objects[kind].get(key)

    def mark_dirty(self, *, settles: bool = False) -> None:
        """Something a plan depends on changed; `settles`: only a workload leaving or an agent
        confirming limits (see `Changes`)."""
        self.changes.note(time.monotonic(), settles=settles)
        self.dirty.set()

    def take_changes(self) -> Changes:
        """The changes noted so far, starting a new record; the loop clears `dirty` with it."""
        taken, self.changes = self.changes, Changes()
        self.dirty.clear()
        return taken

    def view(self) -> ClusterView:
        # Bodies are replaced on every event and never changed in place: a shallow copy is enough.
        snap = {kind: dict(objs) for kind, objs in self.objects.items()}
        return ClusterView(
            workloads=snap[WORKLOADS],
            budgets=snap[BUDGETS],
            nodes=snap[NODES],
            profiles=snap[PROFILES],
            pods=snap[PODS],
        )
