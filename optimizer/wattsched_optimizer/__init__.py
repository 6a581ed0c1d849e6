"""wattsched optimizer: the performance/power model and the placement-and-power program.

Pure Python + PuLP; no Kubernetes. Entry point: `wattsched_optimizer.planner.plan`.
"""
