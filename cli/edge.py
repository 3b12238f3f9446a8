"""`fedge edge generate`: draft on the device, verify in the cloud, keep going offline."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    edge = subparsers.add_parser("edge", help="the edge device").add_subparsers(dest="action", required=True)
    _add_generate(edge)


def _add_generate(edge: argparse._SubParsersAction) -> None:
    edge_gen = edge.add_parser("generate", help="draft here, verify in the cloud (keeps going offline)")
    edge_gen.add_argument("--server", default="127.0.0.1:50051")
    edge_gen.add_argument("--draft", required=True, help="a directory made by `fedge draft build`")
    edge_gen.add_argument("--prompt", required=True)
    edge_gen.add_argument("--max-new-tokens", type=int, default=64)
    edge_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    edge_gen.add_argument("--top-k", type=int, default=0)
    edge_gen.add_argument("--top-p", type=float, default=1.0)
    edge_gen.add_argument("--k", default="auto", help="draft length per round: auto or N")
    edge_gen.add_argument("--k-max", type=int, default=8)
    edge_gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    edge_gen.add_argument("--seed", type=int, default=0)
    edge_gen.add_argument("--reconcile-wait-s", type=float, default=10.0,
                          help="at the end, how long to wait for a lost cloud to verify the offline tail")
    edge_gen.add_argument("--rtt-ms", type=float, default=0.0, help="emulated network (testing)")
    edge_gen.add_argument("--jitter-ms", type=float, default=0.0)
    edge_gen.add_argument("--bandwidth-mbps", type=float, default=0.0)
    edge_gen.add_argument("--loss", type=float, default=0.0)
    edge_gen.set_defaults(func=run_lazily("fedge.edge.client"))
