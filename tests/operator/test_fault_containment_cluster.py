"""Fault containment on the sandbox (issue 12): no node, budget or failed round stops the cluster's
scheduling, and a lost agent is noticed in seconds with only its replicas moved.

The nodes here are KWOK nodes of products the example nodes do not have (H200, A100 40 GB), each
served by an agent of its own, so the test decides what runs where and which agent dies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.operator.conftest import TEST_LABEL, StartOperator, get_json, wait_until
from tests.operator.test_operator_cluster import (
    apply,
    budget,
    gpu_node,
    pods_of,
    profile_limits,
    running_on_planned_nodes,
    start_node_agent,
    workload,
)
from wattsched_operator.cache import ClusterCache
from wattsched_operator.core import build_input_function
from wattsched_operator.kube import Kube
from wattsched_operator.loop import LoopSettings, PlanningLoop
from wattsched_operator.metrics import OperatorMetrics
from wattsched_optimizer.model import PerformanceModel
from wattsched_optimizer.problem import Plan, PlanInput

if TYPE_CHECKING:
    import subprocess

    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

H200 = "NVIDIA-H200"
A100_40 = "NVIDIA-A100-SXM4-40GB"


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    found = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_]
    return found[0] if found else {}


def events_on(sandbox: Sandbox, kind: str, name: str, namespace: str = "default") -> list[Any]:
    selector = f"involvedObject.kind={kind},involvedObject.name={name}"
    items: list[Any] = get_json(sandbox, "events", "-n", namespace, "--field-selector", selector)[
        "items"
    ]
    return items


class Nodes:
    """Test nodes with an agent each; all removed (agents stopped, nodes deleted) at the end."""

    def __init__(self, sandbox: Sandbox, tmp_path: Path) -> None:
        self.sandbox = sandbox
        self.tmp_path = tmp_path
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.names: list[str] = []

    def add(self, name: str, product: str, gpus: int, *, agent: bool = True) -> str:
        body = gpu_node(name, product, gpus)
        # Without the label the session's all-nodes agent, which may list nodes while this test
        # creates them, never serves this node: its own agent is the only one.
        del body["metadata"]["labels"]["nvidia.com/gpu.present"]
        apply(self.sandbox, None, body)
        self.names.append(name)
        if agent:
            self.agents[name] = start_node_agent(self.sandbox, name, self.tmp_path / f"{name}.log")
        return name

    def stop_agent(self, name: str) -> None:
        agent = self.agents.pop(name)
        agent.kill()  # no last status: the agent just goes silent
        agent.wait()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
            agent.wait()
        for name in self.names:
            self.sandbox.kubectl("delete", "node", name, "--wait=false", check=False)


@pytest.fixture
def nodes(sandbox: Sandbox, tmp_path: Path) -> Iterator[Nodes]:
    """Ask for it before `start_operator`: it is then removed after the operator has released the
    test's workloads (whose pods need these nodes' kubelet to go)."""
    created = Nodes(sandbox, tmp_path)
    try:
        yield created
    finally:
        created.close()


def test_a_node_with_an_unknown_gpu_product_never_stops_planning(
    sandbox: Sandbox, namespace: str, nodes: Nodes, start_operator: StartOperator
) -> None:
    """Issue 12 item 2: with such a node, budgets changed meanwhile are applied and new
    workloads are placed; the budget names the node, and the node gets an Event."""
    suffix = namespace[-5:]
    scope = {TEST_LABEL: f"unknown-{suffix}"}
    unknown = nodes.add(f"gpu-a10g-{suffix}", "NVIDIA-A10G", 4, agent=False)
    known = nodes.add(f"gpu-h200-{suffix}", H200, 2)
    for name in (unknown, known):
        sandbox.kubectl("label", "node", name, f"{TEST_LABEL}=unknown-{suffix}", "--overwrite")
    # The unknown node counts at 4 x 2000 W (unknown_product.max_watts_before_agent: no agent
    # reports its GPUs' maximum); the H200 idles at 2 x 200 W: 8400 W with nothing placed.
    apply(sandbox, None, budget(f"with-unknown-{suffix}", 10400, scope))
    operator = start_operator()
    fits = workload("fits", products=[H200])
    fits["spec"]["energy"] = {"policy": "Performance"}  # at the H200's 700 W maximum
    apply(sandbox, namespace, fits)
    wait_until(
        "fits Running on the H200", lambda: running_on_planned_nodes(sandbox, namespace, "fits")
    )

    name = f"with-unknown-{suffix}"
    status = get_json(sandbox, "energybudget", name)["status"]
    planned = condition({"status": status}, "NodesPlanned")
    assert planned["status"] == "False"
    assert planned["reason"] == "NodeExcluded"
    assert f"Node {unknown}" in planned["message"]
    assert "GPU product 'A10G' is not in the catalogue" in planned["message"]
    assert "(8000 W)" in planned["message"]
    assert status["allocatedCapWatts"] > 8000

    def node_event() -> list[Any]:
        return [e for e in events_on(sandbox, "Node", unknown) if e["reason"] == "NodeExcluded"]

    (event,) = wait_until(f"a NodeExcluded Event on {unknown}", node_event)
    assert "GPU product 'A10G' is not in the catalogue" in event["message"]

    # Lowered from 10400 W to 8700 W: the H200's limits follow (700 W left for 2 GPUs).
    assert sum(profile_limits(sandbox, known)[0]) == 900  # 700 W + an idle 200 W
    lowered_at = time.monotonic()
    sandbox.kubectl(
        "patch", "energybudget", name, "--type=merge", "-p", '{"spec": {"powerCapWatts": 8700}}'
    )

    def applied() -> bool:
        spec, confirmed = profile_limits(sandbox, known)
        allocated = get_json(sandbox, "energybudget", name)["status"]["allocatedCapWatts"]
        return sum(spec) <= 700 and sum(confirmed) <= 700 and allocated <= 8700

    wait_until("the lowered cap applied on the H200", applied, timeout_seconds=60)
    print(f"lowered cap applied in {time.monotonic() - lowered_at:.1f} s (measured)")
    ready = condition(get_json(sandbox, "energybudget", name), "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "CapEnforced")
    assert "planning round failed" not in operator.log_path.read_text()


def test_a_budget_below_its_idle_minimum_holds_only_its_own_nodes(
    sandbox: Sandbox, namespace: str, nodes: Nodes, start_operator: StartOperator
) -> None:
    """Issue 12 item 3: a 1 W budget over one node; a service elsewhere runs, the budget says
    why, and work that only fits the held node waits with that reason."""
    suffix = namespace[-5:]
    held_node = nodes.add(f"gpu-h200-{suffix}", H200, 2)
    free_node = nodes.add(f"gpu-a100-{suffix}", A100_40, 2)
    name = f"one-watt-{suffix}"
    apply(sandbox, None, budget(name, 1, {TEST_LABEL: held_node}))
    start_operator()
    apply(
        sandbox,
        namespace,
        workload("service", products=[A100_40]),
        workload("h200-only", products=[H200]),
    )
    wait_until(
        "service Running outside the held budget",
        lambda: running_on_planned_nodes(sandbox, namespace, "service"),
    )
    assert get_json(sandbox, "llmworkload", "service", "-n", namespace)["status"]["nodes"] == (
        free_node
    )

    def held_back() -> dict[str, Any]:
        body = get_json(sandbox, "llmworkload", "h200-only", "-n", namespace)
        limited = condition(body, "BudgetLimited")
        return limited if limited.get("status") == "True" else {}

    limited = wait_until("h200-only held back by the held budget", held_back)
    assert f"EnergyBudget {name} holds its nodes ({held_node})" in limited["message"]
    ready = condition(get_json(sandbox, "energybudget", name), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CapBelowFloor")
    assert ready["message"].startswith("spec.powerCapWatts=1 is below the 400 W")
    (event,) = wait_until(
        "a CapBelowFloor Event on the budget",
        lambda: [
            e for e in events_on(sandbox, "EnergyBudget", name) if e["reason"] == "CapBelowFloor"
        ],
    )
    assert "spec.powerCapWatts=1" in event["message"]
    # Another round that holds it (the cap changes, the reason does not): no second Event.
    sandbox.kubectl(
        "patch", "energybudget", name, "--type=merge", "-p", '{"spec": {"powerCapWatts": 2}}'
    )

    def held_at_two() -> bool:
        ready = condition(get_json(sandbox, "energybudget", name), "Ready")
        return str(ready["message"]).startswith("spec.powerCapWatts=2 ")

    wait_until("the held budget's status after its cap changed", held_at_two)
    reasons = [e["reason"] for e in events_on(sandbox, "EnergyBudget", name)]
    assert reasons.count("CapBelowFloor") == 1
    wait_until(
        f"{held_node} held at the H200 minimum",
        lambda: profile_limits(sandbox, held_node) == ([200.0, 200.0], [200.0, 200.0]),
    )

    sandbox.kubectl("delete", "energybudget", name, "--timeout=60s")
    wait_until(
        "h200-only Running once the budget is gone",
        lambda: running_on_planned_nodes(sandbox, namespace, "h200-only"),
    )


def test_a_budget_tight_while_its_agent_is_down_holds_only_its_node(
    sandbox: Sandbox, namespace: str, nodes: Nodes, start_operator: StartOperator
) -> None:
    """Issue 12 item 3, the other way: 2 x 200 W idle <= 1000 W < 2 x 700 W. Once the agent is
    lost its node counts at maximum, the budget is held and says so; work elsewhere is placed."""
    suffix = namespace[-5:]
    tight_node = nodes.add(f"gpu-h200-{suffix}", H200, 2)
    nodes.add(f"gpu-a100-{suffix}", A100_40, 2)
    name = f"tight-{suffix}"
    apply(sandbox, None, budget(name, 1000, {TEST_LABEL: tight_node}))
    start_operator()
    wait_until(
        f"{tight_node} idle and confirmed",
        lambda: (
            sandbox.kubectl("get", "nodepowerprofile", tight_node, check=False).returncode == 0
            and profile_limits(sandbox, tight_node) == ([200.0, 200.0], [200.0, 200.0])
        ),
    )
    wait_until(
        f"{name} met while the agent confirms",
        lambda: (
            condition(get_json(sandbox, "energybudget", name), "Ready").get("reason")
            == "CapEnforced"
        ),
    )
    nodes.stop_agent(tight_node)

    def held() -> dict[str, Any]:
        ready = condition(get_json(sandbox, "energybudget", name), "Ready")
        return ready if ready.get("reason") == "CapBelowFloor" else {}

    ready = wait_until(f"{name} held once the agent is lost", held, timeout_seconds=90)
    assert ready["message"].startswith("spec.powerCapWatts=1000 is below the 1400 W")
    assert ready["message"].endswith(
        f"counted at their maximum until their agent confirms: {tight_node}"
    )
    apply(sandbox, namespace, workload("elsewhere", products=[A100_40]))
    wait_until(
        "a new workload outside the held budget Running",
        lambda: running_on_planned_nodes(sandbox, namespace, "elsewhere"),
    )


def failing_plan(plan_input: PlanInput, model: PerformanceModel) -> Plan:
    raise RuntimeError("the solver crashed")


def test_a_round_that_cannot_plan_marks_every_budget_and_waiting_workload(
    sandbox: Sandbox, crds: list[str], namespace: str
) -> None:
    """Failure is visible: a condition and one Event on each budget and waiting workload, and a
    count of failed rounds. The loop runs in this process, its plans failing."""
    name = f"watched-{namespace[-5:]}"
    apply(sandbox, None, budget(name, 5000, {TEST_LABEL: name}))
    try:
        apply(sandbox, namespace, workload("waiting"))
        metrics = OperatorMetrics()

        async def leader() -> bool:
            return True

        loop = PlanningLoop(
            cache=ClusterCache(),
            kube=Kube(str(sandbox.kubeconfig)),
            settings=LoopSettings(debounce_seconds=0.2, namespaces=(namespace,)),
            build_input=build_input_function(30.0),
            plan_function=failing_plan,
            metrics=metrics,
            is_leader=leader,
        )

        async def run_a_while() -> None:
            loop.cache.mark_dirty()  # as the operator's first watch events do
            task = asyncio.create_task(loop.run())
            await asyncio.sleep(4)  # several rounds: each fails, after the debounce
            task.cancel()

        asyncio.run(run_a_while())
        failed_rounds = metrics.registry.get_sample_value(
            "wattsched_reconcile_errors_total", {"step": "plan"}
        )
        assert failed_rounds is not None
        assert failed_rounds >= 2

        cause = "the planning round failed: RuntimeError: the solver crashed"
        ready = condition(get_json(sandbox, "energybudget", name), "Ready")
        assert (ready["status"], ready["reason"], ready["message"]) == (
            "False",
            "PlanFailed",
            cause,
        )
        body = get_json(sandbox, "llmworkload", "waiting", "-n", namespace)
        assert body["status"]["phase"] == "Pending"
        assert body["status"]["message"] == cause
        schedulable = condition(body, "Schedulable")
        assert (schedulable["status"], schedulable["reason"]) == ("Unknown", "PlanFailed")
        # One Event per object and cause, however many rounds failed.
        budget_events = [e for e in events_on(sandbox, "EnergyBudget", name)]
        assert [(e["reason"], e["message"]) for e in budget_events] == [("PlanFailed", cause)]
        workload_events = events_on(sandbox, "LLMWorkload", "waiting", namespace)
        assert [e["reason"] for e in workload_events] == ["PlanFailed"]
    finally:
        sandbox.kubectl("delete", "energybudget", name, "--wait=false", check=False)


def test_a_lost_agent_is_noticed_in_seconds_and_only_its_replicas_move(
    sandbox: Sandbox, namespace: str, nodes: Nodes, start_operator: StartOperator
) -> None:
    """Issue 12 item 7: the default heartbeat timeout and a re-plan on its expiry; the gang's
    members on the healthy node keep their pods; the restart is announced; the workload is never
    Running with a replica's pod missing or elsewhere."""
    suffix = namespace[-5:]
    lost, healthy = (nodes.add(f"gpu-a100-{i}-{suffix}", A100_40, 8) for i in (1, 2))
    start_operator()
    apply(
        sandbox,
        namespace,
        workload("gang", type_="Training", gpus=4, replicas=4, products=[A100_40]),
    )
    wait_until("the gang Running", lambda: running_on_planned_nodes(sandbox, namespace, "gang"), 90)
    before = {p["metadata"]["name"]: p for p in pods_of(sandbox, namespace, "gang")}
    on_healthy = {
        n: p["metadata"]["uid"] for n, p in before.items() if p["spec"]["nodeName"] == healthy
    }
    on_lost = {n for n, p in before.items() if p["spec"]["nodeName"] == lost}
    assert len(on_healthy) == len(on_lost) == 2
    spare = nodes.add(f"gpu-a100-3-{suffix}", A100_40, 8)
    wait_until(
        f"{spare}'s agent reporting",
        lambda: (
            condition(get_json(sandbox, "nodepowerprofile", spare), "Applied").get("status")
            == "True"
            if sandbox.kubectl("get", "nodepowerprofile", spare, check=False).returncode == 0
            else False
        ),
        60,
    )

    stopped_at = time.monotonic()
    nodes.stop_agent(lost)
    running_with_pods_missing: list[str] = []

    def serving(pods: list[dict[str, Any]], placements: list[dict[str, Any]]) -> bool:
        by_name = {p["metadata"]["name"]: p for p in pods}
        return all(
            (pod := by_name.get(f"gang-{pl['replica']}")) is not None
            and pod["spec"].get("nodeName") == pl["node"]
            and pod["status"].get("phase") == "Running"
            and not pod["metadata"].get("deletionTimestamp")
            for pl in placements
        )

    def moved() -> bool:
        # Pods, then the status, then pods again: a status that says Running while neither
        # reading of the pods has every placement served is Running with pods missing.
        pods_before = pods_of(sandbox, namespace, "gang")
        status = get_json(sandbox, "llmworkload", "gang", "-n", namespace).get("status") or {}
        pods = pods_of(sandbox, namespace, "gang")
        placements = status.get("placements") or []
        if status.get("phase") == "Running" and not (
            serving(pods_before, placements) or serving(pods, placements)
        ):
            running_with_pods_missing.append(str(placements))
        on_spare = [p for p in pods if p["spec"].get("nodeName") == spare]
        return len(on_spare) == 2 and all(p["metadata"]["name"] in on_lost for p in on_spare)

    wait_until("the replicas on the lost node moved to the spare", moved, 120, interval=0.5)
    print(
        f"replicas moved {time.monotonic() - stopped_at:.1f} s after the agent stopped (measured)"
    )
    wait_until(
        "the gang Running again", lambda: running_on_planned_nodes(sandbox, namespace, "gang"), 90
    )
    after = {p["metadata"]["name"]: p for p in pods_of(sandbox, namespace, "gang")}
    assert {n: after[n]["metadata"]["uid"] for n in on_healthy} == on_healthy
    assert all(after[n]["spec"]["nodeName"] == spare for n in on_lost)
    assert running_with_pods_missing == []
    restarts = [
        e
        for e in events_on(sandbox, "LLMWorkload", "gang", namespace)
        if e["reason"] == "GangRestart"
    ]
    assert len(restarts) == 1
    assert f"moves from {lost} to {spare}" in restarts[0]["message"]
