"""The simulated GPUs: NVML envelopes agree with the optimizer's catalogue (the agent keeps a
copy), and their draw is the simulator's ground truth, read from the one shared table."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from tests.agent.conftest import truth_draw_watts
from wattsched_agent.nvml_backend import NvmlBackend
from wattsched_agent.simulated_nvml import SimulatedNvml, load_ground_truth, load_products
from wattsched_optimizer.model import normalise_product, product_spec
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.truth import GroundTruth, truth_product

PRODUCTS = load_products()


@pytest.mark.parametrize("label", sorted(PRODUCTS))
def test_simulated_envelope_matches_the_catalogue_and_the_ground_truth(label: str) -> None:
    envelope = PRODUCTS[label]
    product = normalise_product(label)
    assert normalise_product(envelope.nvml_name) == product
    spec = product_spec(product)
    assert (envelope.min_watts, envelope.default_watts, envelope.max_watts) == (
        spec.min_watts.value,
        spec.default_watts.value,
        spec.max_watts.value,
    )
    assert envelope.ground_truth_product == truth_product(label)
    truth = GroundTruth().product(envelope.ground_truth_product)
    assert (truth.min_watts, truth.max_watts) == (envelope.min_watts, envelope.max_watts)


def test_the_agent_reads_the_numbers_the_simulator_reads() -> None:
    agent_view = load_ground_truth()
    truth = GroundTruth()
    assert agent_view.idle_watts == {n: p.idle_watts for n, p in truth.products.items()}
    assert agent_view.max_watts == {n: p.max_watts for n, p in truth.products.items()}
    assert agent_view.full_load_fraction == {
        t.value: k.full_load_fraction for t, k in truth.types.items()
    }
    assert agent_view.kept_throughput_curve == {t.value: k.curve for t, k in truth.types.items()}
    assert agent_view.load_power_exponent == truth.load_power_exponent
    assert agent_view.node_power_spread == truth.node_power_spread
    assert agent_view.clock_curve == {
        t.value: k.clock_curve for t, k in truth.types.items() if k.clock_curve
    }
    assert agent_view.max_sm_clock_mhz == {n: p.max_sm_clock_mhz for n, p in truth.products.items()}


def test_a_locked_decode_gpu_draws_the_truths_clocked_share() -> None:
    library = SimulatedNvml("n", ["NVIDIA-H100-80GB-HBM3"])
    backend = NvmlBackend(library, "simulated")
    backend.open()
    library.set_utilisation(0, 1.0)
    unlocked = backend.sample(0).draw_watts
    backend.apply_clocks(0, 990, 990)
    locked = backend.sample(0).draw_watts
    assert unlocked is not None
    assert locked is not None
    _, draw = GroundTruth().clock_effect("H100-80GB", WorkloadType.INFERENCE, 990)
    assert locked == pytest.approx(unlocked * draw, rel=1e-3)
    library.set_utilisation(0, 1.0, "Training")
    training = backend.sample(0).draw_watts
    backend.reset_clocks(0)
    assert backend.sample(0).draw_watts == training  # no clock curve for compute-bound work


@pytest.mark.parametrize("label", sorted(PRODUCTS))
@pytest.mark.parametrize("limit_fraction", [0.3, 0.6, 0.87, 1.0])
@pytest.mark.parametrize("utilisation", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("workload_type", list(WorkloadType))
def test_simulated_gpu_draws_the_ground_truth(
    label: str, limit_fraction: float, utilisation: float, workload_type: WorkloadType
) -> None:
    library = SimulatedNvml("n", [label])
    backend = NvmlBackend(library, "simulated")
    backend.open()
    envelope = PRODUCTS[label]
    limit = backend.apply_limit(0, envelope.max_watts * limit_fraction).applied_watts
    assert limit is not None
    library.set_utilisation(0, utilisation, workload_type.value)
    expected = truth_draw_watts(label, utilisation, limit, library.node_factor, workload_type)
    assert backend.sample(0).draw_watts == pytest.approx(expected, abs=1e-3)


def test_a_ground_truth_file_given_by_path_changes_the_draw(tmp_path: Path) -> None:
    table = yaml.safe_load(
        resources.files("wattsched_ground_truth").joinpath("ground_truth.yaml").read_text()
    )
    table["products"]["L4"]["idleWatts"] = 20.0
    path = tmp_path / "truth.yaml"
    path.write_text(yaml.safe_dump(table))
    library = SimulatedNvml("n", ["NVIDIA-L4"], truth=load_ground_truth(path))
    library.nvmlInit()
    draw_mw = library.nvmlDeviceGetPowerUsage(library.nvmlDeviceGetHandleByIndex(0))
    assert draw_mw / 1000 == pytest.approx(20.0 * library.node_factor, abs=1e-3)


def test_a_file_that_is_no_ground_truth_table_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "products.yaml"
    path.write_text("products: {}\n")
    with pytest.raises(ValueError, match=r"products.yaml: not a ground-truth table"):
        load_ground_truth(path)
