"""The operator's own watch against the sandbox's API server: it lists, then follows every change,
delivering compact read-only bodies one at a time; a new list deletes what went meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import Sandbox
from wattsched_operator.cache import PODS, FrozenDict, object_key
from wattsched_operator.desired import LABEL_WORKLOAD
from wattsched_operator.kube import Kube, pods_path
from wattsched_operator.watch import Watch

pytestmark = pytest.mark.cluster


def pod(name: str, workload: str = "llama") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {LABEL_WORKLOAD: workload}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


class Seen:
    """The events a watch delivered, and how many deliveries ran at once (at most)."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str, Any]] = []
        self.running = 0
        self.most_at_once = 0

    async def deliver(self, event_type: str | None, body: Any) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.01)  # a handler that awaits: the next event must wait for it
        self.events.append((event_type, object_key(body), body))
        self.running -= 1

    async def until(self, what: str, check: Any, timeout_seconds: float = 30) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not check():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout_seconds} s; seen {self.events}")
            await asyncio.sleep(0.05)

    def of(self, key: str) -> list[str | None]:
        return [event_type for event_type, k, _ in self.events if k == key]


def pod_watch(kube: Kube, path: str, seen: Seen) -> Watch:
    """A watch of the operator's pods at `path` (on the running loop) delivering to `seen`."""
    return Watch(
        kube=kube,
        kind=PODS,
        path=path,
        deliver=seen.deliver,
        loop=asyncio.get_running_loop(),
        label_selector=LABEL_WORKLOAD,
    )


def test_a_watch_lists_then_follows_each_change_as_a_compact_body_one_at_a_time(
    sandbox: Sandbox, namespace: str
) -> None:
    kube = Kube(str(sandbox.kubeconfig))
    path = pods_path(namespace)
    kube.create(path, pod("before-0"))
    kube.create(path, pod("unlabelled") | {"metadata": {"name": "unlabelled"}})

    async def scenario() -> Seen:
        seen = Seen()
        watch = pod_watch(kube, path, seen)
        watch.start()
        try:
            before = f"{namespace}/before-0"
            await seen.until("the listed pod", lambda: None in seen.of(before))
            await asyncio.to_thread(kube.create, path, pod("after-0"))
            after = f"{namespace}/after-0"
            await seen.until("the created pod", lambda: "ADDED" in seen.of(after))
            await asyncio.to_thread(kube.delete, f"{path}/before-0", 0)
            await seen.until("the deleted pod", lambda: "DELETED" in seen.of(before))
        finally:
            watch.stop()
            await asyncio.to_thread(watch.join, 10)
        return seen

    seen = asyncio.run(scenario())
    assert f"{namespace}/unlabelled" not in {key for _, key, _ in seen.events}
    assert seen.most_at_once == 1
    for _, _, body in seen.events:
        assert isinstance(body, FrozenDict)  # the cache's read-only form
        assert "managedFields" not in body["metadata"]
        assert set(body["spec"]) == {"nodeName", "containers"}  # a pod as the cache keeps it


def test_a_new_list_deletes_what_was_delivered_before_and_is_gone_now(
    sandbox: Sandbox, namespace: str
) -> None:
    kube = Kube(str(sandbox.kubeconfig))
    path = pods_path(namespace)
    kube.create(path, pod("stays"))

    async def scenario() -> Seen:
        seen = Seen()
        watch = pod_watch(kube, path, seen)
        watch.known.add(f"{namespace}/went-while-away")  # delivered by an earlier list
        watch.start()
        try:
            await seen.until("the list", lambda: len(seen.events) >= 2)
        finally:
            watch.stop()
            await asyncio.to_thread(watch.join, 10)
        return seen

    seen = asyncio.run(scenario())
    assert [(t, k) for t, k, _ in seen.events[:2]] == [
        (None, f"{namespace}/stays"),
        ("DELETED", f"{namespace}/went-while-away"),
    ]  # then the pod's own changes (kube-scheduler binds it)
