"""What a round learns from telemetry for later rounds: the model's calibration from the running
placements' measured power and throughput, and the services' measured demand (the demand
history that sizes them, and the hourly peaks the horizon forecasts from). Pure: it folds the
readings the shell took into copies of the memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from wattsched_operator import (
    demand,
    statuses,
)
from wattsched_operator.readings import (
    Calibrator,
    PodKey,
    TelemetrySnapshot,
    calibration_samples,
)
from wattsched_operator.rounds import (
    Body,
    ClusterView,
    Memory,
    Readings,
    Settings,
    pod_id,
    pod_started,
    pod_workload_key,
    running,
)
from wattsched_optimizer.problem import (
    Placement,
    PlanInput,
    WorkloadType,
)


def calibrate(
    calibrator: Calibrator,
    *,
    memory: Memory,
    plan_input: PlanInput,
    view: ClusterView,
    readings: Readings | None,
    monotonic: float,
    settings: Settings,
) -> int | None:
    """Fold a fresh reading of the running replicas into the model's corrections (at most
    once per accounting interval, so one reading is not counted many times). Returns how many
    samples it learned from, None when it was not time to. Call it before the round plans:
    `calibrator` must hold the corrections `memory.applied_placements` were planned with."""
    telemetry = readings.snapshot if readings is not None else None
    if readings is None or telemetry is None or telemetry.stale:
        return None
    if (
        memory.calibrated_at is not None
        and monotonic - memory.calibrated_at < settings.accounting_seconds
    ):
        return None
    nodes = {(p.workload, p.replica): p.node for p in memory.applied_placements}
    # A reading says what a replica draws only if the replica ran for the whole rate window,
    # and the exporter had a window to see its load: a younger pod's reading includes idle.
    # The same holds for a replica whose limit (or node, variant, clock) changed since.
    window = timedelta(seconds=readings.rate_window_seconds)
    settled_by = telemetry.time - 2 * window
    pods: dict[tuple[str, int], PodKey] = {}
    for pod in view.pods.values():
        if not running(pod) or statuses.replica_index(pod) < 0:
            continue
        started = pod_started(pod)
        if started is None or started > settled_by:
            continue
        replica = (pod_workload_key(pod), statuses.replica_index(pod))
        since = memory.applied_since.get(replica)
        if since is None or since > settled_by:
            continue
        if nodes.get(replica) == pod["spec"]["nodeName"]:  # where the placement says
            pods[replica] = pod_id(pod)
    samples = calibration_samples(
        memory.applied_placements,
        pods=pods,
        products={node.name: node.product for node in plan_input.nodes},
        types={workload.key: workload.type for workload in plan_input.workloads},
        snapshot=telemetry,
        model=calibrator.model(),
    )
    calibrator.observe(samples)
    return len(samples)


def applied_since(
    memory: Memory, placements: Iterable[Placement], now: datetime
) -> dict[tuple[str, int], datetime]:
    """Each placed replica's `applied_since`: kept while its node, variant, limit and clock are
    those of the previous plan, else `now`."""
    before = {(p.workload, p.replica): p for p in memory.applied_placements}
    since: dict[tuple[str, int], datetime] = {}
    for placement in placements:
        key = (placement.workload, placement.replica)
        old = before.get(key)
        same = old is not None and (
            old.node,
            old.variant,
            old.power_limit_watts,
            old.sm_clock_mhz,
        ) == (
            placement.node,
            placement.variant,
            placement.power_limit_watts,
            placement.sm_clock_mhz,
        )
        since[key] = memory.applied_since.get(key, now) if same else now
    return since


def record_demand(
    history: demand.DemandHistory,
    measured: Mapping[str, tuple[float, float]],
    monotonic: float,
) -> None:
    """Add each service's `measured` tokens/s (`measured_services`) to its demand history, with
    the tokens waiting in its queues."""
    for key, (tokens_per_second, backlog_tokens) in measured.items():
        history.record(key, monotonic, tokens_per_second, backlog_tokens=backlog_tokens)


def record_hourly(
    hourly: demand.HourlyDemand,
    measured: Mapping[str, tuple[float, float]],
    now: datetime,
) -> None:
    """Add each service's `measured` tokens/s (`measured_services`) to its peak of the
    wall-clock hour (the horizon's forecast for the same hour of later days), where nothing waits
    in its queues: only then is what it served what it needed. With a queue, the served tokens/s
    are a lower bound while it grows and a catch-up while it drains (after a restart or a move,
    several times the service's demand for a minute), and one catch-up would stand as the
    busiest hour for the whole horizon and as that hour's forecast for days."""
    for key, (tokens_per_second, backlog_tokens) in measured.items():
        if backlog_tokens <= 0:
            hourly.record(key, now.timestamp(), tokens_per_second)


def measured_services(
    plan_input: PlanInput,
    pods_by_workload: Mapping[str, list[Body]],
    telemetry: TelemetrySnapshot | None,
) -> dict[str, tuple[float, float]]:
    """Each service's measured tokens/s and the tokens waiting in its queues: the sums over its
    running pods that a fresh reading measured. A pod's tokens/s is its short-window peak where
    measured (else the rate window's mean); a pod with no reading yet (its server starting, not
    yet scraped) serves nothing that counts, and a pod without a queue figure counts as an empty
    queue. A service none of whose pods has a reading gets none: its earlier readings stand (a
    rolling move, one replica starting after another, must not empty the window and fall back to
    the declared demand)."""
    measured: dict[str, tuple[float, float]] = {}
    if telemetry is None or telemetry.stale:
        return measured
    for workload in plan_input.workloads:
        if workload.type is not WorkloadType.INFERENCE:
            continue
        pods = [pod_id(p) for p in pods_by_workload.get(workload.key, []) if running(p)]
        values = [
            value
            for pod in pods
            if (
                value := telemetry.pod_peak_tokens_per_second.get(
                    pod, telemetry.pod_tokens_per_second.get(pod)
                )
            )
            is not None
        ]
        if values:
            measured[workload.key] = (
                sum(values),
                sum(telemetry.pod_queued_tokens.get(pod, 0.0) for pod in pods),
            )
    return measured
