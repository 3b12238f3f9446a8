"""`fedge privacy dp|secagg-time`: privacy experiments (DP vs attacks, secure-aggregation cost).

Options default to the experiments' dataclasses (`fedge.simulations.privacy.DPExperiment`,
`SecAggTimeExperiment`); the handlers build one, run it, print its table and write JSON + plot.
"""

from __future__ import annotations

import argparse
import dataclasses

from fedge.cli.outputs import default_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    privacy = subparsers.add_parser("privacy", help="privacy experiments: DP vs attacks, secure-aggregation cost")
    privacy_sub = privacy.add_subparsers(dest="action", required=True)
    _add_dp(privacy_sub)
    _add_secagg_time(privacy_sub)


def _add_dp(sub: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    dp = sub.add_parser("dp", help="membership inference, canary exposure, utility vs epsilon (DP + secagg)")
    dp.add_argument("--model", default=DEFAULT_MODEL)
    dp.add_argument("--epsilons", default="inf,8,4,1")
    dp.add_argument("--delta", type=float, default=1e-3, help="below 1/number of clients")
    dp.add_argument("--clip", type=float, default=0.01, help="client update L2 clip norm C (under DP)")
    dp.add_argument("--clients", type=int, default=5, help="all of them train every round")
    dp.add_argument("--rounds", type=int, default=3)
    dp.add_argument("--steps", type=int, default=6, help="local steps per round")
    dp.add_argument("--batch-size", type=int, default=4)
    dp.add_argument("--seq-len", type=int, default=64)
    dp.add_argument("--lr", type=float, default=2e-2)
    dp.add_argument("--rank", type=int, default=8)
    dp.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    dp.add_argument("--examples-per-client", type=int, default=32, help="short documents each client trains on")
    dp.add_argument("--nonmembers-per-client", type=int, default=48, help="same-family documents nobody trains on")
    dp.add_argument("--doc-chars", type=int, default=120, help="document length in characters")
    dp.add_argument("--canary-repeats", type=int, default=6, help="documents of one client the secret tops")
    dp.add_argument("--candidates", type=int, default=255, help="random secrets the canary is ranked among")
    dp.add_argument("--client-model", default="target", choices=["target", "draft"])
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--json", default=default_output("privacy-dp", "privacy-dp.json"))
    dp.set_defaults(func=_dp)


def _add_secagg_time(sub: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    t = sub.add_parser("secagg-time", help="secure-aggregation vs plain round time at 0/10/30%% dropout")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--clients", type=int, default=10, help="all of them are sampled every round")
    t.add_argument("--partition", default="iid")
    t.add_argument("--repeats", type=int, default=3, help="one-round runs per dropout and mode")
    t.add_argument("--dropouts", default="0,0.1,0.3")
    t.add_argument("--steps", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--seq-len", type=int, default=32)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--targets", default="q_proj,v_proj")
    t.add_argument("--client-model", default="target", choices=["target", "draft"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", default=default_output("privacy-secagg-time", "privacy-secagg-time.json"))
    t.set_defaults(func=_secagg_time)


def _fields(args: argparse.Namespace, cls) -> dict:
    """The options that are fields of the experiment dataclass `cls`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _dp(args: argparse.Namespace) -> int:
    from fedge.simulations.privacy import DPExperiment, run_dp_experiment
    from fedge.simulations.privacy_report import print_dp

    def run():
        return run_dp_experiment(DPExperiment(**{**_fields(args, DPExperiment), "epsilons": _floats(args.epsilons)}))

    return _run(args, run, print_dp)


def _secagg_time(args: argparse.Namespace) -> int:
    from fedge.simulations.privacy_report import print_time
    from fedge.simulations.privacy_secagg_time import SecAggTimeExperiment, run_secagg_time

    def run():
        fields = {**_fields(args, SecAggTimeExperiment), "dropouts": _floats(args.dropouts)}
        return run_secagg_time(SecAggTimeExperiment(**fields))

    return _run(args, run, print_time)


def _run(args: argparse.Namespace, run, show) -> int:
    import logging
    import sys
    from pathlib import Path

    from fedge.simulations.privacy import write_report

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    try:
        report = run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    show(report)
    plot_path = write_report(report, Path(args.json))
    print(f"wrote {args.json} and {plot_path}")
    return 0
