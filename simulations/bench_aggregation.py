"""`fedge bench aggregation`: exact vs naive LoRA aggregation, settled by data.

FedAvg of A and B separately is not the average of the clients' B A products; FFA-LoRA (A frozen),
FedSVD (the exact mean product, re-factorised by SVD) and HetLoRA (heterogeneous ranks) answer that
in different ways. Which one gives the best global adapter is an empirical question that depends on
the data's heterogeneity, so this benchmark runs every method over several seeds and two
partitions (the stdlib's natural package families, and Dirichlet 0.1 label skew over them) and
reports the mean and spread of the final global held-out perplexity, the paired difference to
FedAvg (same seed: same data split, clients sampled, adapter init) and the bytes each method moves
per client and round, both ways.

Each (partition, seed) is one Flower simulation (`fedge.simulations.federated.simulate`, Ray backend,
the production ClientApp) in which the methods run back to back through the one run loop
(`fedge.cloud.federated_rounds.FederatedRun`: rounds, federated evaluation, bytes), so the actors
and their loaded model are shared and only the method differs. The per-round settings are small
(few clients per round, few local steps, short windows, a small evaluation) so that the whole grid
fits about 30 minutes on a 2-core CPU; they are in the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedge.cloud.federated_config import FederatedConfig
from fedge.models import DEFAULT_MODEL
from fedge.peft_methods.config import METHODS


@dataclass
class AggregationBench:
    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = METHODS
    partitions: tuple[str, ...] = ("natural", "dirichlet:0.1")
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str = "stdlib"
    rounds: int = 20
    clients: int = 6
    clients_per_round: int = 2
    steps: int = 1
    batch_size: int = 2
    seq_len: int = 32
    lr: float = 3e-3
    rank: int = 8
    eval_examples: int = 8  # held-out windows per client, every client, every round
    client_model: str = "target"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods must be a comma list of {METHODS} (got {','.join(self.methods)})")
        if not self.seeds or not self.partitions:
            raise ValueError("--seeds and --partitions need at least one value each")


def _config(bench: AggregationBench, partition: str, seed: int, clients: int) -> FederatedConfig:
    return FederatedConfig(model=bench.model, data=bench.data, partition=partition, num_clients=clients,
                           clients_per_round=min(bench.clients_per_round, clients), rounds=bench.rounds,
                           rank=bench.rank, steps=bench.steps, batch_size=bench.batch_size, seq_len=bench.seq_len,
                           lr=bench.lr, eval_examples=bench.eval_examples, seed=seed, noop_rounds=0,
                           client_model=bench.client_model)


def _run_record(config: FederatedConfig, result, wall_s: float) -> dict:
    records = result.records
    trained = [r for r in records if r["round"] > 0]

    def per_round(key: str) -> float:
        return sum(r[key] for r in trained) / max(1, len(trained))

    return {"method": config.method, "partition": config.partition, "seed": config.seed,
            "initial_perplexity": records[0]["global_perplexity"], "final_perplexity": records[-1]["global_perplexity"],
            "final_worst_client_perplexity": records[-1]["worst_client_perplexity"],
            "perplexity_per_round": [r["global_perplexity"] for r in records],
            "bytes_up_per_client_round": per_round("bytes_up_per_client"),
            "bytes_down_per_client_round": per_round("bytes_down_per_client"),
            "rejected": sum(len(r.get("rejected", [])) for r in trained), "wall_s": wall_s,
            # ||aggregated - exact mean of the clients' B_k A_k changes|| / ||exact||, per round (0 for exact methods)
            "aggregation_error_per_round": [r.get("aggregation_error") for r in trained],
            # the round's clients' own freshly trained adapters on their own held-out text, vs the global loss:
            # local training that helps while the aggregate does not points at the aggregation
            "personal_loss_per_round": [statistics.fmean(r["personal_loss"].values()) if r.get("personal_loss")
                                        else None for r in trained],
            "global_loss_per_round": [r["global_loss"] for r in records]}


def _mean_error(runs: list[dict]) -> float | None:
    errors = [e for r in runs for e in r.get("aggregation_error_per_round", []) if e is not None]
    return statistics.fmean(errors) if errors else None


def _progress(console, partition: str, seed: int, method: str, record: dict, rounds: int) -> None:
    if record["round"] % 5 == 0 or record["round"] == rounds:
        console.print(f"  {partition} seed {seed} {method}: round {record['round']}/{rounds} "
                      f"global ppl {record['global_perplexity']:.3f}")


def run_partition_seed(bench: AggregationBench, partition: str, seed: int, console) -> list[dict]:
    """Every method on one (partition, seed), back to back in one simulation."""
    from fedge.cloud.federated_rounds import FederatedRun
    from fedge.data import load_corpus
    from fedge.edge import federated_client
    from fedge.simulations.federated import simulate

    corpus = load_corpus(bench.data, partition, num_clients=bench.clients, seed=seed)  # what the devices load
    base = _config(bench, partition, seed, len(corpus.clients))

    def body(grid) -> list[dict]:
        out = []
        for method in bench.methods:
            config = replace(base, method=method)
            start = time.perf_counter()
            run = FederatedRun(config, on_round=lambda r, m=method: _progress(console, partition, seed, m, r,
                                                                              base.rounds))
            run.execute(grid)
            out.append(_run_record(config, run.result, time.perf_counter() - start))
        return out

    console.rule(f"{partition}, seed {seed}: {len(corpus.clients)} clients, {base.clients_per_round}/round, "
                 f"{base.rounds} rounds x {base.steps} steps")
    return simulate(base, body, federated_client.app)


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict], bench: AggregationBench) -> list[dict]:
    """Per (partition, method): final perplexity over seeds, paired difference to FedAvg, wins, bytes."""
    rows = []
    for partition in bench.partitions:
        by = {(r["method"], r["seed"]): r for r in runs if r["partition"] == partition}
        for method in bench.methods:
            mine = [by[method, s] for s in bench.seeds if (method, s) in by]
            if not mine:
                continue
            row = {"partition": partition, "method": method,
                   "final_perplexity": _spread([r["final_perplexity"] for r in mine]),
                   "initial_perplexity": statistics.fmean(r["initial_perplexity"] for r in mine),
                   "bytes_up_per_client_round": statistics.fmean(r["bytes_up_per_client_round"] for r in mine),
                   "bytes_down_per_client_round": statistics.fmean(r["bytes_down_per_client_round"] for r in mine),
                   "aggregation_error": _mean_error(mine)}
            paired = [by[method, s]["final_perplexity"] - by["fedavg", s]["final_perplexity"]
                      for s in bench.seeds if (method, s) in by and ("fedavg", s) in by]
            row["vs_fedavg"] = _spread(paired) if paired else None
            row["wins"] = sum(1 for s in bench.seeds if (method, s) in by and by[method, s]["final_perplexity"] ==
                              min(by[m, s]["final_perplexity"] for m in bench.methods if (m, s) in by))
            rows.append(row)
    return rows


def best_per_partition(rows: list[dict]) -> dict[str, str]:
    out = {}
    for row in rows:
        best = out.get(row["partition"])
        if best is None or row["final_perplexity"]["mean"] < best["final_perplexity"]["mean"]:
            out[row["partition"]] = row
    return {p: r["method"] for p, r in out.items()}


def reusable_runs(bench: AggregationBench, paths: list[Path]) -> list[dict]:
    """Runs of an earlier report or partial file (the first of `paths` that exists) made with the same
    settings, partitions and seeds aside: a killed grid continues, and partitions run one at a time
    end up in one report."""
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return []
    earlier = json.loads(path.read_text())

    def key(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in ("partitions", "seeds")}

    if key(earlier["settings"]) != key(json.loads(json.dumps(asdict(bench), default=str))):
        raise ValueError(f"--resume: {path} was made with other settings; give another --json")
    return [r for r in earlier["runs"] if r["partition"] in bench.partitions and r["seed"] in bench.seeds]


def run(bench: AggregationBench, console, partial: Path | None = None, reuse: list[dict] = ()) -> dict:
    """The whole grid; with `partial`, the runs so far are written there after each simulation; the
    (partition, seed) pairs of `reuse` (earlier runs of the same settings) are not run again."""
    start = time.perf_counter()
    runs = list(reuse)
    done = {(r["partition"], r["seed"]) for r in runs}
    for partition in bench.partitions:
        for seed in bench.seeds:
            if (partition, seed) in done:
                console.print(f"{partition}, seed {seed}: reused from the earlier report")
                continue
            runs += run_partition_seed(bench, partition, seed, console)
            if partial is not None:
                partial.write_text(json.dumps({"settings": asdict(bench), "runs": runs}, indent=1, default=str))
    rows = summarise(runs, bench)
    return {"benchmark": "aggregation", "settings": asdict(bench), "summary": rows,
            "best": best_per_partition(rows), "runs": runs, "wall_s": time.perf_counter() - start}


# ---------------------------------------------------------------- report


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB"


def table(report: dict):
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"exact vs naive LoRA aggregation ({s['model']}, {s['rounds']} rounds, {s['clients']} clients, "
                    f"{s['clients_per_round']}/round x {s['steps']} steps, {len(s['seeds'])} seeds)")
    for col in ("partition", "method", "final ppl mean +- std", "min-max", "vs fedavg (paired)", "best in",
                "agg. error", "bytes up/client/round", "bytes down/client/round"):
        t.add_column(col, justify="right")
    for r in report["summary"]:
        f, d, err = r["final_perplexity"], r["vs_fedavg"], r.get("aggregation_error")
        t.add_row(r["partition"], r["method"], f"{f['mean']:.3f} +- {f['std']:.3f}", f"{f['min']:.3f}-{f['max']:.3f}",
                  "-" if d is None or r["method"] == "fedavg" else f"{d['mean']:+.3f} +- {d['std']:.3f}",
                  f"{r['wins']}/{f['n']}", "-" if err is None else f"{err:.1e}",
                  _kb(r["bytes_up_per_client_round"]), _kb(r["bytes_down_per_client_round"]))
    return t


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = report["settings"]
    fig, axes = plt.subplots(1, len(settings["partitions"]), figsize=(6 * len(settings["partitions"]), 4),
                             squeeze=False)
    for ax, partition in zip(axes[0], settings["partitions"], strict=True):
        for method in settings["methods"]:
            # relative to the seed's own start: seeds differ in their held-out text, methods of a seed do not
            curves = np.array([np.array(r["perplexity_per_round"]) / r["perplexity_per_round"][0] - 1
                               for r in report["runs"] if r["partition"] == partition and r["method"] == method])
            if curves.size == 0:
                continue
            x = np.arange(curves.shape[1])
            line, = ax.plot(x, 100 * curves.mean(axis=0), label=method)
            ax.fill_between(x, 100 * curves.min(axis=0), 100 * curves.max(axis=0), color=line.get_color(),
                            alpha=0.15)
        ax.set(title=f"{partition} (mean, min-max over {len(settings['seeds'])} seeds)", xlabel="round",
               ylabel="global held-out perplexity vs round 0 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import logging
    import sys

    from rich.console import Console

    logging.getLogger("flwr").setLevel(logging.ERROR)
    console = Console()
    try:
        bench = AggregationBench(
            model=args.model, methods=tuple(args.methods.split(",")), partitions=tuple(args.partitions.split(",")),
            seeds=tuple(int(s) for s in args.seeds.split(",")), data=args.data, rounds=args.rounds,
            clients=args.clients, clients_per_round=args.clients_per_round, steps=args.steps,
            batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, rank=args.rank,
            eval_examples=args.eval_examples, client_model=args.client_model)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.json")
        reuse = reusable_runs(bench, [partial, path]) if args.resume else []
        report = run(bench, console, partial=partial, reuse=reuse)
    except ValueError as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    console.print(table(report))
    console.print("best mean final perplexity: " + ", ".join(f"{p}: {m}" for p, m in report["best"].items()))
    path.write_text(json.dumps(report, indent=1, default=str))
    plot(report, path.with_suffix(".png"))
    path.with_suffix(".partial.json").unlink(missing_ok=True)
    console.print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
