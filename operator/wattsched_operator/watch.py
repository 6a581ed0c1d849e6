"""The operator's own watches of LLMWorkloads and of its pods: list, then watch, in a thread.

These two kinds grow with the workloads (10,000 LLMWorkloads are 10,000 objects and, after a
round's status writes, 10,000 watch events), so kopf does not watch them: kopf parses every event
into a full body (about 32 KB of Python objects for an LLMWorkload with its managed fields),
queues it to a task per object, and keeps a record per object for as long as the process lives.
Here a worker thread reads the watch stream line by line, turns each event's object into the
cache's compact body (`cache.slim`: no managed fields, shared read-only values) at once, and hands
it to the event loop (`deliver`), waiting until it is handled: one full body at a time, whatever
the number of objects or the rate of events.

A watch starts with a paged list (each page slimmed as it comes) whose objects are delivered as
events without a type (as kopf delivers its initial listing), followed by a DELETED for every
object delivered before that the list no longer holds; then it watches from the list's
resourceVersion, following bookmarks. A watch the server ends is opened again where it stopped;
one the server refuses as too old (410 Gone) or that fails is listed again, after a backoff (0.5 s
doubling to 30 s) while failures go on. Not for the other kinds (budgets, nodes,
NodePowerProfiles: a few hundred objects, watched by kopf) nor for what a round decides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from wattsched_operator.cache import Body, object_key, slim
from wattsched_operator.kube import Kube, KubeError
from wattsched_operator.rounds import backoff_seconds

logger = logging.getLogger("wattsched.operator")

# The server ends each watch after this long (it is opened again from where it stopped), and a
# watch that sent nothing, not even a bookmark, for longer than the read timeout is opened again.
WATCH_SECONDS = 300
READ_TIMEOUT_SECONDS = WATCH_SECONDS + 60
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
HTTP_GONE = 410

# One event for the handler: its type (ADDED, MODIFIED, DELETED; None for a listed object) and
# the object's compact body.
Deliver = Callable[[str | None, Body], Coroutine[Any, Any, None]]


class _StoppedError(Exception):
    """The watch was stopped while it read."""


@dataclass
class Watch:
    """One kind's list and watch at `path` (with `label_selector`), delivering each event's
    compact body to `deliver` on `loop`, one at a time, in the order the server sent them."""

    kube: Kube
    kind: str
    path: str
    deliver: Deliver
    loop: asyncio.AbstractEventLoop
    label_selector: str | None = None
    retry_first_seconds: float = RETRY_FIRST_SECONDS
    # Keys of the objects delivered and not deleted (a new list deletes the others).
    known: set[str] = field(init=False, default_factory=set)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _response: Any = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"wattsched watch {self.kind}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the watch: its thread delivers nothing more and exits (at once if it waits for
        an event: the stream is closed, from a thread of its own so that this never blocks)."""
        self._stop.set()
        response = self._response
        if response is not None:
            threading.Thread(target=_close, args=(response,), daemon=True).start()

    def join(self, timeout_seconds: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self.watch_from(version)
                failures = 0
            except _StoppedError:
                return
            except Exception as error:  # the watch must go on: list again after a backoff
                if self._stop.is_set():
                    return
                failures += 1
                delay = backoff_seconds(failures, self.retry_first_seconds, RETRY_MAX_SECONDS)
                gone = isinstance(error, KubeError) and error.status == HTTP_GONE
                log = logger.info if gone else logger.warning
                log("%s watch: %s; listing again in %.1f s", self.kind, error, delay)
                version = None
                self._stop.wait(delay)

    def _handle(self, event_type: str | None, body: Body) -> None:
        """Hand one event to the event loop and wait until it is handled."""
        if self._stop.is_set():
            raise _StoppedError
        key = object_key(body)
        if event_type == "DELETED":
            self.known.discard(key)
        else:
            self.known.add(key)
        handled = asyncio.run_coroutine_threadsafe(self.deliver(event_type, body), self.loop)
        try:
            handled.result()
        except Exception:  # one object's event never stops the watch (kopf's rule too)
            if self._stop.is_set():
                raise _StoppedError from None
            logger.exception("%s watch: handling %s of %s failed", self.kind, event_type, key)

    def _list(self) -> str:
        """List every object (delivered without a type), delete the ones no longer there;
        returns the list's resourceVersion."""
        bodies, version = self.kube.list_with_version(
            self.path, self.label_selector, keep=lambda body: slim(self.kind, body)
        )
        listed = {object_key(body) for body in bodies}
        gone = [key for key in self.known if key not in listed]
        for body in bodies:
            self._handle(None, body)
        del bodies
        for key in gone:
            self._handle("DELETED", _stub(key))
        return version

    def watch_from(self, version: str) -> str:
        """Watch from `version` until the server ends the watch; returns the last version seen.
        A refusal as too old raises `KubeError` (410)."""
        query = {
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        if self.label_selector:
            query["labelSelector"] = self.label_selector
        lines = self.kube.watch_lines(
            self.path, query, read_timeout_seconds=READ_TIMEOUT_SECONDS, opened=self._opened
        )
        try:
            for line in lines:
                version = self._event(line, version)
        finally:
            self._response = None
            if self._stop.is_set():
                raise _StoppedError
        return version

    def _opened(self, response: Any) -> None:
        self._response = response
        if self._stop.is_set():
            response.close()

    def _event(self, line: bytes, version: str) -> str:
        """Handle one line of the watch; returns the resourceVersion it leaves the watch at."""
        event = json.loads(line)
        event_type = event.get("type")
        raw = event.get("object") or {}
        del event, line  # the full body lives only until it is slimmed
        if event_type == "ERROR":
            raise KubeError("WATCH", self.path, int(raw.get("code") or 0), str(raw.get("message")))
        found = str((raw.get("metadata") or {}).get("resourceVersion") or version)
        if event_type in {"ADDED", "MODIFIED", "DELETED"}:
            body = slim(self.kind, raw)
            del raw
            self._handle(str(event_type), body)
        return found  # a BOOKMARK only moves the version


def _close(response: Any) -> None:
    try:
        response.close()
    except Exception:  # closing under a reading thread: the read ends either way
        logger.debug("closing a watch stream", exc_info=True)


def _stub(key: str) -> Body:
    """A body that names an object by its cache key (for a DELETED found by a new list)."""
    namespace, _, name = key.rpartition("/")
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"metadata": metadata}


def handled_by(handler: Callable[..., Coroutine[Any, Any, None]], state: Any) -> Deliver:
    """A `Deliver` that calls one of `handlers`' event handlers with `state`."""

    async def deliver(event_type: str | None, body: Mapping[str, Any]) -> None:
        await handler(state, event_type, body)

    return deliver
