"""The status writer: statuses and their Events written in the background, one write per object
at a time, a newer write merged into the one still waiting, Events once, retries on conflicts,
everything written on stop; and what it holds shown to the next round (`overlay`)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any, cast

import pytest

from wattsched_api.meta import merge_patch
from wattsched_api.vocabulary import Phase
from wattsched_operator import core
from wattsched_operator import writer as writer_module
from wattsched_operator.apply import Applier, object_path
from wattsched_operator.cache import WORKLOADS, ClusterCache
from wattsched_operator.core import ClusterView, Event, ObjectRef, StatusWrite
from wattsched_operator.kube import KubeError
from wattsched_operator.writer import (
    StatusWriter,
    compose_merge_patches,
)
from wattsched_optimizer.problem import Unplaced


def ref(name: str, uid: str = "") -> ObjectRef:
    return ObjectRef(core.WORKLOAD_KIND, name, "team", uid or f"uid-{name}")


def event(name: str, reason: str) -> Event:
    return Event(ref(name), "Normal", reason, f"{name} {reason}")


def write(name: str, status: Mapping[str, Any], *reasons: str) -> StatusWrite:
    return StatusWrite(ref(name), status, tuple(event(name, r) for r in reasons))


def lazily(
    name: str,
    status: Mapping[str, Any],
    *reasons: str,
    built: list[str] | None = None,
    decided_by: str | None = None,
) -> core.WorkloadStatus:
    """A round's status of workload `name`, built when written: `status` with its Events unless
    the object already has it (each build recorded in `built`); `decided_by`: what decides it
    besides the object's resourceVersion (None: the writer is not told)."""

    def inputs(body: Mapping[str, Any]) -> int | None:
        return hash((decided_by, body["metadata"].get("resourceVersion")))

    def build(previous: Mapping[str, Any]) -> StatusWrite | None:
        if built is not None:
            built.append(name)
        if merge_patch(previous, status) == previous:
            return None
        return write(name, status, *reasons)

    phase = str(status.get("phase"))
    return core.WorkloadStatus(
        f"team/{name}",
        phase,
        None,
        "Pending",
        None,
        ref(name),
        build,
        None if decided_by is None else inputs,
    )


class FakeServer:
    """Records status writes and Events in the order they land; a write can be held (`gate`)
    or fail with the errors queued in `failures` (per path, in order)."""

    def __init__(self) -> None:
        self.statuses: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []
        self.failures: dict[str, list[KubeError]] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}

    async def write_status(self, path: str, body: Mapping[str, Any]) -> None:
        self.in_flight[path] = self.in_flight.get(path, 0) + 1
        self.most_at_once[path] = max(self.most_at_once.get(path, 0), self.in_flight[path])
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            if self.failures.get(path):
                raise self.failures[path].pop(0)
            self.writes.append((path, dict(body["status"])))
            self.statuses[path] = merge_patch(self.statuses.get(path, {}), body["status"])
        finally:
            self.in_flight[path] -= 1

    async def post_event(self, posted: Event) -> None:
        self.events.append((posted.object.name, posted.reason))

    def writer(self, **settings: Any) -> StatusWriter:
        return StatusWriter(
            write_status=self.write_status,
            post_event=self.post_event,
            path_of=lambda r: f"/w/{r.name}",
            **settings,
        )


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- merge patches -----------------------------------------------------------------------------


PATCH_PAIRS = [
    ({"phase": "Placed", "a": {"x": 1}}, {"phase": "Running", "a": {"y": 2}}),
    ({"a": {"x": 1, "y": 2}}, {"a": {"x": None}}),
    ({"a": {"x": {"deep": 1}}}, {"a": 5}),
    ({"conditions": [{"type": "A"}]}, {"conditions": [{"type": "B"}], "b": None}),
    ({"b": 2}, {"a": {"x": None, "v": {"n": 1}}}),
]
# A key removed (or set to a non-object), then an object merged into it: no one merge patch says
# "replace this object", so these are written one after the other.
NOT_ONE_PATCH = [
    ({"a": None}, {"a": {"x": 1, "z": None}}),
    ({"a": 3}, {"a": {"x": 1}}),
    ({"a": {"x": None}}, {"a": {"x": {"y": 1}}}),
]
TARGET = {"a": {"x": 0, "w": 9}, "b": 1, "phase": "Pending"}


@pytest.mark.parametrize(("first", "second"), PATCH_PAIRS)
def test_composed_merge_patches_do_what_the_two_do_one_after_the_other(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    one_by_one = merge_patch(merge_patch(TARGET, first), second)
    assert merge_patch(TARGET, compose_merge_patches(first, second)) == one_by_one


@pytest.mark.parametrize(("first", "second"), NOT_ONE_PATCH)
def test_patches_no_merge_patch_can_compose_are_refused(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    assert compose_merge_patches(first, second) is None


@pytest.mark.parametrize(("first", "second"), PATCH_PAIRS + NOT_ONE_PATCH)
def test_writes_queued_for_one_object_land_as_the_writes_one_after_the_other(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    server = FakeServer()
    server.statuses["/w/a/status"] = dict(TARGET)

    async def scenario() -> None:
        writer = server.writer()
        server.gate.clear()
        writer.submit(write("a", {"phase": "Held"}))
        await asyncio.sleep(0.01)
        writer.submit(write("a", first))
        writer.submit(write("a", second))
        server.gate.set()
        await writer.stop(5)

    run(scenario())
    held = merge_patch(TARGET, {"phase": "Held"})
    assert server.statuses["/w/a/status"] == merge_patch(merge_patch(held, first), second)
    composable = compose_merge_patches(first, second) is not None
    assert len(server.writes) == (2 if composable else 3)


# -- writing -----------------------------------------------------------------------------------


def test_writes_waiting_for_an_object_are_merged_and_the_latest_status_wins() -> None:
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer(concurrency=2)
        server.gate.clear()
        writer.submit(write("a", {"phase": "Pending", "message": "waiting"}, "Admitted"))
        await asyncio.sleep(0.01)  # a's first write is in flight, held
        writer.submit(write("a", {"phase": "Placed", "message": None}, "Placed"))
        writer.submit(write("a", {"phase": "Running", "ready": True}))
        server.gate.set()
        await writer.stop(5)

    run(scenario())
    assert server.writes == [
        ("/w/a/status", {"phase": "Pending", "message": "waiting"}),
        ("/w/a/status", {"phase": "Running", "message": None, "ready": True}),
    ]
    assert server.statuses["/w/a/status"] == {"phase": "Running", "ready": True}
    assert server.events == [("a", "Admitted"), ("a", "Placed")]


def test_an_object_is_never_written_twice_at_once_and_its_writes_land_in_order() -> None:
    server = FakeServer()
    phases = [f"p{i}" for i in range(30)]

    async def scenario() -> None:
        writer = server.writer(concurrency=8)
        for i, phase in enumerate(phases):
            writer.submit(write("a", {"phase": phase, f"k{i}": i}))
            writer.submit(write(f"other-{i}", {"phase": phase}))
            await asyncio.sleep(0)
        await writer.stop(5)

    run(scenario())
    assert max(server.most_at_once.values()) == 1
    order = [status["phase"] for path, status in server.writes if path == "/w/a/status"]
    assert order == sorted(order, key=phases.index)  # never an older status after a newer one
    assert server.statuses["/w/a/status"]["phase"] == "p29"
    assert server.statuses["/w/a/status"] == {"phase": "p29", **{f"k{i}": i for i in range(30)}}
    assert len(server.statuses) == 31


def test_objects_are_written_in_the_order_they_were_submitted() -> None:
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer(concurrency=1)
        for name in ("c", "a", "b"):
            writer.submit(write(name, {"phase": "Placed"}))
        await writer.stop(5)

    run(scenario())
    assert [path for path, _ in server.writes] == ["/w/c/status", "/w/a/status", "/w/b/status"]


def test_stop_writes_everything_pending_before_the_workers_end() -> None:
    server = FakeServer()

    async def scenario() -> StatusWriter:
        writer = server.writer(concurrency=3)
        for i in range(50):
            writer.submit(write(f"w{i}", {"phase": "Placed"}, "Placed"))
        await writer.stop(10)
        return writer

    writer = run(scenario())
    assert len(server.statuses) == 50
    assert len(server.events) == 50
    assert writer.idle()
    assert writer._workers == []


def test_stop_gives_up_after_its_timeout_on_writes_that_cannot_land() -> None:
    server = FakeServer()

    async def scenario() -> StatusWriter:
        writer = server.writer()
        server.gate.clear()
        writer.submit(write("held", {"phase": "Placed"}))
        await writer.stop(0.2)
        return writer

    writer = run(scenario())
    assert server.writes == []
    assert writer._workers == []


def test_an_event_in_two_merged_writes_is_posted_once_and_only_after_its_status_landed() -> None:
    server = FakeServer()
    seen_at_post: list[dict[str, Any]] = []

    async def post(posted: Event) -> None:
        seen_at_post.append(dict(server.statuses.get(f"/w/{posted.object.name}/status", {})))
        server.events.append((posted.object.name, posted.reason))

    async def scenario() -> None:
        writer = StatusWriter(
            write_status=server.write_status, post_event=post, path_of=lambda r: f"/w/{r.name}"
        )
        server.gate.clear()
        writer.submit(write("x", {"phase": "Pending"}))
        await asyncio.sleep(0.01)
        writer.submit(write("a", {"phase": "Placed"}, "Admitted", "Placed"))
        writer.submit(write("a", {"phase": "Placed", "n": 2}, "Placed"))
        server.gate.set()
        await writer.stop(5)

    run(scenario())
    assert server.events == [("a", "Admitted"), ("a", "Placed")]
    assert all(status.get("phase") == "Placed" for status in seen_at_post)


def test_a_conflict_is_retried_and_a_newer_write_that_came_meanwhile_wins() -> None:
    server = FakeServer()
    errors: list[BaseException] = []
    server.failures["/w/a/status"] = [KubeError("PATCH", "/w/a/status", 409, "conflict")]

    async def scenario() -> None:
        writer = server.writer(retry_first_seconds=0.05, on_error=errors.append)
        writer.submit(write("a", {"phase": "Placed", "old": 1}, "Placed"))
        await asyncio.sleep(0.01)  # the first try failed; its retry waits
        writer.submit(write("a", {"phase": "Running"}))
        await writer.stop(5)

    run(scenario())
    assert [type(e) for e in errors] == [KubeError]
    assert server.writes == [("/w/a/status", {"phase": "Running", "old": 1})]
    assert server.events == [("a", "Placed")]  # once, after the write that landed


def test_throttling_server_faults_and_lost_connections_are_retried_with_backoff() -> None:
    server = FakeServer()
    path = "/w/a/status"
    server.failures[path] = [
        KubeError("PATCH", path, 429, "slow down"),
        KubeError("PATCH", path, 503, "unavailable"),
        cast(KubeError, ConnectionResetError("reset")),
    ]

    async def scenario() -> None:
        writer = server.writer(retry_first_seconds=0.01)
        writer.submit(write("a", {"phase": "Placed"}, "Placed"))
        await writer.stop(5)

    run(scenario())
    assert server.writes == [(path, {"phase": "Placed"})]
    assert server.events == [("a", "Placed")]


def test_a_write_to_an_object_that_is_gone_is_dropped_without_its_events() -> None:
    server = FakeServer()
    errors: list[BaseException] = []
    server.failures["/w/gone/status"] = [KubeError("PATCH", "/w/gone/status", 404, "not found")]

    async def scenario() -> StatusWriter:
        writer = server.writer(on_error=errors.append)
        writer.submit(write("gone", {"phase": "Placed"}, "Placed"))
        await writer.stop(5)
        return writer

    writer = run(scenario())
    assert (server.writes, server.events, errors) == ([], [], [])
    assert writer.expected == {}


def test_a_refused_write_is_counted_dropped_and_left_to_the_next_round() -> None:
    server = FakeServer()
    errors: list[BaseException] = []
    server.failures["/w/bad/status"] = [KubeError("PATCH", "/w/bad/status", 422, "invalid")]

    async def scenario() -> ClusterView:
        writer = server.writer(on_error=errors.append)
        writer.submit(write("bad", {"phase": "Placed"}, "Placed"))
        await writer.stop(5)
        return writer.overlay(view_with(workload_body("bad", {"phase": "Pending"})))

    view = run(scenario())
    assert server.writes == []
    assert server.events == []
    assert [getattr(e, "status", None) for e in errors] == [422]
    assert view.workloads["team/bad"]["status"] == {"phase": "Pending"}  # what the server has


def test_a_writer_that_no_longer_leads_forgets_what_it_has_not_sent() -> None:
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer(concurrency=1)
        server.gate.clear()
        writer.submit(write("a", {"phase": "Placed"}))
        await asyncio.sleep(0.01)
        writer.submit(write("b", {"phase": "Placed"}))
        writer.discard()
        server.gate.set()
        await writer.stop(5)
        assert set(writer.expected) <= {"/w/a"}

    run(scenario())
    assert [path for path, _ in server.writes] == ["/w/a/status"]


# -- the next round sees what the writer holds -------------------------------------------------


def workload_body(name: str, status: dict[str, Any], uid: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": uid or f"uid-{name}"},
        "status": status,
    }


def view_with(*workloads: dict[str, Any]) -> ClusterView:
    return ClusterView(
        workloads={f"team/{w['metadata']['name']}": w for w in workloads},
        budgets={},
        nodes={},
        profiles={},
        pods={},
    )


def test_the_overlay_shows_pending_and_unwatched_writes_until_the_cache_holds_them() -> None:
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer()
        server.gate.clear()
        writer.submit(write("a", {"phase": "Placed", "message": None}))
        cached = view_with(workload_body("a", {"phase": "Pending", "message": "waiting"}))
        pending = writer.overlay(cached)
        assert pending.workloads["team/a"]["status"] == {"phase": "Placed"}
        assert cached.workloads["team/a"]["status"]["phase"] == "Pending"  # not changed
        server.gate.set()
        await writer.flush(5)
        # Written, the watch not yet back: still shown.
        assert writer.overlay(cached).workloads["team/a"]["status"] == {"phase": "Placed"}
        # The watch brought it: nothing left to show.
        watched = view_with(workload_body("a", {"phase": "Placed"}))
        assert writer.overlay(watched) == watched
        assert writer.expected == {}
        # A later (older) cache body is shown as the server has it: the writer let go.
        assert writer.overlay(cached) == cached
        await writer.stop(1)

    run(scenario())


def test_the_overlay_leaves_an_object_recreated_under_the_same_name_alone() -> None:
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer()
        writer.submit(write("a", {"phase": "Running"}))
        await writer.flush(5)
        recreated = view_with(workload_body("a", {}, uid="another-uid"))
        assert writer.overlay(recreated) == recreated
        assert writer.expected == {}
        await writer.stop(1)

    run(scenario())


# -- the round does not wait for its status writes ---------------------------------------------


class HeldStatusKube:
    """A Kube whose status writes block until `release` is set; pods are created at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.created: list[str] = []
        self.statuses: list[str] = []
        self.events: list[str] = []

    def write(self, path: str, body: Mapping[str, Any], patch: bool = True) -> None:
        if path.endswith("/status"):
            assert self.release.wait(10)
            self.statuses.append(path)
        elif path.endswith("/events"):
            self.events.append(body["reason"])
        else:
            self.created.append(body["metadata"]["name"])


def threaded_applier(kube: HeldStatusKube, *, writer_concurrency: int) -> Applier:
    """An Applier over `kube` whose calls run in the running loop's thread pool (as the
    operator's do); to be made inside a running loop."""
    loop = asyncio.get_running_loop()

    async def call(function: Any, *args: Any) -> Any:
        return await loop.run_in_executor(None, function, *args)

    return Applier(
        kube=cast(Any, kube),
        cache=ClusterCache(),
        metrics=None,
        call=call,
        confirm_timeout_seconds=1,
        heartbeat_timeout_seconds=30,
        writer_concurrency=writer_concurrency,
    )


def test_a_round_returns_and_the_next_creates_pods_while_status_writes_are_held() -> None:
    kube = HeldStatusKube()

    async def scenario() -> None:
        applier = threaded_applier(kube, writer_concurrency=2)

        def round_(name: str) -> core.Round:
            applier.cache.upsert(WORKLOADS, workload_body(name, {}))
            pod = {"metadata": {"name": f"{name}-0", "namespace": "team", "labels": {}}}
            return core.Round(
                memory=core.Memory(),
                create=(pod,),
                workload_statuses=(lazily(name, {"phase": "Placed"}, "Placed"),),
            )

        empty = view_with()
        await asyncio.wait_for(applier.apply(round_("first"), empty), 5)
        await asyncio.wait_for(applier.apply(round_("second"), empty), 5)
        assert kube.created == ["first-0", "second-0"]
        assert kube.statuses == []  # both rounds went on with their statuses held
        assert set(applier.writer.expected) == {
            object_path(ref("first")),
            object_path(ref("second")),
        }
        kube.release.set()
        await applier.writer.stop(5)
        assert sorted(kube.statuses) == sorted(
            object_path(ref(n)) + "/status" for n in ("first", "second")
        )
        assert kube.events == ["Placed", "Placed"]

    run(scenario())


def test_a_written_status_the_watch_never_shows_as_written_is_shown_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API server may prune or default a field: the cache's body then never matches what was
    written, and after a while it is the truth again."""
    monkeypatch.setattr(writer_module, "SHOWN_AFTER_WRITE_SECONDS", 0.2)
    server = FakeServer()

    async def scenario() -> None:
        writer = server.writer()
        writer.submit(write("a", {"phase": "Placed", "pruned": 1}))
        await writer.flush(5)
        as_stored = view_with(workload_body("a", {"phase": "Placed"}))
        shown = writer.overlay(as_stored).workloads["team/a"]["status"]
        assert shown == {"phase": "Placed", "pruned": 1}
        await asyncio.sleep(0.3)
        assert writer.overlay(as_stored) == as_stored
        assert writer.expected == {}
        await writer.stop(1)

    run(scenario())


def test_waiting_statuses_keep_what_they_repeat_once() -> None:
    # A round's thousands of statuses wait in the writer: the conditions and figures they share
    # are one read-only object, not one copy per workload.
    server = FakeServer()

    async def scenario() -> tuple[Any, Any]:
        server.gate.clear()  # nothing lands: the writes wait
        writer = server.writer(concurrency=1)
        for name in ("a", "b", "c"):
            admitted = {"type": "Admitted", "status": "True", "message": "the operator read it"}
            writer.submit(write(name, {"phase": "Pending", "conditions": [admitted]}))
        await asyncio.sleep(0)
        b, c = (writer.pending[f"/w/{n}"].writes[0].status for n in ("b", "c"))
        with pytest.raises(TypeError):
            b["phase"] = "Running"  # type: ignore[index]
        server.gate.set()
        await writer.stop(5)
        return b, c

    b, c = run(scenario())
    assert b["conditions"] is c["conditions"]
    assert server.statuses["/w/c/status"]["conditions"][0]["message"] == "the operator read it"


def test_what_a_round_holds_per_workload_keeps_no_attribute_dict_per_object() -> None:
    # A round of 10,000 workloads holds one of each per workload (two rounds while the writer
    # builds the last one's statuses): their fields only, no `__dict__` each.
    held = (
        ref("a"),
        event("a", "Placed"),
        write("a", {"phase": "Placed"}, "Placed"),
        lazily("a", {"phase": "Placed"}),
        Unplaced("team/a", "no GPU is free", "gpus"),
    )
    assert [type(value).__name__ for value in held if hasattr(value, "__dict__")] == []


def test_a_status_of_enum_values_is_kept_as_the_plain_strings_it_is_written_as() -> None:
    # The core's statuses hold StrEnum phases and condition types; the writer keeps them as the
    # plain strings the API server gets (only exact strings can be shared and interned).
    server = FakeServer()

    async def scenario() -> Any:
        writer = server.writer()
        writer.submit(write("a", {"phase": Phase.RUNNING, "conditions": [{"type": "Ready"}]}))
        status = writer.pending["/w/a"].writes[0].status
        await writer.stop(5)
        return status

    status = run(scenario())
    assert type(status["phase"]) is str
    assert status["phase"] == "Running"
    assert server.statuses["/w/a/status"]["phase"] == "Running"


# -- a round's statuses, built as the writer has room ------------------------------------------


def bodies_of(*names: str) -> dict[str, dict[str, Any]]:
    return {name: workload_body(name, {}) for name in names}


def test_a_rounds_statuses_are_built_only_as_the_writer_has_room() -> None:
    server = FakeServer()
    names = [f"w{i:02d}" for i in range(20)]
    bodies = bodies_of(*names)
    built: list[str] = []
    held: list[int] = []

    async def scenario() -> None:
        server.gate.clear()
        writer = server.writer(
            concurrency=2, max_built=3, current_body=lambda r: bodies.get(r.name)
        )
        landing = server.write_status

        async def write_status(path: str, body: Mapping[str, Any]) -> None:
            held.append(len(writer.pending) + len(writer.in_flight))
            await landing(path, body)

        writer.write_status = write_status
        writer.submit_lazily(lazily(n, {"phase": "Placed"}, "Placed", built=built) for n in names)
        for _ in range(5):
            await asyncio.sleep(0)
        assert built == names[:3]  # the writer holds 3 built statuses, the rest wait unbuilt
        assert not writer.idle()
        server.gate.set()
        await writer.stop(5)
        assert writer.idle()

    run(scenario())
    assert built == names  # each built once, in order
    assert max(held) <= 3
    assert sorted(server.statuses) == sorted(f"/w/{n}/status" for n in names)
    assert server.events == [(n, "Placed") for n in names]


def test_a_status_is_built_against_what_the_writer_sent_and_unchanged_is_not_written() -> None:
    # The watch has not brought the first write back yet (the cache's body has no status): the
    # next round's same status is built against the written one, and neither written nor its
    # Event posted again.
    server = FakeServer()
    bodies = bodies_of("a")

    async def scenario() -> None:
        writer = server.writer(current_body=lambda r: bodies.get(r.name))
        writer.submit_lazily([lazily("a", {"phase": "Placed"}, "Placed")])
        assert await writer.flush(5)
        writer.submit_lazily([lazily("a", {"phase": "Placed"}, "Placed")])
        assert await writer.flush(5)
        writer.submit_lazily([lazily("a", {"phase": "Running"})])
        await writer.stop(5)

    run(scenario())
    assert server.writes == [
        ("/w/a/status", {"phase": "Placed"}),
        ("/w/a/status", {"phase": "Running"}),
    ]
    assert server.events == [("a", "Placed")]


def test_a_newer_rounds_statuses_replace_the_older_rounds_not_built_yet() -> None:
    server = FakeServer()
    bodies = bodies_of("a", "b", "c")

    async def scenario() -> None:
        server.gate.clear()
        writer = server.writer(
            concurrency=1, max_built=1, current_body=lambda r: bodies.get(r.name)
        )
        writer.submit_lazily(lazily(n, {"phase": "Placed"}, "Placed") for n in "abc")
        await asyncio.sleep(0)
        writer.submit_lazily(lazily(n, {"phase": "Running"}, "Running") for n in "abc")
        server.gate.set()
        await writer.stop(5)

    run(scenario())
    assert server.writes == [
        ("/w/a/status", {"phase": "Placed"}),
        ("/w/a/status", {"phase": "Running"}),
        ("/w/b/status", {"phase": "Running"}),
        ("/w/c/status", {"phase": "Running"}),
    ]
    assert server.events == [("a", "Placed"), ("a", "Running"), ("b", "Running"), ("c", "Running")]


def test_a_round_starting_drops_the_last_rounds_statuses_not_built_and_writes_the_built() -> None:
    server = FakeServer()
    names = [f"w{i:02d}" for i in range(10)]
    bodies = bodies_of(*names)
    built: list[str] = []

    async def scenario() -> StatusWriter:
        server.gate.clear()
        writer = server.writer(
            concurrency=1, max_built=3, current_body=lambda r: bodies.get(r.name)
        )
        writer.submit_lazily(lazily(n, {"phase": "Placed"}, "Placed", built=built) for n in names)
        await asyncio.sleep(0)
        writer.drop_unbuilt()
        assert writer.lazy is None
        server.gate.set()
        assert await writer.flush(5)
        # The next round's statuses: the ones dropped are built now, the written ones found
        # unchanged.
        writer.submit_lazily(lazily(n, {"phase": "Placed"}, "Placed", built=built) for n in names)
        await writer.stop(5)
        return writer

    writer = run(scenario())
    assert built == names[:3] + names
    assert [path for path, _ in server.writes] == [f"/w/{n}/status" for n in names]
    assert server.events == [(n, "Placed") for n in names]
    assert writer.idle()


def test_a_lazily_submitted_status_of_an_object_gone_or_recreated_is_not_built() -> None:
    server = FakeServer()
    bodies = {"b": workload_body("b", {}, uid="another-uid"), **bodies_of("c")}
    built: list[str] = []

    async def scenario() -> None:
        writer = server.writer(current_body=lambda r: bodies.get(r.name))
        writer.submit_lazily(lazily(n, {"phase": "Placed"}, built=built) for n in "abc")
        await writer.stop(5)

    run(scenario())
    assert built == ["c"]
    assert list(server.statuses) == ["/w/c/status"]


def test_a_status_found_unchanged_is_not_built_again_while_what_decides_it_stays() -> None:
    server = FakeServer()
    body = workload_body("a", {"phase": "Placed"})
    body["metadata"]["resourceVersion"] = "7"
    bodies = {"a": body}
    built: list[str] = []
    someone_writes = "someone else writes the status: a new resourceVersion"

    async def passes(*steps: str) -> None:
        writer = server.writer(current_body=lambda r: bodies.get(r.name))
        for step in steps:
            if step == someone_writes:
                bodies["a"] = {"metadata": {**body["metadata"], "resourceVersion": "8"}}
                continue
            writer.submit_lazily([lazily("a", {"phase": "Placed"}, built=built, decided_by=step)])
            assert await writer.flush(5)
        await writer.stop(5)

    run(passes("plan 1", "plan 1", "plan 1"))
    assert built == ["a"]  # found unchanged once, then skipped unbuilt
    run(passes("plan 1", "plan 2", "plan 2"))
    assert built == ["a", "a", "a"]  # a new writer knows nothing; then the inputs moved
    built.clear()
    run(passes("plan 1", "plan 1", someone_writes, "plan 1"))
    assert built == ["a", "a"]  # the new resourceVersion is built against, and written
    assert server.writes == [("/w/a/status", {"phase": "Placed"})]


def test_first_statuses_are_written_before_refreshes_of_statuses_already_written() -> None:
    # Running workloads' energy figures, refreshed every accounting interval, are submitted built
    # and wait ahead of a round's first statuses; the writer still builds and writes those first.
    server = FakeServer()
    running = {"phase": "Running", "energy": {"joules": 1.0}}
    bodies = {
        **{n: workload_body(n, running) for n in ("r1", "r2")},
        **bodies_of("n1", "n2", "n3"),
    }
    built: list[str] = []

    async def scenario() -> None:
        writer = server.writer(
            concurrency=1, max_built=2, current_body=lambda r: bodies.get(r.name)
        )
        for name in ("r1", "r2"):
            writer.submit(write(name, {"energy": {"joules": 2.0}}))
        writer.submit_lazily(
            lazily(n, {"phase": "Placed"}, "Placed", built=built) for n in ("n1", "n2", "n3")
        )
        assert built == ["n1", "n2"]  # the refreshes waiting take none of the room
        await writer.stop(5)

    run(scenario())
    assert [path for path, _ in server.writes] == [
        f"/w/{n}/status" for n in ("n1", "n2", "n3", "r1", "r2")
    ]
    assert server.events == [(n, "Placed") for n in ("n1", "n2", "n3")]


def test_a_first_status_whose_write_failed_is_retried_as_a_first_status() -> None:
    server = FakeServer()
    bodies = {"r": workload_body("r", {"phase": "Running"}), **bodies_of("n1", "n2")}
    server.failures["/w/n1/status"] = [KubeError("PATCH", "/w/n1/status", 409, "conflict")]

    async def scenario() -> None:
        writer = server.writer(
            concurrency=1, retry_first_seconds=0.0, current_body=lambda r: bodies.get(r.name)
        )
        writer.submit(write("r", {"energy": {"joules": 2.0}}))
        writer.submit(write("n1", {"phase": "Placed"}))
        writer.submit(write("n2", {"phase": "Placed"}))
        writer.submit(write("x", {"phase": "Placed"}))  # not in the cache: not known to be first
        await writer.stop(5)

    run(scenario())
    assert [path for path, _ in server.writes] == [f"/w/{n}/status" for n in ("n1", "n2", "r", "x")]


def test_a_status_the_round_counted_energy_for_is_built_at_once_the_others_as_there_is_room() -> (
    None
):
    # The next round's accounting starts from the energy written (or waiting to be): it must see
    # every counted one, however far behind the writer is.
    kube = HeldStatusKube()

    async def scenario() -> None:
        applier = threaded_applier(kube, writer_concurrency=1)
        applier.writer.max_built = 1
        for name in ("a", "b", "c"):
            applier.cache.upsert(WORKLOADS, workload_body(name, {}))
        energy = {"phase": "Running", "energy": {"joules": 5.0}}
        counted = dataclasses.replace(lazily("c", energy), counted=True)
        round_ = core.Round(
            memory=core.Memory(),
            workload_statuses=(
                lazily("a", {"phase": "Placed"}),
                lazily("b", {"phase": "Placed"}),
                counted,
            ),
        )
        await asyncio.wait_for(applier.apply(round_, view_with()), 5)
        # c at once; a in the room for one lazily built status (c does not take it); b waits.
        assert set(applier.writer.expected) == {object_path(ref(n)) for n in ("a", "c")}
        kube.release.set()
        await applier.writer.stop(5)
        assert sorted(kube.statuses) == sorted(
            object_path(ref(n)) + "/status" for n in ("a", "b", "c")
        )

    run(scenario())
