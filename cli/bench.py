"""`fedge bench speculative|kernels|draft-training|serving-load|aggregation|deployment`: benchmarks that print a table
and write JSON."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily
from fedge.cli.outputs import default_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: print a table, write JSON").add_subparsers(
        dest="action", required=True)
    _add_speculative(bench)
    _add_kernels(bench)
    _add_draft_training(bench)
    _add_serving_load(bench)
    _add_aggregation(bench)
    _add_deployment(bench)


def _add_speculative(bench: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    spec_bench = bench.add_parser("speculative", help="target-only vs HF assisted vs fedge speculative")
    spec_bench.add_argument("--target", default=DEFAULT_MODEL)
    spec_bench.add_argument("--draft", default=None,
                            help="comma-separated draft dirs or recipes int4, int8, L12-int4 (default: int4,int8)")
    spec_bench.add_argument("--prompts", type=int, default=6, help="prompts per domain")
    spec_bench.add_argument("--max-new-tokens", type=int, default=64)
    spec_bench.add_argument("--k", default="auto")
    spec_bench.add_argument("--compile", default="on", choices=["on", "off", "env"],
                            help="torch.compile the lean runners (warm-up reported apart; env: FEDGE_COMPILE)")
    spec_bench.add_argument("--json", default=default_output("bench-speculative", "bench-speculative.json"))
    spec_bench.set_defaults(func=run_lazily("fedge.simulations.bench_speculative", output_files=("json",)))


def _add_kernels(bench: argparse._SubParsersAction) -> None:
    kernel_bench = bench.add_parser("kernels", help="kernel vs torch reference: time, GB/s, fraction of peak")
    kernel_bench.add_argument("--json", default=default_output("bench-kernels", "bench-kernels.json"))
    kernel_bench.add_argument("--ops", default="verify,quant,lora,aggregate", help="comma-separated subset")
    kernel_bench.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    kernel_bench.add_argument("--quick", action="store_true", help="fewer and smaller shapes")
    kernel_bench.add_argument("--budget", type=float, default=0.5, help="seconds of timing per function")
    kernel_bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    kernel_bench.set_defaults(func=run_lazily("fedge.simulations.bench_kernels", output_files=("json",)))


def _add_draft_training(bench: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    draft = bench.add_parser("draft-training", help="LoRA trained on the int4 draft vs on the fp32 target: "
                                                    "utility, peak RSS, s/step, speculative acceptance")
    draft.add_argument("--model", default=DEFAULT_MODEL)
    draft.add_argument("--quant", default="int4", choices=["int4", "int8"])
    draft.add_argument("--draft-layers", type=int, default=0, help="also train on a truncated draft of N layers")
    draft.add_argument("--datasets", default="stdlib,gsm8k", help="comma list of stdlib, gsm8k")
    draft.add_argument("--data-dir", default=None, help="holds gsm8k/train.jsonl (default: $FEDGE_DATA_DIR)")
    draft.add_argument("--steps", type=int, default=30, help="local steps (same on every side)")
    draft.add_argument("--batch-size", type=int, default=4)
    draft.add_argument("--seq-len", type=int, default=128)
    draft.add_argument("--lr", type=float, default=3e-3)
    draft.add_argument("--rank", type=int, default=8)
    draft.add_argument("--targets", default="q_proj,v_proj")
    draft.add_argument("--method", default="fedavg", help="which factors train (fedavg: A and B; ffa: B only)")
    draft.add_argument("--eval-examples", type=int, default=32, help="held-out examples per dataset")
    draft.add_argument("--prompts", type=int, default=4, help="prompts per dataset for acceptance")
    draft.add_argument("--max-new-tokens", type=int, default=48)
    draft.add_argument("--threads", type=int, default=2, help="torch threads of each training client")
    draft.add_argument("--loss-chunk-tokens", type=int, default=128, help="tokens per chunk of the head + loss")
    draft.add_argument("--no-gradient-checkpointing", action="store_true",
                       help="keep every layer's activations (both sides; faster, more memory)")
    draft.add_argument("--seed", type=int, default=0)
    draft.add_argument("--quick", action="store_true", help="6 steps, short windows, 2 prompts")
    draft.add_argument("--json", default=default_output("bench-draft-training", "bench-draft-training.json"))
    draft.set_defaults(func=run_lazily("fedge.simulations.bench_draft_training", output_files=("json",)))


def _add_serving_load(bench: argparse._SubParsersAction) -> None:
    load = bench.add_parser("serving-load", help="many phones on one verifier replica: p50/p95 round latency, "
                                                 "peak memory, chunked vs one-shot prefill")
    load.add_argument("--model", default="tiny-random-llama")
    load.add_argument("--phones", type=int, default=64)
    load.add_argument("--rounds", type=int, default=12, help="verify rounds per phone")
    load.add_argument("--k", type=int, default=4, help="drafted tokens per round")
    load.add_argument("--min-prompt", type=int, default=16)
    load.add_argument("--max-prompt", type=int, default=1024)
    load.add_argument("--think-ms", type=float, default=20.0, help="phone drafting time between rounds")
    load.add_argument("--ramp-s", type=float, default=1.0, help="phones start spread over this long")
    load.add_argument("--prefill-chunk", type=int, default=256)
    load.add_argument("--batch-wait-ms", type=float, default=5.0)
    load.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--json", default=default_output("bench-serving-load", "bench-serving-load.json"))
    load.set_defaults(func=run_lazily("fedge.simulations.serving_load", output_files=("json",)))


def _add_aggregation(bench: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    agg = bench.add_parser("aggregation", help="fedavg vs ffa vs fedsvd vs hetlora over seeds and partitions: "
                                               "final perplexity mean and spread, bytes both ways")
    agg.add_argument("--model", default=DEFAULT_MODEL)
    agg.add_argument("--methods", default="fedavg,ffa,fedsvd,hetlora")
    agg.add_argument("--partitions", default="natural,dirichlet:0.1")
    agg.add_argument("--seeds", default="0,1,2")
    agg.add_argument("--data", default="stdlib")
    agg.add_argument("--rounds", type=int, default=20)
    agg.add_argument("--clients", type=int, default=6)
    agg.add_argument("--clients-per-round", type=int, default=2)
    agg.add_argument("--steps", type=int, default=1, help="local steps per round")
    agg.add_argument("--batch-size", type=int, default=2)
    agg.add_argument("--seq-len", type=int, default=32)
    agg.add_argument("--lr", type=float, default=3e-3)
    agg.add_argument("--rank", type=int, default=8)
    agg.add_argument("--eval-examples", type=int, default=8, help="held-out windows per client per round")
    agg.add_argument("--client-model", default="target", choices=["target", "draft"])
    agg.add_argument("--json", default=default_output("bench-aggregation", "bench-aggregation.json"))
    agg.add_argument("--resume", action="store_true",
                     help="reuse the (partition, seed) runs of --json's partial file (or the report itself) made "
                          "with the same settings: continue a killed grid, or add a partition to a report")
    agg.set_defaults(func=run_lazily("fedge.simulations.bench_aggregation", output_files=("json",)))


def _add_deployment(bench: argparse._SubParsersAction) -> None:
    dep = bench.add_parser("deployment", help="round time on Flower's deployment engine (SuperLink + SuperNodes "
                                              "on loopback) vs the simulation: no-op and 1-step rounds")
    dep.add_argument("--devices", type=int, default=3)
    dep.add_argument("--noop-rounds", type=int, default=4)
    dep.add_argument("--rounds", type=int, default=3, help="1-step training rounds")
    dep.add_argument("--model", default="tiny-random-llama")
    dep.add_argument("--client-model", default="target", choices=["target", "draft"])
    dep.add_argument("--data", default="stdlib")
    dep.add_argument("--seq-len", type=int, default=32)
    dep.add_argument("--variants", default="flower,poll,warm,preload",
                     help="deployment set-ups, in order (flower: Flower's own SuperNode and SuperExec; poll: "
                          "fedge.edge.supernode's shorter poll; warm: + the fork SuperExec; preload: + the model)")
    dep.add_argument("--poll-interval", type=float, default=0.25, help="fedge.edge.supernode's idle poll, seconds")
    dep.add_argument("--json", default=default_output("bench-deployment", "bench-deployment.json"))
    dep.set_defaults(func=run_lazily("fedge.simulations.bench_deployment", output_files=("json",)))
