"""Handlers that import their module only when the command runs (keeps `fedge --help` fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fedge.cli.outputs import make_parent_dirs


def run_lazily(module: str, function: str = "main", *,
               output_files: tuple[str, ...] = ()) -> Callable[[argparse.Namespace], int]:
    """A handler that imports `module` and calls `module.function(args)` only when its command runs.

    `output_files` names the options holding files the command writes; their directories are created first.
    """

    def handler(args: argparse.Namespace) -> int:
        import importlib

        make_parent_dirs(args, *output_files)
        return int(getattr(importlib.import_module(module), function)(args) or 0)

    return handler
