"""wattsched operator: the kopf controller, the API models it shares with the agent, and the CLI."""
