"""Agents silent together: when too many of the agents that have reported are lost at once
(`snapshot.lost_agents`), the fault is taken to lie between the operator and the agents and
their replicas stay; a few lost agents still move their replicas (`NodeLost`)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from tests.operator.test_core import NOW, node, replica_pod, service, view
from wattsched_operator import core

LATER = NOW + timedelta(seconds=60)  # the default heartbeat timeout is 30 s
FRESH = (LATER - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
NODES = [f"l40s-{i}" for i in range(4)]


def round_with_silent(silent: int) -> core.Round:
    """Four 4-GPU nodes, a 1-GPU service running on each; the agents of the first `silent`
    nodes last reported 65 s before the round, the others 5 s before."""
    workloads = [service(f"chat{i}") for i in range(len(NODES))]
    pods = [replica_pod(f"chat{i}", name, annotations=None) for i, name in enumerate(NODES)]
    cluster = view([node(name) for name in NODES], workloads, pods)
    for name in NODES[silent:]:
        cluster.profiles[name]["status"]["agent"]["heartbeatTime"] = FRESH
    return core.decide(core.Observed(cluster, monotonic=100.0), LATER)


def evicted(round_: core.Round) -> dict[str, str | None]:
    return {e.name: e.cause for e in round_.evict}


def test_a_lost_agent_moves_its_replicas_when_most_agents_report() -> None:
    round_ = round_with_silent(1)
    assert evicted(round_) == {"chat0-0": "NodeLost"}
    assert [p["spec"]["nodeName"] for p in round_.create] != ["l40s-0"]
    assert round_.memory.ready_agents == frozenset(NODES[1:])


def test_two_of_four_lost_agents_are_below_the_share_and_move() -> None:
    assert evicted(round_with_silent(2)) == {"chat0-0": "NodeLost", "chat1-0": "NodeLost"}


def test_agents_silent_together_keep_their_replicas_and_take_no_new_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="wattsched.operator"):
        round_ = round_with_silent(3)
    assert evicted(round_) == {}
    assert round_.create == ()
    assert round_.plan is not None
    placed = {p.workload: p.node for p in round_.plan.placements}
    assert placed == {f"team/chat{i}": name for i, name in enumerate(NODES)}
    assert round_.memory.ready_agents == frozenset({"l40s-3"})
    [message] = [r.getMessage() for r in caplog.records if "silent at once" in r.getMessage()]
    assert "the agents of 3 GPU node(s) are silent at once (l40s-0, l40s-1, l40s-2)" in message
    # A new workload goes to the one node whose agent reports.
    caplog.clear()
    workloads = [service(f"chat{i}") for i in range(len(NODES))] + [service("new")]
    pods = [replica_pod(f"chat{i}", name, annotations=None) for i, name in enumerate(NODES)]
    cluster = view([node(name) for name in NODES], workloads, pods)
    cluster.profiles["l40s-3"]["status"]["agent"]["heartbeatTime"] = FRESH
    again = core.decide(core.Observed(cluster, memory=round_.memory, monotonic=200.0), LATER)
    assert evicted(again) == {}
    assert [p["metadata"]["annotations"]["wattsched.io/node"] for p in again.create] == ["l40s-3"]
    # Logged once while the same agents stay silent.
    assert not [r for r in caplog.records if "silent at once" in r.getMessage()]
