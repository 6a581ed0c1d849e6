"""The operator's Prometheus metrics (prometheus_client) and the HTTP server that exposes them.

One registry per operator process so tests can build several. Figures here are about the
operator's own work (plans, solve time, gap, phases, per-budget allocation, moves, preemptions,
errors) and what it accounts: energy and carbon counters per budget and per workload that advance
with the same increments as the statuses (`wattsched_*_energy_joules_total`,
`wattsched_*_carbon_grams_total`, labelled with the increment's source, measured or modelled), the
allowance used per budget and whether each workload's SLO is met. Measured GPU power itself comes
from DCGM/Kepler through telemetry, not from here. Ratios end in `_ratio` (Prometheus naming).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from wattsched_operator.rounds import BudgetMetric
from wattsched_optimizer.model import Calibration
from wattsched_optimizer.problem import MoveReason

# The steps the planning loop counts errors of: the round as a whole, an API write while applying
# the plan, a NodePowerProfile write, an accounting round between plans.
RECONCILE_STEPS = ("plan", "apply", "limits", "account")


def version() -> str:
    """The installed wattsched distribution's version ("unknown" when not installed)."""
    try:
        return metadata.version("wattsched")
    except metadata.PackageNotFoundError:
        return "unknown"


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.plans = Counter(
            "wattsched_plans",
            "Plans solved and applied, by optimizer status.",
            ["status"],
            registry=r,
        )
        self.solve_seconds = Histogram(
            "wattsched_plan_solve_seconds",
            "Seconds the optimizer took per plan.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.build_info = Gauge(
            "wattsched_build_info",
            "Always 1; the labels say which wattsched version runs.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=version()).set(1)
        self.gap = Gauge(
            "wattsched_plan_gap_ratio", "Relative MIP gap of the last plan.", registry=r
        )
        self.workloads = Gauge(
            "wattsched_workloads",
            "LLMWorkloads by phase after the last plan.",
            ["phase"],
            registry=r,
        )
        self.allocated_cap_watts = Gauge(
            "wattsched_budget_allocated_cap_watts",
            "Sum of planned GPU power limits in a budget's scope (modelled from the plan), watts.",
            ["budget"],
            registry=r,
        )
        self.expected_watts = Gauge(
            "wattsched_budget_expected_watts",
            "Expected GPU draw in a budget's scope (modelled), watts.",
            ["budget"],
            registry=r,
        )
        self.cap_watts = Gauge(
            "wattsched_budget_cap_watts", "A budget's power cap, watts.", ["budget"], registry=r
        )
        self.measured_watts = Gauge(
            "wattsched_budget_measured_watts",
            "Measured GPU draw in a budget's scope (absent when not every node was measured), "
            "watts.",
            ["budget"],
            registry=r,
        )
        self.allowance_used = Gauge(
            "wattsched_budget_energy_allowance_used_ratio",
            "Energy used this period (GPU energy x PUE) over the budget's "
            "spec.energy.kilowattHours (absent without an allowance).",
            ["budget"],
            registry=r,
        )
        self.budget_energy = Counter(
            "wattsched_budget_energy_joules",
            "Energy accounted to a budget (GPU energy in its scope x PUE), joules, by source.",
            ["budget", "source"],
            registry=r,
        )
        self.budget_carbon = Counter(
            "wattsched_budget_carbon_grams",
            "CO2-equivalent accounted to a budget (its energy x carbon intensity), grams.",
            ["budget"],
            registry=r,
        )
        self.workload_energy = Counter(
            "wattsched_workload_energy_joules",
            "GPU energy accounted to an LLMWorkload's pods, joules, by source.",
            ["namespace", "workload", "source"],
            registry=r,
        )
        self.workload_carbon = Counter(
            "wattsched_workload_carbon_grams",
            "CO2-equivalent accounted to an LLMWorkload (energy x PUE x intensity), grams.",
            ["namespace", "workload"],
            registry=r,
        )
        self.slo_met = Gauge(
            "wattsched_workload_slo_met",
            "1 when an LLMWorkload's declared objective (tokens/s or deadline) is met, 0 when at "
            "risk; absent for workloads without one.",
            ["namespace", "workload"],
            registry=r,
        )
        self.preemptions = Counter(
            "wattsched_preemptions",
            "Replicas preempted (evicted with no place in the plan), by cause: BudgetCut, "
            "HigherPriority or Deferred (the horizon plan runs the workload later).",
            ["cause"],
            registry=r,
        )
        self.moves = Counter(
            "wattsched_moves",
            "Replicas moved to another node or variant (evicted and created again), by cause: "
            "NodeLost, BudgetCut, HigherPriority, SavesEnergy or SpecChanged.",
            ["cause"],
            registry=r,
        )
        for cause in MoveReason:  # a series per cause from the start, so rate() sees the first
            if cause is not MoveReason.DEFERRED:  # a preemption cause, never a move's
                self.moves.labels(cause=cause.value)
        for cause in (MoveReason.BUDGET, MoveReason.PRIORITY, MoveReason.DEFERRED):
            self.preemptions.labels(cause=cause.value)
        self.reconcile_errors = Counter(
            "wattsched_reconcile_errors",
            "Errors by step: plan (a round that could not plan at all), apply (an API write while "
            "applying a plan), limits (a NodePowerProfile write).",
            ["step"],
            registry=r,
        )
        for step in RECONCILE_STEPS:  # a series from the start, so rate() sees the first error
            self.reconcile_errors.labels(step=step)
        self.model_correction = Gauge(
            "wattsched_model_correction_ratio",
            "Calibration factor the optimizer's performance model is corrected by, from measured "
            "power and throughput (1 = as catalogued), per product, workload type and quantity.",
            ["product", "type", "quantity"],
            registry=r,
        )
        self.unconfirmed_nodes = Gauge(
            "wattsched_unconfirmed_nodes",
            "Nodes whose agent did not confirm lowered limits in time (counted at maximum power).",
            registry=r,
        )
        # Budgets that have label sets in the per-budget gauges (removed when a budget goes), and
        # workloads in the SLO gauge.
        self._budgets: set[str] = set()
        self._slo_workloads: set[tuple[str, str]] = set()
        # Label sets of the per-workload counters, so a deleted workload's series can go.
        self._workload_series: set[tuple[str, str, str]] = set()

    def set_budgets(self, figures: Mapping[str, BudgetMetric]) -> None:
        """Per-budget gauges for the budgets in `figures` (every budget there is); the label sets
        of budgets no longer there are removed, so a deleted budget leaves no stale series."""
        gauges = (self.cap_watts, self.allocated_cap_watts, self.expected_watts)
        for name in sorted(self._budgets - set(figures)):
            for gauge in gauges:
                gauge.remove(name)
            for optional in (self.measured_watts, self.allowance_used):
                _remove(optional, name)
        for name, budget in figures.items():
            self.cap_watts.labels(budget=name).set(budget.cap_watts)
            self.allocated_cap_watts.labels(budget=name).set(budget.allocated_cap_watts)
            self.expected_watts.labels(budget=name).set(budget.expected_watts)
            if budget.measured_watts is None:
                _remove(self.measured_watts, name)
            else:
                self.measured_watts.labels(budget=name).set(budget.measured_watts)
            if budget.energy_allowance_kwh and budget.energy_used_kwh is not None:
                self.allowance_used.labels(budget=name).set(
                    budget.energy_used_kwh / budget.energy_allowance_kwh
                )
            else:
                _remove(self.allowance_used, name)
        self._budgets = set(figures)

    def count_budget_energy(self, budget: str, joules: float, grams: float, source: str) -> None:
        """Advance a budget's energy (GPU energy x PUE) and carbon counters by one increment."""
        self.budget_energy.labels(budget=budget, source=source).inc(max(joules, 0.0))
        self.budget_carbon.labels(budget=budget).inc(max(grams, 0.0))

    def count_workload_energy(self, key: str, joules: float, grams: float, source: str) -> None:
        """Advance a workload's (`namespace/name`) GPU energy and carbon counters."""
        namespace, name = key.split("/", 1)
        self.workload_energy.labels(namespace=namespace, workload=name, source=source).inc(
            max(joules, 0.0)
        )
        self.workload_carbon.labels(namespace=namespace, workload=name).inc(max(grams, 0.0))
        self._workload_series.add((namespace, name, source))

    def keep_workloads(self, keys: set[str]) -> None:
        """Remove the energy and carbon series of workloads (`namespace/name`) not in `keys`
        (deleted ones), so the registry does not grow with every workload ever accounted."""
        gone = {s for s in self._workload_series if f"{s[0]}/{s[1]}" not in keys}
        for namespace, name, source in gone:
            self.workload_energy.remove(namespace, name, source)
        for namespace, name in sorted({(s[0], s[1]) for s in gone}):
            self.workload_carbon.remove(namespace, name)
        self._workload_series -= gone

    def set_slo(self, met: Mapping[str, bool]) -> None:
        """The SLO gauge for every workload (`namespace/name`) with a declared objective; series
        of workloads no longer listed are removed."""
        keys = {tuple(key.split("/", 1)) for key in met}
        for namespace, name in sorted(self._slo_workloads - keys):
            self.slo_met.remove(namespace, name)
        for key, value in met.items():
            namespace, name = key.split("/", 1)
            self.slo_met.labels(namespace=namespace, workload=name).set(1 if value else 0)
        self._slo_workloads = {(k[0], k[1]) for k in keys}

    def set_corrections(self, corrections: Mapping[tuple[str, str], Calibration]) -> None:
        for (product, workload_type), correction in corrections.items():
            labels = {"product": product, "type": workload_type}
            self.model_correction.labels(**labels, quantity="power").set(correction.power_factor)
            self.model_correction.labels(**labels, quantity="throughput").set(
                correction.throughput_factor
            )

    def set_phases(self, counts: Mapping[str, int]) -> None:
        for phase, count in counts.items():
            self.workloads.labels(phase=phase).set(count)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)


def _remove(gauge: Gauge, *labels: str) -> None:
    """Remove a label set from a gauge if it is there."""
    try:
        gauge.remove(*labels)
    except KeyError:
        return
