"""`fedge simulate federated|phones`: federated fine-tuning and phones against a real cloud."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    simulate = subparsers.add_parser("simulate", help="simulations: federated fine-tuning, phones").add_subparsers(
        dest="action", required=True)
    _add_federated(simulate)
    _add_phones(simulate)


def _add_federated(simulate: argparse._SubParsersAction) -> None:
    from fedge.simulations.federated import add_arguments as add_federated_arguments

    fed_sim = simulate.add_parser("federated", help="federated LoRA on Flower + Ray (LoRA-aware aggregation)")
    add_federated_arguments(fed_sim)
    fed_sim.set_defaults(func=run_lazily("fedge.simulations.federated"))


def _add_phones(simulate: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    phones = simulate.add_parser("phones", help="N phones against a real `fedge cloud serve`: cloud-only vs "
                                                "edge-assisted, cloud CPU-seconds per token")
    phones.add_argument("--phones", type=int, default=8)
    phones.add_argument("--rtt-ms", type=float, default=40.0)
    phones.add_argument("--jitter-ms", type=float, default=5.0)
    phones.add_argument("--bandwidth-mbps", type=float, default=20.0)
    phones.add_argument("--loss", type=float, default=0.0, help="per-message loss probability (TCP retransmit)")
    phones.add_argument("--model", default=DEFAULT_MODEL)
    phones.add_argument("--draft", default=None, help="draft dir (default: build a full-depth int4 draft)")
    phones.add_argument("--max-new-tokens", type=int, default=48)
    phones.add_argument("--k-max", type=int, default=8)
    phones.add_argument("--port", type=int, default=0, help="cloud port (0 = pick a free one)")
    phones.add_argument("--server", default=None, help="use a running cloud at HOST:PORT instead of starting one "
                                                       "(its CPU is then read from its Health reply)")
    phones.add_argument("--no-reference", action="store_true", help="skip the local target greedy reference")
    phones.add_argument("--cloud-batch-wait-ms", type=float, default=200.0,
                        help="the started cloud's --batch-wait-ms (how long rounds wait for each other)")
    phones.add_argument("--adapters", default=None, help="adapter registry dir the started cloud serves")
    phones.add_argument("--adapter-version", default="", help="sessions use this served adapter version")
    phones.add_argument("--json", default="simulate-phones.json")
    phones.set_defaults(func=run_lazily("fedge.simulations.phones"))
