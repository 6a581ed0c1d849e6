"""The statuses and Events a round writes: each workload's and budget's new status (built by
`statuses`) compared with the one it has, the Events a change posts (`Admitted`, `Placed`,
`Unschedulable`, `SLORisk`, a budget condition turning False...), and the statuses of a round
that could not plan (`mark_failed`). Pure: writes are returned as data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wattsched_api.energybudget import parse_energybudget
from wattsched_api.errors import ApiValidationError
from wattsched_api.vocabulary import (
    ConditionType,
    EventReason,
    Phase,
    Reason,
)
from wattsched_operator import (
    bookkeeping,
    budget_horizon,
    lifecycle,
    services,
    statuses,
)
from wattsched_operator.readings import (
    TelemetrySnapshot,
)
from wattsched_operator.rounds import (
    BUDGET_KIND,
    WORKLOAD_KIND,
    Body,
    BudgetMetric,
    ClusterView,
    Event,
    ObjectRef,
    PlannedInput,
    StatusWrite,
    WorkloadStatus,
    gang_size,
    is_deleting,
    is_gang,
    pod_id,
    running,
)
from wattsched_optimizer.problem import (
    Placement,
    Plan,
    PlanInput,
    Unplaced,
)


def _slo_of(status: Mapping[str, Any]) -> bool | None:
    """Whether a workload's SLOMet condition is True (None: it has none)."""
    condition = statuses.find_condition(status.get("conditions") or [], ConditionType.SLO_MET)
    if condition is not None and condition.get("status") in {"True", "False"}:
        return bool(condition["status"] == "True")
    return None


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


@dataclass(frozen=True)
class _RoundOutcome:
    """What a round decided that a workload's status says (shared by its workloads' builds)."""

    active: frozenset[str]
    placements_by_workload: Mapping[str, list[Placement]]
    unplaced: Mapping[str, Unplaced]
    life: lifecycle.Lifecycle
    pods_by_workload: Mapping[str, list[Body]]
    now: datetime
    accounts: bookkeeping.Accounts
    telemetry: TelemetrySnapshot | None
    demands: Mapping[str, float]

    def placements(self, key: str) -> list[Placement]:
        return self.placements_by_workload.get(key, []) if key in self.active else []

    def summary(self, key: str, body: Body, previous: Mapping[str, Any]) -> tuple[str, bool | None]:
        """The phase and SLOMet the workload's status gets (what `build` writes), without
        building it."""
        phase = statuses.next_phase(
            previous.get("phase"),
            is_gang=is_gang(body),
            gang_size=gang_size(body),
            placements=self.placements(key),
            pods=[statuses.PodView.from_pod(p) for p in self.pods_by_workload.get(key, [])],
            failed_permanently=key in self.life.failed,
        )
        objective = self.objective(key, body)
        if not objective.declared:
            return phase, None
        met, _, _ = statuses.slo_met(objective, phase, self.placements(key), self.unplaced.get(key))
        return phase, met

    def objective(self, key: str, body: Body) -> statuses.SloObjective:
        return statuses.SloObjective.from_spec(body.get("spec") or {}, demand=self.demands.get(key))

    def inputs(self, key: str, body: Body, current: Mapping[str, Any]) -> int | None:
        """A key of everything `build` reads for the workload, given its object as it is now
        (`current`: its status, by resourceVersion) and as the round saw it (`body`: spec and
        generation): the plan's placements and why not, its pods (by resourceVersion), a
        permanent failure, the figures accounting and telemetry give it, the demand it was sized
        for. None when a resourceVersion is missing. (The time of the round only dates a
        condition that changes, so it is not part of the key.)"""
        seen = body["metadata"].get("resourceVersion")
        now = (current.get("metadata") or {}).get("resourceVersion")
        pods = self.pods_by_workload.get(key, [])
        versions = tuple(
            (p["metadata"].get("name"), p["metadata"].get("resourceVersion")) for p in pods
        )
        if seen is None or now is None or any(v is None for _, v in versions):
            return None
        return hash(
            (
                body["metadata"].get("uid"),
                seen,
                now,
                tuple(self.placements(key)),
                self.unplaced.get(key),
                versions,
                self.life.failed.get(key),
                repr(self.accounts.workload_energy.get(key)),
                self.accounts.workload_measured_watts.get(key),
                repr(self.accounts.workload_progress.get(key)),
                None
                if self.telemetry is None
                else statuses.workload_telemetry(
                    self.telemetry, [pod_id(p) for p in pods if running(p)]
                ),
                self.demands.get(key),
            )
        )

    def build(self, key: str, body: Body, previous: Mapping[str, Any]) -> StatusWrite | None:
        """The workload's status write against `previous`, the status it has (None when the
        status would not change)."""
        pod_bodies = self.pods_by_workload.get(key, [])
        pods = [statuses.PodView.from_pod(p) for p in pod_bodies]
        if key in self.accounts.workload_energy:
            energy = self.accounts.workload_energy[key]
            measured_watts = self.accounts.workload_measured_watts.get(key)
        else:  # not due: the figures stay as they are (no draw without a running pod)
            energy = previous.get("energy") or {}
            measured_watts = (previous.get("power") or {}).get("measuredWatts")
            if not any(running(p) for p in pod_bodies):
                measured_watts = None
        new = statuses.workload_status(
            previous,
            generation=int(body["metadata"].get("generation") or 1),
            is_gang=is_gang(body),
            gang_size=gang_size(body),
            placements=self.placements(key),
            unplaced=self.unplaced.get(key),
            pods=pods,
            failure_message=self.life.failed.get(key),
            now=self.now,
            measured_watts=measured_watts,
            energy=energy,
            objective=self.objective(key, body),
            telemetry=None
            if self.telemetry is None
            else statuses.workload_telemetry(
                self.telemetry, [pod_id(p) for p in pod_bodies if running(p)]
            ),
        )
        if key in self.accounts.workload_progress:
            new["progress"] = self.accounts.workload_progress[key]
        # Named once it exists: created with the first pod that serves (`services.may_create`).
        if (service := services.status_service(body)) is not None and (
            previous.get("service") == service or any(services.serves(p) for p in pod_bodies)
        ):
            new["service"] = service
        owned = {k: previous.get(k) for k in new}
        if owned == statuses.without_nones(new):
            return None
        ref = ObjectRef.of(WORKLOAD_KIND, body)
        return StatusWrite(ref, new, _workload_events(ref, previous, new))


class _Decided:
    """One workload's part of a round's outcome: how to build its status and what decides it
    (`_RoundOutcome.build`, `.inputs`), held per workload until the writer builds it (fields in
    slots: a round holds 10,000 of them, two `functools.partial`s each were 5 MB, measured)."""

    __slots__ = ("body", "key", "outcome")

    def __init__(self, outcome: _RoundOutcome, key: str, body: Body) -> None:
        self.outcome = outcome
        self.key = key
        self.body = body

    def build(self, previous: Mapping[str, Any]) -> StatusWrite | None:
        return self.outcome.build(self.key, self.body, previous)

    def inputs(self, current: Mapping[str, Any]) -> int | None:
        return self.outcome.inputs(self.key, self.body, current)


def workload_statuses(
    view: ClusterView,
    *,
    active: Mapping[str, Body],
    plan: Plan,
    life: lifecycle.Lifecycle,
    pods_by_workload: Mapping[str, list[Body]],
    now: datetime,
    accounts: bookkeeping.Accounts,
    telemetry: TelemetrySnapshot | None = None,
    demands: Mapping[str, float] | None = None,
    unplaced: Mapping[str, Unplaced],
) -> tuple[list[WorkloadStatus], frozenset[str]]:
    """Each handled workload's status and its Events (built when written: `WorkloadStatus`);
    with `telemetry` (Prometheus configured) also its `TelemetryFresh` condition from this
    round's reading of its running pods. `demands` are the tokens/s each service was sized for
    (SLOMet compares the plan with them); `unplaced` the workloads without a place
    (`unplaced_of`: the work the horizon holds back now says Schedulable=False with reason
    Deferred, and until when and why). Returns them and the workloads that exist (for
    metrics)."""
    placements_by_workload: dict[str, list[Placement]] = {}
    for placement in plan.placements:
        placements_by_workload.setdefault(placement.workload, []).append(placement)
    outcome = _RoundOutcome(
        active=frozenset(active),
        placements_by_workload=placements_by_workload,
        # A service served in part is placed, with its shortfall saying what binds.
        unplaced={
            **unplaced,
            **{s.workload: Unplaced(s.workload, s.reason, s.constraint) for s in plan.shortfalls},
        },
        life=life,
        pods_by_workload=pods_by_workload,
        now=now,
        accounts=accounts,
        telemetry=telemetry,
        demands=demands or {},
    )
    results: list[WorkloadStatus] = []
    for key, body in view.workloads.items():
        if is_deleting(body):
            continue
        previous = body.get("status") or {}
        previous_phase = str(previous.get("phase") or Phase.PENDING)
        previous_slo = _slo_of(previous)
        if key not in active and key not in life.succeeded and key not in life.failed:
            results.append(
                WorkloadStatus(key, previous_phase, previous_slo, previous_phase, previous_slo)
            )
            continue
        phase, met = outcome.summary(key, body, previous)
        results.append(
            WorkloadStatus(
                key,
                phase,
                met,
                previous_phase,
                previous_slo,
                ref=ObjectRef.of(WORKLOAD_KIND, body),
                build=(decided := _Decided(outcome, key, body)).build,
                inputs=decided.inputs,
                seen=previous,
                counted=key in accounts.workload_energy
                and any(running(p) for p in pods_by_workload.get(key, [])),
            )
        )
    return results, frozenset(view.workloads)


def unplaced_of(plan: Plan, deferred: Iterable[budget_horizon.DeferredWork]) -> dict[str, Unplaced]:
    """The workloads a round leaves without a place, by key: the plan's unplaced, and the work
    the horizon defers (left out of the solve; shown as not placed now, reason Deferred)."""
    return {
        **{u.workload: u for u in plan.unplaced},
        **{
            d.workload: Unplaced(d.workload, d.message, statuses.DEFERRED_CONSTRAINT)
            for d in deferred
        },
    }


def _workload_events(
    ref: ObjectRef, previous: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[Event, ...]:
    """The Events of a workload's status change."""
    before_phase = previous.get("phase")
    phase = new["phase"]
    schedulable = next(c for c in new["conditions"] if c["type"] == ConditionType.SCHEDULABLE)
    before_schedulable = statuses.find_condition(
        previous.get("conditions") or [], ConditionType.SCHEDULABLE
    )
    events: list[tuple[str, str, str]] = []
    # One Event when the workload becomes unschedulable or the binding constraint changes; a
    # reason whose figures move every plan does not post an Event each time. Work the horizon
    # defers gets one Deferred Event per deferral (its message says until when and why).
    if schedulable["status"] == "False" and (
        before_schedulable is None
        or before_schedulable.get("status") != "False"
        or before_schedulable.get("reason") != schedulable["reason"]
    ):
        if schedulable["reason"] == Reason.DEFERRED:
            events.append(("Normal", EventReason.DEFERRED, schedulable["message"]))
        else:
            events.append(("Warning", EventReason.UNSCHEDULABLE, schedulable["message"]))
    # Running is in the status (phase, Ready condition) but gets no Event: one API write per
    # workload less when a burst of pods starts.
    # A workload placed as it is admitted gets the Placed Event only (it says both); one that
    # waits gets Admitted now and Placed later.
    if before_phase is None and phase != Phase.PLACED:
        events.append(("Normal", EventReason.ADMITTED, "the operator accepted the workload"))
    slo = statuses.find_condition(new["conditions"], ConditionType.SLO_MET)
    before_slo = statuses.find_condition(previous.get("conditions") or [], ConditionType.SLO_MET)
    # An objective that was met and no longer is (preempted, a budget cut, a lost node).
    if slo is not None and slo["status"] == "False" and (before_slo or {}).get("status") == "True":
        events.append(("Warning", EventReason.SLO_RISK, slo["message"]))
    if phase != before_phase and phase == Phase.PLACED:
        events.append(("Normal", EventReason.PLACED, new["message"]))
    elif phase != before_phase and phase == Phase.SUCCEEDED:
        events.append(("Normal", EventReason.SUCCEEDED, "every replica finished"))
    elif phase != before_phase and phase == Phase.FAILED:
        events.append(("Warning", EventReason.FAILED, new["message"]))
    return tuple(Event(ref, *event) for event in events)


def budget_statuses(
    view: ClusterView,
    plan: Plan,
    plan_input: PlanInput,
    now: datetime,
    telemetry: TelemetrySnapshot | None = None,
    *,
    accounts: bookkeeping.Accounts | None = None,
    built: PlannedInput | None = None,
    planned_at: datetime | None = None,
    reported: Mapping[str, tuple[str, str]],
    allowances: Mapping[str, budget_horizon.AllowanceOutlook] | None = None,
) -> tuple[list[StatusWrite], dict[str, tuple[str, str]], dict[str, BudgetMetric]]:
    """Budget statuses, with the period's energy and carbon where accounting was due and the
    horizon's `allowances` (remaining and projected figures, the `AllowanceExhausted`
    condition); an Event where a budget becomes held, unreadable, loses a node from planning or
    has no allowance left for all its flexible work.
    `planned_at`: when `plan` was made, if not `now`. Returns the writes, what Events have now
    been posted about, and the budgets' gauges."""
    built = built or PlannedInput(plan_input)
    allocations = {a.name: a for a in plan.budgets}
    scopes = {b.name: b.node_names for b in plan_input.budgets}
    unready = sorted(n.name for n in plan_input.nodes if not n.agent_ready)
    writes: list[StatusWrite] = []
    figures: dict[str, BudgetMetric] = {}
    posted = dict(reported)
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
        outlook = (allowances or {}).get(name)
        if outlook is not None:
            new.update(outlook.status_fields())
            new["conditions"] = [
                *new["conditions"],
                statuses.condition(
                    previous.get("conditions") or [],
                    ConditionType.ALLOWANCE_EXHAUSTED,
                    outlook.exhausted,
                    outlook.reason,
                    outlook.message,
                    now=now,
                    observed_generation=int(body["metadata"].get("generation") or 1),
                ),
            ]
        ref = ObjectRef.of(BUDGET_KIND, body)
        events = _budget_events(ref, previous, new, posted)
        if accounts is not None:
            new.update(accounts.budget_figures.get(name, {}))
        allowance = ((body.get("spec") or {}).get("energy") or {}).get("kilowattHours")
        if outlook is not None and accounts is not None and name in accounts.budget_figures:
            # What is left moves with the energy accounted this round (between plans too).
            new.update(_remaining(body, accounts.budget_figures[name]))
        used = new.get("energyUsedKilowattHours", previous.get("energyUsedKilowattHours"))
        figures[name] = BudgetMetric(
            cap_watts=cap,
            allocated_cap_watts=new["allocatedCapWatts"],
            expected_watts=new["expectedWatts"],
            measured_watts=new.get("measuredWatts"),
            energy_used_kwh=None if used is None else float(used),
            energy_allowance_kwh=None if allowance is None else float(allowance),
        )
        writes.append(StatusWrite(ref, new, events))
    return writes, posted, figures


def _remaining(body: Body, figures: Mapping[str, Any]) -> dict[str, float]:
    """The allowance left after the period's figures accounting just wrote
    (`remainingKilowattHours`, `remainingCarbonKg`, as the horizon's outlook words them)."""
    spec = body.get("spec") or {}
    allowed_kwh = (spec.get("energy") or {}).get("kilowattHours")
    allowed_kg = (spec.get("carbon") or {}).get("maxKgPerPeriod")
    out = {}
    if allowed_kwh is not None and figures.get("energyUsedKilowattHours") is not None:
        out["remainingKilowattHours"] = round(
            float(allowed_kwh) - float(figures["energyUsedKilowattHours"]), 3
        )
    if allowed_kg is not None and figures.get("carbonKg") is not None:
        out["remainingCarbonKg"] = round(float(allowed_kg) - float(figures["carbonKg"]), 3)
    return out


def _budget_events(
    ref: ObjectRef,
    previous: Mapping[str, Any],
    new: Mapping[str, Any],
    posted: dict[str, tuple[str, str]],
) -> tuple[Event, ...]:
    """A Warning Event when a budget's `Ready` or `NodesPlanned` condition turns False with a
    new reason, or `NodesPlanned` names other nodes. What was posted is remembered in `posted`
    (the cache may not show this round's status write yet); after a restart the status stands
    in."""
    events = []
    for type_ in (ConditionType.READY, ConditionType.NODES_PLANNED):
        after = statuses.find_condition(new.get("conditions") or [], type_)
        key = f"EnergyBudget {ref.name} {type_}"
        if after is None or after["status"] != "False":
            posted.pop(key, None)
            continue
        seen = (after["reason"], after["message"] if type_ == ConditionType.NODES_PLANNED else "")
        if key not in posted:
            before = statuses.find_condition(previous.get("conditions") or [], type_) or {}
            if before.get("status") == "False":
                posted[key] = (
                    str(before.get("reason")),
                    str(before.get("message")) if type_ == ConditionType.NODES_PLANNED else "",
                )
        if posted.get(key) != seen:
            posted[key] = seen
            events.append(Event(ref, "Warning", after["reason"], after["message"]))
    # An allowance that has no room for all flexible work: one Event each time it runs short
    # (or for another allowance), none while it stays short.
    exhausted = statuses.find_condition(
        new.get("conditions") or [], ConditionType.ALLOWANCE_EXHAUSTED
    )
    key = f"EnergyBudget {ref.name} {ConditionType.ALLOWANCE_EXHAUSTED}"
    if exhausted is None or exhausted["status"] != "True":
        posted.pop(key, None)
    else:
        was = statuses.find_condition(
            previous.get("conditions") or [], ConditionType.ALLOWANCE_EXHAUSTED
        )
        if key not in posted and was is not None and was.get("status") == "True":
            posted[key] = (str(was.get("reason")), "")
        if posted.get(key) != (exhausted["reason"], ""):
            posted[key] = (exhausted["reason"], "")
            events.append(
                Event(ref, "Warning", EventReason.ALLOWANCE_EXHAUSTED, exhausted["message"])
            )
    return tuple(events)


def mark_failed(
    kind: str, body: Body, type_: str, cause: str, *, now: datetime, said: dict[str, str]
) -> StatusWrite | None:
    meta = body["metadata"]
    key = f"{kind} {meta.get('namespace', '')}/{meta['name']}"
    if said.get(key) == cause:
        return None  # already says so (the watch may not have shown it yet): no write, no Event
    previous = body.get("status") or {}
    marked = statuses.condition(
        previous.get("conditions") or [],
        type_,
        False if type_ == ConditionType.READY else None,
        Reason.PLAN_FAILED,
        cause,
        now=now,
        observed_generation=int(meta.get("generation") or 1),
    )
    conditions = [c for c in previous.get("conditions") or [] if c.get("type") != type_] + [marked]
    status: dict[str, Any] = {"conditions": conditions}
    if kind == WORKLOAD_KIND:  # it waits, and says why
        status |= {"phase": previous.get("phase") or Phase.PENDING, "message": cause}
    said[key] = cause
    ref = ObjectRef.of(kind, body)
    return StatusWrite(ref, status, (Event(ref, "Warning", EventReason.PLAN_FAILED, cause),))
