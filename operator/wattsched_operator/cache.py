"""The operator's in-memory view of the cluster, fed by kopf's watch events.

Holds the latest body of every LLMWorkload, EnergyBudget, GPU node, NodePowerProfile and operator
pod, and a dirty flag that tells the planning loop something changed (with `Changes`: when, and
whether it was only departures and confirmations, which the loop lets settle before planning).
Handlers only write here; the loop reads a consistent copy (`view()`). Cached bodies are read-only
and share every part that repeats across objects (`SharedValues`), so 10,000 workloads from a few
templates cost little more than their metadata. Not a source of truth: a periodic full list
(`replace`) heals anything a paused or restarted watch missed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wattsched_api.vocabulary import GPU_RESOURCE
from wattsched_operator.core import Body, ClusterView
from wattsched_operator.frozen import FrozenDict, FrozenList

__all__ = ["Body", "ClusterView", "FrozenDict", "FrozenList"]

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


# Levels `SharedValues.share` descends (two Python frames each): every well-formed object is
# shallower, and below this a value is kept as it came, so a hostile object thousands of levels
# deep (the API server accepts up to 10,000) cannot exhaust the stack here.
_COMPACT_MAX_DEPTH = 64

# Keys found only in an object's own metadata: a dict holding one is unique, never shared.
_UNIQUE_KEYS = frozenset({"uid", "resourceVersion"})


class SharedValues:
    """One read-only copy of every JSON object and array that repeats across cached bodies.

    Ten thousand workloads made from a few templates hold the same spec, the same conditions
    (written in the same round) and the same container lists; each distinct value is kept once,
    as a `FrozenDict` or `FrozenList`, keyed by its content (its children by identity, being shared
    already). Values nothing else holds any more are dropped whenever the table has doubled since
    the last sweep, so it stays in proportion to what the cache holds. Thread-safe: the planning
    loop's resync slims its lists in a worker thread while watch events arrive.
    """

    def __init__(self) -> None:
        self._table: dict[tuple[Any, ...], FrozenDict | FrozenList] = {}
        self._sweep_above = _SWEEP_MIN_ENTRIES
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._table)

    def share(self, value: Any) -> Any:
        """`value` with its objects and arrays frozen and shared, its keys and short strings
        interned. Objects holding a `uid` or `resourceVersion` (metadata) stay unshared."""
        with self._lock:
            shared, _ = self._share(value, 0)
            if len(self._table) > self._sweep_above:
                self._sweep()
            return shared

    def _share(self, value: Any, depth: int) -> tuple[Any, bool]:
        """The shared form of `value`, and whether others may share it (a value holding an
        unshared one is not: its key would name a copy no one else has)."""
        if isinstance(value, str):
            # A str subclass (a status's StrEnum phase or condition type) as the plain string
            # the API server would send: only exact strings can be interned.
            text = str.__str__(value)
            return (sys.intern(text) if len(text) <= _INTERNED_MAX_LENGTH else text), True
        if depth >= _COMPACT_MAX_DEPTH or not isinstance(value, dict | list):
            return value, not isinstance(value, dict | list)
        shareable = True
        children = []
        for child in value.values() if isinstance(value, dict) else value:
            shared, ok = self._share(child, depth + 1)
            children.append(shared)
            shareable = shareable and ok
        if isinstance(value, dict):
            keys = [sys.intern(k) if isinstance(k, str) else k for k in value]
            shareable = shareable and _UNIQUE_KEYS.isdisjoint(keys)
            if not shareable:
                return FrozenDict(zip(keys, children, strict=True)), False
            key: tuple[Any, ...] = (dict, *keys, *map(_identity, children))
            found = self._table.get(key)
            if found is None:
                self._table[key] = found = FrozenDict(zip(keys, children, strict=True))
            return found, True
        if not shareable:
            return FrozenList(children), False
        key = (list, *map(_identity, children))
        found = self._table.get(key)
        if found is None:
            self._table[key] = found = FrozenList(children)
        return found, True

    def _sweep(self) -> None:
        """Drop the values only the table holds (a parent first, then its children)."""
        while True:
            unused = [k for k in self._table if sys.getrefcount(self._table[k]) <= _TABLE_ONLY]
            for key in unused:
                del self._table[key]
            if not unused:
                break
        self._sweep_above = max(_SWEEP_MIN_ENTRIES, 2 * len(self._table))


# The table is swept once it holds more than this, or twice what the last sweep left.
_SWEEP_MIN_ENTRIES = 4096
# sys.getrefcount of a value only the table holds: the table's reference and the call's argument.
_TABLE_ONLY = 2


def _identity(value: Any) -> Any:
    """What stands for a shared value in its parent's key: containers (already shared) by
    identity, strings by content, other scalars by type and content (1, 1.0 and True differ)."""
    kind = type(value)
    if kind is str:
        return value
    if kind is FrozenDict or kind is FrozenList or kind is dict or kind is list:
        return id(value)
    return (kind, value)


_SHARED = SharedValues()


def shared(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """`value` read-only, with every object and array that repeats across the cache's bodies
    and other shared values kept once (`SharedValues`): for what is held a while, like the
    status writes waiting to go."""
    compact: Mapping[str, Any] = _SHARED.share(value)
    return compact


def slim(kind: str, body: Mapping[str, Any]) -> Body:
    """The parts of an object the operator reads, compact; the rest is dropped to keep memory small.

    Every kind loses `metadata.managedFields` and kubectl's last-applied annotation (a second
    copy of the spec). Pods keep only identity, labels, annotations, owner, node, their
    containers' names, env and GPU requests, and their phase, start time, conditions and
    container states and restart counts. Keys and short strings are interned, and every object or
    array that repeats across bodies (a template's spec, a round's conditions) is kept once: the
    result is read-only (`FrozenDict`, `FrozenList`; copy it to change it).
    """
    slimmed: Body = _SHARED.share(_slim(kind, body))
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

    Departures free GPUs and power, but nothing waits on them (the garbage collector removes the
    pods), and the rounds that changed limits already waited for the confirmations of their
    lowerings or counted their raises as on their way (`core.RaiseInFlight`). So while only
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

    def upsert(self, kind: str, body: Mapping[str, Any]) -> None:
        """Store `body`, made compact (`slim`) unless it is already (a `FrozenDict`)."""
        compact = body if isinstance(body, FrozenDict) else slim(kind, body)
        self.objects[kind][object_key(body)] = compact

    def remove(self, kind: str, body: Mapping[str, Any]) -> None:
        self.objects[kind].pop(object_key(body), None)

    def replace(self, kind: str, slimmed_bodies: Iterable[Body]) -> None:
        """Replace everything of one kind with a fresh list from the API server, each body
        already `slim` (the list slims page by page: `Kube.list(..., keep=...)`)."""
        self.objects[kind] = {object_key(b): b for b in slimmed_bodies}

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
