"""`fedge bench deployment`: what a round costs on Flower's deployment engine next to the simulation.

The same run, side by side in one process, on a real local deployment (a SuperLink with TLS and
SuperNode authentication, one SuperNode per device, on loopback: `LocalFederation`, what `fedge
federation up` starts) in up to four set-ups, then in Flower's simulation engine (Ray actors):

- `flower`: Flower 1.41 as it comes: `flower-supernode` (a fixed 3 s idle poll) and Flower's
  SuperExec (a fresh `flwr-clientapp` interpreter per message: imports, then the model load);
- `poll`: fedge's SuperNode entry point (`fedge.edge.supernode`: the same SuperNode with a
  `--poll-interval`), Flower's SuperExec;
- `warm`: the poll plus fedge's warm SuperExec (`fedge.edge.warm_superexec`: each message's process is
  forked from one that imported torch, transformers, peft and the data readers once);
- `preload`: warm, and the SuperExec also loaded the device's model before forking (`--preload-model`):
  a message only wraps its adapter around the inherited base.

All run the same two apps (`fedge.cloud.server_app.app`, the device ClientApp) with the same options:

- no-op rounds: the training round's messages and payloads, clients answer with a zero update at
  once (the message path: polling, a ClientApp process per message on a SuperNode, an actor call in
  the simulation);
- 1-step rounds: each device trains one local step and evaluates its personalised adapter (the
  round's train exchange; the federated evaluation after it is reported apart).

Per-round seconds are medians (no-op: after the first, which also starts the actors); the table shows
each engine / simulation as a ratio. Numbers on a shared CPU are noisy; the ratios come from one run.
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
    eval_rounds_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def noop_s(self) -> float:
        times = self.noop_rounds_s[1:] or self.noop_rounds_s
        return statistics.median(times) if times else float("nan")

    @property
    def train_s(self) -> float:
        return statistics.median(self.train_rounds_s) if self.train_rounds_s else float("nan")

    @property
    def eval_s(self) -> float:
        return statistics.median(self.eval_rounds_s) if self.eval_rounds_s else float("nan")


@dataclass(frozen=True)
class Variant:
    """One deployment set-up: which SuperNode poll, SuperExec and preloading the devices run."""

    name: str
    poll_interval: float  # 0: Flower's flower-supernode (fixed 3 s)
    warm: bool
    preload: bool
    about: str


def variants(poll_interval: float) -> dict[str, Variant]:
    return {v.name: v for v in (
        Variant("flower", 0.0, False, False, "flower-supernode (3 s poll), Flower's SuperExec"),
        Variant("poll", poll_interval, False, False, f"{poll_interval:g} s poll, Flower's SuperExec"),
        Variant("warm", poll_interval, True, False, f"{poll_interval:g} s poll, warm fork SuperExec"),
        Variant("preload", poll_interval, True, True, f"{poll_interval:g} s poll, warm fork SuperExec, "
                                                      "model preloaded"),
    )}


def bench_config(args: argparse.Namespace) -> FederatedConfig:
    return FederatedConfig(model=args.model, data=args.data, num_clients=args.devices,
                           clients_per_round=args.devices, rounds=args.rounds, noop_rounds=args.noop_rounds,
                           steps=1, batch_size=2, seq_len=args.seq_len, rank=4, eval_examples=1,
                           client_model=args.client_model, secagg=False, round_timeout=600.0, wait_nodes_s=600.0)


# the options a deployment run overrides (the app's pyproject holds the rest)
RUN_KEYS = ("model", "num_clients", "clients_per_round", "rounds", "noop_rounds", "steps", "batch_size", "seq_len",
            "rank", "eval_examples", "client_model", "secagg", "round_timeout", "wait_nodes_s", "checkpoint_dir")


def deployment(config: FederatedConfig, workdir: Path, variant: Variant) -> EngineTimes:
    from fedge.cloud.federated_config import RUN_CONFIG_PREFIX
    from fedge.simulations.local_federation import FederationSpec, LocalFederation

    config = replace(config, checkpoint_dir=str(workdir / "ckpt"))
    values = asdict(config)
    run_config = {RUN_CONFIG_PREFIX + k.replace("_", "-"): values[k] for k in RUN_KEYS}
    spec = FederationSpec(workdir=workdir / "federation", devices=config.num_clients, data=config.data,
                          warm=variant.warm, poll_interval=variant.poll_interval,
                          preload_model=config.model if variant.preload else "",
                          preload_client_model=config.client_model)
    start = time.perf_counter()
    with LocalFederation(spec) as federation:
        run_id = federation.submit(run_config)
        status = federation.wait_run(run_id, 3600)
        if status != "finished:completed":
            raise RuntimeError(f"the deployment run ended {status}:\n{federation.run_log(run_id)[-3000:]}")
    ckpt = workdir / "ckpt"
    records = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "state.json").read_text())["records"]
    return EngineTimes(variant.name, records[0]["noop_rounds_s"], [r["train_s"] for r in records[1:]],
                       [r["eval_s"] for r in records[1:]], time.perf_counter() - start)


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
                       [r["eval_s"] for r in result.records[1:]], time.perf_counter() - start)


def run_engines(args: argparse.Namespace, config: FederatedConfig, out: Path, console) -> list[EngineTimes]:
    """The simulation first, then each deployment variant asked for, in order."""
    chosen = variants(args.poll_interval)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(chosen))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {sorted(chosen)}")
    with console.status("simulation: the same rounds"):
        engines = [simulation(config)]
    for name in names:
        variant = chosen[name]
        with console.status(f"deployment '{name}' ({variant.about}): SuperLink + {args.devices} SuperNodes, "
                            f"{args.noop_rounds} no-op and {args.rounds} 1-step rounds"):
            engines.append(deployment(config, out / f"deployment-{name}", variant))
    return engines


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    config = bench_config(args)
    out = Path(args.json).parent
    console = Console(width=160)
    engines = run_engines(args, config, out, console)
    with console.status("a fresh ClientApp process: imports and model load"):
        reload = reload_cost(config)
    simulated, about = engines[0], variants(args.poll_interval)
    table = Table(title=f"seconds per round, {args.devices} devices, {args.model} ({args.client_model}): "
                        "Flower's deployment engine on loopback (TLS, SuperNode auth) vs its simulation engine")
    for col in ("engine", "no-op round s", "/ sim", "1-step round s", "/ sim", "evaluation s", "/ sim"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for e in engines:
        label = "simulation (Ray actors)" if e is simulated else f"{e.engine}: {about[e.engine].about}"
        table.add_row(label, f"{e.noop_s:.3f}", f"{e.noop_s / simulated.noop_s:.1f}x", f"{e.train_s:.3f}",
                      f"{e.train_s / simulated.train_s:.1f}x", f"{e.eval_s:.3f}", f"{e.eval_s / simulated.eval_s:.1f}x")
    console.print(table)
    console.print("a fresh ClientApp process per training message (Flower's SuperExec) costs "
                  f"{reload['process_s']:.2f} s (imports {reload['imports_s']:.2f} s, "
                  f"model load {reload['model_load_s']:.2f} s)")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "reload_per_message": reload,
               "variants": {n: asdict(v) for n, v in about.items()},
               "engines": [{**asdict(e), "noop_s": e.noop_s, "train_s": e.train_s, "eval_s": e.eval_s}
                           for e in engines],
               "ratios_over_simulation": {e.engine: {"noop": e.noop_s / simulated.noop_s, "train": e.train_s /
                                                     simulated.train_s, "eval": e.eval_s / simulated.eval_s}
                                          for e in engines}}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.json}")
    return 0
