"""The budget-safe order of power-limit changes, as pure functions of current and planned limits.

Moving from one plan to the next must never let the sum of GPU power limits in a budget's scope
exceed its cap, not even for a moment. So limits change in two steps around the pod changes:
first every limit that goes down (or is unknown) is lowered and the agent must confirm it, then
pods are deleted and created, and only then do limits go up. Limits are per pod (the agent applies
a pod's limit to exactly the GPUs the kubelet gave it) plus one for idle GPUs, as in a
NodePowerProfile's spec. This module computes the two steps and reads an agent's confirmation (and
its last heartbeat) from a NodePowerProfile; it does not talk to the API server.

Why the lowering step is safe: every GPU ends up at or below both its current and its planned
limit. A pod in both the current spec and the plan gets the smaller of its planned limit, its spec
limit and the highest limit the agent reports on its GPUs; every other GPU (free, held by a pod the
plan drops, or by a pod not created yet) gets the idle limit, which is the smallest of the planned
one, the spec's and the highest applied on free GPUs. What the agent reports counts only once it
has read the spec's generation: before that its limits are an older spec's, below the spec only
where a raise is on its way (a raise is written after the lowering it needs was confirmed, so the
spec bounds every GPU), and lowering the spec to them would undo the raise and wait for it again.
GPUs of pods wattsched did not create are left alone in both steps (budgets count them at what they
run at), unless an EnergyBudget opts in to capping them (`NodeLimits.unmanaged_watts`): a new or
lower cap is written in the lowering step, a higher one or its removal in the raising step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from wattsched_api.meta import read_timestamp

# An agent's applied limit may differ from the requested one by rounding to NVML's milliwatts.
CONFIRM_TOLERANCE_WATTS = 0.5
# status.deviceMapping.source values under which the agent set limits (see the CRD).
MAPPED_SOURCES = frozenset({"PodResources", "LastKnown"})

PodKey = tuple[str, str]  # (namespace, pod name)


@dataclass(frozen=True)
class NodeLimits:
    """A NodePowerProfile spec in numbers: a limit per wattsched pod and one for idle GPUs, and the
    SM clock range (MHz) to lock some pods' GPUs to (a clock is not a cap: the steps below order
    limits only; clocks ride along with the final limits)."""

    idle_watts: float | None
    pods: Mapping[PodKey, float] = field(default_factory=dict)
    clocks: Mapping[PodKey, tuple[int, int]] = field(default_factory=dict)
    # Limit for GPUs held by other teams' pods, where an EnergyBudget opts in; None: left alone.
    unmanaged_watts: float | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> NodeLimits:
        idle = spec.get("idlePowerLimitWatts")
        unmanaged = spec.get("unmanagedPowerLimitWatts")
        return cls(
            idle_watts=None if idle is None else float(idle),
            unmanaged_watts=None if unmanaged is None else float(unmanaged),
            pods={
                (str(p["namespace"]), str(p["name"])): float(p["powerLimitWatts"])
                for p in spec.get("pods") or []
            },
            clocks={
                (str(p["namespace"]), str(p["name"])): (
                    int(p["smClockRangeMegahertz"]["min"]),
                    int(p["smClockRangeMegahertz"]["max"]),
                )
                for p in spec.get("pods") or []
                if p.get("smClockRangeMegahertz")
            },
        )

    def spec_fields(self) -> dict[str, Any]:
        """The spec's limit fields; `pods` is always written so a merge patch replaces it, and
        `unmanagedPowerLimitWatts` (null when no budget opts in) so a merge patch removes it."""
        pods: list[dict[str, Any]] = []
        for (ns, name), watts in sorted(self.pods.items()):
            entry: dict[str, Any] = {
                "namespace": ns,
                "name": name,
                "powerLimitWatts": round(watts, 1),
            }
            clocks = self.clocks.get((ns, name))
            if clocks is not None:
                entry["smClockRangeMegahertz"] = {"min": clocks[0], "max": clocks[1]}
            pods.append(entry)
        out: dict[str, Any] = {"pods": pods}
        if self.idle_watts is not None:
            out["idlePowerLimitWatts"] = round(self.idle_watts, 1)
        out["unmanagedPowerLimitWatts"] = (
            None if self.unmanaged_watts is None else round(self.unmanaged_watts, 1)
        )
        return out


@dataclass(frozen=True)
class NodePowerState:
    """What is known about one node's limits: the profile's spec, and what the agent applied."""

    spec: NodeLimits | None  # None: no NodePowerProfile yet
    # Highest applied limit on the GPUs each pod holds, and on free GPUs (as the agent reported).
    applied_by_pod: Mapping[PodKey, float] = field(default_factory=dict)
    applied_idle_watts: float | None = None

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any] | None) -> NodePowerState:
        """The spec, and what the agent applied; an agent that has not yet read the spec's
        generation reports an older spec's limits, which are on their way to this spec's (a
        raise in flight), so only the spec counts (see `power_steps`)."""
        if profile is None:
            return cls(spec=None)
        spec = NodeLimits.from_spec(profile.get("spec") or {})
        status = profile.get("status") or {}
        generation = int((profile.get("metadata") or {}).get("generation") or 0)
        if int(status.get("observedGeneration") or 0) < generation:
            return cls(spec)
        by_pod: dict[PodKey, float] = {}
        idle: float | None = None
        for gpu in status.get("gpus") or []:
            applied = gpu.get("appliedWatts")
            if applied is None:
                continue
            if gpu.get("pod"):
                namespace, _, name = str(gpu["pod"]).partition("/")
                key = (namespace, name)
                by_pod[key] = max(by_pod.get(key, 0.0), float(applied))
            else:
                idle = max(idle or 0.0, float(applied))
        return cls(spec, by_pod, idle)


@dataclass(frozen=True)
class PowerSteps:
    """Limits to write before pod changes (all decreases) and after them (the plan's limits)."""

    lower: Mapping[str, NodeLimits]
    raise_: Mapping[str, NodeLimits]


def _smallest(values: Iterable[float | None]) -> float:
    return min((value for value in values if value is not None), default=math.inf)


def power_steps(
    current: Mapping[str, NodePowerState], planned: Mapping[str, NodeLimits]
) -> PowerSteps:
    """Split the move to `planned` limits into a lowering step and a raising step.

    The lowering step never raises any GPU (see the module docstring); the raising step writes the
    planned limits where they differ from what the lowering step left.
    """
    lower: dict[str, NodeLimits] = {}
    raise_: dict[str, NodeLimits] = {}
    for node, target in sorted(planned.items()):
        state = current.get(node, NodePowerState(None))
        spec = state.spec
        idle = _smallest(
            [
                target.idle_watts,
                None if spec is None else spec.idle_watts,
                state.applied_idle_watts,
            ]
        )
        pods = {
            key: _smallest([watts, spec.pods[key], state.applied_by_pod.get(key)])
            for key, watts in target.pods.items()
            if spec is not None and key in spec.pods
        }
        # Clocks in force stay as they are until the raising step writes the planned ones.
        kept_clocks = {} if spec is None else {k: v for k, v in spec.clocks.items() if k in pods}
        # Capping other teams' GPUs only lowers them: the lower cap of the two goes first.
        unmanaged = _smallest(
            [target.unmanaged_watts, None if spec is None else spec.unmanaged_watts]
        )
        interim = NodeLimits(
            idle_watts=None if math.isinf(idle) else idle,
            pods=pods,
            clocks=kept_clocks,
            unmanaged_watts=None if math.isinf(unmanaged) else unmanaged,
        )
        if spec != interim:
            lower[node] = interim
        if interim != target:
            raise_[node] = target
    return PowerSteps(lower=lower, raise_=raise_)


def is_confirmed(profile: Mapping[str, Any], generation: int) -> bool:
    """Whether the agent reports a profile's spec (at `generation` or later) as applied.

    Confirmed means: `status.observedGeneration` has caught up, the agent is ready, it knows which
    GPU each pod holds (`status.deviceMapping`), and every GPU it set a limit on for that spec reads
    back at or below that limit (within NVML's rounding).
    """
    status = profile.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return False
    if not (status.get("agent") or {}).get("ready"):
        return False
    if (status.get("deviceMapping") or {}).get("source") not in MAPPED_SOURCES:
        return False
    for gpu in status.get("gpus") or []:
        target = gpu.get("targetWatts")
        if target is None:
            continue
        applied = gpu.get("appliedWatts")
        if applied is None or float(applied) > float(target) + CONFIRM_TOLERANCE_WATTS:
            return False
    return True


def agent_heartbeat(profile: Mapping[str, Any] | None) -> datetime | None:
    """When a profile's agent last reported (None: no profile, or no heartbeat read)."""
    agent = ((profile or {}).get("status") or {}).get("agent") or {}
    return read_timestamp(agent.get("heartbeatTime"))
