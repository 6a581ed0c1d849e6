"""The agent's NodePowerProfile watch against the sandbox's API server: what it reports across
watch requests, and how it recovers from a resourceVersion the API server no longer has (410).

Each test runs a `ProfileWatch` over the agent's own `KubeAccess` in a thread, on one node's
profile (a field selector, as a single-node agent watches), with watch requests shortened to 2 s
so that several end and are resumed during a test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.agent.conftest import apply_profile, profile_object, wait_until
from wattsched_agent import kube_access
from wattsched_agent.kube_access import Backoff, KubeAccess, ProfileWatch

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster
NODE = "gpu-a100-00"


class Reported:
    """The names a watch reported, read from the test's thread."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, name: str) -> None:
        with self.lock:
            self.names.append(name)

    def count(self) -> int:
        with self.lock:
            return len(self.names)


@pytest.fixture
def profile(sandbox: Sandbox, crds: list[str]) -> Iterator[str]:
    apply_profile(sandbox, NODE, idle_watts=300)
    yield NODE
    sandbox.kubectl("delete", "nodepowerprofile", NODE, "--ignore-not-found")


def start(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, resource_version: str | None = None
) -> tuple[ProfileWatch, Reported, threading.Event, threading.Thread]:
    monkeypatch.setattr(kube_access, "WATCH_SECONDS", 2)
    kube = KubeAccess(str(sandbox.kubeconfig))
    reported = Reported()
    stop = threading.Event()
    watch = ProfileWatch(
        list_profiles=lambda: kube.list_profiles(NODE),
        watch_events=lambda version: kube.watch_profile_events(NODE, version),
        on_spec_change=reported,
        stop=stop,
        backoff=Backoff(first_seconds=0.2, max_seconds=1.0),
    )
    watch.resource_version = resource_version
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    return watch, reported, stop, thread


def test_spec_changes_are_reported_once_across_watch_requests_and_status_writes_are_not(
    sandbox: Sandbox, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reported, stop, thread = start(sandbox, monkeypatch)
    try:
        wait_until("the listed profile reported", lambda: reported.count() == 1)
        status = {"status": {"agent": {"heartbeatTime": "2026-12-06T06:00:00Z"}}}
        sandbox.kubectl(
            "patch", "nodepowerprofile", profile, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
        written = profile_object(sandbox, profile)["status"]["agent"]["heartbeatTime"]
        assert written == "2026-12-06T06:00:00Z"
        threading.Event().wait(5)  # two watch requests end and are resumed meanwhile
        assert reported.count() == 1  # neither the status write nor a resumed watch reports it
        apply_profile(sandbox, profile, idle_watts=250)
        wait_until("the new generation reported", lambda: reported.count() == 2)
        sandbox.kubectl("delete", "nodepowerprofile", profile)
        wait_until("the deletion reported", lambda: reported.count() == 3)
        threading.Event().wait(3)
        assert reported.names == [profile] * 3
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_resource_version_the_api_server_no_longer_has_is_listed_again(
    sandbox: Sandbox, profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # resourceVersion 1 is older than the API server's watch history: it answers 410 Gone.
    watch, reported, stop, thread = start(sandbox, monkeypatch, resource_version="1")
    try:
        wait_until("the profile reported from the new list", lambda: reported.count() == 1)
        wait_until("a resourceVersion from the list", lambda: watch.resource_version != "1")
        apply_profile(sandbox, profile, idle_watts=250)
        wait_until("the new generation reported", lambda: reported.count() == 2)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
