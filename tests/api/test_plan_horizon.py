"""`wattsched plan` over a horizon: a budget near its energy allowance defers flexible work and
says so; with an hourly carbon profile a job due in 30 hours is planned into the clean hours."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from wattsched_cli.plan import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO_ROOT / "offline" / "snapshot.yaml"
NOW = "2026-11-25T02:00:00Z"
# 420 g/kWh except from 10:00 to 15:00 UTC (solar), 140 g/kWh.
SOLAR = [140.0 if 10 <= hour < 15 else 420.0 for hour in range(24)]


def items() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(SNAPSHOT.read_text())["items"]
    return loaded


def cluster_budget(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        o for o in objects if o["kind"] == "EnergyBudget" and o["metadata"]["name"] == "cluster"
    )


def plan_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, objects: list[dict[str, Any]], *extra: str
) -> dict[str, Any]:
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert main(["-f", str(path), "-o", "json", "--now", NOW, *extra]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def due_in_30_hours(objects: list[dict[str, Any]]) -> dict[str, Any]:
    lora = next(
        o for o in objects if o["kind"] == "LLMWorkload" and o["metadata"]["name"] == "lora"
    )
    job = copy.deepcopy(lora)
    job["metadata"].update(name="nightly", uid="uid-nightly")
    job["spec"]["slo"] = {"totalWork": {"gpuHours": 8}, "deadline": "2026-11-26T08:00:00Z"}
    return job


def test_a_budget_near_its_allowance_defers_flexible_work_and_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    budget = cluster_budget(objects)
    budget["spec"]["energy"] = {"kilowattHours": 400, "period": "Day"}
    budget["status"] = {"energyUsedKilowattHours": 399.9, "periodStart": "2026-11-25T00:00:00Z"}
    plan = plan_json(capsys, tmp_path, objects)
    deferred = {d["workload"]: d for d in plan["deferred"]}
    # Work without a deadline waits for the next day's allowance (it renews at 00:00 UTC).
    for key in ("team-a/lora", "team-b/summaries"):
        assert deferred[key]["cause"] == "Allowance"
        assert deferred[key]["until"] == "2026-11-26T00:00:00Z"
        assert deferred[key]["message"] == (
            "Deferred until 00:00 UTC: EnergyBudget cluster has no allowance left for it this "
            "day (399.9 of 400 kWh used)"
        )
    placed = {p["workload"] for p in plan["placements"]}
    assert not placed & set(deferred)
    assert "team-a/chat" in placed  # inference keeps serving (at its minimum-energy setting)
    (allowance,) = plan["allowances"]
    assert allowance["budget"] == "cluster"
    assert allowance["allowanceExhausted"] is True
    assert allowance["reason"] == "EnergyAllowance"
    assert allowance["remainingKilowattHours"] == pytest.approx(0.1)
    assert allowance["projectedKilowattHoursAtPeriodEnd"] > 400


def test_the_same_snapshot_with_room_in_the_allowance_defers_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    budget = cluster_budget(objects)
    budget["spec"]["energy"] = {"kilowattHours": 100000, "period": "Day"}
    budget["status"] = {"energyUsedKilowattHours": 1.0, "periodStart": "2026-11-25T00:00:00Z"}
    plan = plan_json(capsys, tmp_path, objects)
    assert plan["deferred"] == []
    (allowance,) = plan["allowances"]
    assert allowance["allowanceExhausted"] is False
    assert allowance["reason"] == "WithinAllowance"


def test_a_job_due_in_30_hours_is_planned_into_the_clean_hours(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    cluster_budget(objects)["spec"]["carbon"] = {
        "intensityGramsPerKilowattHour": 420,
        "hourlyIntensityGramsPerKilowattHour": SOLAR,
    }
    objects.append(due_in_30_hours(objects))
    plan = plan_json(capsys, tmp_path, objects)
    deferred = {d["workload"]: d for d in plan["deferred"]}
    nightly = deferred["team-a/nightly"]
    assert nightly["message"] == "Deferred until 10:00 UTC: 140 g/kWh then vs 420 now"
    assert nightly["plannedSlots"]
    assert all(10 <= int(slot[11:13]) < 15 for slot in nightly["plannedSlots"])
    assert "team-a/nightly" not in {p["workload"] for p in plan["placements"]}
    # The one-instant planner alone (--horizon-hours 0) starts it now.
    now = plan_json(capsys, tmp_path, objects, "--horizon-hours", "0")
    assert now["deferred"] == []
    assert "team-a/nightly" in {p["workload"] for p in now["placements"]}


def test_the_table_says_what_waits_and_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    objects = items()
    cluster_budget(objects)["spec"]["carbon"] = {
        "intensityGramsPerKilowattHour": 420,
        "hourlyIntensityGramsPerKilowattHour": SOLAR,
    }
    objects.append(due_in_30_hours(objects))
    path = tmp_path / "snapshot.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    assert main(["-f", str(path), "--now", NOW]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^team-a/nightly +Deferred until 10:00 UTC: 140 g/kWh then vs 420 now$", out, re.M
    )


def test_a_bad_horizon_is_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["-f", str(SNAPSHOT), "--now", NOW, "--horizon-hours", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "wattsched plan: --horizon-hours: must be from 0 to 168 (a week), got -1\n"
