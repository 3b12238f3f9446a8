"""`fedge models list|pull`: the model registry (fedge.models does the work)."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="the model registry").add_subparsers(dest="action", required=True)
    _add_list(models)
    _add_pull(models)


def _add_list(models: argparse._SubParsersAction) -> None:
    models.add_parser("list", help="registered models and whether they are cached").set_defaults(func=_list)


def _add_pull(models: argparse._SubParsersAction) -> None:
    pull = models.add_parser("pull", help="fetch (or build) a model into the cache and load it once")
    pull.add_argument("name")
    pull.set_defaults(func=_pull)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedge.models import describe_models

    table = Table(title="fedge models")
    for col in ("name", "cached", "description"):
        table.add_column(col)
    for row in describe_models():
        table.add_row(row["name"], "yes" if row["cached"] else "no", row["description"])
    Console().print(table)
    print("Any Hugging Face causal LM path or id is accepted wherever a model name is.")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from fedge.models import REGISTRY, ModelUnavailableError, load_model, resolve_model

    if args.name not in REGISTRY:
        print(f"fedge: unknown model {args.name!r}; known: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        path = resolve_model(args.name)
        fetched = time.perf_counter() - start
        start = time.perf_counter()
        model, _ = load_model(args.name)
        loaded = time.perf_counter() - start
    except ModelUnavailableError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {path}")
    print(f"  parameters: {n_params / 1e6:.1f}M; fetch/build: {fetched:.1f} s; "
          f"load from cache: {loaded:.1f} s")
    return 0
