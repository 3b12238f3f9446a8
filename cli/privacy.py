"""`fedge privacy dp|secagg-time`: privacy experiments (DP vs attacks, secure-aggregation cost)."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily
from fedge.cli.outputs import default_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fedge.simulations.privacy_args import add_privacy_arguments

    privacy = subparsers.add_parser("privacy", help="privacy experiments: DP vs attacks, secure-aggregation cost")
    privacy_sub = privacy.add_subparsers(dest="action", required=True)
    add_privacy_arguments(privacy_sub)
    for name, experiment in privacy_sub.choices.items():
        experiment.set_defaults(json=default_output(f"privacy-{name}", f"privacy-{name}.json"))
    privacy.set_defaults(func=run_lazily("fedge.simulations.privacy", output_files=("json",)))
