"""The simulator's ground truth as data (`ground_truth.yaml`) and the one way its curves are read.

The one source of the ground-truth numbers (true GPU power and throughput per product and workload
type), and of how its curves are read (`interpolate`), so both readers agree. Two components read
it and may not import each other: the simulator
(`wattsched_simulator.truth`, which builds its `GroundTruth` from it) and the node agent's
simulated NVML backend (`wattsched_agent.simulated_nvml`, whose draw and energy counter follow it).
Each reads the file with `importlib.resources.files("wattsched_ground_truth")`; besides the curve
reading this package holds no code and imports nothing of the project (import-linter keeps it so).

Not for: the optimizer's prior (`wattsched_optimizer/catalogue.yaml`), which the planner believes
and which differs from this table on purpose.
"""

from __future__ import annotations

import bisect


def interpolate(curve: tuple[tuple[float, float], ...], x: float) -> float:
    """A ground-truth curve at `x`: piecewise-linear through its points, clamped to its ends."""
    xs = [point[0] for point in curve]
    if x <= xs[0]:
        return curve[0][1]
    if x >= xs[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
