"""wattsched optimizer: the performance/power model and the placement-and-power LP. Pure Python + PuLP."""
