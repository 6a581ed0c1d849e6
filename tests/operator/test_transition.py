"""The budget-safe split of a limit change into a lowering step and a raising step."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from wattsched_operator.transition import NodePowerState, is_confirmed, power_steps


def profile(spec: list[float], applied: list[float] | None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "n", "generation": generation},
        "spec": {"gpus": [{"index": i, "powerLimitWatts": w} for i, w in enumerate(spec)]},
    }
    if applied is not None:
        body["status"] = {
            "observedGeneration": generation,
            "agent": {"ready": True},
            "gpus": [{"index": i, "appliedWatts": w} for i, w in enumerate(applied)],
        }
    return body


def test_a_node_without_a_profile_gets_its_limits_in_the_lowering_step() -> None:
    steps = power_steps({}, {"n": (300.0, 300.0)})
    assert steps.lower == {"n": (300.0, 300.0)}
    assert steps.raise_ == {}


def test_mixed_changes_lower_first_and_raise_after() -> None:
    current = {"n": NodePowerState.from_profile(profile([400, 200], [400, 200]))}
    steps = power_steps(current, {"n": (250.0, 350.0)})
    assert steps.lower == {"n": (250.0, 200.0)}
    assert steps.raise_ == {"n": (250.0, 350.0)}


def test_an_unconfirmed_lower_spec_is_never_raised_in_the_lowering_step() -> None:
    # The spec says 200 W but the agent still applies 400 W: the interim keeps the 200 W.
    current = {"n": NodePowerState.from_profile(profile([200], [400]))}
    steps = power_steps(current, {"n": (300.0,)})
    assert "n" not in steps.lower
    assert steps.raise_ == {"n": (300.0,)}


def test_unchanged_limits_need_no_step() -> None:
    current = {"n": NodePowerState.from_profile(profile([300], [300]))}
    steps = power_steps(current, {"n": (300.0,)})
    assert steps.lower == {}
    assert steps.raise_ == {}


watts = st.floats(min_value=50, max_value=1000, allow_nan=False)


@given(
    st.lists(st.tuples(watts, watts, watts), min_size=1, max_size=6),
)
def test_the_lowering_step_never_exceeds_what_is_in_force_or_planned(
    gpus: list[tuple[float, float, float]],
) -> None:
    spec = [g[0] for g in gpus]
    applied = [g[1] for g in gpus]
    planned = tuple(g[2] for g in gpus)
    state = NodePowerState.from_profile(profile(spec, applied))
    steps = power_steps({"n": state}, {"n": planned})
    interim = steps.lower.get("n", tuple(spec))
    for i, value in enumerate(interim):
        assert value <= spec[i]
        assert value <= applied[i]
        assert value <= planned[i]
    assert steps.raise_.get("n", interim) == planned


def test_confirmation_needs_the_generation_the_ready_agent_and_applied_limits() -> None:
    assert is_confirmed(profile([300], [300], generation=2), 2)
    assert is_confirmed(profile([300], [300.4], generation=2), 2)
    assert not is_confirmed(profile([300], [300], generation=2), 3)
    assert not is_confirmed(profile([300], [350], generation=2), 2)
    assert not is_confirmed(profile([300], None), 1)
    not_ready = profile([300], [300])
    not_ready["status"]["agent"]["ready"] = False
    assert not is_confirmed(not_ready, 1)


def test_limits_are_read_by_each_entrys_index_not_its_position() -> None:
    # A profile whose spec lists only GPU 1 (at 200 W), as a hand edit or another writer might:
    # GPU 1 is at 200 W and must not be raised before the pods move; GPU 0 is unknown.
    body = {
        "metadata": {"name": "n", "generation": 1},
        "spec": {"gpus": [{"index": 1, "powerLimitWatts": 200}]},
        "status": {"gpus": [{"index": 1, "appliedWatts": 200}, {"index": 0, "appliedWatts": 700}]},
    }
    state = NodePowerState.from_profile(body)
    assert state.spec_watts == (None, 200.0)
    assert state.applied_watts == (700.0, 200.0)
    steps = power_steps({"n": state}, {"n": (400.0, 400.0)})
    assert steps.lower == {"n": (400.0, 200.0)}
    assert steps.raise_ == {"n": (400.0, 400.0)}
