"""Budgets over time on the sandbox (issue 14): an EnergyBudget whose daily allowance has no room
for a fine-tuning job defers it (Schedulable=False, reason Deferred, one Deferred Event), says so
in its status (AllowanceExhausted, remaining and projected kWh, `kubectl get eb -o wide`) with a
Warning Event, and `wattsched explain` says why the job waits; raising the allowance places it.
A carbon forecast read from Prometheus (the budget's forecastPrometheusQuery) defers a job with a
deadline to the clean hours."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.operator.conftest import StartOperator, get_json, wait_until
from tests.operator.test_operator_cluster import apply, budget, events_of, pods_of, workload
from tests.telemetry.conftest import start_prometheus
from wattsched_cli import explain

if TYPE_CHECKING:
    from tests.conftest import Sandbox

pytestmark = pytest.mark.cluster

SCOPE = {"nvidia.com/gpu.product": "NVIDIA-L4"}
NAME = "tight-day"


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), {}
    )
    return found


def budget_events(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The Events on this test's budget (not on an earlier one of the same name: Events outlive
    the object)."""
    uid = get_json(sandbox, "energybudget", NAME)["metadata"]["uid"]
    items: list[dict[str, Any]] = get_json(
        sandbox,
        "events",
        "-A",
        "--field-selector",
        f"involvedObject.kind=EnergyBudget,involvedObject.name={NAME},involvedObject.uid={uid}",
    )["items"]
    return items


def test_an_exhausted_allowance_defers_a_job_with_a_condition_and_events(
    sandbox: Sandbox,
    namespace: str,
    start_operator: StartOperator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_operator("--replan-seconds", "2", "--horizon-hours", "24")
    tight = budget(NAME, 100000, SCOPE)
    tight["spec"]["energy"] = {"kilowattHours": 0.001, "period": "Day"}
    apply(sandbox, None, tight)
    apply(
        sandbox,
        namespace,
        workload("tune", type_="FineTuning", gpus=1, products=["NVIDIA-L4"]),
    )

    def deferred() -> dict[str, Any] | None:
        body = get_json(sandbox, "llmworkload", "tune", "-n", namespace)
        found = condition(body, "Schedulable")
        return found if found.get("reason") == "Deferred" else None

    schedulable = wait_until("the job deferred", deferred, timeout_seconds=120)
    assert schedulable["status"] == "False"
    assert schedulable["message"].startswith("Deferred until ")
    assert f"EnergyBudget {NAME} has no allowance left for it this day" in schedulable["message"]
    assert pods_of(sandbox, namespace, "tune") == []

    def exhausted() -> dict[str, Any] | None:
        body = get_json(sandbox, "energybudget", NAME)
        return body if condition(body, "AllowanceExhausted").get("status") == "True" else None

    body = wait_until("AllowanceExhausted=True", exhausted, timeout_seconds=60)
    assert condition(body, "AllowanceExhausted")["reason"] == "EnergyAllowance"
    assert body["status"]["remainingKilowattHours"] == pytest.approx(0.001)
    assert body["status"]["projectedKilowattHoursAtPeriodEnd"] > 0.001
    wide = sandbox.kubectl("get", "energybudget", NAME, "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    assert "LEFT(KWH)" in header
    assert "PROJECTED(KWH)" in header
    assert "0.001" in row.split()

    # One Deferred Event on the job and one AllowanceExhausted Event on the budget, not one a
    # round: wait for a few more rounds (re-plans every 2 s) and count again.
    wait_until(
        "the Deferred Event",
        lambda: any(e["reason"] == "Deferred" for e in events_of(sandbox, namespace, "tune")),
    )
    wait_until(
        "the AllowanceExhausted Event",
        lambda: any(e["reason"] == "AllowanceExhausted" for e in budget_events(sandbox)),
    )
    plans_before = get_json(sandbox, "energybudget", NAME)["status"]["lastPlan"]["time"]
    wait_until(
        "two more plans",
        lambda: (
            get_json(sandbox, "energybudget", NAME)["status"]["lastPlan"]["time"] > plans_before
        ),
        timeout_seconds=60,
    )
    job_events = [e for e in events_of(sandbox, namespace, "tune") if e["reason"] == "Deferred"]
    assert len(job_events) == 1
    assert job_events[0]["type"] == "Normal"
    assert job_events[0].get("count", 1) == 1
    assert job_events[0]["message"] == schedulable["message"]
    assert not [e for e in events_of(sandbox, namespace, "tune") if e["reason"] == "Unschedulable"]
    warnings = [e for e in budget_events(sandbox) if e["reason"] == "AllowanceExhausted"]
    assert len(warnings) == 1
    assert warnings[0]["type"] == "Warning"
    assert warnings[0].get("count", 1) == 1

    # `wattsched explain` says why the job waits.
    assert explain.main([f"{namespace}/tune", "--kubeconfig", str(sandbox.kubeconfig)]) == 0
    text = capsys.readouterr().out
    assert f"deferred by the horizon plan: {schedulable['message']}" in text
    assert f"{NAME}: cap " in text
    assert "0.001 kWh left this period" in text
    assert "allowance exhausted" in text

    # More allowance: the job is planned, the condition clears.
    tight["spec"]["energy"] = {"kilowattHours": 100000, "period": "Day"}
    apply(sandbox, None, tight)
    wait_until(
        "the job placed",
        lambda: (
            condition(get_json(sandbox, "llmworkload", "tune", "-n", namespace), "Schedulable").get(
                "status"
            )
            == "True"
        ),
        timeout_seconds=120,
    )
    cleared = condition(get_json(sandbox, "energybudget", NAME), "AllowanceExhausted")
    assert (cleared["status"], cleared["reason"]) == ("False", "WithinAllowance")


@pytest.mark.prometheus
def test_a_carbon_forecast_read_from_prometheus_defers_a_job_to_the_clean_hours(
    sandbox: Sandbox,
    namespace: str,
    start_operator: StartOperator,
    agents: Path,
    tmp_path: Path,
) -> None:
    wait_until("the agents' targets file", agents.exists)
    server = start_prometheus(tmp_path / "prometheus", agents)
    # The documented shape: one series per hour ahead, label hours_ahead; 140 g/kWh 3 to 8 hours
    # ahead, 420 otherwise.
    forecast = " or ".join(
        f'label_replace(vector({140 if 3 <= ahead < 9 else 420}), "hours_ahead", "{ahead}", "", "")'
        for ahead in range(30)
    )
    try:
        start_operator("--prometheus-url", server.url, "--replan-seconds", "2")
        clean = budget("forecast-clean", 100000, SCOPE)
        # The static intensity (300) is the fallback only: "420 now" comes from the forecast.
        clean["spec"]["carbon"] = {
            "intensityGramsPerKilowattHour": 300,
            "forecastPrometheusQuery": forecast,
        }
        apply(sandbox, None, clean)
        job = workload("nightly", type_="FineTuning", gpus=1, products=["NVIDIA-L4"])
        deadline = datetime.now(UTC) + timedelta(hours=30)
        job["spec"]["slo"] = {
            # A few hours' work: it fits in the clean hours.
            "totalWork": {"gpuHours": 0.5},
            "deadline": deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        apply(sandbox, namespace, job)

        def deferred() -> dict[str, Any] | None:
            body = get_json(sandbox, "llmworkload", "nightly", "-n", namespace)
            found = condition(body, "Schedulable")
            return found if found.get("reason") == "Deferred" else None

        schedulable = wait_until("the job deferred", deferred, timeout_seconds=120)
        assert re.fullmatch(
            r"Deferred until \d\d:00 UTC: 140 g/kWh then vs 420 now", schedulable["message"]
        )
        assert pods_of(sandbox, namespace, "nightly") == []
    finally:
        server.stop()
