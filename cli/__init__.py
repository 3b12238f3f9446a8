"""The `fedge` command line. Each subcommand imports its heavy modules only when it runs."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_models_list(args: argparse.Namespace) -> int:
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


def _cmd_models_pull(args: argparse.Namespace) -> int:
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


def _cmd_data_stats(args: argparse.Namespace) -> int:
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


def _run(module: str, function: str = "main"):
    """A handler that imports `module` only when its command runs (keeps `fedge --help` fast)."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), function)(args) or 0)

    return handler


def build_parser() -> argparse.ArgumentParser:
    from fedge.data import PARTITIONS_HELP, SOURCES_HELP
    from fedge.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="fedge", description="federated and edge-cloud language models")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="registered models and whether they are cached").set_defaults(
        func=_cmd_models_list)
    pull = models.add_parser("pull", help="fetch (or build) a model into the cache and load it once")
    pull.add_argument("name")
    pull.set_defaults(func=_cmd_models_pull)

    data = sub.add_parser("data", help="federated data sources").add_subparsers(dest="action", required=True)
    stats = data.add_parser("stats", help="clients, examples and tokens per client")
    stats.add_argument("--source", default="stdlib", help=SOURCES_HELP)
    stats.add_argument("--partition", default="natural", help=PARTITIONS_HELP)
    stats.add_argument("--clients", type=int, default=None, help="number of clients (iid/dirichlet)")
    stats.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer used to count tokens")
    stats.add_argument("--seed", type=int, default=0)
    stats.set_defaults(func=_cmd_data_stats)

    draft = sub.add_parser("draft", help="compressed drafts").add_subparsers(dest="action", required=True)
    build = draft.add_parser("build", help="derive a draft from a target: keep layers, quantise, distil")
    build.add_argument("--target", default=DEFAULT_MODEL)
    build.add_argument("--keep-layers", type=int, default=None, help="first N decoder layers (default: all)")
    build.add_argument("--quant", choices=["none", "int8", "int4"], default="int4")
    build.add_argument("--group-size", type=int, default=32, help="int4 group size along the input dim")
    build.add_argument("--distill-steps", type=int, default=0)
    build.add_argument("--data", default="stdlib", help=f"distillation text: {SOURCES_HELP}")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True)
    build.set_defaults(func=_run("fedge.simulations.generate", "main_build"))

    gen = sub.add_parser("generate", help="speculative generation, draft and target in this process")
    gen.add_argument("--target", default=DEFAULT_MODEL)
    gen.add_argument("--draft", required=True, help="a directory made by `fedge draft build`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--k", default="auto", help="draft length per round: auto or N")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_run("fedge.simulations.generate", "main_generate"))

    bench = sub.add_parser("bench", help="benchmarks: print a table, write JSON").add_subparsers(
        dest="action", required=True)
    spec_bench = bench.add_parser("speculative", help="target-only vs HF assisted vs fedge speculative")
    spec_bench.add_argument("--target", default=DEFAULT_MODEL)
    spec_bench.add_argument("--draft", default=None,
                            help="comma-separated draft dirs or recipes int4, int8, L12-int4 (default: int4,int8)")
    spec_bench.add_argument("--prompts", type=int, default=6, help="prompts per domain")
    spec_bench.add_argument("--max-new-tokens", type=int, default=64)
    spec_bench.add_argument("--k", default="auto")
    spec_bench.add_argument("--json", default="bench-speculative.json")
    spec_bench.set_defaults(func=_run("fedge.simulations.bench_speculative"))
    kernel_bench = bench.add_parser("kernels", help="kernel vs torch reference: time, GB/s, fraction of peak")
    kernel_bench.add_argument("--json", default="bench-kernels.json")
    kernel_bench.add_argument("--ops", default="verify,quant,lora,aggregate", help="comma-separated subset")
    kernel_bench.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    kernel_bench.add_argument("--quick", action="store_true", help="fewer and smaller shapes")
    kernel_bench.add_argument("--budget", type=float, default=0.5, help="seconds of timing per function")
    kernel_bench.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    kernel_bench.set_defaults(func=_run("fedge.simulations.bench_kernels"))

    certs = sub.add_parser("certs", help="TLS certificates and device identities").add_subparsers(
        dest="action", required=True)
    certs_create = certs.add_parser("create", help="CA, server cert, per-device client certs, adapter-signing key")
    certs_create.add_argument("--out", required=True, help="directory to write (an existing CA there is reused)")
    certs_create.add_argument("--devices", default="", help="comma-separated device ids, e.g. phone-1,laptop-2")
    certs_create.add_argument("--num-devices", type=int, default=0, help="also create PREFIX-0 .. PREFIX-(N-1)")
    certs_create.add_argument("--device-prefix", default="device")
    certs_create.add_argument("--hosts", default="localhost,127.0.0.1", help="server certificate names/addresses")
    certs_create.add_argument("--days", type=int, default=825)
    certs_create.add_argument("--overwrite", action="store_true", help="replace an existing CA and keys")
    certs_create.set_defaults(func=_run("fedge.simulations.certs"))

    simulate = sub.add_parser("simulate", help="simulations: federated fine-tuning, phones").add_subparsers(
        dest="action", required=True)
    from fedge.simulations.federated import add_arguments as add_federated_arguments

    fed_sim = simulate.add_parser("federated", help="federated LoRA on Flower + Ray (LoRA-aware aggregation)")
    add_federated_arguments(fed_sim)
    fed_sim.set_defaults(func=_run("fedge.simulations.federated"))

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
    phones.set_defaults(func=_run("fedge.simulations.phones"))

    cloud = sub.add_parser("cloud", help="the cloud coordinator").add_subparsers(dest="action", required=True)
    serve = cloud.add_parser("serve", help="Ray + Ray Serve verifier (batched) behind a gRPC ingress")
    serve.add_argument("--model", default=DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    serve.add_argument("--replicas", type=int, default=1, help="verifier replicas; sessions stick to theirs")
    serve.add_argument("--threads", type=int, default=0, help="torch threads per replica (0 = all cores)")
    serve.add_argument("--max-sessions", type=int, default=64, help="per replica")
    serve.add_argument("--max-draft-len", type=int, default=16)
    serve.add_argument("--max-batch", type=int, default=32, help="rounds in one target forward")
    serve.add_argument("--batch-wait-ms", type=float, default=30.0,
                       help="at most this long a round waits for other active sessions' rounds to share a forward")
    serve.add_argument("--idle-timeout-s", type=float, default=300.0)
    serve.add_argument("--max-message-bytes", type=int, default=1 << 20)
    serve.add_argument("--adapters", default=None, help="adapter registry dir (one sub-dir per version)")
    serve.set_defaults(func=_run("fedge.cloud.serve"))

    edge = sub.add_parser("edge", help="the edge device").add_subparsers(dest="action", required=True)
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
    edge_gen.set_defaults(func=_run("fedge.edge.client"))

    privacy = sub.add_parser("privacy", help="privacy experiments: DP vs attacks, secure-aggregation cost")
    privacy_sub = privacy.add_subparsers(dest="action", required=True)
    from fedge.simulations.privacy_args import add_privacy_arguments

    add_privacy_arguments(privacy_sub)
    privacy.set_defaults(func=_run("fedge.simulations.privacy"))

    demo = sub.add_parser("demo", help="the whole phone-plus-server scenario, with a report")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--phones", type=int, default=8)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--steps", type=int, default=4, help="local LoRA steps per phone per round")
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--epsilon", type=float, default=8.0, help="DP budget for the whole run")
    demo.add_argument("--delta", type=float, default=1e-3)
    demo.add_argument("--clip", type=float, default=0.5, help="L2 clip of one phone's update")
    demo.add_argument("--rtt-ms", type=float, default=40.0)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs", help="the run directory is created under this")
    demo.set_defaults(func=_run("fedge.simulations.demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the output that matters
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
