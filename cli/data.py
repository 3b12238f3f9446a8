"""`fedge data stats`: federated data sources (fedge.data does the work)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="federated data sources").add_subparsers(dest="action", required=True)
    _add_stats(data)


def _add_stats(data: argparse._SubParsersAction) -> None:
    from fedge.data import PARTITIONS_HELP, SOURCES_HELP
    from fedge.models import DEFAULT_MODEL

    stats = data.add_parser("stats", help="clients, examples and tokens per client")
    stats.add_argument("--source", default="stdlib", help=SOURCES_HELP)
    stats.add_argument("--partition", default="natural", help=PARTITIONS_HELP)
    stats.add_argument("--clients", type=int, default=None, help="number of clients (iid/dirichlet)")
    stats.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer used to count tokens")
    stats.add_argument("--seed", type=int, default=0)
    stats.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedge.data import DataSourceError, corpus_stats, load_corpus
    from fedge.models import ModelUnavailableError, load_tokenizer

    try:
        corpus = load_corpus(args.source, args.partition, num_clients=args.clients, seed=args.seed)
        tokenizer = load_tokenizer(args.model)
    except (DataSourceError, ModelUnavailableError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    rows = corpus_stats(corpus, tokenizer)
    table = Table(title=f"{args.source} / {args.partition}: {len(rows)} clients (tokens: {args.model})")
    cols = ["client", "train_docs", "train_examples", "train_tokens", "heldout_docs", "heldout_tokens"]
    for col in cols:
        table.add_column(col.replace("_", " "), justify="left" if col == "client" else "right",
                         no_wrap=col == "client")
    for row in rows:
        table.add_row(*(str(row[c]) for c in cols))
    table.add_row("total", *(str(sum(r[c] for r in rows)) for c in cols[1:]), style="bold")
    Console().print(table)
    return 0
