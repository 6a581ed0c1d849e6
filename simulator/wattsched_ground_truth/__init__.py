"""The simulator's ground-truth table as data: `ground_truth.yaml`, and nothing else.

The one source of the ground-truth numbers (true GPU power and throughput per product and workload
type). Two components read it and may not import each other: the simulator
(`wattsched_simulator.truth`, which builds its `GroundTruth` from it) and the node agent's
simulated NVML backend (`wattsched_agent.simulated_nvml`, whose draw and energy counter follow it).
Each reads the file with `importlib.resources.files("wattsched_ground_truth")`; this package holds
no code, so sharing it shares data and no behaviour (import-linter keeps it that way).

Not for: the optimizer's prior (`wattsched_optimizer/catalogue.yaml`), which the planner believes
and which differs from this table on purpose.
"""
