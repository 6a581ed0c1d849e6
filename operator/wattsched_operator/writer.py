"""Status writes and their Events, off the round's critical path.

A round hands its status writes (`core.StatusWrite`: a merge patch of an object's status and the
Events that go with it) to the `StatusWriter` and goes on: the next round's pod creates never wait
for the last round's statuses. The writer keeps one pending write per object: a newer write for
the same object is merged into the one still waiting (the latest status wins, the Events of both
are kept, an identical Event once), so a burst of rounds costs one status write per object and
phase that is still waiting, not one per round. A few workers (`concurrency`) write first
statuses (an object `current_body` shows without a status, and none sent: the workload just
applied waits for its first word) before the rest, each kind in the order the objects were
first submitted, never two writes of one object at a time; each write's Events are posted once,
after it landed. So a refresh of running workloads' energy figures, every accounting interval,
never holds back the first status of thousands of workloads waiting for theirs.

A round's workload statuses come lazily (`submit_lazily`): each is built when there is room
(fewer than `max_built` of the statuses it built waiting or being written), against the status
the object has then (the cache's, with what the writer has sent or will send merged in), so the
writer never holds more than `max_built` lazily built statuses (besides those submitted built,
such as the energy figures a round counted, which take none of that room), a status that would
not change is never queued, and its Events say what changes from the status last written. A
status found unchanged is not built again while what decides it (`WorkloadStatus.inputs`: the
object's resourceVersion, its pods', the plan's place for it, its figures) stays the same. A
newer round's statuses replace the ones of an older round not built yet (each round decides
every workload's status); the planning loop drops those as the next round starts
(`drop_unbuilt`), so the writer never holds one round's decisions while the next is decided.

What the writer holds is visible to the next round (`overlay`): the view the core decides on
shows each object with its pending and written-but-not-yet-watched status, so a round never
decides the same change twice (and never posts its Events twice) because the watch is behind.

A write that fails with a conflict, throttling, a server fault or no answer is retried with
backoff (a newer write for the object, if one came meanwhile, wins over it); an object that is
gone drops its write; any other refusal is logged and counted and left to the next round, which
decides the status again from what the cluster holds. `stop` writes what is pending (bounded by a
timeout) before the operator exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wattsched_api.meta import merge_patch
from wattsched_operator import core
from wattsched_operator.cache import shared
from wattsched_operator.core import ClusterView, ObjectRef, StatusWrite
from wattsched_operator.kube import HTTP_CONFLICT, HTTP_NOT_FOUND, HTTP_TOO_MANY_REQUESTS, KubeError
from wattsched_operator.rounds import backoff_seconds, is_deleting

logger = logging.getLogger("wattsched.operator")

# Workers writing statuses at once: few enough that the round's own writes (pod creates,
# evictions, profiles) keep most of the operator's API worker threads.
DEFAULT_CONCURRENCY = 4
# Lazily built statuses held at most (objects waiting or being written) while a round's statuses
# are built: enough to keep the workers busy, few against 10,000 workloads.
DEFAULT_MAX_BUILT = 256
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
# How long a written status is shown to rounds at most when the watch never brings it back as
# written (the API server may prune or default a field): then the cache's body is the truth.
SHOWN_AFTER_WRITE_SECONDS = 30.0

WriteStatus = Callable[[str, Mapping[str, Any]], Awaitable[None]]
PostEvent = Callable[[core.Event], Awaitable[None]]
# The object a write goes to as the cache holds it now (None: not there).
CurrentBody = Callable[[ObjectRef], Mapping[str, Any] | None]


def compose_merge_patches(
    first: Mapping[str, Any], second: Mapping[str, Any]
) -> dict[str, Any] | None:
    """One merge patch with the effect of `first` then `second`, or None when no merge patch has
    it: `second` merges an object into a key `first` removes or sets to a non-object (a merge
    patch cannot say "replace this object")."""
    result = dict(first)
    for key, value in second.items():
        before = result.get(key, _ABSENT)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = compose_merge_patches(before, value)
            if inner is None:
                return None
            result[key] = inner
        elif isinstance(value, Mapping) and before is not _ABSENT:
            return None
        else:
            result[key] = value
    return result


_ABSENT = object()


def retryable(error: BaseException) -> bool:
    """Whether a failed write may succeed if sent again: a conflict, throttling, a server fault,
    or no answer at all (not a refusal of the write itself)."""
    if not isinstance(error, KubeError):
        return True  # a connection or timeout error from the client
    return error.status in {0, HTTP_CONFLICT, HTTP_TOO_MANY_REQUESTS} or error.status >= 500


@dataclass
class _Pending:
    """One object's writes waiting to go, in order (one, unless a newer patch could not be merged
    into the one before: `compose_merge_patches`), and for a retry how many tries failed and when
    (monotonic) the next may go."""

    writes: list[StatusWrite]
    failures: int = 0
    not_before: float = 0.0
    # The object's status was never written (nor sent) when its first write here was submitted.
    first: bool = False


def _queued(writes: list[StatusWrite], newer: StatusWrite) -> list[StatusWrite]:
    """`writes` then `newer`, merged into the last write when a merge patch can say both; an
    Event already queued for the object is not queued again."""
    queued = {e for w in writes for e in w.events}
    events = tuple(dict.fromkeys(e for e in newer.events if e not in queued))
    if not writes:
        return [replace(newer, events=events)]
    last = writes[-1]
    status = compose_merge_patches(last.status, newer.status)
    if status is None:
        return [*writes, replace(newer, events=events)]
    return [*writes[:-1], replace(newer, status=status, events=last.events + events)]


def _apply_all(status: Mapping[str, Any], writes: list[StatusWrite]) -> Any:
    for write in writes:
        status = merge_patch(status, write.status)
    return status


@dataclass
class StatusWriter:
    """Writes statuses (`write_status(path, patch)`) and posts their Events (`post_event`) in
    the background; see the module docstring. `path_of` gives an object's API path."""

    write_status: WriteStatus
    post_event: PostEvent
    path_of: Callable[[ObjectRef], str]
    # What lazily submitted statuses are built against (with `expected` merged in).
    current_body: CurrentBody = lambda ref: None
    concurrency: int = DEFAULT_CONCURRENCY
    max_built: int = DEFAULT_MAX_BUILT
    on_error: Callable[[BaseException], None] = lambda error: None
    # A failed write's first retry waits this long, each later one twice as long (at most
    # `RETRY_MAX_SECONDS`).
    retry_first_seconds: float = RETRY_FIRST_SECONDS
    # Waiting writes by object path, in the order they were first submitted.
    pending: dict[str, _Pending] = field(init=False, default_factory=dict)
    # The paths in `pending` whose write is a first status (`_Pending.first`), in order: written
    # before the others.
    first: dict[str, None] = field(init=False, default_factory=dict)
    # Paths being written now.
    in_flight: set[str] = field(init=False, default_factory=set)
    # Paths waiting or being written with a status the lazy pass built (at most `max_built`).
    lazily_built: set[str] = field(init=False, default_factory=set)
    # What the writer has sent or will send, by path (object, status patch): shown to the next
    # round until the cache holds it.
    expected: dict[str, list[StatusWrite]] = field(init=False, default_factory=dict)
    # When (monotonic) the last write of each path in `expected` landed.
    landed_at: dict[str, float] = field(init=False, default_factory=dict)
    # The latest round's workload statuses not built yet (`submit_lazily`).
    lazy: Iterator[core.WorkloadStatus] | None = field(init=False, default=None)
    # The inputs (`WorkloadStatus.inputs`) of the statuses found unchanged, by path: in this
    # round's lazy pass, and in the passes before it (kept until a pass completes).
    unchanged: dict[str, int] = field(init=False, default_factory=dict)
    unchanged_before: dict[str, int] = field(init=False, default_factory=dict)
    # Whether the last lazy pass saw every status of its round (not replaced or dropped first).
    pass_completed: bool = field(init=False, default=True)
    # Set when a write is submitted or done (workers look for work), and when nothing is left.
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _drained: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _workers: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    # -- what rounds call --------------------------------------------------------------------------

    def submit(self, write: StatusWrite) -> None:
        """Queue `write` (merged into the object's waiting write, if any); returns at once.
        Its status is kept in the cache's shared, read-only form (`cache.shared`): a round's
        thousands of statuses repeat most of their conditions and figures."""
        write = replace(write, status=shared(write.status))
        path = self.path_of(write.object)
        waiting = self.pending.get(path)
        if waiting is None:
            first = self._never_written(path, write.object)
            self.pending[path] = _Pending(_queued([], write), first=first)
            if first:
                self.first[path] = None
        else:
            waiting.writes = _queued(waiting.writes, write)
        self.expected[path] = _queued(self.expected.get(path, []), replace(write, events=()))
        self._drained.clear()
        self._wake.set()
        self._start()

    def submit_lazily(self, workload_statuses: Iterable[core.WorkloadStatus]) -> None:
        """Write these statuses, each built when there is room (see the module docstring);
        replaces the statuses of an earlier round not built yet. Returns at once."""
        if self.lazy is None and self.pass_completed:  # what the last pass did not see is gone
            self.unchanged_before = self.unchanged
        else:
            self.unchanged_before |= self.unchanged
        self.unchanged = {}
        self.lazy = iter(workload_statuses)
        self.pass_completed = False
        self._drained.clear()
        self._refill()
        self._wake.set()
        self._start()

    def drop_unbuilt(self) -> None:
        """Forget the lazily submitted statuses not built yet: the planning round starting now
        decides every workload's status again, and holding the last round's decisions while the
        next one is decided kept two rounds of every workload in memory. What is built (waiting
        or being written) is written."""
        if self.lazy is None:
            return
        self.lazy = None
        self._settle()

    def submit_built(self, status: core.WorkloadStatus) -> None:
        """Build `status` now, against the status its object has (the cache's, with what the
        writer sent or will send merged in), and queue it unless it would not change or the
        object is gone."""
        if status.build is None or status.ref is None:
            return
        body = self.current_body(status.ref)
        if body is None or is_deleting(body) or not _same_object(body, status.ref):
            return  # gone (or going): nothing to write
        path = self.path_of(status.ref)
        sent = self.expected.get(path, [])
        inputs = None if sent or status.inputs is None else status.inputs(body)
        if inputs is not None and self.unchanged_before.get(path) == inputs:
            self.unchanged[path] = inputs  # found unchanged before, and nothing moved
            return
        write = status.build(_apply_all(body.get("status") or {}, sent))
        if write is not None:
            self.submit(write)
        elif inputs is not None:
            self.unchanged[path] = inputs

    def _never_written(self, path: str, ref: ObjectRef) -> bool:
        """Whether the object has no status yet, as the cache holds it, and none was sent."""
        if path in self.expected or path in self.in_flight:
            return False
        body = self.current_body(ref)
        return body is not None and not body.get("status")

    def overlay(self, view: ClusterView) -> ClusterView:
        """`view` with the status of each workload and budget the writer holds a write for
        merged in; drops what the cache already shows (and objects that are gone)."""
        if not self.expected:
            return view  # nothing held: no copy of the workloads and budgets
        workloads = dict(view.workloads)
        budgets = dict(view.budgets)
        shown_since = time.monotonic() - SHOWN_AFTER_WRITE_SECONDS
        for path, writes in list(self.expected.items()):
            ref = writes[-1].object
            objects = _objects_of(ref, workloads, budgets)
            key = _cache_key(ref)
            body = None if objects is None else objects.get(key)
            busy = path in self.pending or path in self.in_flight
            if objects is None or body is None or not _same_object(body, ref):
                if not busy:
                    self._forget(path)
                continue
            status = body.get("status") or {}
            merged = _apply_all(status, writes)
            if merged == status or (not busy and self.landed_at.get(path, 0.0) < shown_since):
                if not busy:
                    self._forget(path)  # the watch caught up (or the server changed it)
                continue
            objects[key] = {**body, "status": merged}
        return replace(view, workloads=workloads, budgets=budgets)

    def idle(self) -> bool:
        return not self.pending and not self.in_flight and self.lazy is None

    async def flush(self, timeout_seconds: float) -> bool:
        """Wait until nothing is pending, being written or left to build (retries included);
        False when `timeout_seconds` passed first."""
        if self.idle():
            return True
        self._start()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout_seconds: float) -> None:
        """Write what is pending (for at most `timeout_seconds`), then stop the workers."""
        if not await self.flush(timeout_seconds):
            logger.warning(
                "%d status writes not done %.0f s after the stop; the next operator writes them",
                len(self.pending) + len(self.in_flight),
                timeout_seconds,
            )
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        # Events are bound to the event loop that waited on them: a writer started again (in
        # another loop) gets new ones.
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()

    def discard(self) -> None:
        """Forget every write not yet sent (this operator no longer leads: another writes)."""
        self.lazy = None
        self.unchanged.clear()
        self.unchanged_before.clear()
        self.pending.clear()
        self.first.clear()
        self.lazily_built &= self.in_flight
        for path in [p for p in self.expected if p not in self.in_flight]:
            self._forget(path)
        self._settle()

    def _forget(self, path: str) -> None:
        self.expected.pop(path, None)
        self.landed_at.pop(path, None)

    # -- workers -----------------------------------------------------------------------------------

    def _start(self) -> None:
        if not self._workers:
            self._workers = [
                asyncio.get_running_loop().create_task(
                    self._work(), name=f"wattsched status writer {i}"
                )
                for i in range(self.concurrency)
            ]

    def _settle(self) -> None:
        if self.idle():
            self._drained.set()

    def _room(self) -> bool:
        return len(self.lazily_built) < self.max_built

    def _refill(self) -> None:
        """Build lazily submitted statuses while fewer than `max_built` of the ones built so
        wait or are being written (at most `max_built` builds a call: the event loop is not held
        for long); skip those that would not change or whose object is gone."""
        for _ in range(self.max_built):
            if self.lazy is None or not self._room():
                return
            status = next(self.lazy, None)
            if status is None:
                self.lazy = None
                self.pass_completed = True
                self._settle()
                return
            self.submit_built(status)
            path = None if status.ref is None else self.path_of(status.ref)
            if path is not None and path in self.pending:
                self.lazily_built.add(path)

    def _next(self) -> tuple[str | None, float | None]:
        """The first waiting path that is due and not being written, first statuses before the
        others, and when (monotonic) the next retry is due if none is."""
        now = time.monotonic()
        soonest: float | None = None
        for path in itertools.chain(self.first, self.pending):
            waiting = self.pending[path]
            if path in self.in_flight:
                continue
            if waiting.not_before <= now:
                return path, None
            soonest = waiting.not_before if soonest is None else min(soonest, waiting.not_before)
        return None, soonest

    async def _work(self) -> None:
        while True:
            self._refill()
            path, retry_at = self._next()
            if path is None and self.lazy is not None and self._room():
                await asyncio.sleep(0)  # more to build: let the event loop run first
                continue
            if path is None:
                # No await between the look and the clear: a submit after it sets it again.
                self._wake.clear()
                timeout = None if retry_at is None else max(0.0, retry_at - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            waiting = self.pending.pop(path)
            self.first.pop(path, None)
            self.in_flight.add(path)
            try:
                await self._write(path, waiting)
            finally:
                self.in_flight.discard(path)
                if path not in self.pending:
                    self.lazily_built.discard(path)
                self._wake.set()  # a newer write of this object may wait for it
                self._settle()

    async def _write(self, path: str, waiting: _Pending) -> None:
        for done, write in enumerate(waiting.writes):
            try:
                await self.write_status(path + "/status", {"status": dict(write.status)})
            except Exception as error:  # every failure is sorted out below
                self._failed(path, waiting, done, error)
                return
            self.landed_at[path] = time.monotonic()
            await asyncio.gather(*(self._post(event) for event in write.events))

    async def _post(self, event: core.Event) -> None:
        try:
            await self.post_event(event)
        except Exception as error:  # a lost Event never stops the writer
            logger.warning(
                "could not post Event %s on %s: %s", event.reason, event.object.name, error
            )

    def _failed(self, path: str, waiting: _Pending, done: int, error: BaseException) -> None:
        """Sort out a failed write: `waiting.writes[done]` failed, the ones before it landed."""
        newer = self.pending.get(path)
        if isinstance(error, KubeError) and error.status == HTTP_NOT_FOUND:
            # The object is gone: nothing to write; a newer write (if any) finds out itself.
            if newer is None:
                self._forget(path)
            return
        self.on_error(error)
        if not retryable(error):
            logger.warning(
                "status write %s refused; the next round decides it again: %s", path, error
            )
            if newer is None:
                self._forget(path)
            else:
                self.expected[path] = [replace(w, events=()) for w in newer.writes]
            return
        failures = waiting.failures + 1
        delay = backoff_seconds(failures, self.retry_first_seconds, RETRY_MAX_SECONDS)
        logger.info("status write %s failed (%s); retrying in %.1f s", path, error, delay)
        writes = waiting.writes[done:]
        for write in newer.writes if newer is not None else ():
            writes = _queued(writes, write)
        first = waiting.first or (newer is not None and newer.first)
        retry = _Pending(writes, failures, time.monotonic() + delay, first)
        # Back at its place in the order: before the objects submitted after it.
        self.pending = {path: retry, **{p: w for p, w in self.pending.items() if p != path}}
        if first:
            self.first = {path: None, **{p: None for p in self.first if p != path}}


def _objects_of(
    ref: ObjectRef, workloads: dict[str, Any], budgets: dict[str, Any]
) -> dict[str, Any] | None:
    """The dict of the view that holds `ref`'s kind (None: the writer shows no other kind)."""
    if ref.kind == core.WORKLOAD_KIND:
        return workloads
    if ref.kind == core.BUDGET_KIND:
        return budgets
    return None


def _cache_key(ref: ObjectRef) -> str:
    return f"{ref.namespace}/{ref.name}" if ref.namespace else ref.name


def _same_object(body: Mapping[str, Any], ref: ObjectRef) -> bool:
    """Whether `body` is the object `ref` was written to (not one re-created under its name)."""
    uid = (body.get("metadata") or {}).get("uid")
    return not ref.uid or not uid or uid == ref.uid
