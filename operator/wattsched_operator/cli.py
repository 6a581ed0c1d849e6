"""The `wattsched` console script: one entry point that dispatches to each component's command.

Each subcommand lives with its component and is imported only when invoked, so `wattsched agent`
never loads kopf or PuLP and `wattsched plan` never loads kopf. A component command is a function
`main(argv: list[str]) -> int` that parses its own arguments. A command whose packages come from an
extra (the image installs none) says which extra to install, in one line, when they are missing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, one-line help). Modules expose `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("wattsched_operator.run", "run the kopf operator (wraps `kopf run`)"),
    "agent": ("wattsched_agent.cli", "run the node agent that applies GPU power limits"),
    "plan": ("wattsched_operator.plan_command", "solve a plan for a snapshot of cluster objects"),
    "explain": ("wattsched_operator.explain", "say why a workload is where it is"),
    "status": (
        "wattsched_operator.status_command",
        "budgets, unplaced workloads, moves, unconfirmed nodes, failed rounds on one screen",
    ),
    "install-kubectl-plugin": (
        "wattsched_operator.kubectl_plugin",
        "write the `kubectl-wattsched` shim so that `kubectl wattsched ...` works",
    ),
    "simulate": ("wattsched_simulator.cli", "replay traces and compare scheduling policies"),
}

# subcommand -> (extra of pyproject.toml, the top-level packages it adds).
EXTRAS: dict[str, tuple[str, frozenset[str]]] = {
    "simulate": ("simulator", frozenset({"matplotlib", "tqdm"})),
}


def usage() -> str:
    lines = ["usage: wattsched <command> [options]", "", "commands:"]
    width = max(len(name) for name in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `wattsched <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"wattsched: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(SUBCOMMANDS[command][0])
    except ModuleNotFoundError as error:
        extra, packages = EXTRAS.get(command, ("", frozenset()))
        if (error.name or "").partition(".")[0] not in packages:
            raise
        print(
            f"wattsched {command}: needs the {extra!r} extra ({', '.join(sorted(packages))}), "
            f"which this installation lacks; install it with: pip install 'wattsched[{extra}]'",
            file=sys.stderr,
        )
        return 2
    command_main: Callable[[list[str]], int] = module.main
    return command_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
