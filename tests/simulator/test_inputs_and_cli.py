"""Reading traces, Nodes and EnergyBudgets, and `wattsched simulate` end to end on tiny inputs."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.simulator.conftest import write_trace
from wattsched_optimizer import model
from wattsched_simulator import cli
from wattsched_simulator.carbon import load_hourly_csv
from wattsched_simulator.cluster import ClusterError, load_budgets, load_nodes
from wattsched_simulator.trace import (
    DEFAULT_TRACE_DIR,
    PROMPT_TOKEN_WEIGHT,
    TraceError,
    demand_per_step,
    load_traces,
    read_requests,
)
from wattsched_simulator.truth import DEFAULT_PRODUCTS, truth_product

REQUIRED_KEYS = {
    "gpuEnergyKWh",
    "facilityEnergyKWh",
    "carbonKg",
    "tokensPerJoule",
    "sloAttainment",
    "deadlineMisses",
    "secondsOverBudget",
    "preemptions",
    "migrations",
    "planSecondsP50",
}

NODES_YAML = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata:
    name: gpu-h100-00
    labels: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, wattsched.io/rack: rack-a}
  status:
    allocatable: {nvidia.com/gpu: "8"}
- apiVersion: v1
  kind: Node
  metadata:
    name: gpu-a100-00
    labels: {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB, wattsched.io/rack: rack-b}
  status:
    allocatable: {nvidia.com/gpu: "8"}
- apiVersion: v1
  kind: Node
  metadata: {name: cpu-only}
  status:
    allocatable: {cpu: "64"}
"""

BUDGETS_YAML = """\
apiVersion: wattsched.io/v1alpha1
kind: EnergyBudget
metadata: {name: cluster}
spec:
  powerCapWatts: 6000
  pue: 1.25
  carbon: {intensityGramsPerKilowattHour: 300}
---
apiVersion: wattsched.io/v1alpha1
kind: EnergyBudget
metadata: {name: rack-a}
spec:
  nodeSelector:
    matchExpressions: [{key: wattsched.io/rack, operator: In, values: [rack-a]}]
  powerCapWatts: 4000
"""


def small_traces(directory: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name, rate in (("code", 2.0), ("conv", 3.0)):
        rows = []
        for second in range(240):
            for _ in range(rng.poisson(rate)):
                rows.append(
                    (
                        f"2023-11-16 18:{15 + second // 60:02d}:{second % 60:02d}.1234567",
                        int(rng.integers(100, 2000)),
                        int(rng.integers(10, 300)),
                    )
                )
        paths.append(write_trace(directory / f"{name}.csv", rows))
    return paths


def test_the_azure_timestamps_with_seven_fractional_digits_are_read(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.csv",
        [("2023-11-16 18:15:46.6805900", 374, 44), ("2023-11-16 18:15:50.9951690", 396, 109)],
    )
    start, requests = read_requests(path)
    assert start.microsecond == 680590
    assert requests[1].arrival_seconds == pytest.approx(4.314579)
    assert (requests[1].context_tokens, requests[1].generated_tokens) == (396, 109)


def test_demand_counts_decode_equivalent_tokens_per_step(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.csv",
        [("2023-11-16 18:00:00.0", 1000, 10), ("2023-11-16 18:00:01.5", 0, 5)],
    )
    _, requests = read_requests(path)
    demand, history = demand_per_step(
        requests, offset_seconds=0.0, duration_seconds=4, step_seconds=1.0, rate_scale=1.0, seed=0
    )
    assert list(demand) == [10 + 1000 * PROMPT_TOKEN_WEIGHT, 5, 0, 0]
    assert len(history) == 0


def test_the_history_before_t0_is_the_trace_wrapped_one_span_earlier(tmp_path: Path) -> None:
    """The demand before t = 0 continues the run's demand backwards: the trace's span wraps, so
    the last steps of the run are also the steps just before it (one request per 10 s here)."""
    rows = [(f"2023-11-16 18:00:{s:02d}.0", 0, 7) for s in range(0, 60, 10)]
    _, requests = read_requests(write_trace(tmp_path / "t.csv", rows))
    demand, history = demand_per_step(
        requests,
        offset_seconds=0,
        duration_seconds=60,
        step_seconds=1,
        rate_scale=2.5,
        seed=4,
        history_seconds=25,
    )
    assert len(history) == 25
    assert list(history) == list(demand[-25:])
    assert history.sum() > 0
    again, none = demand_per_step(
        requests, offset_seconds=0, duration_seconds=60, step_seconds=1, rate_scale=2.5, seed=4
    )
    assert list(again) == list(demand)  # the run's demand does not depend on the history kept
    assert len(none) == 0


def test_rate_scale_multiplies_the_demand_by_superimposing_shifted_copies(tmp_path: Path) -> None:
    rows = [(f"2023-11-16 18:00:{s:02d}.0", 100, 50) for s in range(0, 60, 3)]
    _, requests = read_requests(write_trace(tmp_path / "t.csv", rows))
    once, _ = demand_per_step(
        requests, offset_seconds=0, duration_seconds=60, step_seconds=1, rate_scale=1, seed=3
    )
    thrice, _ = demand_per_step(
        requests, offset_seconds=0, duration_seconds=60, step_seconds=1, rate_scale=3, seed=3
    )
    assert thrice.sum() == pytest.approx(3 * once.sum())
    assert not np.array_equal(thrice, 3 * once)  # shifted, not stretched


def test_a_malformed_trace_is_named_with_its_line(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [("2023-11-16 18:00:00.0", -1, 5)])
    with pytest.raises(TraceError, match=r"t\.csv line 2: token counts must be >= 0"):
        read_requests(path)
    with pytest.raises(TraceError, match="no such file"):
        read_requests(tmp_path / "missing.csv")


def test_traces_share_one_clock(tmp_path: Path) -> None:
    early = write_trace(tmp_path / "early.csv", [("2023-11-16 18:00:00.0", 0, 7)])
    late = write_trace(tmp_path / "late.csv", [("2023-11-16 18:00:02.0", 0, 9)])
    traces = load_traces([early, late], duration_seconds=4, step_seconds=1, rate_scale=1, seed=0)
    assert [list(t.demand_tokens) for t in traces] == [[7, 0, 0, 0], [0, 0, 9, 0]]


def test_nodes_and_budget_scopes_are_read_from_kubernetes_yaml(tmp_path: Path) -> None:
    (tmp_path / "nodes.yaml").write_text(NODES_YAML)
    (tmp_path / "budgets.yaml").write_text(BUDGETS_YAML)
    nodes = load_nodes(tmp_path / "nodes.yaml")
    budgets = load_budgets(tmp_path / "budgets.yaml", nodes)
    assert [(n.name, n.planner_product, n.truth_product, n.gpu_count) for n in nodes] == [
        ("gpu-h100-00", "H100-80GB", "H100-80GB", 8),
        ("gpu-a100-00", "A100-80GB", "A100-80GB", 8),
    ]
    assert {b.name: sorted(b.node_names) for b in budgets} == {
        "cluster": ["gpu-a100-00", "gpu-h100-00"],
        "rack-a": ["gpu-h100-00"],
    }
    assert (budgets[0].pue, budgets[0].carbon_intensity_grams_per_kwh) == (1.25, 300.0)


def test_a_node_without_a_product_label_is_rejected_by_name(tmp_path: Path) -> None:
    (tmp_path / "nodes.yaml").write_text(
        NODES_YAML.replace("nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB, ", "")
    )
    with pytest.raises(ClusterError, match=r"Node gpu-a100-00: metadata.labels\['nvidia.com/gpu"):
        load_nodes(tmp_path / "nodes.yaml")


def test_a_budget_without_a_positive_cap_is_rejected_by_name(tmp_path: Path) -> None:
    (tmp_path / "nodes.yaml").write_text(NODES_YAML)
    (tmp_path / "b.yaml").write_text(
        BUDGETS_YAML.replace("powerCapWatts: 4000", "powerCapWatts: 0")
    )
    with pytest.raises(ClusterError, match=r"EnergyBudget rack-a: spec.powerCapWatts=0"):
        load_budgets(tmp_path / "b.yaml", load_nodes(tmp_path / "nodes.yaml"))


def test_an_hourly_carbon_curve_is_read_in_hour_order(tmp_path: Path) -> None:
    path = tmp_path / "carbon.csv"
    path.write_text("hour,gramsPerKWh\n0,100\n1,300\n")
    curve = load_hourly_csv(path)
    assert [curve.grams_per_kwh_at(s) for s in (0, 3599, 3600, 7200)] == [100, 100, 300, 100]
    path.write_text("hour,gramsPerKWh\n1,100\n")
    with pytest.raises(ValueError, match="hour=1, expected 0"):
        load_hourly_csv(path)


def test_simulate_writes_results_plots_and_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "nodes.yaml").write_text(NODES_YAML)
    (tmp_path / "budgets.yaml").write_text(BUDGETS_YAML)
    traces = small_traces(tmp_path)
    out = tmp_path / "out"
    code = cli.main(
        [
            "--cluster", str(tmp_path / "nodes.yaml"),
            "--budget", str(tmp_path / "budgets.yaml"),
            "--trace", *map(str, traces),
            "--duration", "240",
            "--step", "2",
            "--policies", "spread-max,static-cap,wattsched",
            "--jobs-per-hour", "30",
            "--seed", "5",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert list(document["policies"]) == ["spread-max", "static-cap", "wattsched"]
    for metrics in document["policies"].values():
        assert metrics.keys() >= REQUIRED_KEYS
        assert 0.0 <= metrics["sloAttainment"] <= 1.0
    assert document["policies"]["wattsched"]["secondsOverBudget"] == 0
    assert document["scenario"]["pue"] == 1.25
    # The operator's horizon, with no carbon curve to forecast from.
    assert document["scenario"]["horizonHours"] == 24
    assert document["scenario"]["carbonForecast"] is False
    assert "CC-BY 4.0" in document["scenario"]["traceAttribution"]
    for name in (
        "power_vs_cap.png",
        "energy_by_policy.png",
        "energy_per_work.png",
        "slo_attainment.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert (out / name).stat().st_size < 200_000
    table = capsys.readouterr().out
    for heading in ("GPU kWh", "job Mtok", "tokens/J", "deadline miss", "s limits>cap"):
        assert heading in table
    assert "wattsched" in table


# Fields that measure the machine, not the simulation.
TIMING_KEYS = {"planSecondsP50", "planSecondsMax", "simulatedSecondsPerWallSecond"}


def simulate_every_policy(directory: Path, out: Path, seed: int) -> dict[str, Any]:
    """`wattsched simulate` with every policy (the default) on the tiny cluster; results.json."""
    (directory / "nodes.yaml").write_text(NODES_YAML)
    (directory / "budgets.yaml").write_text(BUDGETS_YAML)
    traces = small_traces(directory)
    code = cli.main(
        [
            "--cluster", str(directory / "nodes.yaml"),
            "--budget", str(directory / "budgets.yaml"),
            "--trace", *map(str, traces),
            "--duration", "240",
            "--step", "2",
            "--jobs-per-hour", "120",
            "--seed", str(seed),
            "--no-plots",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    return document


@pytest.fixture(scope="module")
def every_policy_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("every-policy")
    return simulate_every_policy(directory, directory / "out", seed=5)


def test_every_policy_runs_and_reports_every_required_key(
    every_policy_results: dict[str, Any],
) -> None:
    policies = every_policy_results["policies"]
    assert tuple(policies) == cli.ALL_POLICIES
    for name, metrics in policies.items():
        assert metrics.keys() >= REQUIRED_KEYS, name
        assert 0.0 <= metrics["sloAttainment"] <= 1.0, name
        assert metrics["plans"] >= 1, name
        assert metrics["gpuEnergyKWh"] > 0, name
        assert metrics["facilityEnergyKWh"] == pytest.approx(1.25 * metrics["gpuEnergyKWh"])


def test_the_optimizer_keeps_every_cap_with_or_without_perfect_knowledge(
    every_policy_results: dict[str, Any],
) -> None:
    # By construction: the optimizer's plans keep the sum of power limits in each budget under
    # its cap, and the engine never lets a GPU draw above its limit. The oracle is the same
    # optimizer with better inputs, so it is held to the same caps. (Whether it also uses less
    # energy than wattsched is not guaranteed: it is a reference point, not a proven bound.)
    for name in ("wattsched", "oracle"):
        metrics = every_policy_results["policies"][name]
        assert metrics["secondsOverBudget"] == 0, name
        assert metrics["secondsLimitsOverBudget"] == 0, name
    # The baselines leave every GPU at its default limit: 8 x 700 + 8 x 400 W > the 6,000 W cap,
    # so the cap binds here.
    for name in ("spread-max", "binpack-max"):
        assert every_policy_results["policies"][name]["secondsLimitsOverBudget"] == 240, name


def test_the_same_seed_gives_the_same_results_json(
    tmp_path: Path, every_policy_results: dict[str, Any]
) -> None:
    again = simulate_every_policy(tmp_path, tmp_path / "again", seed=5)

    def without_timing(document: dict[str, Any]) -> dict[str, Any]:
        return {
            "policies": {
                name: {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
                for name, metrics in document["policies"].items()
            },
            # The input files are the same, written to another temporary directory.
            "scenario": {
                k: v
                for k, v in document["scenario"].items()
                if k not in {"traces", "cluster", "budget"}
            },
        }

    assert without_timing(again) == without_timing(every_policy_results)


def test_simulate_rejects_bad_input_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "nodes.yaml").write_text(NODES_YAML)
    base = ["--cluster", str(tmp_path / "nodes.yaml"), "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--policies", "spread-max,fastest"]) == 2
    assert "--policies: unknown fastest" in capsys.readouterr().err
    assert cli.main([*base, "--trace", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    assert cli.main([*base, "--duration", "0"]) == 2
    assert "--duration=0.0: must be > 0" in capsys.readouterr().err
    assert cli.main([*base, "--multi-node-share", "1.5"]) == 2
    assert "--multi-node-share=1.5: must be in [0, 1]" in capsys.readouterr().err
    assert cli.main([*base, "--horizon-hours", "-1"]) == 2
    assert "--horizon-hours=-1: must be from 0" in capsys.readouterr().err


def simulate_in_a_subprocess(directory: Path, stderr: int) -> subprocess.Popen[bytes]:
    """`wattsched simulate` (two policies, 120 steps each) with stderr on the given descriptor."""
    (directory / "nodes.yaml").write_text(NODES_YAML)
    traces = small_traces(directory)
    command = [
        sys.executable, "-m", "wattsched_cli.main", "simulate",
        "--cluster", str(directory / "nodes.yaml"),
        "--trace", *map(str, traces),
        "--duration", "240",
        "--step", "2",
        "--policies", "spread-max,wattsched",
        "--no-plots",
        "--out", str(directory / "out"),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


def test_a_terminal_gets_a_progress_bar_that_ends_complete(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    # 24 rows x 120 columns, so the bar has a width to draw in.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = simulate_in_a_subprocess(tmp_path, terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = shown.decode()
    # 2 policies x 120 steps: the bar starts at 0 and ends at 240/240, naming the last policy.
    assert "simulating" in text
    assert "0/240" in text
    final = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final
    assert "240/240" in final
    assert "wattsched" in final


def test_no_terminal_gets_no_progress_output(tmp_path: Path) -> None:
    process = simulate_in_a_subprocess(tmp_path, subprocess.PIPE)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert stderr == b""
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.skipif(not DEFAULT_TRACE_DIR.is_dir(), reason="needs ../shared/data beside the repo")
def test_the_default_traces_are_the_azure_2023_hour() -> None:
    traces = load_traces(
        [DEFAULT_TRACE_DIR / "code.csv", DEFAULT_TRACE_DIR / "conv.csv"],
        duration_seconds=3600,
        step_seconds=1,
        rate_scale=1,
        seed=0,
    )
    assert [(t.name, t.requests) for t in traces] == [("code", 8819), ("conv", 19366)]
    assert all(t.demand_tokens.sum() > 0 for t in traces)


def test_every_product_the_optimizer_knows_has_a_ground_truth() -> None:
    for product in model.known_products():
        for label in model.product_spec(product).labels:
            assert truth_product(label) in DEFAULT_PRODUCTS, label
    with pytest.raises(ValueError, match="no ground truth for this product"):
        truth_product("NVIDIA-B200")


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_without_the_simulator_extra_simulate_says_which_extra_in_one_line(missing: str) -> None:
    # As in the image, which installs no extra: the package cannot be imported (None in
    # sys.modules makes `import` fail with ModuleNotFoundError naming it).
    program = (
        f"import sys; sys.modules[{missing!r}] = None; "
        "from wattsched_cli.main import main; "
        "raise SystemExit(main(['simulate', '--cluster', 'nodes.yaml', '--out', 'out']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "wattsched simulate: needs the 'simulator' extra (matplotlib, tqdm), which this "
        "installation lacks; install it with: pip install 'wattsched[simulator]'\n"
    )
