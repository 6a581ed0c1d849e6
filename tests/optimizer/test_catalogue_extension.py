"""Products beyond the shipped catalogue: a start-up extension, and products discovered on nodes
that are known for one plan only."""

from __future__ import annotations

from typing import Any

import pytest

from wattsched_optimizer.model import (
    CatalogueModel,
    UnknownProductError,
    discovered_product,
    extended_catalogue,
    product_key,
    product_spec,
    products_in_scope,
)
from wattsched_optimizer.problem import WorkloadType


def test_an_extension_adds_products_and_keeps_the_shipped_ones() -> None:
    extension: dict[str, Any] = {
        "sources": {"t": "test"},
        "products": {
            "T4": {
                "labels": ["Tesla-T4"],
                "memory_gib": {"value": 15, "source": "t"},
                "min_watts": {"value": 60, "source": "t"},
                "default_watts": {"value": 70, "source": "t"},
                "max_watts": {"value": 70, "source": "t"},
                "idle_watts": {"value": 10, "source": "t"},
                "relative_speed": {
                    kind.value: {"value": 0.1, "source": "t"} for kind in WorkloadType
                },
            }
        },
    }
    extended = extended_catalogue(extension)
    assert extended.aliases["TESLA-T4"] == "T4"
    assert extended.products["T4"].max_watts.value == 70
    assert "H100-80GB" in extended.products


def test_an_extension_with_an_unknown_section_names_it() -> None:
    with pytest.raises(ValueError, match=r"catalogue extension: unknown section 'product'"):
        extended_catalogue({"product": {}})


def test_a_discovered_product_is_known_only_inside_its_scope() -> None:
    spec = discovered_product(
        "B200", memory_gib=179, min_watts=400, default_watts=1000, max_watts=1000
    )
    assert product_key("NVIDIA-B200") == "B200"
    with pytest.raises(UnknownProductError):
        product_spec("B200")
    with products_in_scope({"B200": spec}):
        assert product_spec("B200") is spec
        model = CatalogueModel()
        # Speed modelled as the reference H100's until calibrated; idle a modelled share of max.
        b200 = model.throughput_tokens_per_second("B200", WorkloadType.INFERENCE, 70, 8, 1.0, 1000)
        h100 = model.throughput_tokens_per_second(
            "H100-80GB", WorkloadType.INFERENCE, 70, 8, 1.0, 700
        )
        assert b200 == pytest.approx(h100)
        assert model.idle_power_watts("B200") == pytest.approx(107.0)
    assert spec.min_watts.source == "nvml-constraints"
    assert spec.relative_speed[WorkloadType.TRAINING].source == "assumption"
    with pytest.raises(UnknownProductError):
        product_spec("B200")
