"""`fedge simulate federated`: federated LoRA on Flower's simulation engine with the Ray backend.

Per round: global held-out loss/perplexity (the global adapter on every client's held-out text, on
the full-precision model), per-client loss (global, and personalised for that round's clients),
the worst client, bytes up and down, rejected clients with reasons. At the end: centralised LoRA on
the pooled data (the same number of optimiser steps, rounds x local steps, with the round's total
batch) and local-only training, the global adapter in peft format, a JSON report and a plot.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedge.cloud.federated_config import FederatedConfig
from fedge.simulations.faults import Mod

if TYPE_CHECKING:
    from fedge.cloud.federated_rounds import FederatedResult

T = TypeVar("T")

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


def client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The edge ClientApp's handlers (`fedge.edge.federated_client`), wrapped in `mods` (outermost first)."""
    from fedge.edge.federated_client import client_app as build

    return build(mods)


def node_defaults(config: FederatedConfig) -> dict:
    """What each virtual device has in its node config besides Flower's partition-id: the source its
    partition is cut from (a real device names its own data instead)."""
    return {"data": config.data, "partition": config.partition, "seed": config.seed}


@contextmanager
def simulated_devices(config: FederatedConfig):
    """The virtual devices' node-level defaults, inherited by the Ray actors started meanwhile."""
    from fedge.edge.federated_client import SIMULATION_NODE_CONFIG

    before = os.environ.get(SIMULATION_NODE_CONFIG)
    os.environ[SIMULATION_NODE_CONFIG] = json.dumps(node_defaults(config))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SIMULATION_NODE_CONFIG, None)
        else:
            os.environ[SIMULATION_NODE_CONFIG] = before


def _run_simulation(config: FederatedConfig, server: ServerApp, app: ClientApp) -> None:
    from flwr.simulation import run_simulation

    with simulated_devices(config):
        run_simulation(server_app=server, client_app=app, num_supernodes=config.num_clients, backend_name="ray",
                       backend_config=backend_config(config), verbose_logging=False)


def simulate(config: FederatedConfig, server_main: Callable[[Grid], T], app: ClientApp) -> T:
    """Run `server_main(grid)` as the ServerApp of one Flower simulation (Ray backend, one supernode
    per client) and return what it returned; raises what it raised (experiments' own server bodies)."""
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            grid.pull_interval = config.pull_interval  # Flower polls replies every 0.1 s by default
            out["result"] = server_main(grid)
        except BaseException as exc:  # run_simulation only logs errors; keep it for the caller
            out["error"] = exc
            raise

    _run_simulation(config, server, app)
    if "error" in out:
        raise out["error"]
    if "result" not in out:
        raise RuntimeError("the federated simulation ended without a result (see the log above)")
    return out["result"]


def run_federated(config: FederatedConfig, corpus, on_round: Callable[[dict], None] | None = None,
                  grid_wrapper: Callable[[Grid], Grid] | None = None,
                  client_mods: Sequence[Mod] = ()) -> tuple[FederatedResult, FederatedConfig]:
    """Run one federated simulation of the deployment's two apps (`fedge.cloud.server_app.app`, the
    device ClientApp); returns the FederatedResult and the config it ran (with the corpus's number of
    clients). The server never sees `corpus`: each virtual device loads its own partition. Without
    `client_mods` the devices run the production app (secure aggregation and DP mods included);
    `config.faults` adds the fault-injection mod innermost."""
    from fedge.cloud import server_app
    from fedge.edge import federated_client
    from fedge.simulations.faults import fault_mod

    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients))
    if config.faults:
        from fedge.edge.secagg_mods import dp_mod, secagg_mod

        app = client_app([*(client_mods or [secagg_mod, dp_mod]), fault_mod(config.faults, config.round_timeout)])
    else:
        app = client_app(client_mods) if client_mods else federated_client.app
    hooks = server_app.SimulationHooks(config, on_round=on_round, grid_wrapper=grid_wrapper)
    server_app.set_simulation_hooks(hooks)
    try:
        _run_simulation(config, server_app.app, app)
    finally:
        server_app.set_simulation_hooks(None)
    if hooks.errors:
        raise hooks.errors[0]
    if hooks.run is None or not hooks.run.result.final_state:
        raise RuntimeError("the federated simulation ended without a result (see the log above)")
    return hooks.run.result, config


# ---------------------------------------------------------------- baselines


def _eval_loss(adapted, windows_by_client: dict, pad_id: int) -> tuple[float, dict]:
    from fedge.peft_methods.lora_model import mean_token_loss

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
    from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, pad_token_id

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
    from fedge.cloud.federated_rounds import overhead_s_per_round

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
    from fedge.peft_methods.lora_model import AdaptedModel

    AdaptedModel(config.model, config.adapter_spec).save(path, state)


# ---------------------------------------------------------------- the experiment of `fedge simulate federated`


@dataclass
class FederatedExperiment:
    """One `fedge simulate federated` run: methods back to back on one corpus, then the baselines."""

    configs: list[FederatedConfig]
    out_dir: Path
    json_path: Path
    local_only_clients: int = 5
    baselines: bool = True


def _round_line(record: dict, total: int) -> str:
    rej = "".join(f"\n    [red]left out {x['client']}: {x['reason']}" for x in record.get("rejected", []))
    return (f"  round {record['round']}/{total}: global ppl {record['global_perplexity']:.3f}, "
            f"worst {record['worst_client']} {record['worst_client_perplexity']:.3f}"
            + (f", {len(record.get('accepted', []))} updates, "
               f"{_fmt_bytes(record['bytes_up'])} up, {_fmt_bytes(record['bytes_down'])} down, "
               f"{record['train_s']:.1f} s" if record["round"] else "") + rej)


def _run_method(config: FederatedConfig, corpus, out_dir: Path, console) -> dict:
    console.rule(f"{config.method}: {config.num_clients} clients, {config.clients_per_round}/round, "
                 f"{config.rounds} rounds x {config.steps} steps ({config.strategy})")
    start = time.perf_counter()
    result, config = run_federated(config, corpus,
                                   on_round=lambda r, total=config.rounds: console.print(_round_line(r, total)))
    adapter_dir = out_dir / f"adapter-{config.method}"
    save_adapter(config, result.final_state, adapter_dir)
    report = method_report(config, result, {})
    report["wall_s"] = time.perf_counter() - start
    report["adapter_dir"] = str(adapter_dir)
    console.print(round_table(report))
    return report


def run_experiment(experiment: FederatedExperiment, corpus, console) -> dict:
    """Every method, the baselines, the plot and the JSON report; returns the report."""
    out = experiment.out_dir
    out.mkdir(parents=True, exist_ok=True)
    reports = [_run_method(config, corpus, out, console) for config in experiment.configs]
    base = {}
    if experiment.baselines:
        console.rule("baselines")
        base = baselines(experiment.configs[0], corpus, experiment.local_only_clients, console)
    for report in reports:
        report.update({k: v for k, v in base.items() if not k.endswith("_s")})
        compare_on_local_only_clients(report, base)
    plot_path = out / "loss-per-round.png"
    plot(reports, base, plot_path)
    console.print(summary_table(reports))
    payload = reports[0] if len(reports) == 1 else {"methods": {r["method"]: r for r in reports}, **base}
    if len(reports) == 1:
        payload.update({k: v for k, v in base.items() if k.endswith("_s")})
    payload["plot"] = str(plot_path)
    experiment.json_path.parent.mkdir(parents=True, exist_ok=True)
    experiment.json_path.write_text(json.dumps(payload, indent=1, default=float))
    console.print(f"wrote {experiment.json_path}, {plot_path}, adapters in {out}/adapter-*")
    return payload
