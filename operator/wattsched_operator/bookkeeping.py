"""A round's bookkeeping: which workloads and budgets are due for energy and carbon accounting
and job progress (`find_due`, also what the shell must read), and their new figures
(`account`), from the readings the shell took or modelled from the plan (`accounting`,
`progress`). Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from wattsched_api.vocabulary import (
    Source,
)
from wattsched_operator import (
    accounting,
    progress,
    statuses,
)
from wattsched_operator.readings import (
    PodKey,
)
from wattsched_operator.rounds import (
    Body,
    ClusterView,
    EnergyCount,
    Readings,
    Settings,
    is_deleting,
    pod_id,
    pod_started,
    running,
)
from wattsched_optimizer.problem import (
    Plan,
    PlanInput,
)


@dataclass(frozen=True)
class Accounts:
    """This round's energy accounting: the new `status.energy` of the workloads that were due
    (with their measured watts), and the new period figures of the budgets that were due."""

    workload_energy: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    workload_measured_watts: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    budget_figures: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # The new `status.progress` of the jobs that were due.
    workload_progress: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _Due:
    """What accounting finds due at `now` (whole seconds)."""

    now: datetime
    running: Mapping[str, list[Body]]
    workload_starts: Mapping[str, datetime]
    terms: Mapping[str, accounting.BudgetTerms]
    budget_starts: Mapping[str, datetime]
    scopes: Mapping[str, Iterable[str]]
    groups: Mapping[datetime, tuple[set[str], set[PodKey]]]


def find_due(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    pods_by_workload: Mapping[str, list[Body]],
    plan_input: PlanInput,
    settings: Settings,
    now: datetime,
) -> _Due:
    # Whole seconds: `accountedUntil` is written to the second, and the next increment
    # starts exactly where this one ends.
    now = now.replace(microsecond=0)
    interval = settings.accounting_seconds
    running_pods: dict[str, list[Body]] = {
        key: [p for p in pods_by_workload.get(key, []) if running(p)] for key in active
    }
    # Due, and either never accounted (an empty first total) or with pods that used energy:
    # a workload waiting for a place is not rewritten each interval.
    workload_starts = {
        key: start
        for key, body in active.items()
        if (start := accounting.workload_start(body.get("status") or {}, now, interval))
        and (start == now or running_pods[key])
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
    scopes = {b.name: b.node_names for b in plan_input.budgets}
    groups: dict[datetime, tuple[set[str], set[PodKey]]] = {}
    for key, start in workload_starts.items():
        if start < now:
            groups.setdefault(start, (set(), set()))[1].update(map(pod_id, running_pods[key]))
    for name, start in budget_starts.items():
        if start < now:
            groups.setdefault(start, (set(), set()))[0].update(scopes.get(name, ()))
    return _Due(now, running_pods, workload_starts, terms, budget_starts, scopes, groups)


def account(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    plan: Plan,
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    readings: Readings | None,
    settings: Settings,
    now: datetime,
    jobs: Mapping[str, progress.JobTerms] | None = None,
) -> tuple[Accounts, tuple[EnergyCount, ...], tuple[EnergyCount, ...]]:
    """Advance the energy and carbon totals that are due (see `accounting`), and the energy
    counters (workloads, budgets).

    Measured increments come from the energy readings (one per distinct start time, normally
    one); a start the shell could not read, or a pod or node it did not measure, makes that
    increment modelled.
    """
    telemetry = readings.snapshot if readings is not None else None
    due = find_due(
        view,
        active=active,
        pods_by_workload=pods_by_workload,
        plan_input=plan_input,
        settings=settings,
        now=now,
    )
    now = due.now
    if not due.workload_starts and not due.budget_starts:
        return Accounts(), (), ()
    fresh = telemetry is not None and not telemetry.stale
    initial_source = Source.MEASURED if fresh else Source.MODELLED
    terms, scopes = due.terms, due.scopes
    placements: dict[str, list[Any]] = {}
    for placement in plan.placements:
        placements.setdefault(placement.workload, []).append(placement)
    energy_readings = readings.energy if readings is not None else {}
    intensities = readings.intensities if readings is not None else {}
    carbon = {name: t.intensity(intensities.get(name)) for name, t in terms.items()}

    workload_energy: dict[str, Mapping[str, Any]] = {}
    measured_watts: dict[str, float | None] = {}
    workload_counts: list[EnergyCount] = []
    window = readings.rate_window_seconds if readings is not None else 0
    new_series_since = now - timedelta(seconds=window)
    for key, start in due.workload_starts.items():
        pods = due.running[key]
        pod_keys = [pod_id(p) for p in pods]
        planned = placements.get(key, [])
        expected_watts = sum(p.expected_watts_per_gpu * p.gpus for p in planned)
        added: accounting.Increment | None = None
        if start < now:
            reading = energy_readings.get(start)
            fresh_reading = reading is not None and not reading.stale
            measured = (
                accounting.measured_sum(reading.pod_joules, pod_keys)
                if reading is not None and fresh_reading
                else None
            )
            pod_starts = [pod_started(p) or start for p in pods]
            if measured is None and fresh_reading and max(pod_starts) > new_series_since:
                continue  # a pod too new for its first samples: measure it next time
            began = max(start, min(pod_starts))
            added = accounting.increment(measured, expected_watts, (now - began).total_seconds())
        budget = next(
            (
                name
                for name in sorted(terms)
                if carbon[name] is not None and any(p.node in scopes.get(name, ()) for p in planned)
            ),
            None,
        )
        previous = (view.workloads[key].get("status") or {}).get("energy") or {}
        if added is not None:
            intensity = carbon[budget] if budget else None
            pue = terms[budget].pue if budget else 1.0
            workload_counts.append(
                EnergyCount(
                    key,
                    added.joules,
                    added.joules / accounting.JOULES_PER_KWH * pue * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    added.source,
                )
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
    budget_counts: list[EnergyCount] = []
    for name, start in due.budget_starts.items():
        budget_added: accounting.Increment | None = None
        if start < now:
            reading = energy_readings.get(start)
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
            budget_counts.append(
                EnergyCount(
                    name,
                    facility_joules,
                    facility_joules / accounting.JOULES_PER_KWH * intensity.grams_per_kwh
                    if intensity
                    else 0.0,
                    budget_added.source,
                )
            )
        budget_figures[name] = accounting.budget_energy(
            view.budgets[name].get("status") or {},
            budget_added,
            now=now,
            terms=terms[name],
            carbon=carbon[name],
            initial_source=initial_source,
        )
    job_progress = _advance_progress(
        view,
        jobs or {},
        starts=due.workload_starts,
        running=due.running,
        placements=placements,
        measured=readings.progress if readings is not None else {},
        now=now,
    )
    return (
        Accounts(workload_energy, measured_watts, budget_figures, job_progress),
        tuple(workload_counts),
        tuple(budget_counts),
    )


def _advance_progress(
    view: ClusterView,
    jobs: Mapping[str, progress.JobTerms],
    *,
    starts: Mapping[str, datetime],
    running: Mapping[str, list[Body]],
    placements: Mapping[str, list[Any]],
    measured: Mapping[str, float | None],
    now: datetime,
) -> dict[str, Mapping[str, Any]]:
    """The new `status.progress` of the jobs due for accounting (see `progress`): measured
    from the job's `spec.progress.prometheusQuery` when it answered (`measured`), else the plan's
    rate (calibrated model) over the seconds the whole gang ran since the last update."""
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
                [start, *(pod_started(p) or start for p in pods)]
                + ([previous.updated_at] if previous else [])
            )
            seconds = max(0.0, (now - began).total_seconds())
        advanced[key] = progress.advance(
            previous,
            now=now,
            running_seconds=seconds,
            rate_tokens_per_second=sum(p.expected_throughput for p in planned),
            total=terms.total_tokens,
            measured_tokens=measured.get(key),
        ).to_status()
    return advanced
