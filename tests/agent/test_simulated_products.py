"""The simulated GPUs' envelope agrees with the optimizer's catalogue (the agent keeps a copy)."""

from __future__ import annotations

import pytest

from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.simulated_nvml import SimulatedNvml, load_products
from wattsched_optimizer.model import CatalogueModel, normalise_product, product_spec
from wattsched_optimizer.problem import WorkloadType

PRODUCTS = load_products()


@pytest.mark.parametrize("label", sorted(PRODUCTS))
def test_simulated_envelope_matches_the_catalogue(label: str) -> None:
    envelope = PRODUCTS[label]
    product = normalise_product(label)
    assert normalise_product(envelope.nvml_name) == product
    spec = product_spec(product)
    assert (envelope.min_watts, envelope.default_watts, envelope.max_watts) == (
        spec.min_watts.value,
        spec.default_watts.value,
        spec.max_watts.value,
    )
    assert envelope.idle_watts == spec.idle_watts.value


@pytest.mark.parametrize("label", sorted(PRODUCTS))
@pytest.mark.parametrize("limit_fraction", [0.3, 0.6, 0.87, 1.0])
def test_busy_simulated_gpu_draws_what_the_model_expects_for_inference(
    label: str, limit_fraction: float
) -> None:
    library = SimulatedNvml("n", [label])
    backend = NvmlBackend(library, "simulated")
    backend.open()
    envelope = PRODUCTS[label]
    limit = backend.apply_limit(0, envelope.max_watts * limit_fraction).applied_watts
    assert limit is not None
    library.set_utilisation(0, 1.0)
    expected = CatalogueModel().expected_power_watts(
        normalise_product(label), WorkloadType.INFERENCE, limit
    )
    assert backend.sample(0).draw_watts == pytest.approx(expected, abs=0.01)
    library.set_utilisation(0, 0.0)
    assert backend.sample(0).draw_watts == CatalogueModel().idle_power_watts(
        normalise_product(label)
    )
