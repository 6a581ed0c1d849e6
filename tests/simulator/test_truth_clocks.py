"""The ground truth's locked SM clocks: decode saves what Ma et al. measured, compute-bound work
has no clock curve, and a lock only acts where its draw fits under the power limit."""

from __future__ import annotations

import pytest

from wattsched_optimizer.model import sm_clock_effect
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.truth import GroundTruth

TRUTH = GroundTruth()


def test_decode_at_half_the_clock_saves_the_cited_share_of_energy_per_token() -> None:
    # Ma et al. (arXiv 2605.11999): clock locking recovers up to 32% of decode energy.
    kept, draw = TRUTH.clock_effect("H200", WorkloadType.INFERENCE, 990)
    assert 1 - draw / kept == pytest.approx(0.31, abs=0.01)
    assert kept >= 0.9  # "minimal throughput loss"


def test_the_truth_differs_from_the_optimizers_prior() -> None:
    assert TRUTH.clock_effect("H100-80GB", WorkloadType.INFERENCE, 990) != sm_clock_effect(
        "H100-80GB", WorkloadType.INFERENCE, 990
    )


@pytest.mark.parametrize(
    "workload_type",
    [WorkloadType.TRAINING, WorkloadType.FINE_TUNING, WorkloadType.BATCH_INFERENCE],
)
def test_compute_bound_work_has_no_clock_curve(workload_type: WorkloadType) -> None:
    assert TRUTH.clock_effect("H100-80GB", workload_type, 990) == (1.0, 1.0)


def test_a_lock_under_the_limit_sets_throughput_and_draw_and_the_cap_does_not_bite() -> None:
    full = TRUTH.full_load_watts("H100-80GB", WorkloadType.INFERENCE)
    kept, draw = TRUTH.clock_effect("H100-80GB", WorkloadType.INFERENCE, 990)
    assert TRUTH.limit_and_clock_fractions(
        "H100-80GB", WorkloadType.INFERENCE, 450.0, 990
    ) == pytest.approx((kept, full * draw))
    # Unlocked at 450 W the cap bites: less throughput than the lock keeps.
    capped, capped_full = TRUTH.limit_and_clock_fractions(
        "H100-80GB", WorkloadType.INFERENCE, 450.0, None
    )
    assert capped < kept
    assert capped_full == full


def test_a_lock_above_the_limit_adds_nothing_to_the_cap() -> None:
    assert TRUTH.limit_and_clock_fractions(
        "H100-80GB", WorkloadType.INFERENCE, 250.0, 1485
    ) == TRUTH.limit_and_clock_fractions("H100-80GB", WorkloadType.INFERENCE, 250.0, None)


def test_replica_throughput_follows_the_lock() -> None:
    def tokens(clock: int | None) -> float:
        return TRUTH.replica_tokens_per_second(
            product="H100-80GB",
            workload_type=WorkloadType.INFERENCE,
            model_parameters_billions=8,
            gpus=1,
            relative_throughput=1.0,
            power_limit_watts=700.0,
            sm_clock_mhz=clock,
        )

    assert tokens(990) == pytest.approx(tokens(None) * 0.93)
