"""`fedge bench speculative|kernels`: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse

from fedge.cli._lazy import run_lazily
from fedge.cli.outputs import default_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: print a table, write JSON").add_subparsers(
        dest="action", required=True)
    _add_speculative(bench)
    _add_kernels(bench)


def _add_speculative(bench: argparse._SubParsersAction) -> None:
    from fedge.models import DEFAULT_MODEL

    spec_bench = bench.add_parser("speculative", help="target-only vs HF assisted vs fedge speculative")
    spec_bench.add_argument("--target", default=DEFAULT_MODEL)
    spec_bench.add_argument("--draft", default=None,
                            help="comma-separated draft dirs or recipes int4, int8, L12-int4 (default: int4,int8)")
    spec_bench.add_argument("--prompts", type=int, default=6, help="prompts per domain")
    spec_bench.add_argument("--max-new-tokens", type=int, default=64)
    spec_bench.add_argument("--k", default="auto")
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
