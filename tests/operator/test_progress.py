"""Job progress (`wattsched_operator.progress`): work done advances with the placed rate over the
time the gang ran, or comes from a measured counter; the optimizer is given total less done, so a
running job nearly done keeps its place when its whole work would no longer fit its deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from wattsched_operator import progress
from wattsched_operator.snapshot import build_snapshot, split_objects
from wattsched_optimizer.planner import plan
from wattsched_optimizer.problem import WorkAmount, WorkUnit

NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
# One 8-GPU H100 node runs the 8-GPU gang at most at ~53,554 tokens/s (catalogue model, 700 W):
# 1.93e9 tokens in 10 hours. 3e9 tokens do not fit; the 10% left of them (3e8) fit even at 200 W.
TOTAL_TOKENS = 3e9
DEADLINE = "2026-11-25T12:00:00Z"


def training_objects(completed_tokens: float | None) -> list[dict[str, Any]]:
    """A running 8-GPU Training job with a 10-hour deadline, its pod, and its node."""
    job: dict[str, Any] = {
        "apiVersion": "wattsched.io/v1alpha1",
        "kind": "LLMWorkload",
        "metadata": {"name": "pretrain", "namespace": "team-a"},
        "spec": {
            "type": "Training",
            "model": {"name": "m", "parametersBillions": 8},
            "gpu": {"count": 8},
            "slo": {"totalWork": {"tokens": TOTAL_TOKENS}, "deadline": DEADLINE},
            "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
        "status": {"phase": "Running"},
    }
    if completed_tokens is not None:
        job["status"]["progress"] = {
            "completedTokens": completed_tokens,
            "totalTokens": TOTAL_TOKENS,
            "fraction": completed_tokens / TOTAL_TOKENS,
            "source": "modelled",
            "updatedAt": "2026-11-25T01:59:00Z",
        }
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "h100-0",
            "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "pretrain-0",
            "namespace": "team-a",
            "labels": {"wattsched.io/workload": "pretrain", "wattsched.io/replica": "0"},
            "annotations": {
                "wattsched.io/variant": "bf16",
                "wattsched.io/power-limit-watts": "700",
            },
        },
        "spec": {"nodeName": "h100-0", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running"},
    }
    return [node, job, pod]


def test_a_running_job_90_percent_done_stays_placed_when_only_the_rest_fits() -> None:
    nearly_done = build_snapshot(split_objects(training_objects(0.9 * TOTAL_TOKENS)), now=NOW)
    result = plan(nearly_done.plan_input)
    assert [(p.workload, p.node) for p in result.placements] == [("team-a/pretrain", "h100-0")]
    # Only the rest has to fit: the plan may run it below the maximum limit.
    assert result.placements[0].power_limit_watts < 700


def test_the_same_job_with_no_progress_recorded_is_stopped_for_its_deadline() -> None:
    fresh = build_snapshot(split_objects(training_objects(None)), now=NOW)
    result = plan(fresh.plan_input)
    assert result.placements == ()
    assert [(u.workload, u.constraint) for u in result.unplaced] == [
        ("team-a/pretrain", "deadline")
    ]


def test_total_tokens_reduce_every_unit_to_tokens() -> None:
    assert progress.total_tokens(WorkAmount(WorkUnit.TOKENS, 5e6), 1e9) == 5e6
    assert progress.total_tokens(WorkAmount(WorkUnit.STEPS, 10, tokens_per_step=4096), 1e9) == (
        40960
    )
    assert progress.total_tokens(WorkAmount(WorkUnit.GPU_HOURS, 2), 1e9) == 2e9


def test_modelled_progress_adds_the_rate_times_the_seconds_the_gang_ran() -> None:
    before = progress.Progress(
        completed_tokens=1000.0, source="measured", updated_at=NOW, running_seconds=50
    )
    later = NOW + timedelta(minutes=1)
    after = progress.advance(
        before, now=later, running_seconds=60, rate_tokens_per_second=10, total=10_000
    )
    assert (after.completed_tokens, after.source, after.running_seconds) == (
        1600.0,
        "modelled",
        110,
    )
    assert after.fraction == pytest.approx(0.16)
    # 8,400 tokens left at 10 tokens/s: 840 s after this update.
    assert after.estimated_completion == later + timedelta(seconds=840)


def test_a_measured_counter_replaces_the_model_and_nothing_exceeds_the_total() -> None:
    measured = progress.advance(
        None, now=NOW, running_seconds=60, rate_tokens_per_second=10, total=100, measured_tokens=70
    )
    assert (measured.completed_tokens, measured.source) == (70, "measured")
    capped = progress.advance(
        measured, now=NOW, running_seconds=600, rate_tokens_per_second=10, total=100
    )
    assert (capped.completed_tokens, capped.fraction, capped.remaining_tokens) == (100, 1.0, 0.0)


def test_a_job_without_total_work_has_no_fraction_or_completion_time() -> None:
    open_ended = progress.advance(
        None, now=NOW, running_seconds=30, rate_tokens_per_second=10, total=None
    )
    status = open_ended.to_status()
    assert status["completedTokens"] == 300.0
    assert status["runningSeconds"] == 30.0
    assert status["fraction"] is None
    assert status["estimatedCompletionTime"] is None


def test_the_status_reads_back_as_it_was_written() -> None:
    written = progress.advance(
        None, now=NOW, running_seconds=30, rate_tokens_per_second=10, total=1000
    )
    read = progress.read_status(written.to_status())
    assert read == written
    assert progress.read_status(None) is None
    assert progress.read_status({"completedTokens": 5, "updatedAt": "yesterday"}) is None
