"""The chart's Grafana dashboard and PrometheusRule, rendered, without a cluster.

- The dashboard survives a round trip through Grafana's dashboard schema (the models the Grafana
  Foundation SDK generates from Grafana's published schemas, pinned in pyproject.toml): a key the
  schema does not know, at any depth, panel options and queries included, is lost and fails the
  test. Every query parses as PromQL (promtool, Grafana's variables replaced by sample values).
- The panels cover every budget's power, cap, energy, allowance and carbon, energy per namespace
  and per workload, moves, preemptions, unconfirmed nodes and failed rounds; the tokens panel runs
  the configured tokens query; DCGM series are read from one chosen scrape job.
- The PrometheusRule is off by default; its rules pass `promtool check rules` and, on made-up
  series, `promtool test rules` (each alert fires when it should, and not otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.chart.conftest import CHART_DIR, Chart, find
from wattsched_operator.telemetry import DEFAULT_TOKEN_QUERY

PROMTOOL = "promtool"  # Debian's prometheus package ships it (`make prometheus`)
ALERTS_ON = ("prometheusRule.enabled=true",)


def dashboard(chart: Chart, values_files: tuple[Path, ...] = ()) -> dict[str, Any]:
    config_map = find(chart.render(values_files=values_files), "ConfigMap", "-dashboard")
    document: dict[str, Any] = json.loads(config_map["data"]["wattsched.json"])
    return document


def expressions(document: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title -> its queries."""
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in document["panels"]
        if panel["type"] != "row"
    }


def _lost(original: Any, round_tripped: Any, path: str = "") -> list[str]:
    """Paths of `original` that are missing or different in `round_tripped`."""
    if isinstance(original, dict):
        if not isinstance(round_tripped, dict):
            return [path or "."]
        return [
            found
            for key, value in original.items()
            for found in (
                _lost(value, round_tripped[key], f"{path}.{key}")
                if key in round_tripped
                else [f"{path}.{key}"]
            )
        ]
    if isinstance(original, list):
        if not isinstance(round_tripped, list) or len(original) != len(round_tripped):
            return [path]
        return [
            found
            for index, (a, b) in enumerate(zip(original, round_tripped, strict=True))
            for found in _lost(a, b, f"{path}[{index}]")
        ]
    return [] if original == round_tripped else [f"{path}: {original!r} != {round_tripped!r}"]


def _plain(value: Any) -> Any:
    """The SDK's to_json() output (models nested in dicts) as plain JSON."""
    return json.loads(json.dumps(value, default=lambda model: model.to_json()))


def test_the_dashboard_has_only_what_grafanas_dashboard_schema_defines(chart: Chart) -> None:
    plugins.register_default_plugins()
    document = dashboard(chart)
    round_tripped = _plain(Dashboard.from_json(document).to_json())
    assert _lost(document, round_tripped) == []
    # The check is not vacuous: a misspelt key in a panel's options is lost.
    broken = json.loads(json.dumps(document))
    broken["panels"][1]["options"]["legend"]["placment"] = "bottom"
    assert _lost(broken, _plain(Dashboard.from_json(broken).to_json())) == [
        ".panels[1].options.legend.placment"
    ]


def test_panels_do_not_overlap_and_ids_are_unique(chart: Chart) -> None:
    panels = dashboard(chart)["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def _as_promql(expression: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    for variable, value in (
        ("$__rate_interval", "5m"),
        ("$__range", "6h"),
        ("$budget", ".*"),
        ("$namespace", ".*"),
        ("$power_job", "agent"),
    ):
        expression = expression.replace(variable, value)
    return expression


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which(PROMTOOL), "promtool is missing: run `make prometheus`"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)


def test_every_dashboard_query_parses_as_promql(chart: Chart, tmp_path: Path) -> None:
    queries = [q for qs in expressions(dashboard(chart)).values() for q in qs]
    assert len(queries) >= 20
    leftovers = [q for q in map(_as_promql, queries) if "$" in q]
    assert leftovers == [], "a dashboard variable without a sample value"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": _as_promql(query)}
                    for index, query in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_cover_budgets_workloads_moves_nodes_and_rounds(chart: Chart) -> None:
    text = " ".join(q for qs in expressions(dashboard(chart)).values() for q in qs)
    for metric in (
        "wattsched_budget_cap_watts",
        "wattsched_budget_allocated_cap_watts",
        "wattsched_budget_measured_watts",
        "wattsched_budget_energy_joules_total",
        "wattsched_budget_energy_allowance_used_ratio",
        "wattsched_budget_carbon_grams_total",
        "wattsched_workload_energy_joules_total",
        "wattsched_workload_slo_met",
        "wattsched_moves_total",
        "wattsched_preemptions_total",
        "wattsched_unconfirmed_nodes",
        'wattsched_reconcile_errors_total{step="plan"}',
    ):
        assert metric in text
    assert "sum by (namespace) (increase(wattsched_workload_energy_joules_total" in text
    assert "sum by (namespace, workload, source) (increase(wattsched_workload_energy" in text


def test_budget_and_namespace_variables_filter_the_panels(chart: Chart) -> None:
    document = dashboard(chart)
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert {"datasource", "budget", "namespace", "power_job"} <= set(variables)
    assert variables["budget"]["query"]["query"] == (
        "label_values(wattsched_budget_cap_watts, budget)"
    )
    for title, queries in expressions(document).items():
        for query in queries:
            if "wattsched_budget_" in query:
                assert 'budget=~"$budget"' in query, title
            if "wattsched_workload_" in query:
                assert 'namespace=~"$namespace"' in query, title


def test_dcgm_series_come_from_one_chosen_job_so_no_gpu_counts_twice(chart: Chart) -> None:
    for title, queries in expressions(dashboard(chart)).items():
        for query in queries:
            for selector in re.findall(r"DCGM_FI_[A-Z_]+(\{[^}]*\})?", query):
                assert 'job=~"$power_job"' in selector, title
    power_job = next(v for v in dashboard(chart)["templating"]["list"] if v["name"] == "power_job")
    assert power_job["multi"] is False


def test_the_kepler_panel_reads_the_series_the_operator_reads(chart: Chart) -> None:
    from wattsched_operator import telemetry  # noqa: PLC0415

    queries = " ".join(q for qs in expressions(dashboard(chart)).values() for q in qs)
    kepler = set(re.findall(r"kepler_[a-z_]+", queries))
    assert kepler == {"kepler_node_gpu_watts"}
    assert "kepler_node_gpu_watts" in Path(telemetry.__file__).read_text()


def tokens_panel(document: dict[str, Any]) -> str:
    (query,) = expressions(document)["Tokens per joule (measured)"]
    return query


def test_the_tokens_panel_runs_the_configured_tokens_query(chart: Chart, tmp_path: Path) -> None:
    default = tokens_panel(dashboard(chart))
    assert DEFAULT_TOKEN_QUERY.replace("{window}", "5m") in default
    custom = 'sum by (namespace, pod) (rate(tgi_tokens_total{model="a\\"b"}[{window}]))'
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {"operator": {"prometheusUrl": "http://prometheus:9090", "tokensQuery": custom}}
        )
    )
    query = tokens_panel(dashboard(chart, (values,)))
    assert 'rate(tgi_tokens_total{model="a\\"b"}[5m])' in query
    assert "vllm" not in query


def test_the_templates_default_tokens_query_is_the_operators(chart: Chart) -> None:
    template = (CHART_DIR / "templates" / "dashboard-configmap.yaml").read_text()
    assert json.dumps(DEFAULT_TOKEN_QUERY) in template


def test_the_agent_service_monitor_honours_the_agents_labels(chart: Chart) -> None:
    manifests = chart.render(set_values=("agent.serviceMonitor.enabled=true",))
    monitor = find(manifests, "ServiceMonitor", "-agent")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_the_prometheus_rule_is_off_by_default(chart: Chart) -> None:
    assert not [m for m in chart.render() if m["kind"] == "PrometheusRule"]


def rules_file(chart: Chart, tmp_path: Path) -> Path:
    rule = find(chart.render(set_values=ALERTS_ON), "PrometheusRule", "-alerts")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_the_alert_rules_pass_promtool_check(chart: Chart, tmp_path: Path) -> None:
    result = _promtool("check", "rules", str(rules_file(chart, tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


ALERT_TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: wattsched_unconfirmed_nodes
        values: 0 0 2x10
      - series: 'wattsched_reconcile_errors_total{step="plan"}'
        values: 0x5 1 2 3 4 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5
      - series: 'wattsched_budget_energy_allowance_used_ratio{budget="rack-a"}'
        values: 0.5 0.85 0.95x10
      - series: 'wattsched_budget_energy_allowance_used_ratio{budget="cluster"}'
        values: 0.1x12
      - series: 'wattsched_workload_slo_met{namespace="team-a",workload="chat"}'
        values: 1 1 0x20
      - series: 'wattsched_workload_slo_met{namespace="team-b",workload="job"}'
        values: 1x22
    alert_rule_test:
      - eval_time: 3m
        alertname: WattschedUnconfirmedNodes
      - eval_time: 8m
        alertname: WattschedUnconfirmedNodes
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: 2 GPU node(s) have not confirmed their power limits
              description: DESCRIPTION[WattschedUnconfirmedNodes]
      - eval_time: 5m
        alertname: WattschedPlanningRoundsFailing
      - eval_time: 9m
        alertname: WattschedPlanningRoundsFailing
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: 4 wattsched planning rounds failed in 10 minutes
              description: DESCRIPTION[WattschedPlanningRoundsFailing]
      - eval_time: 30m
        alertname: WattschedPlanningRoundsFailing
      - eval_time: 1m
        alertname: WattschedEnergyAllowanceNearlyUsed
      - eval_time: 3m
        alertname: WattschedEnergyAllowanceNearlyUsed
        exp_alerts:
          - exp_labels: {severity: warning, budget: rack-a}
            exp_annotations:
              summary: EnergyBudget rack-a has used 95% of its energy allowance
              description: DESCRIPTION[WattschedEnergyAllowanceNearlyUsed]
      - eval_time: 8m
        alertname: WattschedSLOAtRisk
      - eval_time: 13m
        alertname: WattschedSLOAtRisk
        exp_alerts:
          - exp_labels: {severity: warning, namespace: team-a, workload: chat}
            exp_annotations:
              summary: "LLMWorkload team-a/chat: objective at risk"
              description: DESCRIPTION[WattschedSLOAtRisk]
"""


def test_each_alert_fires_when_it_should_and_not_before(chart: Chart, tmp_path: Path) -> None:
    rules = yaml.safe_load(rules_file(chart, tmp_path).read_text())["groups"][0]["rules"]
    text = ALERT_TESTS
    for rule in rules:  # descriptions are prose: taken from the rule, not repeated here
        text = text.replace(
            f"DESCRIPTION[{rule['alert']}]", json.dumps(rule["annotations"]["description"])
        )
    assert "DESCRIPTION[" not in text
    tests = tmp_path / "tests.yaml"
    tests.write_text(text)
    result = _promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("assignment", "field"),
    [
        ("prometheusRule.allowanceUsedRatio=1.5", "allowanceUsedRatio"),
        ("prometheusRule.sloAtRiskFor=soon", "sloAtRiskFor"),
        ("prometheusRule.failedRoundsPer10m=0", "failedRoundsPer10m"),
    ],
)
def test_bad_alert_values_are_refused_by_the_schema(
    chart: Chart, assignment: str, field: str
) -> None:
    result = chart.helm(*chart.template_args(set_values=(assignment,)), check=False)
    assert result.returncode != 0
    assert field in result.stderr
