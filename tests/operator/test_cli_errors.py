"""The `wattsched` command line at its edges: every error is one line naming what failed and what to
do, with the documented exit code, and no traceback; `--version`; help text and defaults on every
flag of every subcommand.

The unreachable API server is a real one: a loopback port nothing listens on (connection refused).
Missing objects on a live control plane are in test_cli_cluster.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from wattsched_api.commandline import EXIT_CLUSTER, EXIT_USAGE, HelpFormatter
from wattsched_cli.main import SUBCOMMANDS, command_module

# The subcommands that talk to a cluster, with the arguments that make each one reach for it.
CLUSTER_COMMANDS = {
    "explain": ["explain", "team-a/chat"],
    "explain -n": ["explain", "-n", "team-a", "chat"],
    "operator": ["operator", "--metrics-port", "0", "--health-port", "0"],
    "operator --standalone": [
        "operator",
        "--standalone",
        *("--metrics-port", "0", "--health-port", "0"),
    ],
    "agent nvml": ["agent", "--node-name", "gpu-0", "--metrics-port", "0"],
    "agent simulated": ["agent", "--backend", "simulated", "--node-name", "gpu-0"],
    "agent all nodes": ["agent", "--backend", "simulated", "--all-nodes", "--metrics-port", "0"],
    "status": ["status"],
    "plan --from-cluster": ["plan", "--from-cluster"],
}


def wattsched(
    *args: str, kubeconfig: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "WATTSCHED_DEBUG"}
    if kubeconfig is not None:
        environment["KUBECONFIG"] = kubeconfig
    return subprocess.run(
        [sys.executable, "-m", "wattsched_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=environment,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], command: str, code: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"wattsched {command}: "), lines[0]
    assert result.returncode == code, (result.returncode, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the length of the module."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def unreachable_kubeconfig(tmp_path_factory: pytest.TempPathFactory, closed_port: int) -> Path:
    path = tmp_path_factory.mktemp("kubeconfig") / "config"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {{server: "https://127.0.0.1:{closed_port}", insecure-skip-tls-verify: true}}
users:
- name: someone
  user: {{token: not-a-real-token}}
contexts:
- name: nowhere
  context: {{cluster: nowhere, user: someone, namespace: team-a}}
current-context: nowhere
"""
    )
    return path


@pytest.mark.parametrize("name", sorted(CLUSTER_COMMANDS))
def test_an_unreachable_api_server_is_one_line_naming_the_server_and_exit_3(
    name: str, unreachable_kubeconfig: Path, closed_port: int
) -> None:
    args = CLUSTER_COMMANDS[name]
    result = wattsched(*args, kubeconfig=str(unreachable_kubeconfig))
    line = assert_one_line_error(result, args[0], EXIT_CLUSTER)
    assert f"cannot reach the API server https://127.0.0.1:{closed_port}" in line
    assert "Connection refused" in line
    assert "check that the cluster is up" in line


@pytest.mark.parametrize("name", sorted(CLUSTER_COMMANDS))
def test_a_missing_kubeconfig_is_one_line_naming_it_and_exit_3(name: str) -> None:
    args = CLUSTER_COMMANDS[name]
    result = wattsched(*args, kubeconfig="/nonexistent")
    line = assert_one_line_error(result, args[0], EXIT_CLUSTER)
    assert "no usable kubeconfig (KUBECONFIG=/nonexistent)" in line
    assert "set KUBECONFIG or --kubeconfig" in line


# The commands with a --kubeconfig flag.
KUBECONFIG_FLAG_COMMANDS = ("explain", "status", "plan --from-cluster")


@pytest.mark.parametrize("name", KUBECONFIG_FLAG_COMMANDS)
@pytest.mark.parametrize("flag", [["--kubeconfig", "/nonexistent"], ["--kubeconfig=/nonexistent"]])
def test_a_missing_kubeconfig_given_by_flag_is_named_as_the_flag(
    name: str, flag: list[str], tmp_path: Path
) -> None:
    # $KUBECONFIG names another (valid-looking) file: the message must name the flag's file.
    other = tmp_path / "other-config"
    args = [*CLUSTER_COMMANDS[name], *flag]
    result = wattsched(*args, kubeconfig=str(other))
    line = assert_one_line_error(result, args[0], EXIT_CLUSTER)
    assert "no usable kubeconfig (--kubeconfig /nonexistent)" in line
    assert str(other) not in line


def test_a_kubeconfig_that_is_not_yaml_is_one_line_and_exit_3(tmp_path: Path) -> None:
    broken = tmp_path / "config"
    broken.write_text("clusters: [unclosed")
    result = wattsched("explain", "team-a/chat", kubeconfig=str(broken))
    line = assert_one_line_error(result, "explain", EXIT_CLUSTER)
    assert f"{broken}: not a usable kubeconfig" in line


def test_a_missing_snapshot_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = wattsched("plan", "-f", str(tmp_path / "missing.yaml"))
    line = assert_one_line_error(result, "plan", EXIT_USAGE)
    assert f"{tmp_path / 'missing.yaml'}: cannot read" in line


def test_a_missing_simulation_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = wattsched(
        "simulate", "--cluster", str(tmp_path / "nodes.yaml"), "--out", str(tmp_path / "out")
    )
    line = assert_one_line_error(result, "simulate", EXIT_USAGE)
    assert str(tmp_path / "nodes.yaml") in line


# What each command requires, so that the unknown flag is the only mistake.
REQUIRED = {
    "explain": ["chat"],
    "plan": ["-f", "snapshot.yaml"],
    "simulate": ["--cluster", "nodes.yaml", "--out", "out"],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_a_usage_error_is_one_line_pointing_at_help_and_exit_2(command: str) -> None:
    result = wattsched(command, *REQUIRED.get(command, []), "--no-such-flag")
    line = assert_one_line_error(result, command, EXIT_USAGE)
    assert "--no-such-flag" in line
    assert f"see `wattsched {command} --help`" in line


def test_an_unknown_command_is_one_line_listing_the_commands() -> None:
    result = wattsched("explian")
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        f"wattsched: unknown command 'explian': use one of {', '.join(SUBCOMMANDS)} "
        "(see `wattsched --help`)"
    ]


def test_explain_refuses_a_namespace_given_twice_differently() -> None:
    result = wattsched("explain", "-n", "team-b", "team-a/chat", kubeconfig="/nonexistent")
    line = assert_one_line_error(result, "explain", EXIT_USAGE)
    assert "namespace team-a, but -n says team-b" in line


def test_version_prints_the_installed_package_version() -> None:
    result = wattsched("--version")
    assert result.returncode == 0
    assert result.stdout == f"wattsched {version('wattsched')}\n"


def test_help_lists_every_command_and_the_exit_codes() -> None:
    result = wattsched("--help")
    assert result.returncode == 0
    for command in SUBCOMMANDS:
        assert f"  {command}" in result.stdout
    assert "3 cluster unusable" in result.stdout
    assert "4 not found" in result.stdout


def parser_of(command: str) -> argparse.ArgumentParser:
    module = command_module(command)
    parser: argparse.ArgumentParser = module.build_parser()
    return parser


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_of_every_command_has_help_text(command: str) -> None:
    missing = [a.dest for a in flags(parser_of(command)) if not (a.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_with_a_default_shows_it_in_help(command: str) -> None:
    parser = parser_of(command)
    assert issubclass(parser.formatter_class, HelpFormatter)  # type: ignore[arg-type]
    formatter = parser._get_formatter()
    for action in flags(parser):
        if action.default in (None, False, [], "", argparse.SUPPRESS) or not action.option_strings:
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown.lower(), f"{action.option_strings}: {shown!r}"


def test_output_into_a_closed_pipe_stops_quietly_with_141() -> None:
    """`wattsched ... | head`: the reader went away; no bug report, the status SIGPIPE gives."""
    args = ["plan", "-f", "offline/snapshot.yaml", "-o", "json"]
    process = subprocess.Popen(
        [sys.executable, "-m", "wattsched_cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # before the command writes anything: every write meets a closed pipe
    with process.stderr:
        stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert stderr == ""
