"""The operator's metrics: per-budget gauges follow the budgets that exist (no stale series)."""

from __future__ import annotations

from wattsched_operator.metrics import OperatorMetrics
from wattsched_operator.rounds import BudgetMetric

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
    metrics.set_budgets({"rack-a": BudgetMetric(20000, 18500, 12000)})
    assert budget_series(metrics) == {
        ("wattsched_budget_cap_watts", "rack-a"): 20000,
        ("wattsched_budget_allocated_cap_watts", "rack-a"): 18500,
        ("wattsched_budget_expected_watts", "rack-a"): 12000,
    }


def test_a_budget_no_longer_there_loses_its_series_and_the_others_keep_theirs() -> None:
    metrics = OperatorMetrics()
    metrics.set_budgets(
        {"rack-a": BudgetMetric(20000, 18500, 12000), "cluster": BudgetMetric(60000, 27000, 0)}
    )
    metrics.set_budgets({"cluster": BudgetMetric(60000, 30000, 21000)})
    assert budget_series(metrics) == {
        ("wattsched_budget_cap_watts", "cluster"): 60000,
        ("wattsched_budget_allocated_cap_watts", "cluster"): 30000,
        ("wattsched_budget_expected_watts", "cluster"): 21000,
    }
    metrics.set_budgets({})
    assert budget_series(metrics) == {}
    # A budget created again with the same name gets its series back.
    metrics.set_budgets({"rack-a": BudgetMetric(7000, 6400, 5000)})
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
    assert values == {"plan": 0, "apply": 1, "limits": 0, "account": 0}


def samples(metrics: OperatorMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Label set -> value of every sample called `name`."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_build_info_names_the_installed_version() -> None:
    (labels,) = samples(OperatorMetrics(), "wattsched_build_info")
    assert labels[0][0] == "version"
    assert labels[0][1]


def test_ratios_end_in_ratio() -> None:
    metrics = OperatorMetrics()
    metrics.gap.set(0.01)
    names = {family.name for family in metrics.registry.collect()}
    assert {"wattsched_plan_gap_ratio", "wattsched_model_correction_ratio"} <= names
    assert "wattsched_plan_gap" not in names


def test_energy_and_carbon_counters_add_each_increment_per_budget_and_workload() -> None:
    metrics = OperatorMetrics()
    metrics.count_budget_energy("rack-a", 3.6e6, 400.0, "modelled")
    metrics.count_budget_energy("rack-a", 1.8e6, 200.0, "modelled")
    metrics.count_workload_energy("team-a/chat", 1000.0, 0.1, "measured")
    assert samples(metrics, "wattsched_budget_energy_joules_total") == {
        (("budget", "rack-a"), ("source", "modelled")): 5.4e6
    }
    assert samples(metrics, "wattsched_budget_carbon_grams_total") == {
        (("budget", "rack-a"),): 600.0
    }
    assert samples(metrics, "wattsched_workload_energy_joules_total") == {
        (("namespace", "team-a"), ("source", "measured"), ("workload", "chat")): 1000.0
    }
    assert samples(metrics, "wattsched_workload_carbon_grams_total") == {
        (("namespace", "team-a"), ("workload", "chat")): 0.1
    }


def test_allowance_used_and_measured_watts_exist_only_where_known() -> None:
    metrics = OperatorMetrics()
    metrics.set_budgets(
        {
            "rack-a": BudgetMetric(
                20000,
                18500,
                12000,
                measured_watts=11000,
                energy_used_kwh=90,
                energy_allowance_kwh=100,
            ),
            "cluster": BudgetMetric(60000, 27000, 0),
        }
    )
    assert samples(metrics, "wattsched_budget_energy_allowance_used_ratio") == {
        (("budget", "rack-a"),): 0.9
    }
    assert samples(metrics, "wattsched_budget_measured_watts") == {(("budget", "rack-a"),): 11000}
    metrics.set_budgets({"rack-a": BudgetMetric(20000, 18500, 12000)})
    assert samples(metrics, "wattsched_budget_energy_allowance_used_ratio") == {}
    assert samples(metrics, "wattsched_budget_measured_watts") == {}


def test_the_slo_gauge_follows_the_workloads_with_an_objective() -> None:
    metrics = OperatorMetrics()
    metrics.set_slo({"team-a/chat": True, "team-b/job": False})
    assert samples(metrics, "wattsched_workload_slo_met") == {
        (("namespace", "team-a"), ("workload", "chat")): 1.0,
        (("namespace", "team-b"), ("workload", "job")): 0.0,
    }
    metrics.set_slo({"team-b/job": True})
    assert samples(metrics, "wattsched_workload_slo_met") == {
        (("namespace", "team-b"), ("workload", "job")): 1.0
    }


def test_a_deleted_workloads_energy_series_go_and_the_others_stay() -> None:
    metrics = OperatorMetrics()
    metrics.count_workload_energy("team-a/chat", 10.0, 1.0, "measured")
    metrics.count_workload_energy("team-a/chat", 5.0, 0.5, "modelled")
    metrics.count_workload_energy("team-b/job", 7.0, 0.0, "modelled")
    metrics.keep_workloads({"team-b/job"})
    assert samples(metrics, "wattsched_workload_energy_joules_total") == {
        (("namespace", "team-b"), ("source", "modelled"), ("workload", "job")): 7.0
    }
    assert list(samples(metrics, "wattsched_workload_carbon_grams_total")) == [
        (("namespace", "team-b"), ("workload", "job"))
    ]
