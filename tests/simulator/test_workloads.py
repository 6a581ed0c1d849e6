"""The generated job mix: seeded, and with the properties `workloads`' module docstring promises."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.simulator.conftest import nominal_seconds
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.workloads import JobSpec, generate_jobs

HOUR = 3600.0
# 100 simulated hours at 12 jobs/h: ~960 jobs, enough for the documented shares to show.
LONG_RUN = 100 * HOUR


def many_jobs(deadline_share: float = 0.7) -> list[JobSpec]:
    return generate_jobs(
        seed=11, duration_seconds=LONG_RUN, jobs_per_hour=12.0, deadline_share=deadline_share
    )


def share(jobs: list[JobSpec], count: int) -> float:
    return count / len(jobs)


def test_the_same_seed_gives_the_same_jobs() -> None:
    first = generate_jobs(seed=3, duration_seconds=HOUR, jobs_per_hour=12.0)
    second = generate_jobs(seed=3, duration_seconds=HOUR, jobs_per_hour=12.0)
    assert first
    assert first == second


def test_a_different_seed_gives_different_jobs() -> None:
    first = generate_jobs(seed=3, duration_seconds=HOUR, jobs_per_hour=12.0)
    other = generate_jobs(seed=4, duration_seconds=HOUR, jobs_per_hour=12.0)
    assert [j.arrival_seconds for j in first] != [j.arrival_seconds for j in other]


def test_no_jobs_at_a_zero_rate() -> None:
    assert generate_jobs(seed=0, duration_seconds=HOUR, jobs_per_hour=0.0) == []


def test_jobs_arrive_in_order_over_the_first_80_percent_at_the_mean_rate() -> None:
    jobs = many_jobs()
    arrivals = [job.arrival_seconds for job in jobs]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] > 0
    assert arrivals[-1] < 0.8 * LONG_RUN
    expected = 12.0 * 0.8 * LONG_RUN / HOUR
    assert len(jobs) == pytest.approx(expected, rel=0.1)
    assert len({job.key for job in jobs}) == len(jobs)


def test_types_sizes_and_priorities_follow_the_documented_shares() -> None:
    jobs = many_jobs()
    types = Counter(job.type for job in jobs)
    assert set(types) == {
        WorkloadType.TRAINING,
        WorkloadType.FINE_TUNING,
        WorkloadType.BATCH_INFERENCE,
    }
    assert share(jobs, types[WorkloadType.TRAINING]) == pytest.approx(0.3, abs=0.05)
    assert share(jobs, types[WorkloadType.FINE_TUNING]) == pytest.approx(0.4, abs=0.05)
    assert share(jobs, types[WorkloadType.BATCH_INFERENCE]) == pytest.approx(0.3, abs=0.05)
    sizes = Counter(job.model_parameters_billions for job in jobs)
    assert set(sizes) == {8.0, 13.0, 70.0}
    assert share(jobs, sizes[8.0]) == pytest.approx(0.5, abs=0.05)
    assert share(jobs, sizes[13.0]) == pytest.approx(0.3, abs=0.05)
    assert share(jobs, sizes[70.0]) == pytest.approx(0.2, abs=0.05)
    priorities = Counter(job.priority for job in jobs)
    assert set(priorities) == {0, 50, 100}
    assert share(jobs, priorities[0]) == pytest.approx(0.5, abs=0.05)
    assert share(jobs, priorities[50]) == pytest.approx(0.35, abs=0.05)
    assert share(jobs, priorities[100]) == pytest.approx(0.15, abs=0.05)


def test_replica_shapes_follow_the_model_size_and_only_batch_inference_is_preemptible() -> None:
    for job in many_jobs():
        size = (8.0, 13.0, 70.0).index(job.model_parameters_billions)
        batch = job.type is WorkloadType.BATCH_INFERENCE
        assert job.gpus_per_replica == ((1, 1, 4) if batch else (1, 2, 8))[size], job
        assert job.replicas in {1, 2}
        assert job.preemptible is batch


def test_work_and_deadlines_are_sized_as_documented() -> None:
    jobs = many_jobs()
    with_deadline = [job for job in jobs if job.deadline_seconds is not None]
    assert share(jobs, len(with_deadline)) == pytest.approx(0.7, abs=0.05)
    for job in jobs:
        nominal = nominal_seconds(job)
        if job.deadline_seconds is None:
            assert 8 * 60 - 1e-6 <= nominal <= 30 * 60 + 1e-6, job
            continue
        slack = (job.deadline_seconds - job.arrival_seconds) / nominal
        assert 1.5 - 1e-9 <= slack <= 3.0 + 1e-9, job
        # Every deadline falls inside the run; work near the end is shrunk to fit.
        assert job.deadline_seconds <= LONG_RUN + 1e-6, job
        shrunk = job.deadline_seconds == pytest.approx(LONG_RUN)
        assert nominal <= 30 * 60 + 1e-6, job
        assert shrunk or nominal >= 8 * 60 - 1e-6, job


def test_every_deadline_is_meetable_within_a_short_run() -> None:
    # In a one-hour run most deadlines would fall after the end; their work is shrunk instead.
    jobs = generate_jobs(seed=2, duration_seconds=HOUR, jobs_per_hour=30.0, deadline_share=1.0)
    assert jobs
    for job in jobs:
        assert job.deadline_seconds is not None
        assert job.deadline_seconds <= HOUR + 1e-6
        assert job.arrival_seconds + nominal_seconds(job) <= job.deadline_seconds


def test_the_deadline_share_is_honoured_at_its_extremes() -> None:
    assert all(job.deadline_seconds is None for job in many_jobs(deadline_share=0.0))
    assert all(job.deadline_seconds is not None for job in many_jobs(deadline_share=1.0))


def test_a_multi_node_share_spans_70b_training_replicas_and_leaves_the_rest_of_the_mix() -> None:
    plain = generate_jobs(seed=5, duration_seconds=4 * HOUR, jobs_per_hour=30.0)
    spanning = generate_jobs(
        seed=5, duration_seconds=4 * HOUR, jobs_per_hour=30.0, multi_node_share=1.0
    )
    assert [j.key for j in plain] == [j.key for j in spanning]
    assert all(j.nodes_per_replica == 1 for j in plain)
    changed = [(a, b) for a, b in zip(plain, spanning, strict=True) if a != b]
    assert changed, "no 70B training job in the mix"
    for before, after in changed:
        assert (after.type, after.model_parameters_billions) == (WorkloadType.TRAINING, 70.0)
        assert (after.gpus_per_replica, after.nodes_per_replica) == (8, 2)
        assert after.pods == 2 * after.replicas
        # Twice the GPUs for the same nominal duration: twice the work.
        assert after.work_tokens == pytest.approx(2 * before.work_tokens, rel=1e-9)
        assert after.arrival_seconds == before.arrival_seconds
