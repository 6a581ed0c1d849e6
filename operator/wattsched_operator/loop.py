"""The planning loop: the shell around the decision core, one round at a time.

Handlers mark the cache dirty; the loop waits for that (or for the periodic re-plan, a retry that is
due, an agent's heartbeat expiring, a demand check that finds a service short of capacity), lets
changes settle for the debounce time (longer while only workloads are leaving and agents confirming
limits: one plan for a mass deletion, not one per workload), follows leadership, resyncs the cache
from full lists, reads telemetry, and hands what it observed to `core.decide` (off the event loop:
it solves). The Round that comes back is applied by `apply` in the budget-safe order. What a round
decides is in `core`; how it is written is in `apply`; this module only sequences rounds and reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from wattsched_api.vocabulary import Source
from wattsched_operator import budget_horizon, core, desired, transition
from wattsched_operator.apply import Applier
from wattsched_operator.cache import (
    BUDGETS,
    NODES,
    PODS,
    PROFILES,
    WORKLOADS,
    Body,
    ClusterCache,
    slim,
)
from wattsched_operator.core import (
    InputBuilder,
    PlanFunction,
    PlannedInput,
)
from wattsched_operator.kube import (
    GROUP_PATH,
    Kube,
    budgets_path,
    pods_path,
    profiles_path,
    workloads_path,
)
from wattsched_operator.readings import EnergyReading, PodKey, TelemetrySnapshot
from wattsched_operator.telemetry import TelemetryReader
from wattsched_optimizer.problem import Plan

logger = logging.getLogger("wattsched.operator")

T = TypeVar("T")

# How often a wait for changes to settle looks for a change that ends it.
SETTLE_POLL_SECONDS = 0.1

__all__ = ["InputBuilder", "LoopSettings", "PlanFunction", "PlannedInput", "PlanningLoop"]


@dataclass(frozen=True)
class LoopSettings(core.Settings):
    """The decision core's settings (`core.Settings`: with telemetry each accounting update is a
    status write per running workload; the loop re-plans when a heartbeat it counted on expires,
    not only on the periodic re-plan) and the shell's own."""

    debounce_seconds: float = 1.0
    # While every change since the last round can settle (a workload deleted, its pods going, an
    # agent confirming limits: `cache.Changes`), plan once this long passed without another, and
    # at most this long after the first.
    settle_quiet_seconds: float = 2.0
    settle_longest_seconds: float = 10.0
    replan_seconds: float = 60.0
    confirm_timeout_seconds: float = 15.0
    # Namespaces whose LLMWorkloads this operator handles; empty means all.
    namespaces: tuple[str, ...] = ()
    workers: int = 16
    # A telemetry read slower than this is dropped for the round (planning goes on, modelled).
    telemetry_timeout_seconds: float = 10.0
    # With telemetry, how often the services' served tokens/s and queues are read between plans
    # (`core.check_demand`): a service whose demand exceeds its plan's capacity is re-planned
    # then, not at the periodic re-plan. 0: no checks.
    demand_check_seconds: float = 15.0
    # On the way out, how long the loop waits for status writes still pending to be written.
    flush_seconds: float = 10.0


class PlanningLoop:
    def __init__(
        self,
        *,
        cache: ClusterCache,
        kube: Kube,
        settings: LoopSettings,
        build_input: InputBuilder,
        plan_function: PlanFunction,
        metrics: Any,
        is_leader: Callable[[], Awaitable[bool]],
        telemetry: TelemetryReader | None = None,
    ) -> None:
        self.cache = cache
        self.kube = kube
        self.settings = settings
        self.build_input = build_input
        self.plan_function = plan_function
        self.metrics = metrics
        self.is_leader = is_leader
        self.telemetry = telemetry
        # What the controller carries from round to round (see `core.Memory`).
        self.memory = core.fresh_memory(settings.replan_seconds)
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="kube")
        self._was_leader = False
        self._wake_at: float | None = None
        self._planned_at = 0.0
        self._accounted_at = 0.0
        self._checked_at = 0.0
        self.applier = Applier(
            kube=kube,
            cache=cache,
            metrics=metrics,
            call=self._call,
            confirm_timeout_seconds=settings.confirm_timeout_seconds,
            heartbeat_timeout_seconds=settings.heartbeat_timeout_seconds,
            namespaces=settings.namespaces,
        )

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait for a change, the periodic tick, a retry that is due or an agent's
        heartbeat expiring; debounce, plan, apply.

        With telemetry and an accounting interval shorter than the re-plan interval, the ticks in
        between are accounting rounds (`account_once`): measured power, energy and carbon in
        statuses follow `accounting_seconds` without solving a plan each time.
        """
        try:
            await self._run()
        finally:
            # Cancelled (the operator stops) or failed: what rounds decided is still written.
            await self.applier.writer.stop(self.settings.flush_seconds)

    async def _run(self) -> None:
        last_resync = 0.0
        while True:
            due = await self._wait_for_work()
            self.cache.take_changes()
            leader = await self.is_leader()
            if not leader:
                self._was_leader = False
                self.applier.writer.discard()  # the leader writes statuses now
                continue
            if due == "check" and self._was_leader:
                try:
                    await self.check_demand_once()
                except Exception:
                    logger.exception("demand check failed; the next plan reads demand")
                    # A round between plans, as accounting rounds are counted.
                    self.metrics.reconcile_errors.labels(step="account").inc()
                continue
            if due == "account" and self._was_leader:
                try:
                    await self.account_once()
                except Exception:
                    logger.exception("accounting round failed; the next plan accounts")
                    self.metrics.reconcile_errors.labels(step="account").inc()
                continue
            try:
                periodic = time.monotonic() - last_resync >= self.settings.replan_seconds
                if not self._was_leader or periodic:
                    await self.resync()
                    last_resync = time.monotonic()
                self._was_leader = True
                self._planned_at = self._accounted_at = self._checked_at = time.monotonic()
                await self.plan_once()
                self.memory = core.succeeded(self.memory)
            except Exception as error:
                logger.exception("planning round failed; retrying after the debounce")
                self.metrics.reconcile_errors.labels(step="plan").inc()
                self.cache.mark_dirty()
                await self.report_failed_round(error)

    async def _wait_for_work(self) -> str:
        """Return when the next round is due: the cache changed (after the debounce), the periodic
        re-plan is due, a replica's retry is due, or an agent counted on in the last round has
        been silent for longer than the heartbeat timeout (a heartbeat that arrives in time
        just moves the wake-up): "plan". "account" when only an accounting round between plans
        is due, "check" when only a demand check is (see `run`)."""
        planned_at = self._planned_at if self.memory.last_round is not None else time.monotonic()
        periodic_at = planned_at + self.settings.replan_seconds
        account_at = (
            self._accounted_at + self.settings.accounting_seconds
            if self._accounting_between_plans()
            else None
        )
        check_at = (
            self._checked_at + self.settings.demand_check_seconds
            if self._checking_demand_between_plans()
            else None
        )
        while True:
            wake_at = min(
                t
                for t in (
                    periodic_at,
                    self._wake_at,
                    self._heartbeat_expiry(),
                    account_at,
                    check_at,
                )
                if t is not None
            )
            try:
                timeout = max(0.0, wake_at - time.monotonic())
                await asyncio.wait_for(self.cache.dirty.wait(), timeout=timeout)
                await asyncio.sleep(self.settings.debounce_seconds)
                await self._let_changes_settle()
                return "plan"
            except TimeoutError:
                now = time.monotonic()
                if now >= periodic_at or (self._wake_at is not None and now >= self._wake_at):
                    return "plan"
                if lost := self._lost_agents():
                    logger.info("agents lost on %s: re-planning", ", ".join(lost))
                    return "plan"
                if account_at is not None and now >= account_at:
                    return "account"
                if check_at is not None and now >= check_at:
                    return "check"

    async def _let_changes_settle(self) -> None:
        """While only departures and confirmations came since the last round, wait until they
        stop coming (or the longest wait passed); any other change ends the wait at once."""
        while True:
            left = self.cache.changes.settle_seconds(
                time.monotonic(),
                quiet_seconds=self.settings.settle_quiet_seconds,
                longest_seconds=self.settings.settle_longest_seconds,
            )
            if left <= 0:
                return
            await asyncio.sleep(min(left, SETTLE_POLL_SECONDS))

    def _heartbeats(self) -> dict[str, datetime | None]:
        """The last heartbeat of each agent the last round counted as ready (None: none read)."""
        return {
            node: transition.agent_heartbeat(self.cache.get(PROFILES, node))
            for node in self.memory.ready_agents
        }

    def _heartbeat_expiry(self) -> float | None:
        """When (monotonic) the first heartbeat the last round counted on expires."""
        beats = [b for b in self._heartbeats().values() if b is not None]
        if not beats:
            return None
        left = (min(beats) - datetime.now(UTC)).total_seconds()
        return time.monotonic() + left + self.settings.heartbeat_timeout_seconds + 0.1

    def _lost_agents(self) -> list[str]:
        """Agents the last round counted as ready whose heartbeat is now too old (or gone)."""
        now = datetime.now(UTC)
        limit = self.settings.heartbeat_timeout_seconds
        return sorted(
            node
            for node, beat in self._heartbeats().items()
            if beat is None or (now - beat).total_seconds() > limit
        )

    async def resync(self) -> None:
        """Refill the cache from full lists (heals events missed while paused or restarting)."""

        async def listed(kind: str, path: str, selector: str | None = None) -> list[Body]:
            keep = functools.partial(slim, kind)  # page by page: no full bodies piling up
            return await self._call(functools.partial(self.kube.list, keep=keep), path, selector)

        namespaces = self.settings.namespaces
        workloads: list[Body] = []
        pods: list[Body] = []
        selector = desired.LABEL_WORKLOAD
        if namespaces:
            for namespace in namespaces:
                workloads += await listed(WORKLOADS, workloads_path(namespace))
                pods += await listed(PODS, pods_path(namespace), selector)
        else:
            workloads = await listed(WORKLOADS, f"{GROUP_PATH}/llmworkloads")
            pods = await listed(PODS, "/api/v1/pods", selector)
        self.cache.replace(WORKLOADS, workloads)
        self.cache.replace(PODS, pods)
        self.cache.replace(BUDGETS, await listed(BUDGETS, budgets_path()))
        self.cache.replace(NODES, await listed(NODES, "/api/v1/nodes"))
        self.cache.replace(PROFILES, await listed(PROFILES, profiles_path()))

    # -- one round ---------------------------------------------------------------------------------

    def view(self) -> core.ClusterView:
        """The cache's view, with the statuses this operator wrote or will write and the watch
        has not brought back yet (so a round never decides a change, or its Events, twice)."""
        return self.applier.writer.overlay(self.cache.view())

    def _observed(self, view: core.ClusterView, readings: core.Readings | None) -> core.Observed:
        return core.Observed(
            view=view,
            memory=self.memory,
            monotonic=time.monotonic(),
            settings=self.settings,
            telemetry=readings,
        )

    async def plan_once(self) -> Plan | None:
        """Read, decide, apply: one planning round. Returns the plan."""
        now = datetime.now(UTC)
        # The last round's plan, input and results are read between plans only (accounting,
        # demand checks): let them go before this round builds its own, so two rounds' inputs
        # of every workload are never held at once. A round that fails leaves none (the loop
        # plans again, and accounts only after a plan).
        self.memory = dataclasses.replace(self.memory, last_round=None)
        # The same for the last round's statuses the writer has not built yet: this round decides
        # every workload's status again.
        self.applier.writer.drop_unbuilt()
        view = self.view()
        started = time.monotonic()
        observed = self._observed(view, None)
        # Once per round: telemetry_requests and decide share it.
        prepared = await self._call(
            functools.partial(core.prepare, build_input=self.build_input), observed, now
        )
        readings = None
        if self.telemetry is not None:
            requests = await self._call(
                functools.partial(core.telemetry_requests, prepared=prepared), observed, now
            )
            readings = await self._read(requests)
        observed = dataclasses.replace(observed, telemetry=readings)
        decided = await self._call(
            functools.partial(core.decide, plan_function=self.plan_function, prepared=prepared),
            observed,
            now,
        )
        self._wake_at = decided.wake_at
        if not await self.is_leader():
            # Another operator took over while this one was solving: it applies, this one must not.
            logger.info("no longer the leader; dropping the plan")
            return decided.plan
        decided_seconds = time.monotonic() - started
        # The round's memory holds even if applying fails part-way (the next round retries).
        self.memory = decided.memory
        applied = await self.applier.apply(decided, view)
        timings = decided.plan.timings_seconds if decided.plan is not None else {}
        logger.info(
            "round of %d workloads: decided in %.2f s (plan: %s), applied in %.2f s",
            len(view.workloads),
            decided_seconds,
            ", ".join(f"{step} {seconds:.2f} s" for step, seconds in timings.items()) or "none",
            time.monotonic() - started - decided_seconds,
        )
        self.memory = core.after_apply(
            decided,
            applied,
            view=view,
            monotonic=time.monotonic(),
            settings=observed.settings,
        )
        return decided.plan

    def _accounting_between_plans(self) -> bool:
        return (
            self.telemetry is not None
            and self.memory.last_round is not None
            and self.settings.accounting_seconds < self.settings.replan_seconds
        )

    def _checking_demand_between_plans(self) -> bool:
        return (
            self.telemetry is not None
            and self.memory.last_round is not None
            and 0 < self.settings.demand_check_seconds < self.settings.replan_seconds
        )

    async def check_demand_once(self) -> None:
        """Between plans: read the running pods' tokens/s and queues; when a service's demand
        exceeds its plan's capacity (`core.check_demand`), the next round is a plan."""
        self._checked_at = time.monotonic()
        last = self.memory.last_round
        if last is None:
            return
        view = self.view()
        nodes = [node.name for node in last.plan_input.nodes]
        pods = [core.pod_id(pod) for pod in view.pods.values() if core.running(pod)]
        snapshot = await self._read_snapshot(nodes, pods)
        decided = core.check_demand(self._observed(view, core.Readings(snapshot=snapshot)))
        self.memory = decided.memory
        if decided.replan_soon:
            self.cache.mark_dirty()

    async def account_once(self) -> None:
        """Between plans, with nothing changed since the last one: read telemetry and bring the
        energy, carbon and measured figures in statuses up to date against that plan."""
        if self.memory.last_round is None:
            return
        self._accounted_at = time.monotonic()
        now = datetime.now(UTC)
        view = self.view()
        observed = self._observed(view, None)
        readings = None
        if self.telemetry is not None:
            requests = core.telemetry_requests(observed, now, between_plans=True)
            readings = await self._read(requests)
        decided = core.account(dataclasses.replace(observed, telemetry=readings), now)
        await self.applier.apply(decided, view)
        self.memory = decided.memory

    async def report_failed_round(self, error: BaseException) -> None:
        """Mark every budget and every waiting workload with the cause of a round that could not
        plan at all (a condition, and one Event per object and cause). Never raises."""
        try:
            decided = core.failed_round(self._observed(self.view(), None), error, datetime.now(UTC))
            for write in decided.early_statuses:
                self.applier.writer.submit(write)
            self.memory = decided.memory
        except Exception:  # reporting must never stop the loop
            logger.exception("could not report the failed round")

    # -- telemetry ---------------------------------------------------------------------------------

    async def _read(self, requests: core.TelemetryRequests) -> core.Readings:
        """Everything `requests` asks for, each read bounded by the telemetry timeout. Never
        fails: a slow or broken read is a stale snapshot or a modelled figure."""
        assert self.telemetry is not None
        snapshot = await self._read_snapshot(list(requests.nodes), list(requests.pods))
        energy: dict[datetime, EnergyReading] = {}
        if requests.end is not None:
            for start, (nodes, pods) in requests.energy.items():
                reading = await self._bounded(
                    functools.partial(self.telemetry.energy, start=start, end=requests.end),
                    list(nodes),
                    list(pods),
                    what="energy read",
                )
                if reading is not None:
                    energy[start] = reading
        intensities = {
            name: await self._bounded(
                self.telemetry.scalar, query, what=f"carbon intensity query of {name}"
            )
            for name, query in requests.intensity_queries.items()
        }
        measured = {
            key: await self._bounded(self.telemetry.scalar, query, what=f"progress query of {key}")
            for key, query in requests.progress_queries.items()
        }
        forecasts = {}
        for name, query in requests.forecast_queries.items():
            samples = await self._bounded(
                self.telemetry.samples, query, what=f"carbon forecast query of {name}"
            )
            if samples:
                forecasts[name] = budget_horizon.forecast_by_hours_ahead(samples)
        return core.Readings(
            snapshot=snapshot,
            energy=energy,
            intensities=intensities,
            progress=measured,
            rate_window_seconds=self.telemetry.config.rate_window_seconds,
            carbon_forecasts=forecasts,
        )

    async def _bounded(self, function: Callable[..., T], *args: Any, what: str) -> T | None:
        """One telemetry read, None when it failed or took longer than the timeout (the model
        stands in)."""
        try:
            return await asyncio.wait_for(
                self._call(function, *args), timeout=self.settings.telemetry_timeout_seconds
            )
        except Exception as error:  # telemetry must never stop planning
            logger.warning("%s failed (%r); the model stands in", what, error)
            return None

    async def _read_snapshot(
        self, nodes: list[str], pods: list[PodKey]
    ) -> TelemetrySnapshot | None:
        """Measured power of the planned nodes and the operator's running pods (None without
        --prometheus-url). Never fails: a slow or broken read is a stale snapshot."""
        if self.telemetry is None:
            return None
        try:
            return await asyncio.wait_for(
                self._call(self.telemetry.read, nodes, pods),
                timeout=self.settings.telemetry_timeout_seconds,
            )
        except Exception as error:  # telemetry must never stop planning
            reason = (
                f"telemetry read took over {self.settings.telemetry_timeout_seconds:g} s"
                if isinstance(error, TimeoutError)
                else f"telemetry read failed: {error!r}"
            )
            logger.warning("%s; statuses use the model", reason)
            return TelemetrySnapshot(
                datetime.now(UTC), Source.MODELLED, True, reason, unavailable=True
            )
