"""`fedge bench deployment`: what a round costs on Flower's deployment engine next to the simulation.

The same run three times, side by side in one process: on a real local deployment (a SuperLink with
TLS and SuperNode authentication, one SuperNode per device, on loopback: `LocalFederation`, what
`fedge federation up` starts) with Flower's own SuperExec (a fresh `flwr-clientapp` interpreter per
message), the same with fedge's warm SuperExec (`fedge.edge.warm_superexec`: each message's process is
forked from one that imported torch, transformers and peft once), then in Flower's simulation engine
(Ray actors). All run the same two apps (`fedge.cloud.server_app.app`, the device ClientApp) with the same options:

- no-op rounds: the training round's messages and payloads, clients answer with a zero update at
  once (the message path: polling, a ClientApp process per message on a SuperNode, an actor call in
  the simulation);
- 1-step rounds: each device loads its model, trains one local step and evaluates its personalised
  adapter (in deployment a fresh ClientApp process per message imports torch and loads the model;
  a simulation's actor keeps both).

Per-round seconds are medians (no-op: after the first, which also starts the actors); the table shows
deployment / simulation as a ratio. Numbers on a shared CPU are noisy; the ratio comes from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fedge.cloud.federated_config import FederatedConfig


@dataclass
class EngineTimes:
    engine: str
    noop_rounds_s: list[float] = field(default_factory=list)
    train_rounds_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def noop_s(self) -> float:
        times = self.noop_rounds_s[1:] or self.noop_rounds_s
        return statistics.median(times) if times else float("nan")

    @property
    def train_s(self) -> float:
        return statistics.median(self.train_rounds_s) if self.train_rounds_s else float("nan")


def bench_config(args: argparse.Namespace) -> FederatedConfig:
    return FederatedConfig(model=args.model, data=args.data, num_clients=args.devices,
                           clients_per_round=args.devices, rounds=args.rounds, noop_rounds=args.noop_rounds,
                           steps=1, batch_size=2, seq_len=args.seq_len, rank=4, eval_examples=1,
                           client_model=args.client_model, secagg=False, round_timeout=600.0, wait_nodes_s=600.0)


# the options a deployment run overrides (the app's pyproject holds the rest)
RUN_KEYS = ("model", "num_clients", "clients_per_round", "rounds", "noop_rounds", "steps", "batch_size", "seq_len",
            "rank", "eval_examples", "client_model", "secagg", "round_timeout", "wait_nodes_s", "checkpoint_dir")


def deployment(config: FederatedConfig, workdir: Path, warm: bool) -> EngineTimes:
    from fedge.cloud.federated_config import RUN_CONFIG_PREFIX
    from fedge.simulations.local_federation import FederationSpec, LocalFederation

    config = replace(config, checkpoint_dir=str(workdir / "ckpt"))
    values = asdict(config)
    run_config = {RUN_CONFIG_PREFIX + k.replace("_", "-"): values[k] for k in RUN_KEYS}
    start = time.perf_counter()
    with LocalFederation(FederationSpec(workdir=workdir / "federation", devices=config.num_clients,
                                        data=config.data, warm=warm)) as federation:
        run_id = federation.submit(run_config)
        status = federation.wait_run(run_id, 3600)
        if status != "finished:completed":
            raise RuntimeError(f"the deployment run ended {status}:\n{federation.run_log(run_id)[-3000:]}")
    ckpt = workdir / "ckpt"
    records = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "state.json").read_text())["records"]
    return EngineTimes("deployment-warm" if warm else "deployment", records[0]["noop_rounds_s"],
                       [r["train_s"] for r in records[1:]], time.perf_counter() - start)


# what a fresh ClientApp process does before its first training step: imports and the model load
RELOAD = """
import sys, time
start = time.perf_counter()
from fedge.edge.federated_client import adapter_spec_from
from fedge.edge.training_model import load_training_model, served_model
from fedge.cloud.federated_config import FederatedConfig
config = FederatedConfig(**{json})
record = config.client_config()
imported = time.perf_counter()
load_training_model(config.model, adapter_spec_from(record), client_model=config.client_model,
                    quant=config.draft_quant, keep_layers=config.draft_layers or None)
served_model(config.model, adapter_spec_from(record))
print(imported - start, time.perf_counter() - imported)
"""


def reload_cost(config: FederatedConfig, repeats: int = 3) -> dict[str, float]:
    """Seconds a deployment device pays per training message, in a fresh process (median of `repeats`):
    interpreter start, imports, and loading the training model and the target it evaluates on."""
    import subprocess
    import sys

    script = RELOAD.replace("{json}", repr(asdict(config)))
    rows = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
        imports, load = (float(x) for x in out.split()[-2:])
        rows.append((time.perf_counter() - start, imports, load))
    total, imports, load = (statistics.median(col) for col in zip(*rows, strict=True))
    return {"process_s": total, "imports_s": imports, "model_load_s": load}


def simulation(config: FederatedConfig) -> EngineTimes:
    from fedge.data import load_corpus
    from fedge.simulations.federated import run_federated

    start = time.perf_counter()
    corpus = load_corpus(config.data, config.partition, num_clients=config.num_clients, seed=config.seed)
    result, _ = run_federated(config, corpus)
    return EngineTimes("simulation", result.overhead_rounds_s, [r["train_s"] for r in result.records[1:]],
                       time.perf_counter() - start)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    config = bench_config(args)
    out = Path(args.json).parent
    console = Console(width=160)
    engines = []
    for warm in (False, True):
        with console.status(f"deployment ({'warm fork' if warm else 'Flower'} SuperExec): SuperLink + "
                            f"{args.devices} SuperNodes, {args.noop_rounds} no-op and {args.rounds} 1-step rounds"):
            engines.append(deployment(config, out / ("deployment-warm" if warm else "deployment"), warm))
    with console.status("simulation: the same rounds"):
        engines.append(simulation(config))
    with console.status("a fresh ClientApp process: imports and model load"):
        reload = reload_cost(config)
    cold, warm_engine, simulated = engines
    table = Table(title=f"seconds per round, {args.devices} devices, {args.model} ({args.client_model}): "
                        "deployment on loopback (Flower's SuperExec: a fresh interpreter per message; "
                        "fedge's warm fork SuperExec) vs simulation")
    for col in ("round", "deployment s", "deployment warm s", "simulation s", "deployment / sim",
                "deployment warm / sim"):
        table.add_column(col, justify="left" if col == "round" else "right")
    for name, attr in (("no-op (message path)", "noop_s"), ("1 local step (+ model load, eval)", "train_s")):
        dep, dep_warm, sim = (getattr(e, attr) for e in engines)
        table.add_row(name, f"{dep:.3f}", f"{dep_warm:.3f}", f"{sim:.3f}", f"{dep / sim:.1f}x",
                      f"{dep_warm / sim:.1f}x")
    console.print(table)
    console.print(f"per training message, a deployment device starts a process: {reload['process_s']:.2f} s "
                  f"(imports {reload['imports_s']:.2f} s, model load {reload['model_load_s']:.2f} s); "
                  "a simulation's actor pays this once")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "reload_per_message": reload,
               "engines": [{**asdict(e), "noop_s": e.noop_s, "train_s": e.train_s} for e in engines],
               "ratios_over_simulation": {e.engine: {"noop": e.noop_s / simulated.noop_s,
                                                     "train": e.train_s / simulated.train_s} for e in engines},
               "warm_speedup": {"noop": cold.noop_s / warm_engine.noop_s, "train": cold.train_s / warm_engine.train_s}}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.json}")
    return 0
