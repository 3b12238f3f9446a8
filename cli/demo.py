"""`fedge demo`: the whole phone-plus-server scenario, with a report (fedge.simulations.demo runs it)."""

from __future__ import annotations

import argparse

from fedge.cli.outputs import RUNS_ROOT


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL
    from fedge.simulations.demo import DemoConfig

    d = DemoConfig()
    demo = subparsers.add_parser("demo", help="the whole phone-plus-server scenario, with a report")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--phones", type=int, default=8)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--steps", type=int, default=d.steps, help="local LoRA steps per phone per round")
    demo.add_argument("--lr", type=float, default=d.lr, help="the phones' AdamW learning rate (FFA: B only)")
    demo.add_argument("--epsilon", "--dp-epsilon", dest="epsilon", type=float, default=d.epsilon,
                      help="client-level DP budget for the whole run (0 = off, the default)")
    demo.add_argument("--delta", type=float, default=d.delta)
    demo.add_argument("--clip", type=float, default=d.clip, help="L2 clip of one phone's update (DP only)")
    demo.add_argument("--rtt-ms", type=float, default=40.0)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=str(RUNS_ROOT), help="the run directory is created under this")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from fedge.simulations.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler already
    run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}))
    return 0
