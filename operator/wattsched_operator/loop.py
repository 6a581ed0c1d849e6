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
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from wattsched_operator import accounting, desired, statuses, transition
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
from wattsched_optimizer.model import (
    CatalogueModel,
    PerformanceModel,
    product_spec,
    products_in_scope,
)
from wattsched_optimizer.problem import Placement, Plan, PlanInput, PlanStatus, WorkloadType

logger = logging.getLogger("wattsched.operator")

ANNOTATION_FAILURES = "wattsched.io/failures"
ANNOTATION_RETRY_AFTER = "wattsched.io/retry-after"
ANNOTATION_FAILURE_COUNTED = "wattsched.io/failure-counted"
MAX_BACKOFF_SECONDS = 300.0
HTTP_FORBIDDEN = 403
HTTP_INVALID = 422

T = TypeVar("T")

PlanFunction = Callable[[PlanInput, PerformanceModel], Plan]


@dataclass(frozen=True)
class PlannedInput:
    """The optimizer's input, and the workloads left out as invalid (key -> error message)."""

    plan_input: PlanInput
    rejected: Mapping[str, str] = dataclasses.field(default_factory=dict)


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


def pod_workload_key(pod: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}/{(meta.get('labels') or {}).get(desired.LABEL_WORKLOAD, '')}"


def refuses_the_template(error: KubeError) -> bool:
    """Whether the API server refused a pod for what the user's template says (Pod Security
    admission or validation), as opposed to the operator's own permissions or a transient fault."""
    if error.status == HTTP_INVALID:
        return True
    return error.status == HTTP_FORBIDDEN and "violates PodSecurity" in error.message


def is_deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


@dataclass(frozen=True)
class Accounts:
    """This round's energy accounting: the new `status.energy` of the workloads that were due
    (with their measured watts), and the new period figures of the budgets that were due."""

    workload_energy: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    workload_measured_watts: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    budget_figures: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass
class Lifecycle:
    """Per-workload facts gathered before planning: finished, failed for good, waiting to retry."""

    succeeded: set[str] = dataclasses.field(default_factory=set)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    keep_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    delete_pods: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    wake_at: float | None = None


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
        # Workloads whose replica pod the API server refused (PodSecurity, invalid template), by
        # key: (the generation refused, the API server's message). Retried when the spec changes.
        self.pod_rejections: dict[str, tuple[int, str]] = {}
        # Corrections of the performance model from measurements (bounded, smoothed), and what
        # they are fitted against: the placements in force while telemetry was measuring.
        self.calibrator = Calibrator()
        self._applied_placements: tuple[Placement, ...] = ()
        self._calibrated_at = 0.0

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: wait for a change or the periodic tick, debounce, plan, apply."""
        last_resync = 0.0
        while True:
            timeout = self.settings.replan_seconds
            if self._wake_at is not None:
                timeout = max(0.0, min(timeout, self._wake_at - time.monotonic()))
            try:
                await asyncio.wait_for(self.cache.dirty.wait(), timeout=timeout)
                await asyncio.sleep(self.settings.debounce_seconds)
            except TimeoutError:
                pass
            self.cache.dirty.clear()
            leader = await self.is_leader()
            if not leader:
                self._was_leader = False
                continue
            try:
                periodic = time.monotonic() - last_resync >= self.settings.replan_seconds
                if not self._was_leader or periodic:
                    await self.resync()
                    last_resync = time.monotonic()
                self._was_leader = True
                await self.plan_once()
            except Exception:
                logger.exception("planning round failed; retrying after the debounce")
                self.metrics.reconcile_errors.labels(step="plan").inc()
                self.cache.mark_dirty()

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
        self._wake_at = life.wake_at
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
        active: dict[str, Body],
        life: Lifecycle,
        pods_by_workload: dict[str, list[Body]],
        now: datetime,
    ) -> Plan:
        """Solve `plan_input`, apply the plan and write every status (the rest of `plan_once`)."""
        started = time.monotonic()
        # Telemetry is read while the optimizer solves; it only feeds status.
        reading = asyncio.create_task(self._read_telemetry(plan_input, view))
        try:
            model = CatalogueModel().calibrated(self.calibrator.corrections())
            plan = await self._call(self.plan_function, plan_input, model)
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
        if plan.status is PlanStatus.INFEASIBLE:
            # Not even the empty placement fits: nothing is placed or raised. Nodes whose agent
            # has not confirmed their limits count at maximum, which alone can make it so (a
            # budget applied before the agents' first confirmation); they are lowered.
            await self._lower_unconfirmed_to_minimum(view, plan_input)
            await self._write_budget_statuses(view, plan, plan_input, now, telemetry)
            return plan
        self._calibrate(plan_input, view, telemetry)
        await self._apply(view, active, plan, life)
        self._applied_placements = plan.placements
        accounts = await self._account(
            view,
            active=active,
            plan=plan,
            plan_input=plan_input,
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
        )
        await self._write_budget_statuses(view, plan, plan_input, now, telemetry, accounts=accounts)
        return plan

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
            labels = pod["metadata"].get("labels") or {}
            if not _running(pod) or desired.LABEL_REPLICA not in labels:
                continue
            started = _pod_started(pod)
            if started is None or started > settled_by:
                continue
            replica = (pod_workload_key(pod), int(labels[desired.LABEL_REPLICA]))
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

    async def _account(
        self,
        view: ClusterView,
        *,
        active: Mapping[str, Body],
        plan: Plan,
        plan_input: PlanInput,
        pods_by_workload: Mapping[str, list[Body]],
        telemetry: TelemetrySnapshot | None,
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
            budget_figures[name] = accounting.budget_energy(
                view.budgets[name].get("status") or {},
                budget_added,
                now=now,
                terms=terms[name],
                carbon=carbon[name],
                initial_source=initial_source,
            )
        return Accounts(workload_energy, measured_watts, budget_figures)

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
            failures = int(annotations.get(ANNOTATION_FAILURES, "0"))
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
                due = datetime.fromisoformat(str(retry_after).replace("Z", "+00:00"))
                if now >= due:
                    life.delete_pods.add(_pod_id(pod))
                else:
                    life.keep_pods.add(_pod_id(pod))
                    wake = time.monotonic() + (due - now).total_seconds()
                    life.wake_at = wake if life.wake_at is None else min(life.wake_at, wake)
        return life

    def _refused_pods(self, active: Mapping[str, Body]) -> dict[str, str]:
        """Workloads whose pods the API server refused for their current generation."""
        refused: dict[str, str] = {}
        for key, (generation, message) in list(self.pod_rejections.items()):
            body = active.get(key)
            if body is None or int(body["metadata"].get("generation") or 1) != generation:
                del self.pod_rejections[key]  # deleted, or its spec changed: try again
                continue
            refused[key] = f"the API server refused its replica pod: {message}"
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
            status = {"phase": statuses.PENDING, "conditions": [condition], "message": message}
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
        planned = desired.planned_limits(plan)
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

        # 2. Delete preempted and moved pods (and failed pods due for a retry).
        placed_keys = {p.workload for p in plan.placements}
        to_delete = sorted(set(changes.delete) | life.delete_pods)
        preempted: dict[str, int] = {}
        for namespace, name in to_delete:
            pod = view.pods.get(f"{namespace}/{name}")
            if pod is None:
                continue
            key = pod_workload_key(pod)
            if key in active and key not in placed_keys and not _finished(pod):
                preempted[key] = preempted.get(key, 0) + 1
        await self._gather(self._delete_pod(ns, name, view) for ns, name in to_delete)
        for key, count in preempted.items():
            self.metrics.preemptions.inc(count)
            unplaced = next((u for u in plan.unplaced if u.workload == key), None)
            reason = unplaced.reason if unplaced else "the plan no longer places it"
            await self._event(active[key], "Warning", "Preempted", f"{count} replica(s): {reason}")

        # 3. Create new pods (a name still held by a terminating pod is retried next round).
        deleting = set(to_delete) | {
            (p["metadata"]["namespace"], p["metadata"]["name"])
            for p in view.pods.values()
            if is_deleting(p)
        }
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

    async def _lower_unconfirmed_to_minimum(self, view: ClusterView, plan_input: PlanInput) -> None:
        """Lower every GPU of the nodes counted at maximum to its product's minimum.

        Lowering never breaks a budget, and once the agents confirm, the next plan counts those
        nodes at what they apply instead of at maximum.
        """
        idle = {
            node.name: transition.NodeLimits(idle_watts=product_spec(node.product).min_watts.value)
            for node in plan_input.nodes
            if not node.agent_ready
        }
        current = {
            node: transition.NodePowerState.from_profile(view.profiles.get(node)) for node in idle
        }
        lower = transition.power_steps(current, idle).lower
        if not lower:
            return
        unconfirmed = await self._wait_confirmed(await self._write_limits(view, lower))
        self.unconfirmed = frozenset((self.unconfirmed - set(lower)) | unconfirmed)
        self.metrics.unconfirmed_nodes.set(len(self.unconfirmed))
        logger.info(
            "plan infeasible with %d node(s) counted at maximum: lowered them to their minimum "
            "(%d confirmed)",
            len(lower),
            len(lower) - len(unconfirmed),
        )
        self.cache.mark_dirty()

    async def _gather(self, calls: Iterable[Awaitable[Any]]) -> None:
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("apply step failed: %s", result)
                self.metrics.reconcile_errors.labels(step="apply").inc()
                self.cache.mark_dirty()

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
        try:
            await self._call(self.kube.write, pods_path(namespace), pod, False)
        except KubeError as error:
            if refuses_the_template(error):
                # The user's template is refused in its namespace (Pod Security, validation):
                # retrying cannot help until the spec changes; the next round reports it.
                key = pod_workload_key(pod)
                generation = int(
                    (active.get(key) or {"metadata": {}})["metadata"].get("generation") or 1
                )
                self.pod_rejections[key] = (generation, error.message)
                logger.warning("workload %s: replica pod refused: %s", key, error.message)
                self.cache.mark_dirty()
                return
            if error.status != 409:
                raise
            self.cache.mark_dirty()  # a same-named pod still exists; retry next round

    async def _write_limits(
        self, view: ClusterView, limits: Mapping[str, transition.NodeLimits]
    ) -> dict[str, int]:
        """Create or patch NodePowerProfiles; returns each node's new metadata.generation."""

        async def write(node: str, watts: transition.NodeLimits) -> tuple[str, int]:
            manifest = desired.node_power_profile(node, watts)
            if node in view.profiles:
                written = await self._call(
                    self.kube.merge_patch, profiles_path(node), {"spec": manifest["spec"]}
                )
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
                    if error.status != 409:
                        raise
                    written = await self._call(
                        self.kube.merge_patch, profiles_path(node), {"spec": manifest["spec"]}
                    )
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
        """Wait until each agent reports its profile applied; returns the nodes that did not."""
        waiting = {node for node, generation in generations.items()}
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
    ) -> None:
        """Each handled workload's status; with `telemetry` (Prometheus configured) also its
        `TelemetryFresh` condition from this round's reading of its running pods."""
        placements_by_workload: dict[str, list[Any]] = {}
        for placement in plan.placements:
            placements_by_workload.setdefault(placement.workload, []).append(placement)
        unplaced = {u.workload: u for u in plan.unplaced}
        phases: list[str] = []
        writes: list[Awaitable[Any]] = []
        for key, body in view.workloads.items():
            if is_deleting(body):
                continue
            previous = body.get("status") or {}
            if key not in active and key not in life.succeeded and key not in life.failed:
                phases.append(str(previous.get("phase") or statuses.PENDING))
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
                objective=statuses.SloObjective.from_spec(body.get("spec") or {}),
                telemetry=None
                if telemetry is None
                else statuses.workload_telemetry(
                    telemetry,
                    [_pod_id(p) for p in pods_by_workload.get(key, []) if _running(p)],
                ),
            )
            phases.append(new["phase"])
            owned = {k: previous.get(k) for k in new}
            if owned != statuses.without_nones(new):
                writes.append(self._write_workload_status(body, previous, new))
        await self._gather(writes)
        self.metrics.set_phases(statuses.phase_counts(phases))

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
    ) -> None:
        """Budget statuses, with the period's energy and carbon where accounting was due."""
        allocations = {a.name: a for a in plan.budgets}
        scopes = {b.name: b.node_names for b in plan_input.budgets}
        writes: list[Awaitable[Any]] = []
        figures: dict[str, BudgetFigures] = {}
        for name, body in view.budgets.items():
            if is_deleting(body):
                continue
            cap = float((body.get("spec") or {}).get("powerCapWatts") or 0.0)
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
            )
            if accounts is not None:
                new.update(accounts.budget_figures.get(name, {}))
            figures[name] = BudgetFigures(
                cap_watts=cap,
                allocated_cap_watts=new["allocatedCapWatts"],
                expected_watts=new["expectedWatts"],
            )
            writes.append(
                self._call(self.kube.write, budgets_path(name) + "/status", {"status": new})
            )
        self.metrics.set_budgets(figures)
        await self._gather(writes)

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
                "namespace": namespace,
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
