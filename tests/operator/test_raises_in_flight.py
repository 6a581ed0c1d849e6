"""Raises the round does not wait for: the apply step writes them and returns, and the next rounds
count their node as ready at the raised limits until the confirmation timeout
(`core.RaiseInFlight`, `snapshot.raise_on_its_way`); past it, unconfirmed, at maximum power."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, cast

from tests.operator.test_core import NOW, node, profile, service, view
from wattsched_api.meta import merge_patch
from wattsched_operator import core, transition
from wattsched_operator.apply import Applier
from wattsched_operator.cache import PROFILES, ClusterCache
from wattsched_operator.metrics import OperatorMetrics
from wattsched_optimizer.problem import Plan, PlanStatus

NODE = "l40s-0"
RAISED_GENERATION = 3  # the profile's generation 2 is the round's lowering, 3 its raise
WRITTEN_AT = 100.0
DEADLINE = WRITTEN_AT + 15.0  # the operator's --confirm-timeout-seconds default


def performance(name: str) -> dict[str, Any]:
    """A service that runs at its GPUs' maximum (L40S: 350 W; idle GPUs go to 100 W)."""
    body = service(name)
    body["spec"]["energy"] = {"policy": "Performance"}
    return body


def budget(cap_watts: float) -> dict[str, Any]:
    return {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "EnergyBudget",
        "metadata": {"name": "rack", "uid": "uid-rack", "generation": 1},
        "spec": {"powerCapWatts": cap_watts},
    }


def after_a_raise_not_yet_applied(*arriving: str) -> tuple[core.ClusterView, core.Memory]:
    """`chat` placed and its limit raised by a round whose agent confirmed the lowering
    (generation 2) and has not read the raise (3) yet; `arriving` services created since. A budget
    of 1,000 W: chat at 350 W and three idle GPUs at 100 W fit, and so does another 350-W service,
    while the four GPUs at the L40S maximum (1,400 W) do not."""
    first = core.Observed(view([node(NODE)], [performance("chat")], []), monotonic=WRITTEN_AT)
    round_ = core.decide(first, NOW)
    raised = round_.raise_[NODE]
    assert raised.pods[("team", "chat-0")] == 350.0
    memory = core.after_apply(
        round_,
        core.Applied(raised={NODE: core.RaiseInFlight(RAISED_GENERATION, DEADLINE)}),
        view=first.view,
        monotonic=WRITTEN_AT,
        settings=first.settings,
    )
    pod = copy.deepcopy(dict(round_.create[0]))
    pod["spec"]["nodeName"] = NODE
    pod["status"] = {"phase": "Running", "startTime": "2026-12-05T11:59:59Z"}
    workloads = [performance("chat"), *(performance(name) for name in arriving)]
    cluster = view([node(NODE)], workloads, [pod])
    written = profile(NODE)
    written["metadata"]["generation"] = RAISED_GENERATION
    written["spec"] = {"nodeName": NODE, **raised.spec_fields()}
    written["status"]["observedGeneration"] = RAISED_GENERATION - 1
    cluster = dataclasses.replace(
        cluster, profiles={NODE: written}, budgets={"rack": budget(1000.0)}
    )
    return cluster, memory


def test_the_round_after_a_raise_its_agent_has_not_applied_counts_the_node_ready_at_it() -> None:
    cluster, memory = after_a_raise_not_yet_applied("other")
    round_ = core.decide(core.Observed(cluster, memory=memory, monotonic=WRITTEN_AT + 1), NOW)

    assert round_.plan is not None
    assert round_.memory.ready_agents == frozenset({NODE})
    # The raised 350 W count, with the new service's: nothing is lowered, nothing moves.
    assert round_.plan.node_power_limits_watts[NODE] == (350.0, 350.0, 100.0, 100.0)
    [allocation] = round_.plan.budgets
    assert allocation.allocated_cap_watts == 900.0
    assert not allocation.held
    assert [p["metadata"]["name"] for p in round_.create] == ["other-0"]
    assert round_.lower == {}
    assert round_.evict == ()


def test_a_raise_not_confirmed_within_the_timeout_counts_its_node_at_maximum_power() -> None:
    cluster, memory = after_a_raise_not_yet_applied("other")
    round_ = core.decide(core.Observed(cluster, memory=memory, monotonic=DEADLINE + 1), NOW)

    assert round_.plan is not None
    assert round_.memory.ready_agents == frozenset()
    [allocation] = round_.plan.budgets
    assert allocation.allocated_cap_watts == 4 * 350.0  # above the cap: the budget is held
    assert allocation.held
    assert round_.create == ()


def test_the_memory_keeps_a_raise_until_its_deadline_and_a_newer_raise_replaces_it() -> None:
    _, memory = after_a_raise_not_yet_applied()
    assert memory.raises == {NODE: core.RaiseInFlight(RAISED_GENERATION, DEADLINE)}
    settings = core.Settings()
    empty = view([], [], [])

    def applied(at: float, raised: Mapping[str, core.RaiseInFlight]) -> core.Memory:
        round_ = core.Round(memory=memory)
        return core.after_apply(
            round_, core.Applied(raised=raised), view=empty, monotonic=at, settings=settings
        )

    newer = core.RaiseInFlight(RAISED_GENERATION + 2, DEADLINE + 5)
    assert applied(DEADLINE - 1, {}).raises == memory.raises
    assert applied(DEADLINE - 1, {NODE: newer}).raises == {NODE: newer}
    assert applied(DEADLINE, {}).raises == {}


# -- the apply step ------------------------------------------------------------------------------


class SilentAgentKube:
    """A Kube that stores NodePowerProfiles (each spec change a new generation) and whose agents
    never report: nothing is ever confirmed."""

    def __init__(self, profiles: Mapping[str, dict[str, Any]]) -> None:
        self.profiles = {name: copy.deepcopy(body) for name, body in profiles.items()}
        self.patched: list[tuple[str, dict[str, Any]]] = []

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        name = path.rsplit("/", 1)[-1]
        body = self.profiles[name]
        body["spec"] = merge_patch(body["spec"], copy.deepcopy(dict(patch["spec"])))
        body["metadata"]["generation"] += 1
        self.patched.append((name, copy.deepcopy(body["spec"])))
        return copy.deepcopy(body)


def test_the_apply_step_writes_raises_and_returns_without_waiting_for_the_agents() -> None:
    before = profile(NODE)  # generation 1, confirmed
    kube = SilentAgentKube({NODE: before})
    raised = transition.NodeLimits(idle_watts=100.0, pods={("team", "chat-0"): 350.0})
    plan = Plan(
        status=PlanStatus.OPTIMAL,
        objective=0.0,
        bound=0.0,
        gap=0.0,
        solve_seconds=0.0,
        placements=(),
        node_power_limits_watts={NODE: (350.0, 100.0, 100.0, 100.0)},
        budgets=(),
        unplaced=(),
    )
    round_ = core.Round(memory=core.Memory(), plan=plan, raise_={NODE: raised})
    cluster = dataclasses.replace(view([node(NODE)], [], []), profiles={NODE: before})

    async def scenario() -> core.Applied:
        loop = asyncio.get_running_loop()

        async def call(function: Any, *args: Any) -> Any:
            return await loop.run_in_executor(None, function, *args)

        cache = ClusterCache()
        cache.upsert(PROFILES, before)
        applier = Applier(
            kube=cast(Any, kube),
            cache=cache,
            metrics=OperatorMetrics(),
            call=call,
            # A wait for the agent would outlast the test's guard below by far.
            confirm_timeout_seconds=600,
            heartbeat_timeout_seconds=30,
        )
        started = time.monotonic()
        applied = await asyncio.wait_for(applier.apply(round_, cluster), 30)
        assert started + 600 <= applied.raised[NODE].deadline <= time.monotonic() + 600
        await applier.writer.stop(1)
        return applied

    applied = asyncio.run(scenario())

    [(patched, spec)] = kube.patched
    assert patched == NODE
    assert transition.NodeLimits.from_spec(spec) == raised
    assert applied.unconfirmed == frozenset()
    assert list(applied.raised) == [NODE]
    assert applied.raised[NODE].generation == 2
