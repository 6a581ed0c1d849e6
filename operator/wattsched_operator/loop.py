"""The planning loop: one plan at a time, applied in an order that never breaks a budget.

Handlers mark the cache dirty; the loop waits for that (or for the periodic re-plan), lets changes
settle for the debounce time, reads a copy of the cache, solves a plan off the event loop, and
applies it: lower power limits and wait for the agents to confirm, delete preempted and moved pods,
create new pods, raise limits, then write statuses, Events and metrics. A node whose agent does not
confirm in time counts at maximum power in the next plan. What to write is decided by the pure
functions in `desired`, `transition` and `statuses`; this module does the I/O and the sequencing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from wattsched_api.energybudget import parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_operator import (
    accounting,
    demand,
    desired,
    progress,
    snapshot,
    statuses,
    transition,
)
from wattsched_operator.cache import (
    BUDGETS,
    NODES,
    PODS,
    PROFILES,
    WORKLOADS,
    Body,
    ClusterCache,
    ClusterView,
    slim,
)
from wattsched_operator.kube import (
    GROUP_PATH,
    Kube,
    KubeError,
    budgets_path,
    pods_path,
    profiles_path,
    workloads_path,
)
from wattsched_operator.metrics import BudgetFigures
from wattsched_operator.telemetry import (
    Calibrator,
    EnergyReading,
    PodKey,
    Source,
    TelemetryReader,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_optimizer.model import CatalogueModel, PerformanceModel, products_in_scope
from wattsched_optimizer.problem import (
    MoveReason,
    Placement,
    Plan,
    PlanInput,
    Unplaced,
    WorkloadType,
)

logger = logging.getLogger("wattsched.operator")

ANNOTATION_FAILURES = "wattsched.io/failures"
ANNOTATION_RETRY_AFTER = "wattsched.io/retry-after"
ANNOTATION_FAILURE_COUNTED = "wattsched.io/failure-counted"
# Reason of the conditions and Events of a round that could not plan at all.
PLAN_FAILED = "PlanFailed"
BUDGET_KIND = "EnergyBudget"
WORKLOAD_KIND = "LLMWorkload"
MAX_BACKOFF_SECONDS = 300.0
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_TOO_MANY_REQUESTS = 429
# What each move cause means, in the `Moved` Event (MoveReason's values are the Event's cause).
MOVE_CAUSES = {
    MoveReason.NODE: "its node is gone, NotReady, being deleted, NoExecute-tainted or its agent "
    "is lost",
    MoveReason.BUDGET: "no power limit in place keeps it inside a budget",
    MoveReason.PRIORITY: "higher-priority work needs its GPUs and it is preemptible",
    MoveReason.SAVINGS: "another product or variant saves more than the churn threshold and "
    "spec.disruption.moveToSaveEnergy allows it",
    MoveReason.SPEC: "its spec no longer allows the product or variant it ran with",
}

T = TypeVar("T")

PlanFunction = Callable[[PlanInput, PerformanceModel], Plan]


@dataclass(frozen=True)
class PlannedInput:
    """The optimizer's input, and what was left out of it and why: workloads (key -> error),
    GPU nodes the plan cannot use (name -> why, and what their budgets count them at), budgets
    that cannot be read (name -> error) and other unreadable objects ("Kind key" -> error)."""

    plan_input: PlanInput
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)
    excluded_nodes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    invalid_budgets: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Training/FineTuning/BatchInference workloads: their total and progress query, by key.
    jobs: Mapping[str, progress.JobTerms] = dataclasses.field(default_factory=dict)


InputBuilder = Callable[[ClusterView, frozenset[str], datetime], PlannedInput]


@dataclass(frozen=True)
class LoopSettings:
    debounce_seconds: float = 1.0
    replan_seconds: float = 60.0
    confirm_timeout_seconds: float = 15.0
    backoff_limit: int = 3
    backoff_seconds: float = 10.0
    # Namespaces whose LLMWorkloads this operator handles; empty means all.
    namespaces: tuple[str, ...] = ()
    workers: int = 16
    # A telemetry read slower than this is dropped for the round (planning goes on, modelled).
    telemetry_timeout_seconds: float = 10.0
    # How often energy, carbon and the measured figures in statuses are brought up to date (each
    # update is a status write per running workload).
    accounting_seconds: float = 60.0
    # An agent silent for longer is lost: its node counts at maximum and takes no work. The loop
    # re-plans when a heartbeat it counted on expires, not only on the periodic re-plan.
    heartbeat_timeout_seconds: float = 30.0


def backoff_seconds(failures: int, base_seconds: float) -> float:
    """Seconds before retrying a replica after its `failures`-th failure (doubling, 5 min cap)."""
    return float(min(base_seconds * 2 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS))


def workload_object(body: Mapping[str, Any]) -> desired.WorkloadObject:
    meta = body["metadata"]
    spec = body.get("spec") or {}
    variants = spec.get("variants") or [{"name": "bf16", "precision": "bf16"}]
    return desired.WorkloadObject(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta.get("uid", ""),
        type=WorkloadType(spec.get("type", "Inference")),
        template=spec.get("template") or {},
        precisions={str(v["name"]): str(v.get("precision", "bf16")) for v in variants},
    )


def gang_size(body: Mapping[str, Any]) -> int:
    spec = body.get("spec") or {}
    return int(spec.get("replicas") or 1)


def is_gang(body: Mapping[str, Any]) -> bool:
    return WorkloadType((body.get("spec") or {}).get("type", "Inference")).is_gang


def _note_slo(slo_met: dict[str, bool], key: str, status: Mapping[str, Any]) -> None:
    """Record whether a workload's SLOMet condition is True (workloads without one: nothing)."""
    condition = next(
        (c for c in status.get("conditions") or [] if c.get("type") == statuses.SLO_MET), None
    )
    if condition is not None and condition.get("status") in {"True", "False"}:
        slo_met[key] = condition["status"] == "True"


def pod_workload_key(pod: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{(meta.get('labels') or {}).get(desired.LABEL_WORKLOAD, '')}"


def refuses_the_pod(error: KubeError) -> bool:
    """Whether the API server refused a pod (any 4xx: a malformed or invalid template, Pod
    Security, a quota, a webhook, the operator's own permissions), as opposed to a name still
    taken (409, retried next round), throttling (429) or a server fault (5xx), which are retried.
    A refusal is reported on the workload (`PodRejected`) and retried with backoff."""
    return 400 <= error.status < 500 and error.status not in {
        HTTP_CONFLICT,
        HTTP_TOO_MANY_REQUESTS,
    }


@dataclass(frozen=True)
class PodRejection:
    """The API server refused a workload's replica pod: for which generation, with what message,
    how many times in a row, and when (time.monotonic()) the next try is due."""

    generation: int
    message: str
    refusals: int
    retry_at: float


def unmanaged_gpu_caps(
    budgets: Iterable[Mapping[str, Any]], nodes: Iterable[Mapping[str, Any]]
) -> dict[str, float]:
    """Node name -> the per-GPU limit (W) for GPUs held by other teams' pods: the lowest
    `spec.unmanagedGpus.powerLimitWatts` of the valid, live EnergyBudgets selecting the node.
    Nodes no such budget selects are absent (their other teams' GPUs are left alone)."""
    caps: dict[str, float] = {}
    for body in budgets:
        if is_deleting(body):
            continue
        try:
            spec = parse_energybudget(body).spec
        except ApiValidationError:
            continue  # an invalid budget is reported as such and plans nothing
        if spec.unmanaged_gpu_limit_watts is None:
            continue
        for node in nodes:
            meta = node.get("metadata") or {}
            if spec.selects(meta.get("labels") or {}):
                name = str(meta.get("name"))
                caps[name] = min(caps.get(name, math.inf), spec.unmanaged_gpu_limit_watts)
    return caps


def is_deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


@dataclass(frozen=True)
class Accounts:
    """This round's energy accounting: the new `status.energy` of the workloads that were due
    (with their measured watts), and the new period figures of the budgets that were due."""

    workload_energy: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    workload_measured_watts: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    budget_figures: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # The new `status.progress` of the jobs that were due.
    workload_progress: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass
class Lifecycle:
    """Per-workload facts gathered before planning: finished, failed for good, waiting to retry."""

    succeeded: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    delete_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    wake_at: float | None = None


@dataclasses.dataclass(frozen=True)
class LastRound:
    """The plan last applied, what it was solved from, and the workloads it handled."""

    plan: Plan
    plan_input: PlanInput
    active: frozenset[str]
    planned_at: datetime
    built: PlannedInput
    # The tokens/s each Inference service was sized for (its forecast, or its declared demand).
    demands: Mapping[str, float] = dataclasses.field(default_factory=dict)


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
        self.unconfirmed: frozenset[str] = frozenset()
        self._executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="kube")
        self._was_leader = False
        self._wake_at: float | None = None
        # Workloads whose replica pod the API server refused (PodSecurity, invalid template, ...),
        # by key. Retried when the spec changes, or after a backoff that doubles with each refusal.
        self.pod_rejections: dict[str, PodRejection] = {}
        # Corrections of the performance model from measurements (bounded, smoothed), and what
        # they are fitted against: the placements in force while telemetry was measuring.
        self.calibrator = Calibrator()
        self._applied_placements: tuple[Placement, ...] = ()
        self._calibrated_at = 0.0
        # Measured tokens/s of each Inference service: its demand forecast (see `demand`).
        self.demand = demand.DemandHistory()
        # The last applied plan, for accounting rounds between plans (see `account_once`).
        self._last_round: LastRound | None = None
        self._planned_at = 0.0
        self._accounted_at = 0.0
        # Nodes whose agent the last round counted as ready: their heartbeats are watched.
        self._ready_agents: frozenset[str] = frozenset()
        # Budget conditions an Event was posted for ("EnergyBudget name type" -> (reason, message)).
        self._budget_reported: dict[str, tuple[str, str]] = {}
        # Objects marked with the cause of failed rounds ("Kind namespace/name" -> cause), until a
        # round succeeds: one write and one Event per object and cause.
        self._failure_reported: dict[str, str] = {}
        # What was last reported as left out of planning ("Kind key" -> why): one log line and
        # one Event per cause, not one per round.
        self._reported: dict[str, str] = {}

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
        last_resync = 0.0
        while True:
            plan_due = await self._wait_for_work()
            self.cache.dirty.clear()
            leader = await self.is_leader()
            if not leader:
                self._was_leader = False
                continue
            if not plan_due and self._was_leader:
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
                self._planned_at = self._accounted_at = time.monotonic()
                await self.plan_once()
                self._failure_reported.clear()
            except Exception as error:
                logger.exception("planning round failed; retrying after the debounce")
                self.metrics.reconcile_errors.labels(step="plan").inc()
                self.cache.mark_dirty()
                await self.report_failed_round(error)

    async def _wait_for_work(self) -> bool:
        """Return when the next round is due: the cache changed (after the debounce), the periodic
        re-plan is due, a replica's retry is due, or an agent counted on in the last round has
        been silent for longer than the heartbeat timeout (a heartbeat that arrives in time
        just moves the wake-up): True. False when only an accounting round between plans is due
        (see `run`)."""
        planned_at = self._planned_at if self._last_round is not None else time.monotonic()
        periodic_at = planned_at + self.settings.replan_seconds
        account_at = (
            self._accounted_at + self.settings.accounting_seconds
            if self._accounting_between_plans()
            else None
        )
        while True:
            wake_at = min(
                t
                for t in (periodic_at, self._wake_at, self._heartbeat_expiry(), account_at)
                if t is not None
            )
            try:
                timeout = max(0.0, wake_at - time.monotonic())
                await asyncio.wait_for(self.cache.dirty.wait(), timeout=timeout)
                await asyncio.sleep(self.settings.debounce_seconds)
                return True
            except TimeoutError:
                now = time.monotonic()
                if now >= periodic_at or (self._wake_at is not None and now >= self._wake_at):
                    return True
                if self._lost_agents():
                    logger.info("agents lost on %s: re-planning", ", ".join(self._lost_agents()))
                    return True
                if account_at is not None and now >= account_at:
                    return False

    def _heartbeats(self) -> dict[str, datetime | None]:
        """The last heartbeat of each agent the last round counted as ready (None: none read)."""
        beats: dict[str, datetime | None] = {}
        for node in self._ready_agents:
            agent = ((self.cache.get(PROFILES, node) or {}).get("status") or {}).get("agent") or {}
            beats[node] = accounting.parse_rfc3339(agent.get("heartbeatTime"))
        return beats

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

    async def plan_once(self) -> Plan | None:
        """Plan from the cache and apply the plan. Returns the plan (None when nothing to plan)."""
        now = datetime.now(UTC)
        view = self.cache.view()
        pods_by_workload: dict[str, list[Body]] = {}
        for pod in view.pods.values():
            pods_by_workload.setdefault(pod_workload_key(pod), []).append(pod)
        life = await self._lifecycle(view, pods_by_workload, now)
        # Wake for the next retry: a failed replica's backoff, or a refused pod's.
        wakes = [r.retry_at for r in self.pod_rejections.values() if r.retry_at > time.monotonic()]
        if life.wake_at is not None:
            wakes.append(life.wake_at)
        self._wake_at = min(wakes) if wakes else None
        active = {
            key: body
            for key, body in view.workloads.items()
            if not is_deleting(body)
            and (body.get("status") or {}).get("phase") not in statuses.TERMINAL_PHASES
            and key not in life.succeeded
            and key not in life.failed
        }
        active_view = dataclasses.replace(view, workloads=active)
        built = self.build_input(active_view, self.unconfirmed, now)
        plan_input = built.plan_input
        self._ready_agents = frozenset(n.name for n in plan_input.nodes if n.agent_ready)
        await self._report_left_out(view, built)
        await self._report_rejected(view, built.rejected, now, reason="InvalidSpec")
        refused = self._refused_pods(active)
        await self._report_rejected(view, refused, now, reason="PodRejected")
        active = {k: v for k, v in active.items() if k not in built.rejected and k not in refused}
        plan_input = dataclasses.replace(
            plan_input, workloads=tuple(w for w in plan_input.workloads if w.key not in refused)
        )
        # Products the catalogue lacks (as their nodes describe them) are known for this round.
        with products_in_scope(plan_input.products):
            return await self._plan_and_apply(
                view,
                plan_input,
                built=built,
                active=active,
                life=life,
                pods_by_workload=pods_by_workload,
                now=now,
            )

    async def _plan_and_apply(
        self,
        view: ClusterView,
        plan_input: PlanInput,
        *,
        built: PlannedInput,
        active: dict[str, Body],
        life: Lifecycle,
        pods_by_workload: dict[str, list[Body]],
        now: datetime,
    ) -> Plan:
        """Solve `plan_input`, apply the plan and write every status (the rest of `plan_once`)."""
        started = time.monotonic()
        # Telemetry is read while the optimizer solves; it only feeds status.
        reading = asyncio.create_task(self._read_telemetry(plan_input, view))
        # Services are sized for their forecast demand (measured tokens/s with headroom), or
        # their declared spec.slo.tokensPerSecond until there are readings.
        self.demand.forget(active)
        sized = dataclasses.replace(
            plan_input,
            workloads=demand.with_forecast_demand(
                plan_input.workloads, self.demand, time.monotonic()
            ),
        )
        demands = {w.key: w.tokens_per_second for w in sized.workloads if w.tokens_per_second}
        try:
            model = CatalogueModel().calibrated(self.calibrator.corrections())
            plan = await self._call(self.plan_function, sized, model)
        except BaseException:
            reading.cancel()
            raise
        telemetry = await reading
        if not await self.is_leader():
            # Another operator took over while this one was solving: it applies, this one must not.
            logger.info("no longer the leader; dropping the plan")
            return plan
        self.metrics.plans.labels(status=str(plan.status)).inc()
        self.metrics.solve_seconds.observe(plan.solve_seconds)
        self.metrics.gap.set(plan.gap)
        logger.info(
            "plan %s in %.2f s: %d placements, %d unplaced, %d workloads",
            plan.status,
            time.monotonic() - started,
            len(plan.placements),
            len(plan.unplaced),
            len(active),
        )
        self._calibrate(plan_input, view, telemetry)
        self._record_demand(plan_input, pods_by_workload, telemetry)
        await self._apply(view, active, plan, life)
        await self._open_profiles(view, built.excluded_nodes)
        self._applied_placements = plan.placements
        accounts = await self._account(
            view,
            active=active,
            plan=plan,
            plan_input=plan_input,
            jobs=built.jobs,
            pods_by_workload=pods_by_workload,
            telemetry=telemetry,
        )
        await self._write_statuses(
            view,
            active=active,
            plan=plan,
            life=life,
            pods_by_workload=pods_by_workload,
            now=now,
            accounts=accounts,
            telemetry=telemetry,
            demands=demands,
        )
        await self._write_budget_statuses(
            view, plan, plan_input, now, telemetry, accounts=accounts, built=built
        )
        self._last_round = LastRound(
            plan=plan,
            plan_input=plan_input,
            active=frozenset(active),
            planned_at=now,
            built=built,
            demands=demands,
        )
        return plan

    def _accounting_between_plans(self) -> bool:
        return (
            self.telemetry is not None
            and self._last_round is not None
            and self.settings.accounting_seconds < self.settings.replan_seconds
        )

    async def account_once(self) -> None:
        """Between plans, with nothing changed since the last one: read telemetry and bring the
        energy, carbon and measured figures in statuses up to date against that plan."""
        last = self._last_round
        if last is None:
            return
        self._accounted_at = time.monotonic()
        now = datetime.now(UTC)
        view = self.cache.view()
        pods_by_workload: dict[str, list[Body]] = {}
        for pod in view.pods.values():
            pods_by_workload.setdefault(pod_workload_key(pod), []).append(pod)
        active = {
            key: body
            for key, body in view.workloads.items()
            if key in last.active
            and not is_deleting(body)
            and (body.get("status") or {}).get("phase") not in statuses.TERMINAL_PHASES
        }
        telemetry = await self._read_telemetry(last.plan_input, view)
        self._record_demand(last.plan_input, pods_by_workload, telemetry)
        accounts = await self._account(
            view,
            active=active,
            plan=last.plan,
            plan_input=last.plan_input,
            jobs=last.built.jobs,
            pods_by_workload=pods_by_workload,
            telemetry=telemetry,
        )
        await self._write_statuses(
            view,
            active=active,
            plan=last.plan,
            life=Lifecycle(),
            pods_by_workload=pods_by_workload,
            now=now,
            accounts=accounts,
            telemetry=telemetry,
            demands=last.demands,
        )
        await self._write_budget_statuses(
            view,
            last.plan,
            last.plan_input,
            now,
            telemetry,
            accounts=accounts,
            built=last.built,
            planned_at=last.planned_at,
        )

    async def _read_telemetry(
        self, plan_input: PlanInput, view: ClusterView
    ) -> TelemetrySnapshot | None:
        """Measured power of the planned nodes and the operator's running pods (None without
        --prometheus-url). Never fails: a slow or broken read is a stale snapshot."""
        if self.telemetry is None:
            return None
        nodes = [node.name for node in plan_input.nodes]
        pods = [_pod_id(pod) for pod in view.pods.values() if _running(pod)]
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

    def _calibrate(
        self, plan_input: PlanInput, view: ClusterView, telemetry: TelemetrySnapshot | None
    ) -> None:
        """Fold a fresh reading of the running replicas into the model's corrections (at most
        once per accounting interval, so one reading is not counted many times)."""
        if telemetry is None or telemetry.stale:
            return
        if time.monotonic() - self._calibrated_at < self.settings.accounting_seconds:
            return
        self._calibrated_at = time.monotonic()
        nodes = {(p.workload, p.replica): p.node for p in self._applied_placements}
        # A reading says what a replica draws only if the replica ran for the whole rate window,
        # and the exporter had a window to see its load: a younger pod's reading includes idle.
        assert self.telemetry is not None
        window = timedelta(seconds=self.telemetry.config.rate_window_seconds)
        settled_by = telemetry.time - 2 * window
        pods: dict[tuple[str, int], PodKey] = {}
        for pod in view.pods.values():
            if not _running(pod) or statuses.replica_index(pod) < 0:
                continue
            started = _pod_started(pod)
            if started is None or started > settled_by:
                continue
            replica = (pod_workload_key(pod), statuses.replica_index(pod))
            if nodes.get(replica) == pod["spec"]["nodeName"]:  # where the placement says
                pods[replica] = _pod_id(pod)
        samples = calibration_samples(
            self._applied_placements,
            pods=pods,
            products={node.name: node.product for node in plan_input.nodes},
            types={workload.key: workload.type for workload in plan_input.workloads},
            demands={
                workload.key: workload.tokens_per_second
                for workload in plan_input.workloads
                if workload.tokens_per_second is not None
            },
            snapshot=telemetry,
            corrections=self.calibrator.corrections(),
        )
        for sample in samples:
            self.calibrator.observe(sample)
        if samples:
            self.metrics.set_corrections(self.calibrator.corrections())

    def _record_demand(
        self,
        plan_input: PlanInput,
        pods_by_workload: Mapping[str, list[Body]],
        telemetry: TelemetrySnapshot | None,
    ) -> None:
        """Add each service's measured tokens/s to its demand history: the sum over its running
        pods, when a fresh reading measured every one of them."""
        if telemetry is None or telemetry.stale:
            return
        at = time.monotonic()
        for workload in plan_input.workloads:
            if workload.type is not WorkloadType.INFERENCE:
                continue
            pods = [_pod_id(p) for p in pods_by_workload.get(workload.key, []) if _running(p)]
            readings = [telemetry.pod_tokens_per_second.get(pod) for pod in pods]
            if pods and all(value is not None for value in readings):
                self.demand.record(workload.key, at, sum(v for v in readings if v is not None))

    async def _account(
        self,
        view: ClusterView,
        *,
        active: Mapping[str, Body],
        plan: Plan,
        plan_input: PlanInput,
        pods_by_workload: Mapping[str, list[Body]],
        telemetry: TelemetrySnapshot | None,
        jobs: Mapping[str, progress.JobTerms] | None = None,
    ) -> Accounts:
        """Advance the energy and carbon totals that are due (see `accounting`).

        Measured increments come from one Prometheus energy query per distinct start time (one,
        normally); a failed or slow query, or a pod or node it did not measure, makes that
        increment modelled. Never fails for telemetry.
        """
        # Whole seconds: `accountedUntil` is written to the second, and the next increment
        # starts exactly where this one ends.
        now = datetime.now(UTC).replace(microsecond=0)
        interval = self.settings.accounting_seconds
        fresh = telemetry is not None and not telemetry.stale
        initial_source = accounting.MEASURED if fresh else accounting.MODELLED
        running: dict[str, list[Body]] = {
            key: [p for p in pods_by_workload.get(key, []) if _running(p)] for key in active
        }
        # Due, and either never accounted (an empty first total) or with pods that used energy:
        # a workload waiting for a place is not rewritten each interval.
        workload_starts = {
            key: start
            for key, body in active.items()
            if (start := accounting.workload_start(body.get("status") or {}, now, interval))
            and (start == now or running[key])
        }
        terms = {
            name: accounting.BudgetTerms.from_spec(body.get("spec") or {})
            for name, body in view.budgets.items()
            if not is_deleting(body)
        }
        budget_starts = {
            name: start
            for name, body in view.budgets.items()
            if name in terms
            and (
                start := accounting.budget_start(
                    body.get("status") or {}, now, terms[name].period, interval
                )
            )
        }
        if not workload_starts and not budget_starts:
            return Accounts()
        scopes = {b.name: b.node_names for b in plan_input.budgets}
        placements: dict[str, list[Any]] = {}
        for placement in plan.placements:
            placements.setdefault(placement.workload, []).append(placement)
        groups: dict[datetime, tuple[set[str], set[PodKey]]] = {}
        for key, start in workload_starts.items():
            if start < now:
                groups.setdefault(start, (set(), set()))[1].update(map(_pod_id, running[key]))
        for name, start in budget_starts.items():
            if start < now:
                groups.setdefault(start, (set(), set()))[0].update(scopes.get(name, ()))
        readings = await self._read_energy(groups, now)
        intensities = await self._read_intensities(terms)
        carbon = {name: t.intensity(intensities.get(name)) for name, t in terms.items()}

        workload_energy: dict[str, Mapping[str, Any]] = {}
        measured_watts: dict[str, float | None] = {}
        window = self.telemetry.config.rate_window_seconds if self.telemetry else 0
        new_series_since = now - timedelta(seconds=window)
        for key, start in workload_starts.items():
            pods = running[key]
            pod_keys = [_pod_id(p) for p in pods]
            planned = placements.get(key, [])
            expected_watts = sum(p.expected_watts_per_gpu * p.gpus for p in planned)
            added: accounting.Increment | None = None
            if start < now:
                reading = readings.get(start)
                fresh_reading = reading is not None and not reading.stale
                measured = (
                    accounting.measured_sum(reading.pod_joules, pod_keys)
                    if reading is not None and fresh_reading
                    else None
                )
                pod_starts = [_pod_started(p) or start for p in pods]
                if measured is None and fresh_reading and max(pod_starts) > new_series_since:
                    continue  # a pod too new for its first samples: measure it next time
                began = max(start, min(pod_starts))
                added = accounting.increment(
                    measured, expected_watts, (now - began).total_seconds()
                )
            budget = next(
                (
                    name
                    for name in sorted(terms)
                    if carbon[name] is not None
                    and any(p.node in scopes.get(name, ()) for p in planned)
                ),
                None,
            )
            previous = (view.workloads[key].get("status") or {}).get("energy") or {}
            if added is not None:
                intensity = carbon[budget] if budget else None
                pue = terms[budget].pue if budget else 1.0
                self.metrics.count_workload_energy(
                    key,
                    added.joules,
                    added.joules / accounting.JOULES_PER_KWH * pue * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    added.source,
                )
            workload_energy[key] = accounting.workload_energy(
                previous,
                added,
                now=now,
                initial_source=initial_source,
                pue=terms[budget].pue if budget else 1.0,
                carbon=carbon[budget] if budget else None,
                efficiency=accounting.tokens_per_joule(
                    telemetry,
                    pod_keys,
                    sum(p.expected_throughput for p in planned),
                    expected_watts,
                ),
            )
            measured_watts[key] = statuses.workload_measured_watts(telemetry, pod_keys)

        allocations = {a.name: a for a in plan.budgets}
        budget_figures: dict[str, Mapping[str, Any]] = {}
        for name, start in budget_starts.items():
            budget_added: accounting.Increment | None = None
            if start < now:
                reading = readings.get(start)
                measured = (
                    accounting.measured_sum(reading.node_joules, scopes.get(name, ()))
                    if reading is not None and not reading.stale
                    else None
                )
                allocation = allocations.get(name)
                budget_added = accounting.increment(
                    measured,
                    allocation.expected_watts if allocation else 0.0,
                    (now - start).total_seconds(),
                )
                facility_joules = budget_added.joules * terms[name].pue
                intensity = carbon[name]
                self.metrics.count_budget_energy(
                    name,
                    facility_joules,
                    facility_joules / accounting.JOULES_PER_KWH * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    budget_added.source,
                )
            budget_figures[name] = accounting.budget_energy(
                view.budgets[name].get("status") or {},
                budget_added,
                now=now,
                terms=terms[name],
                carbon=carbon[name],
                initial_source=initial_source,
            )
        job_progress = await self._advance_progress(
            view,
            jobs or {},
            starts=workload_starts,
            running=running,
            placements=placements,
            now=now,
        )
        return Accounts(workload_energy, measured_watts, budget_figures, job_progress)

    async def _advance_progress(
        self,
        view: ClusterView,
        jobs: Mapping[str, progress.JobTerms],
        *,
        starts: Mapping[str, datetime],
        running: Mapping[str, list[Body]],
        placements: Mapping[str, list[Any]],
        now: datetime,
    ) -> dict[str, Mapping[str, Any]]:
        """The new `status.progress` of the jobs due for accounting (see `progress`): measured
        from the job's `spec.progress.prometheusQuery` when it answered, else the plan's rate
        (calibrated model) over the seconds the whole gang ran since the last update."""
        advanced: dict[str, Mapping[str, Any]] = {}
        for key, start in starts.items():
            terms = jobs.get(key)
            if terms is None:
                continue
            status = view.workloads[key].get("status") or {}
            previous = progress.read_status(status.get("progress"))
            planned = placements.get(key, [])
            pods = running.get(key, [])
            seconds = 0.0
            if pods and len(pods) >= len(planned) > 0:
                began = max(
                    [start, *(_pod_started(p) or start for p in pods)]
                    + ([previous.updated_at] if previous else [])
                )
                seconds = max(0.0, (now - began).total_seconds())
            measured = None
            if terms.prometheus_query is not None and self.telemetry is not None:
                try:
                    measured = await asyncio.wait_for(
                        self._call(self.telemetry.scalar, terms.prometheus_query),
                        timeout=self.settings.telemetry_timeout_seconds,
                    )
                except Exception as error:  # the model stands in
                    logger.warning("progress query of %s failed: %r", key, error)
            advanced[key] = progress.advance(
                previous,
                now=now,
                running_seconds=seconds,
                rate_tokens_per_second=sum(p.expected_throughput for p in planned),
                total=terms.total_tokens,
                measured_tokens=measured,
            ).to_status()
        return advanced

    async def _read_energy(
        self, groups: Mapping[datetime, tuple[set[str], set[PodKey]]], end: datetime
    ) -> dict[datetime, EnergyReading]:
        """One energy reading per start time (none without --prometheus-url or on failure)."""
        if self.telemetry is None:
            return {}
        readings: dict[datetime, EnergyReading] = {}
        for start, (nodes, pods) in groups.items():
            try:
                readings[start] = await asyncio.wait_for(
                    self._call(
                        functools.partial(self.telemetry.energy, start=start, end=end),
                        sorted(nodes),
                        sorted(pods),
                    ),
                    timeout=self.settings.telemetry_timeout_seconds,
                )
            except Exception as error:  # telemetry must never stop planning
                logger.warning("energy read failed (%r); this increment is modelled", error)
        return readings

    async def _read_intensities(
        self, terms: Mapping[str, accounting.BudgetTerms]
    ) -> dict[str, float | None]:
        """Carbon intensity from each budget's `spec.carbon.prometheusQuery`, where it has one."""
        if self.telemetry is None:
            return {}
        values: dict[str, float | None] = {}
        for name, budget_terms in terms.items():
            if budget_terms.intensity_query is None:
                continue
            try:
                values[name] = await asyncio.wait_for(
                    self._call(self.telemetry.scalar, budget_terms.intensity_query),
                    timeout=self.settings.telemetry_timeout_seconds,
                )
            except Exception as error:  # the static intensity (if any) stands in
                logger.warning("carbon intensity query of %s failed: %r", name, error)
        return values

    async def _lifecycle(
        self, view: ClusterView, pods_by_workload: Mapping[str, list[Body]], now: datetime
    ) -> Lifecycle:
        """Completion and failure handling: retries with backoff, then Failed."""
        life = Lifecycle()
        for key, body in view.workloads.items():
            phase = (body.get("status") or {}).get("phase")
            pods = pods_by_workload.get(key, [])
            if phase in statuses.TERMINAL_PHASES or is_deleting(body):
                life.keep_pods.update(_pod_id(p) for p in pods if _finished(p))
                continue
            views = [statuses.PodView.from_pod(p) for p in pods]
            done = {v.replica for v in views if v.phase == "Succeeded"}
            if is_gang(body) and len(done) >= gang_size(body):
                life.succeeded.add(key)
                life.keep_pods.update(_pod_id(p) for p in pods)
                continue
            life.keep_pods.update(
                _pod_id(p) for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"
            )
            annotations = body["metadata"].get("annotations") or {}
            # The annotations are the operator's, but anyone who may edit the workload can
            # change them: a value that is not ours counts as none.
            failures_text = str(annotations.get(ANNOTATION_FAILURES, "0"))
            failures = int(failures_text) if failures_text.isdigit() else 0
            retry_after = annotations.get(ANNOTATION_RETRY_AFTER)
            for pod in pods:
                if (pod.get("status") or {}).get("phase") != "Failed":
                    continue
                pod_annotations = pod["metadata"].get("annotations") or {}
                if ANNOTATION_FAILURE_COUNTED not in pod_annotations:
                    failures += 1
                    retry_moment = now + timedelta(
                        seconds=backoff_seconds(failures, self.settings.backoff_seconds)
                    )
                    retry_after = statuses.rfc3339(retry_moment)
                    await self._count_failure(body, pod, failures, retry_after)
                if failures > self.settings.backoff_limit:
                    life.failed[key] = (
                        f"replica pods failed {failures} times (limit "
                        f"{self.settings.backoff_limit}); last: {_pod_failure(pod)}"
                    )
                    break
                due = accounting.parse_rfc3339(retry_after) or now
                if now >= due:
                    life.delete_pods.add(_pod_id(pod))
                else:
                    life.keep_pods.add(_pod_id(pod))
                    wake = time.monotonic() + (due - now).total_seconds()
                    life.wake_at = wake if life.wake_at is None else min(life.wake_at, wake)
        return life

    def _refused_pods(self, active: Mapping[str, Body]) -> dict[str, str]:
        """Workloads whose pods the API server refused for their current generation, and whose
        backoff has not yet run out (those due are planned again; they stay in
        `pod_rejections` until a pod of theirs is accepted, so a new refusal doubles the wait)."""
        refused: dict[str, str] = {}
        for key, rejection in list(self.pod_rejections.items()):
            body = active.get(key)
            if body is None or int(body["metadata"].get("generation") or 1) != rejection.generation:
                del self.pod_rejections[key]  # deleted, or its spec changed: try again
                continue
            if time.monotonic() >= rejection.retry_at:
                continue
            refused[key] = f"the API server refused its replica pod: {rejection.message}"
        return refused

    async def _report_rejected(
        self, view: ClusterView, rejected: Mapping[str, str], now: datetime, *, reason: str
    ) -> None:
        """Mark workloads that cannot be admitted: Admitted=False with the error, and an Event."""
        for key, message in rejected.items():
            body = view.workloads.get(key)
            if body is None:
                continue
            previous = body.get("status") or {}
            admitted = next(
                (c for c in previous.get("conditions") or [] if c.get("type") == "Admitted"), None
            )
            if admitted is not None and admitted.get("message") == message:
                continue
            condition = statuses.condition(
                previous.get("conditions") or [],
                "Admitted",
                False,
                reason,
                message,
                now=now,
                observed_generation=int(body["metadata"].get("generation") or 1),
            )
            meta = body["metadata"]
            path = workloads_path(meta["namespace"], meta["name"]) + "/status"
            # Pending with nothing placed: a placement written before (the spec changed, the pod
            # was refused) goes, so phase, conditions and placements agree. (Merge patch: None
            # removes a field.)
            status = {
                "phase": statuses.PENDING,
                "conditions": [condition],
                "message": message,
                "placements": None,
                "nodes": None,
                "variant": None,
                "replicas": None,
                "power": None,
            }
            await self._gather([self._call(self.kube.write, path, {"status": status})])
            await self._event(body, "Warning", reason, message)

    async def _count_failure(
        self, workload: Body, pod: Body, failures: int, retry_after: str
    ) -> None:
        meta = workload["metadata"]
        pod_meta = pod["metadata"]
        await self._call(
            self.kube.merge_patch,
            workloads_path(meta["namespace"], meta["name"]),
            {
                "metadata": {
                    "annotations": {
                        ANNOTATION_FAILURES: str(failures),
                        ANNOTATION_RETRY_AFTER: retry_after,
                    }
                }
            },
        )
        await self._call(
            self.kube.merge_patch,
            pods_path(pod_meta["namespace"], pod_meta["name"]),
            {"metadata": {"annotations": {ANNOTATION_FAILURE_COUNTED: "true"}}},
        )
        await self._event(
            workload,
            "Warning",
            "ReplicaFailed",
            f"pod {pod_meta['name']} failed ({_pod_failure(pod)}); failure {failures}, "
            f"retry after {retry_after}",
        )

    # -- applying ----------------------------------------------------------------------------------

    async def _apply(
        self, view: ClusterView, active: Mapping[str, Body], plan: Plan, life: Lifecycle
    ) -> None:
        objects = {key: workload_object(body) for key, body in active.items()}
        want = desired.desired_pods(objects, plan.placements)
        changes = desired.pod_changes(view.pods.values(), want, frozenset(life.keep_pods))
        caps = unmanaged_gpu_caps(view.budgets.values(), view.nodes.values())
        planned = {
            node: dataclasses.replace(limits, unmanaged_watts=caps.get(node))
            for node, limits in desired.planned_limits(plan).items()
        }
        current = {
            node: transition.NodePowerState.from_profile(view.profiles.get(node))
            for node in planned
        }
        steps = transition.power_steps(current, planned)

        # 1. Lower limits and wait for the agents to confirm.
        generations = await self._write_limits(view, steps.lower)
        unconfirmed = await self._wait_confirmed(generations)
        self.unconfirmed = frozenset(unconfirmed)
        self.metrics.unconfirmed_nodes.set(len(unconfirmed))
        if unconfirmed:
            logger.warning(
                "agents on %s did not confirm lowered limits within %.0f s; they count at "
                "maximum power in the next plan",
                ", ".join(sorted(unconfirmed)),
                self.settings.confirm_timeout_seconds,
            )
            self.cache.mark_dirty()

        # 2. Evict preempted and moved pods (Eviction API: PodDisruptionBudgets hold), a
        # service's moves one replica at a time unless a budget forces them; delete failed pods
        # due for a retry.
        pods_by_name = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p for p in view.pods.values()
        }
        lost_nodes = frozenset(
            name for name, body in view.nodes.items() if not snapshot.keeps_running(body)
        ) | frozenset(
            node
            for pod in view.pods.values()
            if (node := (pod.get("spec") or {}).get("nodeName")) and node not in view.nodes
        )
        paced = desired.pace_deletions(
            changes.delete,
            pods_by_name,
            want,
            services=frozenset(key for key, body in active.items() if not is_gang(body)),
            forced=frozenset(
                key for key, cause in plan.move_reasons.items() if cause is MoveReason.BUDGET
            ),
            lost_nodes=lost_nodes,
        )
        if paced.later:
            self.cache.mark_dirty()  # the next round moves the next replica
        placed_keys = {p.workload for p in plan.placements}
        await self._mark_moving(view, active, placed_keys, paced.now)
        evicted = await self._evict_pods(paced.now, view)
        await self._gather(
            self._delete_pod(ns, name, view) for ns, name in sorted(life.delete_pods - set(evicted))
        )
        await self._post_disruptions(
            plan, active, view=view, pods_by_name=pods_by_name, want=want, evicted=evicted
        )
        await self._announce_gang_restarts(view, active, plan, evicted)

        # 3. Create new pods (a name still held by a terminating pod is retried next round).
        deleting = (
            set(changes.delete)
            | life.delete_pods
            | {
                (p["metadata"]["namespace"], p["metadata"]["name"])
                for p in view.pods.values()
                if is_deleting(p)
            }
        )
        creatable = [
            p
            for p in changes.create
            if (p["metadata"]["namespace"], p["metadata"]["name"]) not in deleting
            and (p["metadata"]["namespace"], p["metadata"]["name"]) not in life.keep_pods
        ]
        if len(creatable) < len(changes.create):
            self.cache.mark_dirty()
        await self._gather(self._create_pod(p, active) for p in creatable)
        await self._gather(
            self._call(
                self.kube.write,
                pods_path(ns, name),
                {"metadata": {"annotations": {desired.ANNOTATION_POWER_LIMIT: watts}}},
            )
            for (ns, name), watts in changes.relabel_power.items()
        )

        # 4. Raise limits, only when every lowering was confirmed. The round ends when the agents
        # report the raised limits too, so the next plan does not see those nodes as unconfirmed.
        if not unconfirmed:
            raised = await self._write_limits(view, steps.raise_)
            slow = await self._wait_confirmed(raised)
            if slow:
                logger.info(
                    "agents on %s have not yet applied raised limits", ", ".join(sorted(slow))
                )

    async def _gather(self, calls: Iterable[Awaitable[Any]]) -> None:
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("apply step failed: %s", result)
                self.metrics.reconcile_errors.labels(step="apply").inc()
                self.cache.mark_dirty()

    async def _post_disruptions(
        self,
        plan: Plan,
        active: Mapping[str, Body],
        *,
        view: ClusterView,
        pods_by_name: Mapping[tuple[str, str], Body],
        want: Mapping[tuple[str, str], Mapping[str, Any]],
        evicted: Iterable[tuple[str, str]],
    ) -> None:
        """One `Moved` or `Preempted` Event per workload for the pods evicted this round, naming
        the cause, and the counters by cause."""
        placed_keys = {p.workload for p in plan.placements}
        preempted: dict[str, int] = {}
        for namespace, name in evicted:
            pod = view.pods.get(f"{namespace}/{name}")
            if pod is None:
                continue
            key = pod_workload_key(pod)
            if key in active and key not in placed_keys and not _finished(pod):
                preempted[key] = preempted.get(key, 0) + 1
        moves = desired.moved_replicas(pods_by_name, want, evicted)
        for key, moved in moves.items():
            if key not in active:
                continue
            cause = plan.move_reasons.get(key, MoveReason.SPEC)
            self.metrics.moves.labels(cause=cause.value).inc(len(moved))
            shown = "; ".join(moved[:5]) + ("; ..." if len(moved) > 5 else "")
            forced = ""
            if cause is MoveReason.BUDGET and len(moved) > 1 and not is_gang(active[key]):
                forced = " (more than one replica at once: the budget forces it)"
            await self._event(
                active[key],
                "Normal",
                "Moved",
                f"{len(moved)} replica(s), cause {cause.value}: {MOVE_CAUSES[cause]}{forced}; "
                f"{shown}",
            )
        for key, count in preempted.items():
            unplaced = next((u for u in plan.unplaced if u.workload == key), None)
            reason = unplaced.reason if unplaced else "the plan no longer places it"
            budget = unplaced is not None and unplaced.constraint.startswith("budget:")
            cause = MoveReason.BUDGET if budget else MoveReason.PRIORITY
            self.metrics.preemptions.labels(cause=cause.value).inc(count)
            await self._event(
                active[key],
                "Warning",
                "Preempted",
                f"{count} replica(s), cause {cause.value}: {reason}",
            )

    async def _evict_pods(
        self, keys: Iterable[tuple[str, str]], view: ClusterView
    ) -> list[tuple[str, str]]:
        """Evict each pod (a pod on a node that is gone is deleted at once); return the ones
        that went. A PodDisruptionBudget's refusal (429) leaves the pod for the next round."""
        keys = list(keys)
        results = await asyncio.gather(
            *(self._evict_pod(ns, name, view) for ns, name in keys), return_exceptions=True
        )
        evicted = []
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("apply step failed: %s", result)
                self.metrics.reconcile_errors.labels(step="apply").inc()
                self.cache.mark_dirty()
            elif result:
                evicted.append(key)
        return evicted

    async def _evict_pod(self, namespace: str, name: str, view: ClusterView) -> bool:
        pod = view.pods.get(f"{namespace}/{name}") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node not in view.nodes:
            # No kubelet will ever confirm a graceful deletion on a node that is gone.
            await self._call(self.kube.delete, pods_path(namespace, name), 0)
            return True
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
        }
        try:
            await self._call(
                self.kube.write, f"{pods_path(namespace, name)}/eviction", eviction, False
            )
        except KubeError as error:
            if error.status == HTTP_NOT_FOUND:
                return True
            if error.status != HTTP_TOO_MANY_REQUESTS:
                raise
            logger.info(
                "pod %s/%s: eviction refused by a PodDisruptionBudget; retried next round: %s",
                namespace,
                name,
                error.message,
            )
            self.cache.mark_dirty()
            return False
        return True

    async def _delete_pod(self, namespace: str, name: str, view: ClusterView) -> None:
        pod = view.pods.get(f"{namespace}/{name}") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        path = pods_path(namespace, name)
        if node and node not in view.nodes:
            # No kubelet will ever confirm a graceful deletion on a node that is gone.
            await self._call(self.kube.delete, path, 0)
        else:
            await self._call(self.kube.delete, path)

    async def _create_pod(self, pod: Mapping[str, Any], active: Mapping[str, Body]) -> None:
        namespace = pod["metadata"]["namespace"]
        key = pod_workload_key(pod)
        try:
            await self._call(self.kube.write, pods_path(namespace), pod, False)
        except KubeError as error:
            if refuses_the_pod(error):
                # Refused in its namespace (validation, Pod Security, quota, ...): the workload
                # leaves the plan and is reported by the next round; it is tried again when its
                # spec changes or after the backoff (doubling, at most MAX_BACKOFF_SECONDS).
                generation = int(
                    (active.get(key) or {"metadata": {}})["metadata"].get("generation") or 1
                )
                before = self.pod_rejections.get(key)
                refusals = before.refusals + 1 if before and before.generation == generation else 1
                delay = backoff_seconds(refusals, self.settings.backoff_seconds)
                self.pod_rejections[key] = PodRejection(
                    generation, error.message, refusals, time.monotonic() + delay
                )
                logger.warning(
                    "workload %s: replica pod refused (%d, retry in %.0f s): %s",
                    key,
                    error.status,
                    delay,
                    error.message,
                )
                self.cache.mark_dirty()
                return
            if error.status != HTTP_CONFLICT:
                raise
            self.cache.mark_dirty()  # a same-named pod still exists; retry next round
            return
        self.pod_rejections.pop(key, None)  # accepted: the refusal (if any) is over

    async def _mark_moving(
        self,
        view: ClusterView,
        active: Mapping[str, Body],
        placed_keys: set[str],
        to_delete: Iterable[tuple[str, str]],
    ) -> None:
        """Before the pods of a Running workload that stays placed are deleted (they move), its
        status says Placed: it is never Running with a replica's pod gone (the round's status
        write then says where they go)."""
        now = datetime.now(UTC)
        moving: dict[str, list[str]] = {}
        for namespace, name in to_delete:
            pod = view.pods.get(f"{namespace}/{name}")
            key = pod_workload_key(pod) if pod is not None else ""
            if key in placed_keys and key in active:
                moving.setdefault(key, []).append(name)
        writes: list[Awaitable[Any]] = []
        for key, names in sorted(moving.items()):
            body = active[key]
            previous = body.get("status") or {}
            if previous.get("phase") != statuses.RUNNING:
                continue
            message = f"pod(s) {', '.join(sorted(names))} move: waiting for their replacements"
            ready = statuses.condition(
                previous.get("conditions") or [], "Ready", False, "Moving", message, now=now
            )
            conditions = [
                c for c in previous.get("conditions") or [] if c.get("type") != "Ready"
            ] + [ready]
            meta = body["metadata"]
            path = workloads_path(meta["namespace"], meta["name"]) + "/status"
            status = {"phase": statuses.PLACED, "message": message, "conditions": conditions}
            writes.append(self._call(self.kube.write, path, {"status": status}))
        await self._gather(writes)

    async def _announce_gang_restarts(
        self,
        view: ClusterView,
        active: Mapping[str, Body],
        plan: Plan,
        deleted: Iterable[tuple[str, str]],
    ) -> None:
        """A Warning Event `GangRestart` on each placed gang whose running replicas move: the
        gang restarts (its framework re-forms it); the replicas that stay keep their pods."""
        moving: dict[str, list[tuple[int, str]]] = {}
        for namespace, name in deleted:
            pod = view.pods.get(f"{namespace}/{name}")
            if pod is None or _finished(pod) or not (pod.get("spec") or {}).get("nodeName"):
                continue
            key = pod_workload_key(pod)
            replica = statuses.replica_index(pod)
            if key in active and is_gang(active[key]) and replica >= 0:
                moving.setdefault(key, []).append((replica, pod["spec"]["nodeName"]))
        placed = {(p.workload, p.replica): p.node for p in plan.placements}
        for key, replicas in sorted(moving.items()):
            moves = [(r, n, placed[(key, r)]) for r, n in sorted(replicas) if (key, r) in placed]
            if not moves:
                continue  # preempted as a whole: the Preempted Event says so
            await self._event(
                active[key],
                "Warning",
                "GangRestart",
                "the gang restarts: "
                + ", ".join(f"replica {r} moves from {old} to {new}" for r, old, new in moves)
                + "; the other replicas stay where they run",
            )

    async def _open_profiles(self, view: ClusterView, excluded: Mapping[str, str]) -> None:
        """A NodePowerProfile without limits for each excluded GPU node that has none: its agent
        reports there (a product the catalogue lacks is planned from the NVML power range it
        reports) and changes no limit, as an excluded node's limits are left as they are."""
        missing = {
            name: transition.NodeLimits(idle_watts=None)
            for name in sorted(excluded)
            if name not in view.profiles and name in view.nodes
        }
        if missing:
            await self._write_limits(view, missing)

    async def _write_limits(
        self, view: ClusterView, limits: Mapping[str, transition.NodeLimits]
    ) -> dict[str, int]:
        """Create or patch NodePowerProfiles; returns each node's new metadata.generation."""

        async def write(node: str, watts: transition.NodeLimits) -> tuple[str, int]:
            manifest = desired.node_power_profile(node, watts)
            # A merge patch carries nulls (an opt-in removed) that a created manifest leaves out.
            patch = {"spec": {"nodeName": node, **watts.spec_fields()}}
            if node in view.profiles:
                written = await self._call(self.kube.merge_patch, profiles_path(node), patch)
            else:
                node_body = view.nodes.get(node) or {}
                uid = (node_body.get("metadata") or {}).get("uid")
                if uid:
                    manifest["metadata"]["ownerReferences"] = [
                        {"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}
                    ]
                try:
                    written = await self._call(self.kube.create, profiles_path(), manifest)
                except KubeError as error:
                    if error.status != HTTP_CONFLICT:
                        raise
                    written = await self._call(self.kube.merge_patch, profiles_path(node), patch)
            self.cache.upsert(PROFILES, {**(view.profiles.get(node) or {}), **written})
            return node, int(written["metadata"].get("generation") or 1)

        results = await asyncio.gather(
            *(write(n, w) for n, w in sorted(limits.items())), return_exceptions=True
        )
        generations: dict[str, int] = {}
        for (node, _), result in zip(sorted(limits.items()), results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("writing NodePowerProfile %s failed: %s", node, result)
                self.metrics.reconcile_errors.labels(step="limits").inc()
                generations[node] = -1
            else:
                generations[node] = result[1]
        return generations

    async def _wait_confirmed(self, generations: Mapping[str, int]) -> set[str]:
        """Wait until each agent reports its profile applied; returns the nodes that did not.

        Nodes whose agent is lost (silent for longer than the heartbeat timeout) are not waited
        for: they count at maximum power anyway, and no confirmation will come.
        """
        lost = self._silent_agents(generations)
        waiting = {node for node in generations if node not in lost}
        deadline = time.monotonic() + self.settings.confirm_timeout_seconds
        while waiting:
            for node in list(waiting):
                profile = self.cache.get(PROFILES, node)
                generation = generations[node]
                if generation > 0 and profile and transition.is_confirmed(profile, generation):
                    waiting.discard(node)
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        return waiting

    def _silent_agents(self, nodes: Iterable[str]) -> set[str]:
        """Of `nodes`, those whose agent reported before and has been silent for longer than the
        heartbeat timeout."""
        now = datetime.now(UTC)
        silent = set()
        for node in nodes:
            profile = self.cache.get(PROFILES, node) or {}
            agent = (profile.get("status") or {}).get("agent") or {}
            beat = accounting.parse_rfc3339(agent.get("heartbeatTime"))
            if (
                beat is not None
                and (now - beat).total_seconds() > self.settings.heartbeat_timeout_seconds
            ):
                silent.add(node)
        return silent

    # -- statuses ----------------------------------------------------------------------------------

    async def _write_statuses(
        self,
        view: ClusterView,
        *,
        active: Mapping[str, Body],
        plan: Plan,
        life: Lifecycle,
        pods_by_workload: Mapping[str, list[Body]],
        now: datetime,
        accounts: Accounts,
        telemetry: TelemetrySnapshot | None = None,
        demands: Mapping[str, float] | None = None,
    ) -> None:
        """Each handled workload's status; with `telemetry` (Prometheus configured) also its
        `TelemetryFresh` condition from this round's reading of its running pods. `demands` are
        the tokens/s each service was sized for (SLOMet compares the plan with them)."""
        placements_by_workload: dict[str, list[Any]] = {}
        for placement in plan.placements:
            placements_by_workload.setdefault(placement.workload, []).append(placement)
        unplaced = {u.workload: u for u in plan.unplaced}
        # A service served in part is placed, with its shortfall saying what binds.
        unplaced.update(
            {s.workload: Unplaced(s.workload, s.reason, s.constraint) for s in plan.shortfalls}
        )
        phases: list[str] = []
        slo_met: dict[str, bool] = {}
        writes: list[Awaitable[Any]] = []
        for key, body in view.workloads.items():
            if is_deleting(body):
                continue
            previous = body.get("status") or {}
            # A pod refused in this round: the next round reports it (PodRejected), not Placed.
            rejection = self.pod_rejections.get(key)
            if (rejection is not None and rejection.retry_at > time.monotonic()) or (
                key not in active and key not in life.succeeded and key not in life.failed
            ):
                phases.append(str(previous.get("phase") or statuses.PENDING))
                _note_slo(slo_met, key, previous)
                continue
            pods = [statuses.PodView.from_pod(p) for p in pods_by_workload.get(key, [])]
            if key in accounts.workload_energy:
                energy = accounts.workload_energy[key]
                measured_watts = accounts.workload_measured_watts.get(key)
            else:  # not due: the figures stay as they are (no draw without a running pod)
                energy = previous.get("energy") or {}
                measured_watts = (previous.get("power") or {}).get("measuredWatts")
                if not any(_running(p) for p in pods_by_workload.get(key, [])):
                    measured_watts = None
            new = statuses.workload_status(
                previous,
                generation=int(body["metadata"].get("generation") or 1),
                is_gang=is_gang(body),
                gang_size=gang_size(body),
                placements=placements_by_workload.get(key, []) if key in active else [],
                unplaced=unplaced.get(key),
                pods=pods,
                failure_message=life.failed.get(key),
                now=now,
                measured_watts=measured_watts,
                energy=energy,
                objective=statuses.SloObjective.from_spec(
                    body.get("spec") or {}, demand=(demands or {}).get(key)
                ),
                telemetry=None
                if telemetry is None
                else statuses.workload_telemetry(
                    telemetry,
                    [_pod_id(p) for p in pods_by_workload.get(key, []) if _running(p)],
                ),
            )
            if key in accounts.workload_progress:
                new["progress"] = accounts.workload_progress[key]
            phases.append(new["phase"])
            _note_slo(slo_met, key, new)
            owned = {k: previous.get(k) for k in new}
            if owned != statuses.without_nones(new):
                writes.append(self._write_workload_status(body, previous, new))
        await self._gather(writes)
        self.metrics.set_phases(statuses.phase_counts(phases))
        self.metrics.set_slo(slo_met)
        self.metrics.keep_workloads(set(view.workloads))

    async def _write_workload_status(
        self, body: Body, previous: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        meta = body["metadata"]
        path = workloads_path(meta["namespace"], meta["name"]) + "/status"
        await self._call(self.kube.write, path, {"status": new})
        before_phase = previous.get("phase")
        phase = new["phase"]
        schedulable = next(c for c in new["conditions"] if c["type"] == "Schedulable")
        before_schedulable = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == "Schedulable"), None
        )
        events: list[tuple[str, str, str]] = []
        # One Event when the workload becomes unschedulable or the binding constraint changes; a
        # reason whose figures move every plan does not post an Event each time.
        if schedulable["status"] == "False" and (
            before_schedulable is None
            or before_schedulable.get("status") != "False"
            or before_schedulable.get("reason") != schedulable["reason"]
        ):
            events.append(("Warning", "Unschedulable", schedulable["message"]))
        # Running is in the status (phase, Ready condition) but gets no Event: one API write per
        # workload less when a burst of pods starts.
        if before_phase is None:
            events.append(("Normal", "Admitted", "the operator accepted the workload"))
        slo = next((c for c in new["conditions"] if c["type"] == statuses.SLO_MET), None)
        before_slo = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == statuses.SLO_MET), None
        )
        # An objective that was met and no longer is (preempted, a budget cut, a lost node).
        if (
            slo is not None
            and slo["status"] == "False"
            and (before_slo or {}).get("status") == "True"
        ):
            events.append(("Warning", "SLORisk", slo["message"]))
        if phase != before_phase and phase == statuses.PLACED:
            events.append(("Normal", "Placed", new["message"]))
        elif phase != before_phase and phase == statuses.SUCCEEDED:
            events.append(("Normal", "Succeeded", "every replica finished"))
        elif phase != before_phase and phase == statuses.FAILED:
            events.append(("Warning", "Failed", new["message"]))
        await asyncio.gather(*(self._event(body, *event) for event in events))

    async def _write_budget_statuses(
        self,
        view: ClusterView,
        plan: Plan,
        plan_input: PlanInput,
        now: datetime,
        telemetry: TelemetrySnapshot | None = None,
        *,
        accounts: Accounts | None = None,
        built: PlannedInput | None = None,
        planned_at: datetime | None = None,
    ) -> None:
        """Budget statuses, with the period's energy and carbon where accounting was due; an
        Event where a budget becomes held, unreadable or loses a node from planning.
        `planned_at`: when `plan` was made, if not `now`."""
        built = built or PlannedInput(plan_input)
        allocations = {a.name: a for a in plan.budgets}
        scopes = {b.name: b.node_names for b in plan_input.budgets}
        unready = sorted(n.name for n in plan_input.nodes if not n.agent_ready)
        writes: list[Awaitable[Any]] = []
        figures: dict[str, BudgetFigures] = {}
        for name, body in view.budgets.items():
            if is_deleting(body):
                continue
            cap = _number((body.get("spec") or {}).get("powerCapWatts"))
            previous = body.get("status") or {}
            new = statuses.budget_status(
                previous,
                generation=int(body["metadata"].get("generation") or 1),
                allocation=allocations.get(name),
                cap_watts=cap,
                node_count=len(scopes.get(name, ())),
                plan=plan,
                now=now,
                telemetry=telemetry,
                scope_nodes=scopes.get(name, ()),
                unready_nodes=[n for n in unready if n in scopes.get(name, ())],
                excluded_nodes=_excluded_in_scope(body, view, built.excluded_nodes),
                invalid=built.invalid_budgets.get(name),
                planned_at=planned_at,
            )
            writes.append(self._budget_events(_as(BUDGET_KIND, body), previous, new))
            if accounts is not None:
                new.update(accounts.budget_figures.get(name, {}))
            allowance = ((body.get("spec") or {}).get("energy") or {}).get("kilowattHours")
            used = new.get("energyUsedKilowattHours", previous.get("energyUsedKilowattHours"))
            figures[name] = BudgetFigures(
                cap_watts=cap,
                allocated_cap_watts=new["allocatedCapWatts"],
                expected_watts=new["expectedWatts"],
                measured_watts=new.get("measuredWatts"),
                energy_used_kwh=None if used is None else float(used),
                energy_allowance_kwh=None if allowance is None else float(allowance),
            )
            writes.append(
                self._call(self.kube.write, budgets_path(name) + "/status", {"status": new})
            )
        self.metrics.set_budgets(figures)
        await self._gather(writes)

    async def _budget_events(
        self, body: Body, previous: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        """A Warning Event when a budget's `Ready` or `NodesPlanned` condition turns False with a
        new reason, or `NodesPlanned` names other nodes. What was posted is remembered (the cache
        may not show this round's status write yet); after a restart the status stands in."""
        name = body["metadata"]["name"]
        for type_ in ("Ready", statuses.NODES_PLANNED):
            after = statuses.find_condition(new.get("conditions") or [], type_)
            key = f"EnergyBudget {name} {type_}"
            if after is None or after["status"] != "False":
                self._budget_reported.pop(key, None)
                continue
            seen = (after["reason"], after["message"] if type_ == statuses.NODES_PLANNED else "")
            if key not in self._budget_reported:
                before = statuses.find_condition(previous.get("conditions") or [], type_) or {}
                if before.get("status") == "False":
                    self._budget_reported[key] = (
                        str(before.get("reason")),
                        str(before.get("message")) if type_ == statuses.NODES_PLANNED else "",
                    )
            if self._budget_reported.get(key) != seen:
                self._budget_reported[key] = seen
                await self._event(body, "Warning", after["reason"], after["message"])

    async def _report_left_out(self, view: ClusterView, built: PlannedInput) -> None:
        """Log what the snapshot left out, and post one Event on each GPU node the plan cannot
        use whenever its reason changes (budgets in its scope say so in `NodesPlanned`)."""
        for key, message in built.ignored.items():
            if self._reported.get(key) != message:
                logger.warning("left out of planning: %s: %s", key, message)
        for name, reason in built.excluded_nodes.items():
            key = f"Node {name}"
            if self._reported.get(key) != reason:
                logger.warning("node %s takes no work: %s", name, reason)
                node = view.nodes.get(name) or {"metadata": {"name": name}}
                await self._event(_as("Node", node), "Warning", "NodeExcluded", reason)
        self._reported = {
            **built.ignored,
            **{f"Node {name}": reason for name, reason in built.excluded_nodes.items()},
        }

    async def report_failed_round(self, error: BaseException) -> None:
        """Mark every budget and every waiting workload with the cause of a round that could not
        plan at all (a condition, and one Event per object and cause). Never raises."""
        cause = f"the planning round failed: {type(error).__name__}: {error}"[:900]
        now = datetime.now(UTC)
        try:
            view = self.cache.view()
            writes: list[Awaitable[Any]] = []
            for body in view.budgets.values():
                if not is_deleting(body):
                    writes.append(self._mark_failed(_as(BUDGET_KIND, body), "Ready", cause, now))
            for body in view.workloads.values():
                phase = (body.get("status") or {}).get("phase")
                waiting = phase in (None, statuses.PENDING, statuses.PREEMPTED)
                if waiting and not is_deleting(body):
                    writes.append(
                        self._mark_failed(_as(WORKLOAD_KIND, body), "Schedulable", cause, now)
                    )
            await self._gather(writes)
        except Exception:  # reporting must never stop the loop
            logger.exception("could not report the failed round")

    async def _mark_failed(self, body: Body, type_: str, cause: str, now: datetime) -> None:
        meta = body["metadata"]
        key = f"{body['kind']} {meta.get('namespace', '')}/{meta['name']}"
        if self._failure_reported.get(key) == cause:
            return  # already says so (the watch may not have shown it yet): no write, no Event
        previous = body.get("status") or {}
        marked = statuses.condition(
            previous.get("conditions") or [],
            type_,
            False if type_ == "Ready" else None,
            PLAN_FAILED,
            cause,
            now=now,
            observed_generation=int(meta.get("generation") or 1),
        )
        conditions = [c for c in previous.get("conditions") or [] if c.get("type") != type_] + [
            marked
        ]
        status: dict[str, Any] = {"conditions": conditions}
        if body["kind"] == WORKLOAD_KIND:  # it waits, and says why
            status |= {"phase": previous.get("phase") or statuses.PENDING, "message": cause}
            path = workloads_path(meta["namespace"], meta["name"])
        else:
            path = budgets_path(meta["name"])
        await self._call(self.kube.write, path + "/status", {"status": status})
        self._failure_reported[key] = cause
        await self._event(body, "Warning", PLAN_FAILED, cause)

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on an object (best effort: a lost Event never stops a plan)."""
        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        moment = statuses.rfc3339(datetime.now(UTC))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", f"{desired.GROUP}/{desired.VERSION}"),
                "kind": body.get("kind", "LLMWorkload"),
                "name": meta["name"],
                # Cluster-scoped objects (budgets, nodes) have their Events in "default".
                **({"namespace": meta["namespace"]} if meta.get("namespace") else {}),
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": moment,
            "lastTimestamp": moment,
            "count": 1,
            "source": {"component": "wattsched-operator"},
            "reportingComponent": "wattsched-operator",
        }
        try:
            await self._call(
                self.kube.write, f"/api/v1/namespaces/{namespace}/events", event, False
            )
        except KubeError as error:
            logger.warning("could not post Event %s on %s: %s", reason, meta["name"], error)


def _as(kind: str, body: Body) -> Body:
    """A cached body with its kind (items of a list response carry none): Events name it."""
    api_version = "v1" if kind == "Node" else f"{desired.GROUP}/{desired.VERSION}"
    return {**body, "apiVersion": api_version, "kind": kind}


def _number(value: Any) -> float:
    """A spec number as the API server stores it (0 when absent or not a number)."""
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _excluded_in_scope(
    budget: Mapping[str, Any], view: ClusterView, excluded: Mapping[str, str]
) -> dict[str, str]:
    """The excluded GPU nodes a budget's selector matches (an unreadable selector: none)."""
    if not excluded:
        return {}
    try:
        spec = parse_energybudget(budget).spec
    except ApiValidationError:
        return {}
    found: dict[str, str] = {}
    for name, reason in excluded.items():
        labels = ((view.nodes.get(name) or {}).get("metadata") or {}).get("labels") or {}
        text = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}
        if spec.selects(text):
            found[name] = reason
    return found


def _pod_id(pod: Mapping[str, Any]) -> tuple[str, str]:
    return (pod["metadata"]["namespace"], pod["metadata"]["name"])


def _running(pod: Mapping[str, Any]) -> bool:
    """A pod bound to a node and running: the ones telemetry can attribute GPU draw to."""
    return bool((pod.get("spec") or {}).get("nodeName")) and (
        (pod.get("status") or {}).get("phase") == "Running"
    )


def _pod_started(pod: Mapping[str, Any]) -> datetime | None:
    return accounting.parse_rfc3339((pod.get("status") or {}).get("startTime"))


def _finished(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}


def _pod_failure(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated:
            return (
                f"container {container.get('name')} exited {terminated.get('exitCode')}"
                f" ({terminated.get('reason') or 'Error'})"
            )
    return str(status.get("reason") or status.get("message") or "pod failed")
