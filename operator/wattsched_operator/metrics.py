"""The operator's Prometheus metrics (prometheus_client) and the HTTP server that exposes them.

One registry per operator process so tests can build several. Figures here are about the
operator's own work (plans, solve time, gap, phases, per-budget allocation, preemptions, errors);
measured GPU power comes from DCGM/Kepler through telemetry, not from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from wattsched_optimizer.model import Calibration

# The steps the planning loop counts errors of: the round as a whole, an API write while applying
# the plan, a NodePowerProfile write.
RECONCILE_STEPS = ("plan", "apply", "limits")


@dataclass(frozen=True)
class BudgetFigures:
    """One EnergyBudget's figures after a plan, as its gauges show them."""

    cap_watts: float
    allocated_cap_watts: float
    expected_watts: float


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
        self.gap = Gauge("wattsched_plan_gap", "Relative MIP gap of the last plan.", registry=r)
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
        self.preemptions = Counter(
            "wattsched_preemptions", "Replicas preempted to make room.", registry=r
        )
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
            "wattsched_model_correction",
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
        # Budgets that have label sets in the per-budget gauges (removed when a budget goes).
        self._budgets: set[str] = set()

    def set_budgets(self, figures: Mapping[str, BudgetFigures]) -> None:
        """Per-budget gauges for the budgets in `figures` (every budget there is); the label sets
        of budgets no longer there are removed, so a deleted budget leaves no stale series."""
        gauges = (self.cap_watts, self.allocated_cap_watts, self.expected_watts)
        for name in sorted(self._budgets - set(figures)):
            for gauge in gauges:
                gauge.remove(name)
        for name, budget in figures.items():
            self.cap_watts.labels(budget=name).set(budget.cap_watts)
            self.allocated_cap_watts.labels(budget=name).set(budget.allocated_cap_watts)
            self.expected_watts.labels(budget=name).set(budget.expected_watts)
        self._budgets = set(figures)

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
