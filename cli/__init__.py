"""The `fedge` command line: one module per command group, each registering its subcommands.

The package only parses arguments and calls library functions. Every handler imports its heavy modules
(torch, transformers, Ray, Flower) when it runs, never at parse time, so `fedge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from fedge.cli import bench, certs, cloud, data, demo, draft, edge, federation, models, privacy, simulate

GROUPS = (models, data, draft, bench, certs, simulate, cloud, edge, privacy, demo, federation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedge", description="federated and edge-cloud language models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the output that matters
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
