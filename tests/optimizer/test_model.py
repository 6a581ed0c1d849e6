"""The performance/power model: catalogue, product labels, power levels, calibration."""

from __future__ import annotations

import pytest

from wattsched_optimizer.model import (
    CALIBRATION_BOUNDS,
    Calibration,
    CatalogueModel,
    UnknownProductError,
    catalogue,
    known_products,
    normalise_product,
    power_levels_watts,
    product_spec,
)
from wattsched_optimizer.problem import WorkloadType


@pytest.mark.parametrize(
    ("label", "product"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB"),
        ("NVIDIA-A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA-A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA-A100-PCIE-40GB", "A100-PCIE-40GB"),
        ("NVIDIA-L40S", "L40S"),
        ("NVIDIA-L4", "L4"),
        ("NVIDIA-H200", "H200"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("nvidia-l40s", "L40S"),
        ("NVIDIA-L4-SHARED", "L4"),
        ("H100-80GB", "H100-80GB"),
    ],
)
def test_gfd_and_nvml_labels_map_to_catalogue_keys(label: str, product: str) -> None:
    assert normalise_product(label) == product


def test_unknown_label_error_names_the_label_and_the_known_products() -> None:
    with pytest.raises(UnknownProductError) as raised:
        normalise_product("NVIDIA-B200")
    message = str(raised.value)
    assert "NVIDIA-B200" in message
    for product in known_products():
        assert product in message


def test_catalogue_has_the_required_products_with_ordered_power_limits() -> None:
    required = {"H100-80GB", "H200", "A100-80GB", "A100-40GB", "L40S", "L4"}
    assert required <= set(known_products())
    for name in known_products():
        spec = product_spec(name)
        assert 0 < spec.idle_watts.value < spec.min_watts.value <= spec.max_watts.value
        assert spec.memory_gib.value > 0


def test_every_catalogue_number_cites_a_known_source() -> None:
    data = catalogue()
    for spec in data.products.values():
        figures = [spec.memory_gib, spec.min_watts, spec.default_watts, spec.max_watts]
        figures += [spec.idle_watts, *spec.relative_speed.values()]
        assert all(f.source in data.sources for f in figures)
    for type_spec in data.workload_types.values():
        assert type_spec.tokens_per_second_per_gpu_1b.source in data.sources
        assert type_spec.throughput_curve_source in data.sources


def test_power_levels_span_min_to_max_evenly() -> None:
    assert power_levels_watts("H100-80GB", 5) == (200.0, 325.0, 450.0, 575.0, 700.0)
    assert power_levels_watts("L4", 1) == (72.0,)


def test_zeus_training_points_are_reproduced() -> None:
    model = CatalogueModel()
    for fraction, kept in [(0.9, 0.98), (0.8, 0.94), (0.7, 0.90), (0.6, 0.84), (0.5, 0.70)]:
        assert model.throughput_fraction(
            "H100-80GB", WorkloadType.TRAINING, 700 * fraction
        ) == pytest.approx(kept)


def test_inference_at_seventy_percent_cap_keeps_most_throughput() -> None:
    model = CatalogueModel()
    kept = model.throughput_fraction("H100-80GB", WorkloadType.INFERENCE, 490)
    assert 0.9 < kept < 1.0


def test_ml_energy_anchor_llama_8b_on_one_h100() -> None:
    model = CatalogueModel()
    tokens = model.throughput_tokens_per_second("H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700)
    assert tokens == pytest.approx(5147, rel=0.01)
    assert model.expected_power_watts("H100-80GB", WorkloadType.INFERENCE, 700) == pytest.approx(
        609, abs=2
    )


def test_ml_energy_llama_70b_on_four_h100s_draws_within_the_measured_range() -> None:
    """441 W (small batch) to 637 W (large batch) per GPU; the model gives one figure for it."""
    (measured,) = (m for m in catalogue().measurements if m.source == "mlenergy-v3-70b")
    assert (measured.product, measured.workload_type) == ("H100-80GB", WorkloadType.INFERENCE)
    assert (measured.params_billions, measured.gpus) == (70, 4)
    default_limit = product_spec("H100-80GB").default_watts.value
    assert measured.power_limit_watts == default_limit
    watts = CatalogueModel().expected_power_watts(
        measured.product, measured.workload_type, measured.power_limit_watts
    )
    assert measured.watts_per_gpu_low <= watts <= measured.watts_per_gpu_high


def test_throughput_grows_with_power_limit_and_power_never_exceeds_the_limit() -> None:
    model = CatalogueModel()
    for product in known_products():
        for workload_type in WorkloadType:
            levels = power_levels_watts(product, 5)
            speeds = [
                model.throughput_tokens_per_second(product, workload_type, 8, 1, 1.0, level)
                for level in levels
            ]
            assert speeds == sorted(speeds)
            for level in levels:
                assert model.expected_power_watts(product, workload_type, level) <= level


def test_a100_decodes_slower_than_h100_as_splitwise_reports() -> None:
    model = CatalogueModel()
    h100 = model.throughput_tokens_per_second("H100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 700)
    a100 = model.throughput_tokens_per_second("A100-80GB", WorkloadType.INFERENCE, 8, 1, 1.0, 400)
    assert 1.4 <= h100 / a100 <= 1.5


def test_calibration_is_bounded_and_scoped_to_product_and_type() -> None:
    model = CatalogueModel().calibrated(
        {("H100-80GB", WorkloadType.TRAINING): Calibration(throughput_factor=10.0)}
    )
    base = CatalogueModel()
    args = (WorkloadType.TRAINING, 8, 1, 1.0, 700)
    ratio = model.throughput_tokens_per_second("H100-80GB", *args) / (
        base.throughput_tokens_per_second("H100-80GB", *args)
    )
    assert ratio == pytest.approx(CALIBRATION_BOUNDS[1])
    assert model.throughput_tokens_per_second("A100-80GB", *args) == (
        base.throughput_tokens_per_second("A100-80GB", *args)
    )
