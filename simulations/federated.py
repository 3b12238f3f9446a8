"""`fedge simulate federated`: federated LoRA on Flower's simulation engine with the Ray backend.

Per round: global held-out loss/perplexity (the global adapter on every client's held-out text, on
the full-precision model), per-client loss (global, and personalised for that round's clients),
the worst client, bytes up and down, rejected clients with reasons. At the end: centralised LoRA on
the pooled data (the same number of optimiser steps, rounds x local steps, with the round's total
batch) and local-only training, the global adapter in peft format, a JSON report and a plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from fedge.cloud.federated_config import FederatedConfig
from fedge.peft_methods.config import METHODS

log = logging.getLogger("fedge.federated")


def backend_config(config: FederatedConfig) -> dict:
    """Ray backend settings. Flower's default asks 2 CPUs per client, which on a 2-core machine
    gives one actor and serialises every client; one CPU (one torch thread) per client runs as
    many actors as cores."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": config.threads_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": False},
    }


def run_federated(config: FederatedConfig, corpus, on_round=None, summation=None, grid_wrapper=None,
                  client_app=None):
    """Run one federated simulation; returns the FederatedResult (raises what the ServerApp raised)."""
    from flwr.simulation import run_simulation

    from fedge.cloud.federated_server import FederatedRun
    from fedge.edge.federated_client import app as default_client_app

    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients))
    kwargs = {"summation": summation} if summation is not None else {}
    run = FederatedRun(config, corpus, on_round=on_round, grid_wrapper=grid_wrapper, **kwargs)
    # the client runtime is rebuilt from these in every Ray actor, and must describe the same corpus
    run_simulation(server_app=run.server_app(), client_app=client_app or default_client_app,
                   num_supernodes=config.num_clients, backend_name="ray", backend_config=backend_config(config),
                   verbose_logging=False)
    if run.error is not None:
        raise run.error
    if not run.result.final_state:
        raise RuntimeError("the federated simulation ended without a result (see the log above)")
    return run.result, config


# ---------------------------------------------------------------- baselines


def _eval_loss(adapted, windows_by_client: dict, pad_id: int) -> tuple[float, dict]:
    from fedge.peft_methods.adapters import mean_token_loss

    losses, tokens = {}, {}
    for name, windows in windows_by_client.items():
        if windows:
            losses[name] = mean_token_loss(adapted.model, windows, pad_id)
            tokens[name] = sum(len(w) - 1 for w in windows)
    total = sum(tokens.values())
    return sum(losses[n] * tokens[n] for n in losses) / total, losses


def baselines(config: FederatedConfig, corpus, local_only_clients: int, console) -> dict:
    """Centralised LoRA on pooled data, and local-only LoRA per client (same steps as the run)."""
    from fedge.edge.lora_trainer import LocalTrainConfig, train_local
    from fedge.peft_methods.adapters import AdaptedModel, eval_windows, pad_token_id

    adapted = AdaptedModel(config.model, config.adapter_spec)
    tok = adapted.tokenizer
    pad_id = pad_token_id(tok)
    init = adapted.get_state()
    windows = {c.name: eval_windows(c.heldout, tok, config.eval_examples, config.seq_len) for c in corpus.clients}
    steps = config.rounds * config.steps
    out = {}
    start = time.perf_counter()
    central = LocalTrainConfig(steps=steps, batch_size=config.batch_size * config.clients_per_round,
                               seq_len=config.seq_len, lr=config.lr)
    with console.status(f"centralised LoRA: {steps} steps x batch {central.batch_size} on pooled data") as status:
        train_local(adapted, corpus.pooled_train(), config.rank, lambda k: True, central,
                    seed=(config.seed, "central"),
                    progress=lambda s, loss: status.update(f"centralised LoRA: step {s}/{steps} loss {loss:.3f}"))
    loss, per_client = _eval_loss(adapted, windows, pad_id)
    out.update(centralized_loss=loss, centralized_perplexity=math.exp(loss),
               centralized_worst_client_perplexity=math.exp(max(per_client.values())),
               centralized_client_loss=per_client, centralized_steps=steps, centralized_batch_size=central.batch_size,
               centralized_s=time.perf_counter() - start)
    # local-only: each client alone, from the same init, the same number of steps
    start = time.perf_counter()
    names = [c.name for c in corpus.clients if c.heldout]
    chosen = sorted(random.Random(f"local-only:{config.seed}").sample(names, min(local_only_clients, len(names))))
    local = LocalTrainConfig(steps=steps, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr)
    losses = {}
    for i, client in enumerate(c for c in corpus.clients if c.name in chosen):
        adapted.set_state(init)
        with console.status(f"local-only {i + 1}/{len(chosen)} ({client.name}): {steps} steps") as status:
            train_local(adapted, client.train, config.rank, lambda k: True, local,
                        seed=(config.seed, "local", client.name),
                        progress=lambda s, loss, n=client.name: status.update(
                            f"local-only {n}: step {s}/{steps} loss {loss:.3f}"))
        loss, _ = _eval_loss(adapted, {client.name: windows[client.name]}, pad_id)
        losses[client.name] = loss
    mean_loss = sum(losses.values()) / max(1, len(losses))  # each client counts once
    out.update(local_only_loss=mean_loss, local_only_perplexity=math.exp(mean_loss),
               local_only_clients=chosen, local_only_client_loss=losses, local_only_s=time.perf_counter() - start)
    return out


# ---------------------------------------------------------------- report


def method_report(config: FederatedConfig, result, base: dict) -> dict:
    from fedge.cloud.federated_server import overhead_s_per_round

    records = result.records
    final = records[-1]
    trained = [r for r in records if r["round"] > 0]
    bytes_up = [r["bytes_up_per_client"] for r in trained]
    report = {
        "method": config.method,
        "strategy": config.strategy,
        "final_loss": final["global_loss"],
        "final_perplexity": final["global_perplexity"],
        "initial_perplexity": records[0]["global_perplexity"] if records[0]["round"] == 0 else None,
        "worst_client_perplexity": final["worst_client_perplexity"],
        "worst_client": final["worst_client"],
        "bytes_up_per_client_round": sum(bytes_up) / max(1, len(bytes_up)),
        "bytes_down_per_client_round": sum(r["bytes_down_per_client"] for r in trained) / max(1, len(trained)),
        "model_bytes": result.model_bytes,
        "overhead_s_per_round": overhead_s_per_round(result.overhead_rounds_s),
        "noop_rounds_s": result.overhead_rounds_s,
        "discovery_s": result.discovery_s,
        "resumed_from_round": result.resumed_from,
        "rejected": sum(len(r.get("rejected", [])) for r in trained),
        "rounds": records,
        "config": asdict(config),
    }
    report["bytes_up_fraction_of_model"] = report["bytes_up_per_client_round"] / max(1, result.model_bytes)
    errors = [r["aggregation_error"] for r in trained if r.get("aggregation_error") is not None]
    report["aggregation_error_mean"] = sum(errors) / len(errors) if errors else None
    report.update({k: v for k, v in base.items() if not k.endswith("_s")})
    return report


def compare_on_local_only_clients(report: dict, base: dict) -> None:
    """Local-only adapters are evaluated on their own clients only: put the global adapter, the
    initial model and centralised LoRA on the same clients (mean loss per client) beside them."""
    chosen = base.get("local_only_clients")
    if not chosen:
        return
    first, last = report["rounds"][0]["client_loss"], report["rounds"][-1]["client_loss"]
    if not all(c in last for c in chosen):
        return

    def ppl(losses: dict) -> float:
        return math.exp(sum(losses[c] for c in chosen) / len(chosen))

    report["local_only_clients_final_perplexity"] = ppl(last)
    if report["rounds"][0]["round"] == 0:
        report["local_only_clients_initial_perplexity"] = ppl(first)
    if "centralized_client_loss" in base:
        report["local_only_clients_centralized_perplexity"] = ppl(base["centralized_client_loss"])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def round_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['method']} ({report['strategy']}): per round")
    for col in ("round", "global ppl", "worst client ppl", "personal ppl (mean)", "bytes up/client",
                "bytes down/client", "rejected", "train s"):
        table.add_column(col, justify="right")
    for r in report["rounds"]:
        personal = list(r.get("personal_loss", {}).values())
        table.add_row(str(r["round"]), f"{r['global_perplexity']:.3f}", f"{r['worst_client_perplexity']:.3f}",
                      f"{math.exp(sum(personal) / len(personal)):.3f}" if personal else "-",
                      _fmt_bytes(r.get("bytes_up_per_client", 0)) if r["round"] else "-",
                      _fmt_bytes(r.get("bytes_down_per_client", 0)) if r["round"] else "-",
                      str(len(r.get("rejected", []))), f"{r.get('train_s', 0):.1f}" if r["round"] else "-")
    return table


def summary_table(reports: list[dict]):
    from rich.table import Table

    table = Table(title="federated LoRA: summary")
    for col in ("method", "final ppl", "vs central", "central ppl", "local-only ppl (fed, same clients)",
                "worst client ppl", "agg. error", "bytes up/client/round", "% of model", "overhead s/round"):
        table.add_column(col, justify="right")
    for r in reports:
        central = r.get("centralized_perplexity")
        table.add_row(r["method"], f"{r['final_perplexity']:.3f}",
                      f"{r['final_perplexity'] / central:.3f}x" if central else "-",
                      f"{central:.3f}" if central else "-",
                      f"{r['local_only_perplexity']:.3f} ({r['local_only_clients_final_perplexity']:.3f})"
                      if r.get("local_only_clients_final_perplexity") else "-",
                      f"{r['worst_client_perplexity']:.3f}",
                      f"{r['aggregation_error_mean']:.2e}" if r.get("aggregation_error_mean") is not None else "-",
                      _fmt_bytes(r["bytes_up_per_client_round"]),
                      f"{100 * r['bytes_up_fraction_of_model']:.3f}%",
                      f"{r['overhead_s_per_round']:.3f}" if r["overhead_s_per_round"] is not None else "-")
    return table


def plot(reports: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        rounds = [x["round"] for x in r["rounds"]]
        line, = ax.plot(rounds, [x["global_loss"] for x in r["rounds"]], marker="o", label=f"{r['method']} global")
        ax.plot(rounds, [x["worst_client_loss"] for x in r["rounds"]], ls=":", color=line.get_color(),
                label=f"{r['method']} worst client")
    if "centralized_loss" in base:
        ax.axhline(base["centralized_loss"], color="k", ls="--", label="centralised LoRA")
    if "local_only_loss" in base:  # on its own few clients, not the whole federation
        ax.axhline(base["local_only_loss"], color="gray", ls="-.",
                   label=f"local-only ({len(base.get('local_only_clients', []))} clients' own held-out)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_adapter(config: FederatedConfig, state, path: Path) -> None:
    from fedge.peft_methods.adapters import AdaptedModel

    AdaptedModel(config.model, config.adapter_spec).save(path, state)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedge.data import PARTITIONS_HELP, SOURCES_HELP
    from fedge.models import DEFAULT_MODEL

    d = FederatedConfig()
    parser.add_argument("--clients", type=int, default=d.num_clients, help="number of clients (natural: at most)")
    parser.add_argument("--clients-per-round", type=int, default=d.clients_per_round)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--method", default=d.method,
                        help=f"{' | '.join(METHODS)}; a comma list or 'all' runs them back to back")
    parser.add_argument("--strategy", default=d.strategy, choices=["fedavg", "fedprox", "fedadam"],
                        help="Flower server strategy around the LoRA-aware aggregation")
    parser.add_argument("--data", default=d.data, help=SOURCES_HELP)
    parser.add_argument("--partition", default=d.partition, help=PARTITIONS_HELP)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--peft", default=d.peft, choices=["lora", "dora"])
    parser.add_argument("--targets", default=d.targets, help="comma list of module names to adapt")
    parser.add_argument("--hetlora-ranks", default=d.hetlora_ranks, help="e.g. 8,4,2 (cycled over clients)")
    parser.add_argument("--steps", type=int, default=d.steps, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--proximal-mu", type=float, default=d.proximal_mu)
    parser.add_argument("--server-lr", type=float, default=d.server_lr, help="FedAdam eta")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out examples per client")
    parser.add_argument("--eval-clients", type=int, default=d.eval_clients,
                        help="evaluate on a seeded sample of this many clients (0 = all)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--round-timeout", type=float, default=d.round_timeout)
    parser.add_argument("--min-clients", type=int, default=d.min_clients)
    parser.add_argument("--noop-rounds", type=int, default=d.noop_rounds, help="overhead measurement rounds")
    parser.add_argument("--faults", default="", help="PID:KIND,... (nan, inf, shape, crash, slow)")
    parser.add_argument("--transforms", default="", help="client update pipeline, e.g. clip:1.0,noise:0.5")
    parser.add_argument("--local-only-clients", type=int, default=5)
    parser.add_argument("--no-baselines", action="store_true", help="skip centralised and local-only runs")
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoints/METHOD")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--out", default="federated-out", help="adapters and plot go here")
    parser.add_argument("--json", default="federated.json")


def config_from_args(args: argparse.Namespace, method: str) -> FederatedConfig:
    out = Path(args.out)
    return FederatedConfig(
        model=args.model, data=args.data, partition=args.partition, num_clients=args.clients,
        clients_per_round=args.clients_per_round, rounds=args.rounds, method=method, strategy=args.strategy,
        rank=args.rank, peft=args.peft, targets=args.targets, hetlora_ranks=args.hetlora_ranks, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, proximal_mu=args.proximal_mu,
        server_lr=args.server_lr, eval_examples=args.eval_examples, eval_clients=args.eval_clients, seed=args.seed,
        round_timeout=args.round_timeout, min_clients=args.min_clients, noop_rounds=args.noop_rounds,
        faults=args.faults, transforms=args.transforms,
        checkpoint_dir=str(Path(args.checkpoint_dir) / method if args.checkpoint_dir else out / "checkpoints" / method),
        resume=args.resume,
    )


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedge.data import DataSourceError, load_corpus
    from fedge.models import ModelUnavailableError

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler already
    methods = list(METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    try:
        corpus = load_corpus(args.data, args.partition, num_clients=args.clients, seed=args.seed)
        if len(corpus.clients) != args.clients:
            console.print(f"[yellow]{args.data}/{args.partition} gives {len(corpus.clients)} clients "
                          f"(asked for {args.clients}); using {len(corpus.clients)}")
            args.clients = len(corpus.clients)
        configs = [config_from_args(args, m) for m in methods]
    except (DataSourceError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports, base = [], {}
    try:
        for config in configs:
            console.rule(f"{config.method}: {config.num_clients} clients, {config.clients_per_round}/round, "
                         f"{config.rounds} rounds x {config.steps} steps ({config.strategy})")

            def show(record: dict, total=config.rounds) -> None:
                rej = "".join(f"\n    [red]left out {x['client']}: {x['reason']}" for x in record.get("rejected", []))
                console.print(f"  round {record['round']}/{total}: global ppl {record['global_perplexity']:.3f}, "
                              f"worst {record['worst_client']} {record['worst_client_perplexity']:.3f}"
                              + (f", {len(record.get('accepted', []))} updates, "
                                 f"{_fmt_bytes(record['bytes_up'])} up, {_fmt_bytes(record['bytes_down'])} down, "
                                 f"{record['train_s']:.1f} s" if record["round"] else "") + rej)

            start = time.perf_counter()
            result, config = run_federated(config, corpus, on_round=show)
            adapter_dir = out / f"adapter-{config.method}"
            save_adapter(config, result.final_state, adapter_dir)
            report = method_report(config, result, {})
            report["wall_s"] = time.perf_counter() - start
            report["adapter_dir"] = str(adapter_dir)
            reports.append(report)
            console.print(round_table(report))
        if not args.no_baselines:
            console.rule("baselines")
            base = baselines(configs[0], corpus, args.local_only_clients, console)
    except (DataSourceError, ModelUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        report.update({k: v for k, v in base.items() if not k.endswith("_s")})
        compare_on_local_only_clients(report, base)
    plot_path = out / "loss-per-round.png"
    plot(reports, base, plot_path)
    console.print(summary_table(reports))
    payload = reports[0] if len(reports) == 1 else {
        "methods": {r["method"]: r for r in reports},
        **{k: v for k, v in base.items()},
    }
    if len(reports) == 1:
        payload.update({k: v for k, v in base.items() if k.endswith("_s")})
    payload["plot"] = str(plot_path)
    Path(args.json).write_text(json.dumps(payload, indent=1, default=float))
    console.print(f"wrote {args.json}, {plot_path}, adapters in {out}/adapter-*")
    return 0
