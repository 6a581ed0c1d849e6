"""wattsched operator: the kopf controller (cache, planning loop, API writes) and its decisions."""
