"""Handlers that import their module only when the command runs (keeps `fedge --help` fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def run_lazily(module: str, function: str = "main") -> Callable[[argparse.Namespace], int]:
    """A handler that imports `module` and calls `module.function(args)` only when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), function)(args) or 0)

    return handler
