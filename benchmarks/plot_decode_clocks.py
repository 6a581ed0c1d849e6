"""Plot decode energy per token against the locked SM clock: the simulator's ground truth, the
optimizer's prior, and the cited measurements, to `docs/img/decode-energy-vs-clock.png`.

Energy per token is relative to the same work unlocked (busy draw kept / throughput kept), on
an H200 (max SM clock 1,980 MHz; the curves are fractions of the maximum clock, so H100 reads the
same). Cited points: Ma et al. (arXiv 2605.11999, H200): up to 32% of decode energy recovered by
clock locking at minimal throughput loss (the abstract gives the saving, not the clock it was
reached at: placed at half the maximum clock, as the ground truth places it); GreenLLM (arXiv
2508.16449): up to 34%, VoltanaLLM (arXiv 2509.04827): up to 36.3%, both whole-service savings with
per-phase frequency control, drawn as bounds. Modelled curves, cited points; nothing measured here.

Run: `.venv/bin/python benchmarks/plot_decode_clocks.py`
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from wattsched_optimizer.model import sm_clock_effect
from wattsched_optimizer.problem import WorkloadType
from wattsched_simulator.truth import GroundTruth

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img" / "decode-energy-vs-clock.png"
MAX_CLOCK_MHZ = 1980


def main() -> None:
    truth = GroundTruth()
    clocks = list(range(700, MAX_CLOCK_MHZ + 1, 15))
    truth_energy = []
    prior_energy = []
    for clock in clocks:
        kept, draw = truth.clock_effect("H200", WorkloadType.INFERENCE, clock)
        truth_energy.append(draw / kept)
        kept, draw = sm_clock_effect("H200", WorkloadType.INFERENCE, clock)
        prior_energy.append(draw / kept)
    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot(clocks, truth_energy, label="ground truth (simulator, modelled)", color="tab:blue")
    axes.plot(clocks, prior_energy, label="optimizer prior (modelled)", color="tab:orange", ls="--")
    axes.scatter(
        [MAX_CLOCK_MHZ / 2],
        [0.68],
        color="black",
        zorder=5,
        label="Ma et al. 2026: up to 32% less (H200, cited; clock placed)",
    )
    axes.axhline(1 - 0.34, color="tab:green", ls=":", label="GreenLLM: up to 34% (whole service)")
    axes.axhline(
        1 - 0.363, color="tab:red", ls=":", label="VoltanaLLM: up to 36.3% (whole service)"
    )
    axes.axhline(1.0, color="grey", lw=0.8)
    axes.set_xlabel("locked SM clock (MHz), H200")
    axes.set_ylabel("decode energy per token (unlocked = 1)")
    axes.set_title("Decode energy per token vs SM clock (modelled curves, cited points)")
    axes.set_ylim(0.55, 1.1)
    axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(OUT, dpi=120)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
