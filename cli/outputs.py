"""Where commands write by default: `runs/<command>-YYYYmmdd-HHMMSS/`, never the working tree's top.

Parsers use `default_output` / `run_dir` for the defaults of their `--out` / `--json` options, so a
bare `fedge bench kernels` leaves nothing untracked beside the sources (`runs/` is git-ignored). One
timestamp per process keeps a command's files in one directory. Directories are created only when a
command runs (`make_parent_dirs`), not when a parser is built, so `--help` writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

RUNS_ROOT = Path("runs")


@functools.cache
def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_dir(command: str) -> Path:
    """`runs/<command>-YYYYmmdd-HHMMSS`: this process's directory for `command` (e.g. "bench-kernels")."""
    return RUNS_ROOT / f"{command}-{_stamp()}"


def default_output(command: str, filename: str) -> str:
    """The default of a file option: `filename` inside `run_dir(command)`."""
    return str(run_dir(command) / filename)


def make_parent_dirs(args: argparse.Namespace, *file_options: str) -> None:
    """Create the directories the files named by `args.<option>` go into (called when a command runs)."""
    for option in file_options:
        path = getattr(args, option, None)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_dirs(args: argparse.Namespace, *dir_options: str) -> None:
    """Create the directories named by `args.<option>` (called when a command runs)."""
    for option in dir_options:
        path = getattr(args, option, None)
        if path:
            Path(path).mkdir(parents=True, exist_ok=True)
