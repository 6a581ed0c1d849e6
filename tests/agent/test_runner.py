"""The agent's runner without a cluster: which nodes a pass writes the status of.

A fake KubeAccess records the status patches; fake node agents return an empty status. What is
tested is `AgentRunner`'s choice of nodes (spec changes, heartbeats), not the reconcile itself
(tests/agent/test_reconcile.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, cast

import pytest

from wattsched_agent.node_agent import AgentRunner, ExitPolicy

INTERVAL_SECONDS = 10.0


class FakeKube:
    """Profiles for the named nodes; counts the reads, records each status patch (or refuses
    the nodes in `refuse`)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.patched: list[str] = []
        self.refuse: set[str] = set()
        self.reads = 0
        self.read_for: list[str | None] = []  # the node each read asked for (None: all)

    def profiles(self, node_name: str | None) -> dict[str, dict[str, Any]]:
        self.reads += 1
        self.read_for.append(node_name)
        return {
            name: {
                "apiVersion": "wattsched.io/v1alpha1",
                "kind": "NodePowerProfile",
                "metadata": {"name": name, "generation": 1},
                "spec": {"nodeName": name, "pods": []},
            }
            for name in self.names
            if node_name in (None, name)
        }

    def gpu_pods(self, node_name: str | None) -> dict[str, list[Any]]:
        self.reads += 1
        self.read_for.append(node_name)
        return {}

    def patch_status(self, name: str, status: Mapping[str, Any]) -> None:
        if name in self.refuse:
            raise RuntimeError(f"{name}: refused")
        self.patched.append(name)


class FakeAgent:
    def observe_pods(self, pods: list[Any]) -> None:
        pass

    def reconcile(self, profile: Any) -> dict[str, Any]:
        return {}

    def stop(self, policy: ExitPolicy) -> None:
        pass

    def stopped_status(self, profile: Any) -> dict[str, Any]:
        return {}


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube(["gpu-a", "gpu-b"])


def fake_runner(kube: FakeKube, *, workers: int = 2, **settings: Any) -> AgentRunner:
    """A runner over `kube`'s nodes, each with a `FakeAgent`."""
    return AgentRunner(
        cast(Any, kube),
        {name: cast(Any, FakeAgent()) for name in kube.names},
        single_node=None,
        interval_seconds=INTERVAL_SECONDS,
        exit_policy=ExitPolicy.LEAVE,
        workers=workers,
        **settings,
    )


@pytest.fixture
def runner(kube: FakeKube) -> Iterator[AgentRunner]:
    made = fake_runner(kube)
    yield made
    made.shutdown()


def test_the_first_heartbeat_writes_every_node(runner: AgentRunner) -> None:
    assert runner.to_reconcile(set(), heartbeat=True, now=time.monotonic()) == {"gpu-a", "gpu-b"}


def test_a_spec_change_written_just_before_a_heartbeat_is_that_nodes_heartbeat(
    runner: AgentRunner, kube: FakeKube
) -> None:
    runner.tick(runner.to_reconcile({"gpu-a"}, heartbeat=False, now=time.monotonic()))
    assert kube.patched == ["gpu-a"]
    kube.patched.clear()
    runner.tick(runner.to_reconcile(set(), heartbeat=True, now=time.monotonic()))
    assert kube.patched == ["gpu-b"]


def test_a_spec_change_is_always_written_even_right_after_a_write(
    runner: AgentRunner, kube: FakeKube
) -> None:
    runner.tick(runner.to_reconcile(set(), heartbeat=True, now=time.monotonic()))
    kube.patched.clear()
    runner.tick(runner.to_reconcile({"gpu-b"}, heartbeat=True, now=time.monotonic()))
    assert kube.patched == ["gpu-b"]


def test_a_node_is_due_again_half_an_interval_after_its_last_write(runner: AgentRunner) -> None:
    runner.tick(runner.to_reconcile(set(), heartbeat=True, now=time.monotonic()))
    written = time.monotonic()
    assert runner.to_reconcile(set(), heartbeat=True, now=written) == set()
    # Never more than 1.5 intervals without a write: the next pass after half an interval writes.
    later = written + INTERVAL_SECONDS / 2 + 0.1
    assert runner.to_reconcile(set(), heartbeat=True, now=later) == {"gpu-a", "gpu-b"}


def test_a_node_whose_write_failed_is_due_at_the_next_heartbeat(
    runner: AgentRunner, kube: FakeKube
) -> None:
    kube.refuse = {"gpu-a"}
    assert runner.tick(runner.to_reconcile(set(), heartbeat=True, now=time.monotonic())) == 1
    assert runner.to_reconcile(set(), heartbeat=True, now=time.monotonic()) == {"gpu-a"}


def test_a_pass_with_nothing_due_reads_and_writes_nothing(
    runner: AgentRunner, kube: FakeKube
) -> None:
    assert runner.tick(set()) == 0
    assert kube.reads == 0
    assert kube.patched == []


def test_a_spec_change_reads_only_its_nodes_profile_and_pods(
    runner: AgentRunner, kube: FakeKube
) -> None:
    runner.tick(runner.to_reconcile({"gpu-b"}, heartbeat=False, now=time.monotonic()))
    assert kube.patched == ["gpu-b"]
    assert kube.read_for == ["gpu-b", "gpu-b"]  # not every profile and pod of the cluster


def test_a_heartbeat_pass_reads_every_profile_and_pod_once() -> None:
    names = [f"gpu-{i:02d}" for i in range(6)]
    kube = FakeKube(names)
    many = fake_runner(kube)
    try:
        many.tick(many.to_reconcile(set(), heartbeat=True, now=time.monotonic()))
        read_for, patched = list(kube.read_for), sorted(kube.patched)
    finally:
        many.shutdown()
    assert patched == names
    assert read_for == [None, None]


def chunked_runner(kube: FakeKube, chunk: int) -> AgentRunner:
    return fake_runner(kube, workers=1, heartbeat_chunk=chunk)


def test_a_heartbeat_pass_reads_once_and_writes_a_chunk_at_a_time() -> None:
    kube = FakeKube([f"gpu-{i:02d}" for i in range(5)])
    runner = chunked_runner(kube, chunk=2)
    try:
        heartbeat = runner.start_heartbeat(time.monotonic())
        assert heartbeat is not None
        steps = []
        while heartbeat.pending:
            runner.heartbeat_step(heartbeat)
            steps.append(list(kube.patched))
        read_for = list(kube.read_for)
    finally:
        runner.shutdown()
    assert steps == [kube.names[:2], kube.names[:4], kube.names]
    assert read_for == [None, None]


def test_a_node_written_for_a_spec_change_during_a_heartbeat_pass_is_left_out_of_it() -> None:
    kube = FakeKube([f"gpu-{i:02d}" for i in range(5)])
    runner = chunked_runner(kube, chunk=2)
    try:
        heartbeat = runner.start_heartbeat(time.monotonic())
        assert heartbeat is not None
        runner.heartbeat_step(heartbeat)
        runner.tick(runner.to_reconcile({"gpu-04"}, heartbeat=False, now=time.monotonic()))
        while heartbeat.pending:
            runner.heartbeat_step(heartbeat)
        patched = list(kube.patched)
    finally:
        runner.shutdown()
    # gpu-04's spec-change write (from a newer read) was its heartbeat: written once.
    assert patched == ["gpu-00", "gpu-01", "gpu-04", "gpu-02", "gpu-03"]


def test_the_loop_serves_a_spec_change_between_the_chunks_of_a_heartbeat_pass() -> None:
    kube = FakeKube([f"gpu-{i:02d}" for i in range(6)])
    runner = chunked_runner(kube, chunk=2)
    patch_status = kube.patch_status

    def patch_and_change(name: str, status: Mapping[str, Any]) -> None:
        patch_status(name, status)
        if kube.patched == ["gpu-00"]:  # during the first chunk, the operator changes gpu-05
            runner.spec_changed("gpu-05")

    kube.patch_status = patch_and_change  # type: ignore[method-assign]
    kube.watch_profiles = lambda node, on_change, stop: stop.wait()  # type: ignore[attr-defined]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(kube.patched) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    patched = list(kube.patched)
    runner.request_stop()
    thread.join(10)
    assert not thread.is_alive()
    # gpu-05 was written right after the first chunk, and not again by the heartbeat.
    assert patched == ["gpu-00", "gpu-01", "gpu-05", "gpu-02", "gpu-03", "gpu-04"]


@pytest.mark.parametrize(("changed", "per_node"), [(10, True), (11, False)])
def test_a_spec_change_on_up_to_a_sixteenth_of_many_nodes_reads_each_nodes_own(
    changed: int, per_node: bool
) -> None:
    kube = FakeKube([f"gpu-{i:03d}" for i in range(160)])
    runner = chunked_runner(kube, chunk=32)
    names = set(kube.names[:changed])
    try:
        runner.tick(runner.to_reconcile(names, heartbeat=False, now=time.monotonic()))
        read_for, patched = list(kube.read_for), sorted(kube.patched)
    finally:
        runner.shutdown()
    assert patched == sorted(names)
    if per_node:
        assert sorted(map(str, read_for)) == sorted([*names, *names])  # a profile, pods per node
    else:
        assert read_for == [None, None]  # one list of each for the cluster
