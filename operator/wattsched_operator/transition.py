"""The budget-safe order of power-limit changes, as pure functions of current and planned limits.

Moving from one plan to the next must never let the sum of GPU power limits in a budget's scope
exceed its cap, not even for a moment. So limits change in two steps around the pod changes:
first every GPU whose limit goes down (or is unknown) is lowered and the agent must confirm it,
then pods are deleted and created, and only then do limits go up. This module computes those two
steps and reads an agent's confirmation from a NodePowerProfile; it does not talk to the API server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# An agent's applied limit may differ from the requested one by rounding to NVML's milliwatts.
CONFIRM_TOLERANCE_WATTS = 0.5


@dataclass(frozen=True)
class NodePowerState:
    """What is known about one node's limits: the profile's spec, and what the agent applied.

    Both are by NVML index (position i is GPU index i, as the plan's limits are), read from each
    entry's `index` however the lists are ordered; an index with no entry is unknown (None).
    """

    spec_watts: tuple[float | None, ...] | None  # None: no NodePowerProfile yet
    applied_watts: tuple[float | None, ...] | None  # None: the agent has reported nothing

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any] | None) -> NodePowerState:
        if profile is None:
            return cls(spec_watts=None, applied_watts=None)
        spec_by_index = {
            int(g["index"]): float(g["powerLimitWatts"])
            for g in (profile.get("spec") or {}).get("gpus") or []
        }
        status_gpus = (profile.get("status") or {}).get("gpus") or []
        applied_by_index = {
            int(g["index"]): float(g["appliedWatts"])
            for g in status_gpus
            if g.get("appliedWatts") is not None
        }
        size = max(spec_by_index) + 1 if spec_by_index else 0
        spec = tuple(spec_by_index.get(i) for i in range(size))
        applied: tuple[float | None, ...] | None = None
        if status_gpus:
            applied = tuple(applied_by_index.get(i) for i in range(size))
        return cls(spec_watts=spec or None, applied_watts=applied)


@dataclass(frozen=True)
class PowerSteps:
    """Limits to write before pod changes (all decreases) and after them (the plan's limits)."""

    lower: Mapping[str, tuple[float, ...]]
    raise_: Mapping[str, tuple[float, ...]]


def _known(values: tuple[float | None, ...] | None, index: int) -> float:
    if values is None or index >= len(values) or values[index] is None:
        return math.inf
    value = values[index]
    assert value is not None
    return value


def power_steps(
    current: Mapping[str, NodePowerState], planned: Mapping[str, tuple[float, ...]]
) -> PowerSteps:
    """Split the move to `planned` limits into a lowering step and a raising step.

    The lowering step writes, per GPU, the smallest of the planned limit, the profile's current
    spec and the agent's applied limit (unknown counts as unbounded), so it never raises anything.
    The raising step writes the planned limits where they differ from what the lowering step left.
    """
    lower: dict[str, tuple[float, ...]] = {}
    raise_: dict[str, tuple[float, ...]] = {}
    for node, target in sorted(planned.items()):
        state = current.get(node, NodePowerState(None, None))
        interim = tuple(
            min(watts, _known(state.spec_watts, i), _known(state.applied_watts, i))
            for i, watts in enumerate(target)
        )
        if state.spec_watts != interim:
            lower[node] = interim
        if interim != target:
            raise_[node] = target
    return PowerSteps(lower=lower, raise_=raise_)


def is_confirmed(profile: Mapping[str, Any], generation: int) -> bool:
    """Whether the agent reports a profile's spec (at `generation` or later) as applied.

    Confirmed means: `status.observedGeneration` has caught up, the agent is ready, and every GPU's
    applied limit is at or below its spec limit (within NVML's rounding).
    """
    status = profile.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return False
    if not (status.get("agent") or {}).get("ready"):
        return False
    applied = {g.get("index"): g.get("appliedWatts") for g in status.get("gpus") or []}
    for gpu in (profile.get("spec") or {}).get("gpus") or []:
        watts = applied.get(gpu["index"])
        if watts is None or float(watts) > float(gpu["powerLimitWatts"]) + CONFIRM_TOLERANCE_WATTS:
            return False
    return True
