"""The `wattsched` console script: one entry point that dispatches to each command.

The CLI is its own layer, the only package that joins several runtime components: `plan`,
`explain` and `status` live here; `operator`, `agent` and `simulate` are their components' entry
functions. Each is imported only when invoked, so `wattsched agent` never loads kopf or PuLP and
`wattsched plan` never loads kopf. A component command is a function
`main(argv: list[str]) -> int` that parses its own arguments with `build_parser()` (a
`commandline.CommandParser`, so `--help` shows every flag's default).

Whatever a command fails with reaches the user as one line, `wattsched <command>: <what failed>:
<what to do>`, and an exit code from `commandline` (0 done, 1 failed, 2 bad usage or input,
3 cluster unusable, 4 not found): a `CommandError` as raised, a Kubernetes client error (no
kubeconfig, API server unreachable, credentials refused, object not found) translated here, and
anything unexpected as one line asking for a report (`WATTSCHED_DEBUG=1` shows the traceback).
Output into a pipe whose reader went away (`| head`) ends quietly with 141, as SIGPIPE ends tools.
A command whose packages come from an extra (the image installs none) says which extra to
install, in one line, when they are missing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from wattsched_api.commandline import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    one_line,
)

# subcommand -> one-line help.
SUBCOMMANDS: dict[str, str] = {
    "operator": "run the kopf operator (wraps `kopf run`)",
    "agent": "run the node agent that applies GPU power limits",
    "plan": "solve a plan for a snapshot of cluster objects",
    "explain": "say why a workload is where it is",
    "status": "budgets, unplaced workloads, moves, unconfirmed nodes, failed rounds on one screen",
    "install-kubectl-plugin": (
        "write the `kubectl-wattsched` shim so that `kubectl wattsched ...` works"
    ),
    "simulate": "replay traces and compare scheduling policies",
}
# subcommand -> (extra of pyproject.toml, the top-level packages it adds).
EXTRAS: dict[str, tuple[str, frozenset[str]]] = {
    "simulate": ("simulator", frozenset({"matplotlib", "tqdm"})),
}
DEBUG_ENV = "WATTSCHED_DEBUG"


def package_version() -> str:
    try:
        return version("wattsched")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: wattsched <command> [options]", "       wattsched --version", ""]
    lines.append("commands:")
    width = max(len(name) for name in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {help_text}" for name, help_text in SUBCOMMANDS.items()]
    lines += [
        "",
        "Run `wattsched <command> --help` for a command's options.",
        "Exit codes: 0 done, 1 failed, 2 bad usage or input, 3 cluster unusable (kubeconfig, "
        "API server unreachable, credentials refused), 4 not found (object or CRD), "
        "141 output's reader went away (| head).",
    ]
    return "\n".join(lines)


def _import(command: str) -> ModuleType:
    """Import `command`'s module only when it runs: `wattsched agent` never loads kopf or PuLP,
    `wattsched plan` never loads kopf. Plain import statements, so import-linter sees them."""
    if command == "operator":
        from wattsched_operator import run  # noqa: PLC0415

        return run
    if command == "agent":
        from wattsched_agent import cli  # noqa: PLC0415

        return cli
    if command == "plan":
        from wattsched_cli import plan  # noqa: PLC0415

        return plan
    if command == "explain":
        from wattsched_cli import explain  # noqa: PLC0415

        return explain
    if command == "status":
        from wattsched_cli import status  # noqa: PLC0415

        return status
    if command == "install-kubectl-plugin":
        from wattsched_cli import kubectl_plugin  # noqa: PLC0415

        return kubectl_plugin
    from wattsched_simulator import cli as simulate  # noqa: PLC0415

    return simulate


def command_module(command: str) -> ModuleType:
    """The module of `command`, exposing `main(argv: list[str]) -> int` and `build_parser()`; a
    CommandError naming the extra to install where it is missing."""
    try:
        return _import(command)
    except ModuleNotFoundError as error:
        extra, packages = EXTRAS.get(command, ("", frozenset()))
        if (error.name or "").partition(".")[0] not in packages:
            raise
        raise CommandError(
            f"needs the {extra!r} extra ({', '.join(sorted(packages))}), which this installation "
            f"lacks; install it with: pip install 'wattsched[{extra}]'",
            EXIT_USAGE,
        ) from None


# 128 + SIGPIPE, the status of a Unix tool that SIGPIPE ended: the reader of its output went away.
EXIT_OUTPUT_CLOSED = 141


def _output_closed() -> int:
    """The reader of stdout went away (`wattsched explain ... | head`): stop quietly, as Unix
    tools do, rather than report a bug."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush does not fail again
    return EXIT_OUTPUT_CLOSED


def _kubeconfig_flag(arguments: list[str]) -> str | None:
    """The file a command's `--kubeconfig FILE` (or `--kubeconfig=FILE`) names, for its errors."""
    for index, argument in enumerate(arguments):
        if argument == "--kubeconfig" and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith("--kubeconfig="):
            return argument.split("=", 1)[1]
    return None


def _run(command: str, rest: list[str]) -> int:
    try:
        command_main: Callable[[list[str]], int] = command_module(command).main
        return command_main(rest)
    except CommandError as error:
        print(f"wattsched {command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _output_closed()
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        # Imported here, after a failure: commands that never talk to a cluster never load it.
        from wattsched_operator.kube import cluster_error  # noqa: PLC0415

        known = cluster_error(error, _kubeconfig_flag(rest))
        if known is not None:
            print(f"wattsched {command}: {known}", file=sys.stderr)
            return known.exit_code
        print(
            f"wattsched {command}: unexpected {type(error).__name__}: {one_line(error)} (a bug: "
            f"rerun with {DEBUG_ENV}=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        print(f"wattsched {package_version()}")
        return EXIT_OK
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(
            f"wattsched: unknown command {command!r}: use one of {', '.join(SUBCOMMANDS)} "
            "(see `wattsched --help`)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # The client's own retry warnings would add lines before ours; the failure is reported once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    code = _run(command, rest)
    try:
        sys.stdout.flush()  # what is still buffered goes now, while a closed reader can be told
    except BrokenPipeError:
        return _output_closed()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
