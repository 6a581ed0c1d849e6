"""The `wattsched` command line: the dispatcher and the plan, explain and status commands."""
