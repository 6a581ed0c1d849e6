"""wattsched simulator: trace-driven replay of a GPU cluster to compare scheduling policies."""
