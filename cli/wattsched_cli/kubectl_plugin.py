"""`wattsched install-kubectl-plugin [--dir DIR]`: make `kubectl wattsched ...` run `wattsched ...`.

kubectl runs any executable named `kubectl-<name>` on PATH as `kubectl <name>`. The project keeps
one distribution and one console script (`wattsched`), so instead of a second console script this
writes a two-line shim, `kubectl-wattsched`, that runs this interpreter's `wattsched` with the same
arguments (`kubectl wattsched status` is `wattsched status`). By default it goes beside the
`wattsched` script (the environment's scripts folder, already on PATH where `wattsched` is); with
`--dir` anywhere else on PATH. Not for: anything kubectl-specific beyond the name.
"""

from __future__ import annotations

import argparse
import os
import shlex
import stat
import sys
import sysconfig
from pathlib import Path

from wattsched_api.commandline import EXIT_FAILED, CommandParser

SHIM_NAME = "kubectl-wattsched"


def shim_text(python: str) -> str:
    """The shim: runs the `wattsched` CLI with `python`, passing every argument on."""
    return (
        "#!/bin/sh\n"
        "# kubectl plugin written by `wattsched install-kubectl-plugin`: "
        "`kubectl wattsched ARGS` runs `wattsched ARGS`.\n"
        f'exec {shlex.quote(python)} -m wattsched_cli.main "$@"\n'
    )


def install(directory: Path, python: str = sys.executable) -> Path:
    """Write the shim into `directory` (created if missing), executable; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SHIM_NAME
    path.write_text(shim_text(python), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="wattsched install-kubectl-plugin",
        description="Write the kubectl plugin shim `kubectl-wattsched`, so that "
        "`kubectl wattsched status` runs `wattsched status`.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(sysconfig.get_path("scripts")),
        help="folder to write the shim into; it must be on PATH for kubectl to find it",
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    try:
        path = install(args.dir)
    except OSError as error:
        print(
            f"wattsched install-kubectl-plugin: cannot write {args.dir / SHIM_NAME}: "
            f"{error.strerror}; pass --dir with a writable folder on PATH",
            file=sys.stderr,
        )
        return EXIT_FAILED
    on_path = str(args.dir.resolve()) in {
        str(Path(p).resolve()) for p in os.environ.get("PATH", "").split(os.pathsep) if p
    }
    print(f"wrote {path}")
    if not on_path:
        print(f"{args.dir} is not on PATH: add it, or kubectl will not find the plugin")
    print("try: kubectl wattsched status   (kubectl plugin list shows it)")
    return 0
