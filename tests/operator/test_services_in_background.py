"""A round's Services are written in the background (`Applier.submit_services`): the apply step
returns once its pods are created, and Services handed over while older ones are being written
are written next, the newest round's only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any, cast

from tests.operator.test_core import NOW, node, service, view
from wattsched_operator import core
from wattsched_operator.apply import Applier
from wattsched_operator.cache import ClusterCache
from wattsched_operator.metrics import OperatorMetrics

GUARD_SECONDS = 30.0  # far longer than any step here takes; a hang fails instead of blocking


class SlowServicesKube:
    """A Kube that records every create and whose Service creates wait until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.created: list[str] = []  # "pods/<name>" or "services/<name>", in order
        self.lock = threading.Lock()

    def write(self, path: str, body: Mapping[str, Any], patch: bool = True) -> None:
        assert not patch
        kind = path.rsplit("/", 1)[-1]
        if kind == "services":
            assert self.release.wait(GUARD_SECONDS)
        with self.lock:
            self.created.append(f"{kind}/{body['metadata']['name']}")

    def list(self, path: str, label_selector: str | None = None, **_: Any) -> list[Any]:
        return []  # no Service exists yet


def services_of(*names: str) -> tuple[core.Round, dict[tuple[str, str], Mapping[str, Any]]]:
    """A round that places the Inference workloads `names`, and the Services it asks for."""
    cluster = view([node("l40s-0")], [service(name) for name in names], [])
    round_ = core.decide(core.Observed(cluster), NOW)
    assert round_.services is not None
    assert len(round_.services) == len(names)
    return round_, dict(round_.services)


def applier(kube: SlowServicesKube) -> Applier:
    async def call(function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    return Applier(
        kube=cast(Any, kube),
        cache=ClusterCache(),
        metrics=OperatorMetrics(),
        call=call,
        confirm_timeout_seconds=0,
        heartbeat_timeout_seconds=30,
    )


def test_the_apply_step_creates_the_pods_and_returns_while_their_services_are_written() -> None:
    round_, _ = services_of("chat")
    only_pods_and_services = core.Round(
        memory=round_.memory, create=round_.create, services=round_.services
    )
    kube = SlowServicesKube()

    async def scenario() -> tuple[list[str], list[str]]:
        writes = applier(kube)
        await asyncio.wait_for(writes.apply(only_pods_and_services, view([], [], [])), 10)
        at_return = list(kube.created)
        kube.release.set()
        await asyncio.wait_for(writes.services_written(), GUARD_SECONDS)
        await writes.writer.stop(1)
        return at_return, list(kube.created)

    at_return, in_the_end = asyncio.run(scenario())

    assert at_return == ["pods/chat-0"]
    assert in_the_end == ["pods/chat-0", "services/chat"]


def test_services_handed_over_meanwhile_are_written_next_the_newest_rounds_only() -> None:
    _, first = services_of("a")
    _, second = services_of("a", "b")
    _, third = services_of("a", "b", "c")
    kube = SlowServicesKube()
    cluster = view([], [service("a")], [])

    async def scenario() -> list[str]:
        writes = applier(kube)
        writes.submit_services(first, cluster)
        await asyncio.sleep(0.1)  # the first round's Service is being written
        writes.submit_services(second, cluster)
        writes.submit_services(third, cluster)
        kube.release.set()
        await asyncio.wait_for(writes.services_written(), GUARD_SECONDS)
        return list(kube.created)

    created = asyncio.run(scenario())

    # "a" again: the fake lists no Services, so the third round creates all of its own.
    assert created[0] == "services/a"
    assert sorted(created[1:]) == ["services/a", "services/b", "services/c"]
