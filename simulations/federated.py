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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedge.cloud.federated_config import FederatedConfig
from fedge.simulations.faults import Mod
from fedge.simulations.federated_report import (
    compare_on_local_only_clients,
    fmt_bytes,
    method_report,
    plot,
    round_table,
    summary_table,
)

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


@contextmanager
def attached_ray(config: FederatedConfig):
    """With `ray_address`: connect to that running Ray cluster before Flower's backend starts (it skips
    `ray.init` when Ray is up, and shuts Ray down at the end). The cluster's workers do not inherit this
    process's environment, so the node defaults and the import path travel in the job's runtime env."""
    if not config.ray_address:
        yield
        return
    import sys

    import ray

    from fedge.edge.federated_client import SIMULATION_NODE_CONFIG

    if ray.is_initialized():
        ray.shutdown()
    env = {SIMULATION_NODE_CONFIG: json.dumps(node_defaults(config)), "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        ray.init(address=config.ray_address, runtime_env={"env_vars": env}, logging_level=logging.ERROR,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot attach to the Ray cluster at {config.ray_address}: {exc}") from exc
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()  # disconnects this driver; the cluster keeps running


def _run_simulation(config: FederatedConfig, server: ServerApp, app: ClientApp) -> None:
    from flwr.simulation import run_simulation

    with simulated_devices(config), attached_ray(config):
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
    `client_mods` the devices run the production app (secure aggregation and DP mods included); without
    `grid_wrapper` the config's `secagg` / `dp_epsilon` choose it (`privacy_grid_wrapper`);
    `config.faults` adds the fault-injection mod innermost."""
    from fedge.cloud import server_app
    from fedge.cloud.federated_rounds import privacy_grid_wrapper
    from fedge.edge import federated_client
    from fedge.simulations.faults import fault_mod

    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients))
    if grid_wrapper is None:
        grid_wrapper = privacy_grid_wrapper(config)  # --secagg / --dp-epsilon
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
               f"{fmt_bytes(record['bytes_up'])} up, {fmt_bytes(record['bytes_down'])} down, "
               f"{record['train_s']:.1f} s" if record["round"] else "")
            + (f", epsilon {record['epsilon']:.2f}" if record.get("epsilon") is not None else "") + rej)


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
