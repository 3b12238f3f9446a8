"""`fedge privacy ...`: what leaks, at what epsilon, at what cost; and what secure aggregation costs.

Both experiments run the project's real federated LoRA path: Flower's simulation engine (Ray), the
edge ClientApp's train function (local LoRA with peft) wrapped in the privacy mods
(`fedge.edge.secure_aggregation.secagg_mod`, `dp_mod`), the cloud's LoRA-aware strategy
(`fedge.cloud.federated_server.build_strategy`) and its rounds driven through
`fedge.cloud.secure_aggregation.SecureAggregationGrid`. One ServerApp runs every configuration of an
experiment back to back in the same simulation, so the comparisons share the machine and the actors.

- `fedge privacy dp`: for each epsilon (inf = no DP), train the global adapter from the same init
  with secure aggregation and client-level DP calibrated to reach that epsilon after the rounds, then
  measure: utility (held-out perplexity), membership inference on the global adapter (loss-threshold
  and reference-model attacks on member vs non-member windows: ROC AUC) and canary exposure (random
  secrets planted in one client's data; Carlini et al. 2019's rank-based exposure).
- `fedge privacy secagg-time`: round time of secure-aggregation rounds vs plain rounds (the same
  training, the same clients) with 0%, 10% and 30% of the sampled clients dropping after sharing keys,
  plus the cryptography alone at the default model's LoRA size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

log = logging.getLogger("fedge.privacy")

CANARY_PREFIX = "the secret access code is "
CANARY_DIGITS = 6


# ------------------------------------------------------------------ data with canaries


@dataclass
class PrivacyData:
    path: Path
    canary: str
    canary_client: str
    candidates: list[str]


def build_dataset(out_dir: Path, clients: int, examples_per_client: int, canary_repeats: int, seed: int) -> PrivacyData:
    """A JSONL corpus: `clients` stdlib package families, a few chunks each, a canary in one client.

    Small per-client data is deliberate: membership inference needs a model that can memorise.
    """
    from fedge.data import read_source

    rng = random.Random(seed)
    by_group: dict[str, list[str]] = {}
    for ex in read_source("stdlib"):
        by_group.setdefault(ex.group, []).append(ex.text)
    groups = sorted((g for g, rows in by_group.items() if len(rows) >= examples_per_client + 4),
                    key=lambda g: (-len(by_group[g]), g))[:clients]
    if len(groups) < clients:
        raise ValueError(f"the stdlib corpus has only {len(groups)} groups with enough text for {clients} clients")
    canary = CANARY_PREFIX + "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))
    candidates = sorted({CANARY_PREFIX + "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))
                         for _ in range(2000)} - {canary})[:999]
    rows = []
    for i, group in enumerate(sorted(groups)):
        texts = rng.sample(by_group[group], examples_per_client + 4)  # + 4 documents to hold out
        for j, text in enumerate(texts):
            text = text[:600]
            if i == 0 and j < canary_repeats:  # the canary client: the secret inside several documents
                text = f"# {canary}\n{text}"
            rows.append({"text": text, "group": group})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "privacy-corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return PrivacyData(path, canary, sorted(groups)[0], candidates)


# ------------------------------------------------------------------ attacks


def roc_auc(member_scores: list[float], nonmember_scores: list[float]) -> float:
    """P(score of a random member > score of a random non-member) (Mann-Whitney U; ties count half)."""
    m, n = np.asarray(member_scores), np.asarray(nonmember_scores)
    if m.size == 0 or n.size == 0:
        return float("nan")
    greater = (m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()
    return float(greater / (m.size * n.size))


def per_window_losses(model, windows: list[list[int]], pad_id: int) -> list[float]:
    from fedge.peft_methods.adapters import mean_token_loss

    return [mean_token_loss(model, [w], pad_id) for w in windows]


def exposure(model, tokenizer, canary: str, candidates: list[str], pad_id: int) -> dict:
    """Carlini et al. 2019: log2(|candidates| + 1) - log2(rank of the canary by loss)."""
    texts = [canary] + candidates
    windows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    losses = per_window_losses(model, windows, pad_id)
    rank = 1 + sum(1 for loss in losses[1:] if loss < losses[0])
    return {"exposure": math.log2(len(texts)) - math.log2(rank), "rank": rank, "candidates": len(texts),
            "max_exposure": math.log2(len(texts))}


# ------------------------------------------------------------------ the shared server loop


def secure_client_app():
    """The edge ClientApp's handlers, wrapped in the privacy mods."""
    from flwr.clientapp import ClientApp

    from fedge.edge import federated_client
    from fedge.edge.secure_aggregation import dp_mod, secagg_mod

    app = ClientApp(mods=[secagg_mod, dp_mod])
    app.query()(federated_client.query)
    app.train()(federated_client.train)
    return app


def trained_layout(method_spec):
    """The layout of what clients send (the method's trained tensors), from the train message."""
    from fedge.protocol.secagg import VectorLayout

    def layout(messages) -> VectorLayout:
        record = next(iter(messages[0].content.array_records.values()))
        return VectorLayout(tuple((k, tuple(a.shape), "float32") for k, a in sorted(record.items())
                                  if method_spec.trains(k)))

    return layout


def secure_grid_wrapper(config, dp=None, threshold: float = 0.6, seed: int = 0):
    """A `grid_wrapper` for `run_federated`: train rounds under secure aggregation (+ DP if given).

    Clients send the method's trained tensors directly (FFA/FedSVD: B only), so the masked sum is
    exactly the sum the strategy would have computed in the clear."""
    from fedge.cloud.secure_aggregation import SecureAggregationGrid, SecureAggregationSettings
    from fedge.protocol.secagg_records import UPDATE_DIRECT

    settings = SecureAggregationSettings(threshold=threshold, update_mode=UPDATE_DIRECT,
                                         layout=trained_layout(config.method_spec), dp=dp,
                                         population=config.num_clients, seed=seed)
    return lambda grid: SecureAggregationGrid(grid, settings)


def _simulate(config, corpus, body) -> dict:
    """Run `body(grid, run)` as the ServerApp of one Flower simulation; returns what it returned."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedge.cloud.federated_server import FederatedRun
    from fedge.simulations.federated import backend_config

    out: dict = {}
    run = FederatedRun(config, corpus)
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        try:
            grid.pull_interval = config.pull_interval
            out["result"] = body(grid, run)
        except BaseException as exc:  # run_simulation only logs; keep it for the caller
            out["error"] = exc
            raise

    run_simulation(server_app=app, client_app=secure_client_app(), num_supernodes=config.num_clients,
                   backend_name="ray", backend_config=backend_config(config), verbose_logging=False)
    if "error" in out:
        raise out["error"]
    if "result" not in out:
        raise RuntimeError("the privacy simulation ended without a result (see the log above)")
    return out["result"]


def _train_rounds(grid, strategy, config, state, rounds: int):
    """configure -> (secure) send_and_receive -> aggregate -> finalize, as the cloud's round loop does."""
    from fedge.cloud.federated_server import finalize, to_record

    for server_round in range(1, rounds + 1):
        if getattr(grid, "budget_exhausted", False):
            break
        messages = strategy.configure_train(server_round, to_record(state), config.client_config(), grid)
        replies = grid.send_and_receive(messages, timeout=config.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            state, _ = finalize(config, new_arrays.to_torch_state_dict(), state)
    return state


# ------------------------------------------------------------------ fedge privacy dp


def run_dp_experiment(args: argparse.Namespace) -> dict:
    from fedge.cloud.federated_config import FederatedConfig
    from fedge.cloud.federated_server import build_strategy
    from fedge.cloud.secure_aggregation import SecureAggregationGrid, SecureAggregationSettings
    from fedge.data import load_corpus
    from fedge.peft_methods.adapters import AdaptedModel, eval_windows, pad_token_id
    from fedge.peft_methods.dp import DPConfig, RDPAccountant, calibrate_noise_multiplier
    from fedge.protocol.secagg_records import UPDATE_DIRECT

    workdir = Path(tempfile.mkdtemp(prefix="fedge-privacy-"))
    data = build_dataset(workdir, args.clients, args.examples_per_client, args.canary_repeats, args.seed)
    config = FederatedConfig(model=args.model, data=f"jsonl:{data.path}", partition="natural",
                             num_clients=args.clients, clients_per_round=args.clients_per_round, rounds=args.rounds,
                             method="ffa", rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, lr=args.lr, eval_examples=args.eval_examples, seed=args.seed,
                             noop_rounds=0, targets=args.targets)
    corpus = load_corpus(config.data, "natural", num_clients=config.num_clients, seed=config.seed)
    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients))
    sample_rate = config.clients_per_round / config.num_clients
    threshold = max(2, math.ceil(0.6 * config.clients_per_round))
    epsilons = [float(e) for e in args.epsilons.split(",")]

    def body(grid, run):
        node_of_partition = run._discover(grid)
        evaluator = AdaptedModel(config.model, config.adapter_spec)
        tok, pad_id = evaluator.tokenizer, pad_token_id(evaluator.tokenizer)
        init = evaluator.get_state()
        members = [w for c in corpus.clients for w in eval_windows(c.train, tok, args.eval_examples, config.seq_len)]
        nonmembers = [w for c in corpus.clients for w in eval_windows(c.heldout, tok, args.eval_examples,
                                                                       config.seq_len)]
        reference = (per_window_losses(evaluator.model, members, pad_id),
                     per_window_losses(evaluator.model, nonmembers, pad_id))
        rows = []
        for eps in epsilons:
            start = time.perf_counter()
            if math.isinf(eps):
                dp, sigma = None, 0.0
            else:
                sigma = calibrate_noise_multiplier(eps, args.delta, sample_rate, config.rounds)
                dp = DPConfig(clip_norm=args.clip, noise_multiplier=sigma, delta=args.delta, max_epsilon=eps,
                              min_clients=threshold)
            settings = SecureAggregationSettings(threshold=threshold, update_mode=UPDATE_DIRECT,
                                                 layout=trained_layout(config.method_spec), dp=dp,
                                                 population=config.num_clients, seed=args.seed)
            secure = SecureAggregationGrid(grid, settings)
            strategy = build_strategy(config, node_of_partition)
            state = _train_rounds(secure, strategy, config, init, config.rounds)
            evaluator.set_state(state)
            member_loss = per_window_losses(evaluator.model, members, pad_id)
            nonmember_loss = per_window_losses(evaluator.model, nonmembers, pad_id)
            heldout_loss = float(np.mean(nonmember_loss))
            row = {
                "epsilon": eps, "noise_multiplier": sigma, "clip_norm": args.clip if dp else None,
                "rounds_run": len(secure.history),
                "epsilon_spent": secure.privacy_log[-1].epsilon if secure.privacy_log else (0.0 if dp else math.inf),
                "heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss),
                "mia_auc_loss": roc_auc([-x for x in member_loss], [-x for x in nonmember_loss]),
                "mia_auc_reference": roc_auc([r - x for x, r in zip(member_loss, reference[0], strict=True)],
                                             [r - x for x, r in zip(nonmember_loss, reference[1], strict=True)]),
                **{f"canary_{k}": v for k, v in exposure(evaluator.model, tok, data.canary, data.candidates,
                                                          pad_id).items()},
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            log.warning("epsilon %s: %s", eps, {k: row[k] for k in ("heldout_perplexity", "mia_auc_loss",
                                                                     "canary_exposure")})
        evaluator.set_state(init)
        base = exposure(evaluator.model, tok, data.canary, data.candidates, pad_id)
        return {"rows": rows, "init_heldout_perplexity": math.exp(float(np.mean(reference[1]))),
                "init_canary_exposure": base["exposure"]}

    result = _simulate(config, corpus, body)
    inf_row = next((r for r in result["rows"] if math.isinf(r["epsilon"])), None)
    for row in result["rows"]:
        row["perplexity_cost"] = (row["heldout_perplexity"] / inf_row["heldout_perplexity"] - 1) if inf_row else None
    accountant_check = RDPAccountant(conversion="classic")
    accountant_check.step(1.12, 256 / 60000, 60 * 60000 // 256)
    return {"experiment": "dp", "config": asdict(config), "delta": args.delta, "sample_rate": sample_rate,
            "secagg_threshold": threshold, "canary_client": data.canary_client, "canary_repeats": args.canary_repeats,
            "members": args.eval_examples, **result,
            "accountant_check": {"setting": "TF Privacy MNIST: sigma 1.12, q 256/60000, 60 epochs, delta 1e-5",
                                 "published": 2.92, "ours": accountant_check.epsilon(1e-5)}}


# ------------------------------------------------------------------ fedge privacy secagg-time


def crypto_microbenchmark(vector_length: int, clients: int, dropout: float, repeats: int = 1) -> dict:
    """The cryptography alone, in process: a secure round vs summing the same vectors in the clear."""
    from fedge.protocol.secagg import SecAggConfig, run_in_process

    rng = np.random.default_rng(0)
    updates = {i + 1: rng.normal(0, 0.01, vector_length) for i in range(clients)}
    dropped = list(range(1, int(round(dropout * clients)) + 1))
    config = SecAggConfig(threshold=max(2, math.ceil(0.6 * clients)), clip_range=1.0, max_clients=clients,
                          vector_length=vector_length)
    secure, plain = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = run_in_process(updates, config, drop_after_sharing=dropped)
        secure.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        expected = np.sum([updates[c] for c in result.survivors], axis=0)
        plain.append(time.perf_counter() - t0)
    assert np.max(np.abs(result.total - expected)) < 1e-5  # the secure sum is the sum
    return {"vector_length": vector_length, "clients": clients, "dropout": dropout, "dropped": len(dropped),
            "secure_s_all_parties": min(secure), "secure_s_per_client_avg": min(secure) / clients,
            "plain_sum_s": min(plain)}


def run_secagg_time(args: argparse.Namespace) -> dict:
    from fedge.cloud.federated_config import FederatedConfig
    from fedge.cloud.federated_server import build_strategy
    from fedge.cloud.secure_aggregation import SecureAggregationGrid, SecureAggregationSettings
    from fedge.data import load_corpus
    from fedge.peft_methods.adapters import AdaptedModel
    from fedge.protocol.secagg_records import UPDATE_DIRECT

    config = FederatedConfig(model=args.model, data="stdlib", partition=args.partition, num_clients=args.clients,
                             clients_per_round=args.clients_per_round, rounds=args.rounds, method="ffa",
                             rank=args.rank, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_examples=1, seed=args.seed, noop_rounds=0)
    corpus = load_corpus("stdlib", args.partition, num_clients=args.clients, seed=args.seed)
    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients), clients_per_round=min(config.clients_per_round,
                                                                                         len(corpus.clients)))
    dropouts = [float(d) for d in args.dropouts.split(",")]

    def body(grid, run):
        node_of_partition = run._discover(grid)
        init = AdaptedModel(config.model, config.adapter_spec).get_state()
        # warm-up: every actor loads its model and data once, outside the timed rounds
        warm = SecureAggregationGrid(grid, SecureAggregationSettings(secure=False, update_mode=UPDATE_DIRECT,
                                                                     layout=trained_layout(config.method_spec)))
        _train_rounds(warm, build_strategy(config, node_of_partition), config, init, 1)
        rows = []
        for dropout in dropouts:
            for secure in (False, True):
                settings = SecureAggregationSettings(threshold=0.6, secure=secure, update_mode=UPDATE_DIRECT,
                                                     layout=trained_layout(config.method_spec),
                                                     simulate_dropout=dropout, seed=args.seed)
                wrapped = SecureAggregationGrid(grid, settings)
                _train_rounds(wrapped, build_strategy(config, node_of_partition), config, init, config.rounds)
                times = [h.seconds for h in wrapped.history]
                rows.append({"dropout": dropout, "secure": secure, "round_s": float(np.median(times)),
                             "round_s_all": times, "survivors": [h.survivors for h in wrapped.history],
                             "stage_s": [h.stage_seconds for h in wrapped.history]})
        vector_length = sum(int(np.prod(a.shape)) for k, a in init.items() if config.method_spec.trains(k))
        return {"rows": rows, "vector_length": vector_length}

    result = _simulate(config, corpus, body)
    for row in result["rows"]:
        plain = next(r for r in result["rows"] if r["dropout"] == row["dropout"] and not r["secure"])
        row["ratio_vs_plain"] = row["round_s"] / plain["round_s"]
    crypto = [crypto_microbenchmark(args.crypto_vector_length, config.clients_per_round, d) for d in dropouts]
    return {"experiment": "secagg-time", "config": asdict(config), **result, "crypto": crypto}


# ------------------------------------------------------------------ output


def _plot_dp(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = ["inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(x, [r["mia_auc_loss"] for r in rows], "o-", label="loss threshold")
    axes[0].plot(x, [r["mia_auc_reference"] for r in rows], "s-", label="reference model")
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].set(title="membership inference", ylabel="ROC AUC")
    axes[0].legend()
    axes[1].plot(x, [r["canary_exposure"] for r in rows], "o-")
    axes[1].set(title="canary exposure", ylabel="bits")
    axes[2].plot(x, [r["heldout_perplexity"] for r in rows], "o-")
    axes[2].set(title="utility", ylabel="held-out perplexity")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.set_xlabel("epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_time(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dropouts = sorted({r["dropout"] for r in report["rows"]})
    x = np.arange(len(dropouts))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for offset, secure in ((-0.2, False), (0.2, True)):
        values = [next(r["round_s"] for r in report["rows"] if r["dropout"] == d and r["secure"] == secure)
                  for d in dropouts]
        ax.bar(x + offset, values, width=0.4, label="secure aggregation" if secure else "plain")
    ax.set_xticks(x, [f"{d:.0%}" for d in dropouts])
    ax.set(xlabel="clients dropping after sharing keys", ylabel="round time (s)",
           title=f"{report['config']['clients_per_round']} clients per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_dp(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client-level DP + secure aggregation ({report['config']['model']}, "
                        f"{report['config']['rounds']} rounds, q={report['sample_rate']:.2f}, delta={report['delta']})")
    for col in ("epsilon", "sigma", "eps spent", "rounds", "held-out ppl", "ppl cost", "MIA AUC (loss)",
                "MIA AUC (ref)", "canary exposure"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row("inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}", f"{r['noise_multiplier']:.2f}",
                      "inf" if math.isinf(r["epsilon_spent"]) else f"{r['epsilon_spent']:.2f}", str(r["rounds_run"]),
                      f"{r['heldout_perplexity']:.2f}",
                      "" if r["perplexity_cost"] is None else f"{r['perplexity_cost']:+.1%}",
                      f"{r['mia_auc_loss']:.3f}", f"{r['mia_auc_reference']:.3f}",
                      f"{r['canary_exposure']:.2f} / {r['canary_max_exposure']:.1f}")
    Console().print(table)


def _print_time(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"secure aggregation vs plain rounds ({report['config']['clients_per_round']} clients per "
                        f"round, {report['vector_length']} values per update)")
    for col in ("dropout", "mode", "round s (median)", "ratio", "survivors"):
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row(f"{r['dropout']:.0%}", "secure" if r["secure"] else "plain", f"{r['round_s']:.3f}",
                      f"{r['ratio_vs_plain']:.2f}x", ",".join(map(str, r["survivors"])))
    Console().print(table)
    crypto = Table(title="cryptography alone (all parties, in process)")
    for col in ("values", "clients", "dropout", "secure s", "per client s", "plain sum s"):
        crypto.add_column(col, justify="right")
    for c in report["crypto"]:
        crypto.add_row(str(c["vector_length"]), str(c["clients"]), f"{c['dropout']:.0%}",
                       f"{c['secure_s_all_parties']:.3f}", f"{c['secure_s_per_client_avg']:.4f}",
                       f"{c['plain_sum_s']:.4f}")
    Console().print(crypto)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    try:
        if args.action == "dp":
            report = run_dp_experiment(args)
            _print_dp(report)
            plot = _plot_dp
        else:
            report = run_secagg_time(args)
            _print_time(report)
            plot = _plot_time
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedge: {exc}", file=sys.stderr)
        return 2
    json_path = Path(args.json)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot_path = json_path.with_suffix(".png")
    plot(report, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0
