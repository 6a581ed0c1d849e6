"""The operator's metrics: per-budget gauges follow the budgets that exist (no stale series)."""

from __future__ import annotations

from wattsched_operator.metrics import BudgetFigures, OperatorMetrics

GAUGES = (
    "wattsched_budget_cap_watts",
    "wattsched_budget_allocated_cap_watts",
    "wattsched_budget_expected_watts",
)


def budget_series(metrics: OperatorMetrics) -> dict[tuple[str, str], float]:
    """(metric, budget) -> value of every per-budget series in the registry."""
    return {
        (sample.name, sample.labels["budget"]): sample.value
        for family in metrics.registry.collect()
        if family.name in GAUGES
        for sample in family.samples
    }


def test_budget_gauges_show_each_budgets_figures() -> None:
    metrics = OperatorMetrics()
    metrics.set_budgets({"rack-a": BudgetFigures(20000, 18500, 12000)})
    assert budget_series(metrics) == {
        ("wattsched_budget_cap_watts", "rack-a"): 20000,
        ("wattsched_budget_allocated_cap_watts", "rack-a"): 18500,
        ("wattsched_budget_expected_watts", "rack-a"): 12000,
    }


def test_a_budget_no_longer_there_loses_its_series_and_the_others_keep_theirs() -> None:
    metrics = OperatorMetrics()
    metrics.set_budgets(
        {"rack-a": BudgetFigures(20000, 18500, 12000), "cluster": BudgetFigures(60000, 27000, 0)}
    )
    metrics.set_budgets({"cluster": BudgetFigures(60000, 30000, 21000)})
    assert budget_series(metrics) == {
        ("wattsched_budget_cap_watts", "cluster"): 60000,
        ("wattsched_budget_allocated_cap_watts", "cluster"): 30000,
        ("wattsched_budget_expected_watts", "cluster"): 21000,
    }
    metrics.set_budgets({})
    assert budget_series(metrics) == {}
    # A budget created again with the same name gets its series back.
    metrics.set_budgets({"rack-a": BudgetFigures(7000, 6400, 5000)})
    assert budget_series(metrics)[("wattsched_budget_cap_watts", "rack-a")] == 7000


def test_reconcile_errors_has_a_zero_series_per_step_before_any_error() -> None:
    metrics = OperatorMetrics()
    metrics.reconcile_errors.labels(step="apply").inc()
    values = {
        sample.labels["step"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "wattsched_reconcile_errors"
        for sample in family.samples
        if sample.name == "wattsched_reconcile_errors_total"
    }
    assert values == {"plan": 0, "apply": 1, "limits": 0}
