"""The budget-safe split of a limit change into a lowering step and a raising step.

Limits are per wattsched pod plus one for idle GPUs (a NodePowerProfile's spec); the agent reports
which pod holds each GPU and what it applied there.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from wattsched_operator.pod_changes import unmanaged_gpu_caps
from wattsched_operator.transition import NodeLimits, NodePowerState, is_confirmed, power_steps

A = ("team", "a-0")
B = ("team", "b-0")
C = ("team", "c-0")


def profile(
    spec: NodeLimits,
    held: list[tuple[tuple[str, str] | None, float]] | None,
    generation: int = 1,
    *,
    targets: list[float | None] | None = None,
) -> dict[str, Any]:
    """A profile with `spec`; `held`: per GPU (pod holding it or None, applied watts)."""
    body: dict[str, Any] = {
        "metadata": {"name": "n", "generation": generation},
        "spec": {"nodeName": "n", **spec.spec_fields()},
    }
    if held is not None:
        gpus = []
        for index, (pod, watts) in enumerate(held):
            gpu: dict[str, Any] = {"index": index, "appliedWatts": watts}
            if pod is not None:
                gpu["pod"] = f"{pod[0]}/{pod[1]}"
            target = None if targets is None else targets[index]
            if target is not None:
                gpu["targetWatts"] = target
            gpus.append(gpu)
        body["status"] = {
            "observedGeneration": generation,
            "agent": {"ready": True},
            "deviceMapping": {"source": "PodResources"},
            "gpus": gpus,
        }
    return body


def test_a_node_without_a_profile_gets_only_its_idle_limit_in_the_lowering_step() -> None:
    planned = NodeLimits(idle_watts=200, pods={A: 500})
    steps = power_steps({}, {"n": planned})
    assert steps.lower == {"n": NodeLimits(idle_watts=200)}
    assert steps.raise_ == {"n": planned}


def test_kept_pods_go_down_first_and_up_after_and_new_pods_wait_at_idle() -> None:
    now = NodeLimits(idle_watts=200, pods={A: 400, B: 300})
    current = {"n": NodePowerState.from_profile(profile(now, [(A, 400), (B, 300), (None, 200)]))}
    planned = NodeLimits(idle_watts=200, pods={A: 250, B: 350, C: 600})
    steps = power_steps(current, {"n": planned})
    assert steps.lower == {"n": NodeLimits(idle_watts=200, pods={A: 250, B: 300})}
    assert steps.raise_ == {"n": planned}


def test_a_pod_the_plan_drops_is_lowered_to_idle_before_it_is_deleted() -> None:
    now = NodeLimits(idle_watts=200, pods={A: 700})
    current = {"n": NodePowerState.from_profile(profile(now, [(A, 700), (None, 200)]))}
    steps = power_steps(current, {"n": NodeLimits(idle_watts=200)})
    assert steps.lower == {"n": NodeLimits(idle_watts=200)}
    assert steps.raise_ == {}


def test_an_unconfirmed_lower_spec_is_never_raised_in_the_lowering_step() -> None:
    # The spec says 200 W but the agent still applies 400 W: the interim keeps the 200 W.
    now = NodeLimits(idle_watts=100, pods={A: 200})
    current = {"n": NodePowerState.from_profile(profile(now, [(A, 400)]))}
    steps = power_steps(current, {"n": NodeLimits(idle_watts=100, pods={A: 300})})
    assert "n" not in steps.lower
    assert steps.raise_ == {"n": NodeLimits(idle_watts=100, pods={A: 300})}


def test_unchanged_limits_need_no_step() -> None:
    now = NodeLimits(idle_watts=100, pods={A: 300})
    current = {"n": NodePowerState.from_profile(profile(now, [(A, 300), (None, 100)]))}
    steps = power_steps(current, {"n": now})
    assert steps.lower == {}
    assert steps.raise_ == {}


watts = st.integers(min_value=50, max_value=1000).map(float)  # whole watts: no rounding
pods = st.dictionaries(st.sampled_from([A, B, C]), watts, max_size=3)


@given(
    current_idle=watts,
    current_pods=pods,
    planned_idle=watts,
    planned_pods=pods,
    drift=st.lists(watts, min_size=4, max_size=4),
)
def test_the_lowering_step_leaves_no_gpu_above_its_current_or_planned_limit(
    current_idle: float,
    current_pods: dict[tuple[str, str], float],
    planned_idle: float,
    planned_pods: dict[tuple[str, str], float],
    drift: list[float],
) -> None:
    """Whichever pod ends up on a GPU after the pod changes (kept, new, or none), its interim limit
    is at or below what that GPU may have now (spec and applied) and under the plan."""
    now = NodeLimits(idle_watts=current_idle, pods=current_pods)
    # The agent may apply less than the spec (an unconfirmed lowering), never less than nothing.
    held: list[tuple[tuple[str, str] | None, float]] = [
        (pod, min(w, d)) for (pod, w), d in zip(current_pods.items(), drift, strict=False)
    ]
    held.append((None, min(current_idle, drift[-1])))
    state = NodePowerState.from_profile(profile(now, held))
    planned = NodeLimits(idle_watts=planned_idle, pods=planned_pods)
    steps = power_steps({"n": state}, {"n": planned})
    interim = steps.lower.get("n", now)
    assert steps.raise_.get("n", interim) == planned
    applied_now = {pod: w for pod, w in held if pod is not None}
    idle_now = held[-1][1]
    assert interim.idle_watts is not None
    assert interim.idle_watts <= min(current_idle, planned_idle, idle_now)
    for pod, limit in interim.pods.items():
        assert limit <= planned_pods[pod]
        assert limit <= current_pods[pod]
        assert limit <= applied_now.get(pod, math.inf)


def test_confirmation_needs_the_generation_the_ready_agent_a_mapping_and_applied_limits() -> None:
    spec = NodeLimits(idle_watts=100, pods={A: 300})

    def confirmed(applied: float, generation: int = 2, at: int = 2) -> bool:
        body = profile(spec, [(A, applied), (None, 100)], generation, targets=[300, 100])
        return is_confirmed(body, at)

    assert confirmed(300)
    assert confirmed(300.4)
    assert not confirmed(300, at=3)
    assert not confirmed(350)
    assert not is_confirmed(profile(spec, None), 1)
    not_ready = profile(spec, [(A, 300)], targets=[300])
    not_ready["status"]["agent"]["ready"] = False
    assert not is_confirmed(not_ready, 1)
    unmapped = profile(spec, [(A, 300)], targets=[300])
    unmapped["status"]["deviceMapping"] = {"source": "Unavailable"}
    assert not is_confirmed(unmapped, 1)


def test_another_teams_gpu_does_not_block_confirmation() -> None:
    spec = NodeLimits(idle_watts=100, pods={A: 300})
    body = profile(spec, [(A, 300), (("ml", "big"), 700)], targets=[300, None])
    assert is_confirmed(body, 1)


def test_a_clock_change_alone_needs_no_lowering_step_and_is_written_with_the_limits() -> None:
    now = NodeLimits(idle_watts=100, pods={A: 300})
    state = NodePowerState.from_profile(profile(now, [(A, 300), (None, 100)]))
    planned = NodeLimits(idle_watts=100, pods={A: 300}, clocks={A: (990, 990)})
    steps = power_steps({"n": state}, {"n": planned})
    assert "n" not in steps.lower
    assert steps.raise_["n"] == planned
    assert planned.spec_fields()["pods"][0]["smClockRangeMegahertz"] == {"min": 990, "max": 990}


def test_capping_other_teams_gpus_goes_down_first_and_its_removal_after() -> None:
    now = NodeLimits(idle_watts=200, pods={A: 400})
    current = {"n": NodePowerState.from_profile(profile(now, [(A, 400), (None, 200)]))}
    capped = NodeLimits(idle_watts=200, pods={A: 400}, unmanaged_watts=300)
    steps = power_steps(current, {"n": capped})
    assert steps.lower == {"n": capped}
    assert steps.raise_ == {}
    assert capped.spec_fields()["unmanagedPowerLimitWatts"] == 300
    assert NodeLimits.from_spec(capped.spec_fields()) == capped

    current = {"n": NodePowerState.from_profile(profile(capped, [(A, 400), (None, 200)]))}
    steps = power_steps(current, {"n": now})  # the opt-in removed
    assert steps.lower == {}
    assert steps.raise_ == {"n": now}
    assert now.spec_fields()["unmanagedPowerLimitWatts"] is None  # a merge patch removes it
    lower_cap = NodeLimits(idle_watts=200, pods={A: 400}, unmanaged_watts=150)
    assert power_steps(current, {"n": lower_cap}).lower == {"n": lower_cap}


def test_a_node_in_several_opted_in_budgets_gets_the_lowest_cap_for_other_teams_gpus() -> None:
    def budget(name: str, rack: str | None, watts: float | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"powerCapWatts": 10000}
        if rack is not None:
            spec["nodeSelector"] = {"matchLabels": {"rack": rack}}
        if watts is not None:
            spec["unmanagedGpus"] = {"powerLimitWatts": watts}
        return {
            "apiVersion": "wattsched.io/v1alpha1",
            "kind": "EnergyBudget",
            "metadata": {"name": name},
            "spec": spec,
        }

    nodes = [
        {"metadata": {"name": "a1", "labels": {"rack": "a"}}},
        {"metadata": {"name": "b1", "labels": {"rack": "b"}}},
        {"metadata": {"name": "c1", "labels": {"rack": "c"}}},
    ]
    budgets = [
        budget("all", None, 400),
        budget("rack-a", "a", 250),
        budget("rack-c", "c", None),  # not opted in: adds nothing
    ]
    assert unmanaged_gpu_caps(budgets, nodes) == {"a1": 250, "b1": 400, "c1": 400}
    assert unmanaged_gpu_caps(budgets[2:], nodes) == {}
    assert unmanaged_gpu_caps([budget("bad", "a", 0)], nodes) == {}  # invalid: plans nothing


def test_a_raise_the_agent_has_not_read_yet_is_not_lowered_again() -> None:
    # Generation 2 raised A from 200 to 300 W and idle from 100 to 150 W; the agent still
    # reports generation 1's limits. The next plan keeps them: nothing to lower or raise.
    raised = NodeLimits(idle_watts=150, pods={A: 300})
    body = profile(raised, [(A, 200), (None, 100)], generation=2)
    body["status"]["observedGeneration"] = 1
    steps = power_steps({"n": NodePowerState.from_profile(body)}, {"n": raised})
    assert steps.lower == {}
    assert steps.raise_ == {}


def test_limits_the_agent_applied_at_the_spec_generation_still_bound_the_lowering_step() -> None:
    # The agent read generation 2 and applies less than the spec (say, a GPU's NVML range):
    # the lowering step does not count on more than that.
    spec = NodeLimits(idle_watts=100, pods={A: 300})
    body = profile(spec, [(A, 250), (None, 100)], generation=2)
    steps = power_steps({"n": NodePowerState.from_profile(body)}, {"n": spec})
    assert steps.lower == {"n": NodeLimits(idle_watts=100, pods={A: 250})}
