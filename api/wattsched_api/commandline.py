"""What every `wattsched` subcommand shares on the command line: exit codes, the argument parser,
help formatting, the error a command raises to stop with one line, and its text tables.

Exit codes (README "Command line" lists them; every subcommand keeps to them):

- 0 done;
- 1 failed: the command ran and could not finish (an unexpected error is reported as one line too);
- 2 bad usage or input: a flag, a file, an object's field;
- 3 the cluster cannot be used: no or bad kubeconfig, API server unreachable, credentials refused;
- 4 not found: a named object does not exist, or the CRD it needs is not installed.

Standard library only, so the agent and the simulator use it without loading the operator's
dependencies. Not for: turning Kubernetes client exceptions into lines (the dispatcher in `cli`
does that, where importing the client is fine).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CLUSTER = 3
EXIT_NOT_FOUND = 4

# A message longer than this is cut: one line on a terminal, never a response body.
MAX_MESSAGE_CHARS = 400


def one_line(text: object) -> str:
    """`text` as one line: whitespace runs collapsed, cut at MAX_MESSAGE_CHARS."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


class CommandError(Exception):
    """Stops a subcommand with one line on stderr (`wattsched <command>: <message>`) and
    `exit_code`. The message says what failed and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


# Help that already states its default: "(default: ...)", "(default 60)", "..., default X".
STATED_DEFAULT = re.compile(r"\(default\b|\bdefault:|, default \S", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default after its help, unless the help already states it or there is
    nothing to show (no default, an empty one, a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            STATED_DEFAULT.search(text)
            or action.default in (None, False, [], "", argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line naming the flag and where the options
    are listed, with exit code EXIT_USAGE; help shows defaults (HelpFormatter)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {one_line(message)} (see `{self.prog} --help`)\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """`rows` under `headers` as text lines: columns left-aligned, two spaces apart."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines
