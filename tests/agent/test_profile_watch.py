"""The agent's NodePowerProfile watch without a cluster: list, resume, 410 Gone, 504 Too large.

A scripted API stands in for the API server: each list returns the next scripted listing, each
watch the next scripted outcome (events, or an ApiException as the Kubernetes client raises it
for an ERROR event). The stop event records the waits instead of sleeping. What is tested is
`ProfileWatch`'s retry logic: where each watch resumes, when it lists again, how long it waits, and
which profiles it reports (the agent's tests on the sandbox cover the real watch).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from wattsched_agent.kube_access import Backoff, ProfileWatch

TOO_LARGE = ApiException(
    status=504, reason="Timeout: Too large resource version: 900, current: 850"
)
GONE = ApiException(status=410, reason="Expired: too old resource version: 100 (700)")


def profile(name: str, generation: int, resource_version: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": generation, "resourceVersion": resource_version}
    }


def event(kind: str, name: str, generation: int, resource_version: str) -> dict[str, Any]:
    obj = profile(name, generation, resource_version)
    return {"type": kind, "object": obj, "raw_object": obj}


def bookmark(resource_version: str) -> dict[str, Any]:
    obj = {"metadata": {"resourceVersion": resource_version}}
    return {"type": "BOOKMARK", "object": obj, "raw_object": obj}


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(0.0 if timeout is None else timeout)
        return self.is_set()


class ScriptedApi:
    """Lists and watches from a script; stops the watch when the watch script runs out."""

    def __init__(
        self,
        listings: list[tuple[list[dict[str, Any]], str]],
        watches: list[list[dict[str, Any]] | ApiException | OSError],
        stop: threading.Event,
    ) -> None:
        self.listings = listings
        self.watches = watches
        self.stop = stop
        self.calls: list[str] = []  # "list", or "watch@<resourceVersion>"

    def list_profiles(self) -> tuple[list[dict[str, Any]], str]:
        self.calls.append("list")
        return self.listings.pop(0)

    def watch_events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        self.calls.append(f"watch@{resource_version}")
        if not self.watches:
            self.stop.set()
            return
        outcome = self.watches.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        yield from outcome


def run(
    listings: list[tuple[list[dict[str, Any]], str]],
    watches: list[list[dict[str, Any]] | ApiException | OSError],
) -> tuple[ScriptedApi, RecordingStop, list[str]]:
    stop = RecordingStop()
    api = ScriptedApi(listings, watches, stop)
    reported: list[str] = []
    ProfileWatch(
        list_profiles=api.list_profiles,
        watch_events=api.watch_events,
        on_spec_change=reported.append,
        stop=stop,
        backoff=Backoff(first_seconds=1.0, max_seconds=30.0, draw=lambda low, high: high),
    ).run()
    return api, stop, reported


def test_the_first_list_reports_every_profile_and_the_watch_starts_at_its_version() -> None:
    api, _, reported = run([([profile("a", 1, "10"), profile("b", 1, "11")], "12")], [])
    assert reported == ["a", "b"]
    assert api.calls == ["list", "watch@12"]


def test_a_new_generation_is_reported_and_a_status_write_is_not() -> None:
    events = [event("MODIFIED", "a", 1, "13"), event("MODIFIED", "a", 2, "14")]
    api, _, reported = run([([profile("a", 1, "10")], "12")], [events])
    assert reported == ["a", "a"]  # the list, then generation 2 (13 was a status write)
    assert api.calls == ["list", "watch@12", "watch@14"]


def test_a_deleted_profile_is_reported() -> None:
    _, _, reported = run([([profile("a", 1, "10")], "12")], [[event("DELETED", "a", 1, "13")]])
    assert reported == ["a", "a"]


def test_a_watch_that_ends_resumes_from_the_last_version_seen_without_listing() -> None:
    api, stop, _ = run(
        [([profile("a", 1, "10")], "12")],
        [[event("MODIFIED", "a", 2, "20"), bookmark("25")], []],
    )
    assert api.calls == ["list", "watch@12", "watch@25", "watch@25"]
    assert stop.waits == []  # a watch that ends normally is resumed at once


def test_too_large_resource_version_waits_and_resumes_from_the_same_version() -> None:
    api, stop, reported = run(
        [([profile("a", 1, "10")], "12")],
        [
            [event("MODIFIED", "a", 2, "20")],
            TOO_LARGE,
            TOO_LARGE,
            [event("MODIFIED", "a", 3, "30")],
        ],
    )
    assert api.calls == ["list", "watch@12", "watch@20", "watch@20", "watch@20", "watch@30"]
    assert stop.waits == [1.0, 2.0]  # backs off, doubling; no list
    assert reported == ["a", "a", "a"]  # generations 1, 2, 3: nothing lost


def test_gone_lists_again_and_reports_what_changed_or_was_deleted_meanwhile() -> None:
    first = [profile("a", 1, "10"), profile("b", 1, "11"), profile("c", 1, "11")]
    again = [profile("a", 1, "10"), profile("b", 2, "700"), profile("d", 1, "701")]
    api, stop, reported = run([(first, "12"), (again, "702")], [GONE])
    assert api.calls == ["list", "watch@12", "list", "watch@702"]
    # The first list: a, b, c; the second: c deleted, b changed, d new (a unchanged).
    assert reported == ["a", "b", "c", "c", "b", "d"]
    assert stop.waits == [1.0]


def test_failures_back_off_up_to_the_limit_and_a_normal_end_resets_the_wait() -> None:
    failures: list[list[dict[str, Any]] | ApiException | OSError] = [TOO_LARGE] * 7
    _, stop, _ = run(
        [([], "12")], [*failures, [], ConnectionRefusedError("connection refused"), TOO_LARGE]
    )
    assert stop.waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 1.0, 2.0]


def test_a_failed_list_waits_and_lists_again() -> None:
    stop = RecordingStop()
    calls: list[str] = []

    def list_profiles() -> tuple[list[dict[str, Any]], str]:
        calls.append("list")
        if len(calls) == 1:
            raise TOO_LARGE
        return [profile("a", 1, "10")], "12"

    def watch_events(resource_version: str) -> Iterator[dict[str, Any]]:
        calls.append(f"watch@{resource_version}")
        stop.set()
        yield from ()

    reported: list[str] = []
    ProfileWatch(
        list_profiles=list_profiles,
        watch_events=watch_events,
        on_spec_change=reported.append,
        stop=stop,
        backoff=Backoff(draw=lambda low, high: high),
    ).run()
    assert calls == ["list", "list", "watch@12"]
    assert reported == ["a"]
    assert stop.waits == [1.0]


@pytest.mark.parametrize("failures", [1, 3, 10])
def test_a_backoff_wait_is_drawn_between_half_and_all_of_its_ceiling(failures: int) -> None:
    backoff = Backoff(first_seconds=1.0, max_seconds=30.0)
    waits = [backoff.next_seconds() for _ in range(failures)]
    ceiling = min(30.0, 2.0 ** (failures - 1))
    assert ceiling / 2 <= waits[-1] <= ceiling
