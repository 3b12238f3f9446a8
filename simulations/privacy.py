"""`fedge privacy ...`: what leaks, at what epsilon, at what cost; and what secure aggregation costs.

Both experiments run the project's real federated LoRA path: Flower's simulation engine (Ray), the
edge ClientApp's train function (local LoRA with peft) wrapped in the privacy mods
(`fedge.edge.secagg_mods.secagg_mod`, `dp_mod`), the cloud's LoRA-aware strategy
(`fedge.cloud.strategies.build_strategy`) and the one round loop (`fedge.cloud.federated_rounds.run_rounds`)
driven through `fedge.cloud.secagg_server.SecureAggregationGrid`. One ServerApp runs every
configuration of an experiment back to back in the same simulation, so the comparisons share the
machine and the actors.

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

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fedge.cloud.federated_config import FederatedConfig
from fedge.simulations.privacy_attacks import PrivacyData, build_dataset, exposure, per_window_losses, roc_auc

log = logging.getLogger("fedge.privacy")


@dataclass
class DPExperiment:
    """`fedge privacy dp`: the DP budgets to compare and the small federation they are compared on."""

    model: str = "tiny-random-llama"
    epsilons: tuple[float, ...] = (math.inf, 8.0, 4.0, 1.0)
    delta: float = 1e-3  # below 1/number of clients
    clip: float = 0.05  # client update L2 clip norm C
    clients: int = 10
    clients_per_round: int = 10
    rounds: int = 4
    steps: int = 8
    batch_size: int = 4
    seq_len: int = 96
    lr: float = 2e-2
    rank: int = 8
    targets: str = "q_proj,k_proj,v_proj,o_proj"
    examples_per_client: int = 8
    eval_examples: int = 4  # member and non-member windows per client
    canary_repeats: int = 4
    seed: int = 0


@dataclass
class SecAggTimeExperiment:
    """`fedge privacy secagg-time`: secure vs plain rounds at several dropout rates."""

    model: str = "tiny-random-llama"
    clients: int = 20
    clients_per_round: int = 20
    partition: str = "iid"
    rounds: int = 2
    dropouts: tuple[float, ...] = (0.0, 0.1, 0.3)
    steps: int = 2
    batch_size: int = 2
    seq_len: int = 64
    rank: int = 8
    crypto_vector_length: int = 184_320  # FFA lora_B of q,v at rank 8 on SmolLM2-135M
    seed: int = 0


# ------------------------------------------------------------------ secure aggregation around the one round loop


def secure_mods() -> list:
    """The ClientApp mods of private rounds: secure aggregation (with DP), and DP for plain rounds."""
    from fedge.edge.secagg_mods import dp_mod, secagg_mod

    return [secagg_mod, dp_mod]


def trained_layout(method_spec):
    """The layout of what clients send (the method's trained tensors), from the train message."""
    from fedge.protocol.secagg import VectorLayout

    def layout(messages) -> VectorLayout:
        record = next(iter(messages[0].content.array_records.values()))
        return VectorLayout(tuple((k, tuple(a.shape), "float32") for k, a in sorted(record.items())
                                  if method_spec.trains(k)))

    return layout


def secure_settings(config: FederatedConfig, dp=None, threshold: float = 0.6, seed: int = 0, **overrides):
    """Secure aggregation (+ DP if given) of what clients send directly (FFA/FedSVD: B only), so the
    masked sum is exactly the sum the strategy would have computed in the clear."""
    from fedge.cloud.secagg_server import SecureAggregationSettings
    from fedge.protocol.secagg_records import UPDATE_DIRECT

    return SecureAggregationSettings(**{"threshold": threshold, "update_mode": UPDATE_DIRECT,
                                        "layout": trained_layout(config.method_spec), "dp": dp,
                                        "population": config.num_clients, "seed": seed, **overrides})


def secure_grid_wrapper(config: FederatedConfig, dp=None, threshold: float = 0.6, seed: int = 0):
    """A `grid_wrapper` for `run_federated`: train rounds under secure aggregation (+ DP if given)."""
    from fedge.cloud.secagg_server import SecureAggregationGrid

    settings = secure_settings(config, dp, threshold, seed)
    return lambda grid: SecureAggregationGrid(grid, settings)


def train_secure(grid, settings, config: FederatedConfig, node_of_partition: dict[int, int], init, rounds: int):
    """A fresh strategy trained from `init` for `rounds` rounds through a secure grid; (state, the grid)."""
    from fedge.cloud.federated_rounds import run_rounds
    from fedge.cloud.secagg_server import SecureAggregationGrid
    from fedge.cloud.strategies import build_strategy

    secure = SecureAggregationGrid(grid, settings)
    state = run_rounds(secure, build_strategy(config, node_of_partition), config, init, 1, rounds)
    return state, secure


def _simulate(config: FederatedConfig, body):
    """`body(grid, node_of_partition)` as the ServerApp of one simulation of the privacy ClientApp."""
    from fedge.cloud.federated_rounds import discover_partitions
    from fedge.simulations.federated import client_app, simulate

    def main(grid):
        return body(grid, discover_partitions(grid, config.num_clients, config.round_timeout))

    return simulate(config, main, client_app(secure_mods()))


# ------------------------------------------------------------------ fedge privacy dp


def _dp_config(experiment: DPExperiment, data: PrivacyData) -> tuple[FederatedConfig, object]:
    from fedge.data import load_corpus

    config = FederatedConfig(model=experiment.model, data=f"jsonl:{data.path}", partition="natural",
                             num_clients=experiment.clients, clients_per_round=experiment.clients_per_round,
                             rounds=experiment.rounds, method="ffa", rank=experiment.rank, steps=experiment.steps,
                             batch_size=experiment.batch_size, seq_len=experiment.seq_len, lr=experiment.lr,
                             eval_examples=experiment.eval_examples, seed=experiment.seed, noop_rounds=0,
                             targets=experiment.targets)
    corpus = load_corpus(config.data, "natural", num_clients=config.num_clients, seed=config.seed)
    if len(corpus.clients) != config.num_clients:
        config = replace(config, num_clients=len(corpus.clients))
    return config, corpus


class _Attacks:
    """The evaluator model and the member / non-member windows every epsilon is attacked on."""

    def __init__(self, config: FederatedConfig, corpus, data: PrivacyData, eval_examples: int) -> None:
        from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, pad_token_id

        self.evaluator = AdaptedModel(config.model, config.adapter_spec)
        self.tok, self.pad_id, self.data = self.evaluator.tokenizer, pad_token_id(self.evaluator.tokenizer), data
        self.init = self.evaluator.get_state()
        self.members = [w for c in corpus.clients for w in eval_windows(c.train, self.tok, eval_examples,
                                                                         config.seq_len)]
        self.nonmembers = [w for c in corpus.clients for w in eval_windows(c.heldout, self.tok, eval_examples,
                                                                            config.seq_len)]
        self.reference = self.losses(self.init)

    def losses(self, state) -> tuple[list[float], list[float]]:
        self.evaluator.set_state(state)
        return (per_window_losses(self.evaluator.model, self.members, self.pad_id),
                per_window_losses(self.evaluator.model, self.nonmembers, self.pad_id))

    def measure(self, state) -> dict:
        member_loss, nonmember_loss = self.losses(state)
        heldout_loss = float(np.mean(nonmember_loss))
        ref_members, ref_nonmembers = self.reference
        return {
            "heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss),
            "mia_auc_loss": roc_auc([-x for x in member_loss], [-x for x in nonmember_loss]),
            "mia_auc_reference": roc_auc([r - x for x, r in zip(member_loss, ref_members, strict=True)],
                                         [r - x for x, r in zip(nonmember_loss, ref_nonmembers, strict=True)]),
            **{f"canary_{k}": v for k, v in self.canary(state).items()},
        }

    def canary(self, state) -> dict:
        self.evaluator.set_state(state)
        return exposure(self.evaluator.model, self.tok, self.data.canary, self.data.candidates, self.pad_id)


def _dp_row(experiment: DPExperiment, eps: float, grid, config: FederatedConfig, nodes: dict[int, int],
            attacks: _Attacks, threshold: int) -> dict:
    """Train under DP calibrated to `eps` (inf: no DP) with secure aggregation, then attack the adapter."""
    from fedge.peft_methods.dp import DPConfig, calibrate_noise_multiplier

    start = time.perf_counter()
    dp, sigma = None, 0.0
    if not math.isinf(eps):
        sigma = calibrate_noise_multiplier(eps, experiment.delta, config.clients_per_round / config.num_clients,
                                           config.rounds)
        dp = DPConfig(clip_norm=experiment.clip, noise_multiplier=sigma, delta=experiment.delta, max_epsilon=eps,
                      min_clients=threshold)
    settings = secure_settings(config, dp, threshold, experiment.seed)
    state, secure = train_secure(grid, settings, config, nodes, attacks.init, config.rounds)
    row = {"epsilon": eps, "noise_multiplier": sigma, "clip_norm": experiment.clip if dp else None,
           "rounds_run": len(secure.history),
           "epsilon_spent": secure.privacy_log[-1].epsilon if secure.privacy_log else (0.0 if dp else math.inf),
           **attacks.measure(state), "seconds": time.perf_counter() - start}
    log.warning("epsilon %s: %s", eps, {k: row[k] for k in ("heldout_perplexity", "mia_auc_loss", "canary_exposure")})
    return row


def run_dp_experiment(experiment: DPExperiment) -> dict:
    from fedge.peft_methods.dp import RDPAccountant

    data = build_dataset(Path(tempfile.mkdtemp(prefix="fedge-privacy-")), experiment.clients,
                         experiment.examples_per_client, experiment.canary_repeats, experiment.seed)
    config, corpus = _dp_config(experiment, data)
    threshold = max(2, math.ceil(0.6 * config.clients_per_round))

    def body(grid, nodes):
        attacks = _Attacks(config, corpus, data, experiment.eval_examples)
        rows = [_dp_row(experiment, eps, grid, config, nodes, attacks, threshold) for eps in experiment.epsilons]
        return {"rows": rows, "init_heldout_perplexity": math.exp(float(np.mean(attacks.reference[1]))),
                "init_canary_exposure": attacks.canary(attacks.init)["exposure"]}

    result = _simulate(config, body)
    inf_row = next((r for r in result["rows"] if math.isinf(r["epsilon"])), None)
    for row in result["rows"]:
        row["perplexity_cost"] = (row["heldout_perplexity"] / inf_row["heldout_perplexity"] - 1) if inf_row else None
    accountant_check = RDPAccountant(conversion="classic")
    accountant_check.step(1.12, 256 / 60000, 60 * 60000 // 256)
    return {"experiment": "dp", "config": asdict(config), "delta": experiment.delta,
            "sample_rate": config.clients_per_round / config.num_clients, "secagg_threshold": threshold,
            "canary_client": data.canary_client, "canary_repeats": experiment.canary_repeats,
            "members": experiment.eval_examples, **result,
            "accountant_check": {"setting": "TF Privacy MNIST: sigma 1.12, q 256/60000, 60 epochs, delta 1e-5",
                                 "published": 2.92, "ours": accountant_check.epsilon(1e-5)}}


# ------------------------------------------------------------------ fedge privacy secagg-time


def crypto_microbenchmark(vector_length: int, clients: int, dropout: float, repeats: int = 1) -> dict:
    """The cryptography alone, in process: a secure round vs summing the same vectors in the clear."""
    from fedge.protocol.secagg import SecAggConfig, run_in_process

    rng = np.random.default_rng(0)
    updates = {i + 1: rng.normal(0, 0.01, vector_length) for i in range(clients)}
    dropped = list(range(1, int(round(dropout * clients)) + 1))
    config = SecAggConfig(threshold=max(3, math.ceil(2 * clients / 3)), clip_range=1.0, max_clients=clients,
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


def _secagg_time_config(experiment: SecAggTimeExperiment) -> FederatedConfig:
    from fedge.data import load_corpus

    config = FederatedConfig(model=experiment.model, data="stdlib", partition=experiment.partition,
                             num_clients=experiment.clients, clients_per_round=experiment.clients_per_round,
                             rounds=experiment.rounds, method="ffa", rank=experiment.rank, steps=experiment.steps,
                             batch_size=experiment.batch_size, seq_len=experiment.seq_len, eval_examples=1,
                             seed=experiment.seed, noop_rounds=0)
    corpus = load_corpus("stdlib", experiment.partition, num_clients=experiment.clients, seed=experiment.seed)
    if len(corpus.clients) != config.num_clients:
        n = len(corpus.clients)
        config = replace(config, num_clients=n, clients_per_round=min(config.clients_per_round, n))
    return config


def run_secagg_time(experiment: SecAggTimeExperiment) -> dict:
    from fedge.peft_methods.lora_model import AdaptedModel

    config = _secagg_time_config(experiment)

    def body(grid, nodes):
        init = AdaptedModel(config.model, config.adapter_spec).get_state()
        # warm-up: every actor loads its model and data once, outside the timed rounds
        train_secure(grid, secure_settings(config, secure=False, population=None), config, nodes, init, 1)
        rows = []
        for dropout in experiment.dropouts:
            for secure in (False, True):
                settings = secure_settings(config, threshold=0.6, seed=experiment.seed, secure=secure,
                                           simulate_dropout=dropout, population=None)
                _, wrapped = train_secure(grid, settings, config, nodes, init, config.rounds)
                times = [h.seconds for h in wrapped.history]
                rows.append({"dropout": dropout, "secure": secure, "round_s": float(np.median(times)),
                             "round_s_all": times, "survivors": [h.survivors for h in wrapped.history],
                             "stage_s": [h.stage_seconds for h in wrapped.history]})
        vector_length = sum(int(np.prod(a.shape)) for k, a in init.items() if config.method_spec.trains(k))
        return {"rows": rows, "vector_length": vector_length}

    result = _simulate(config, body)
    for row in result["rows"]:
        plain = next(r for r in result["rows"] if r["dropout"] == row["dropout"] and not r["secure"])
        row["ratio_vs_plain"] = row["round_s"] / plain["round_s"]
    crypto = [crypto_microbenchmark(experiment.crypto_vector_length, config.clients_per_round, d)
              for d in experiment.dropouts]
    return {"experiment": "secagg-time", "config": asdict(config), **result, "crypto": crypto}


def write_report(report: dict, json_path: Path) -> Path:
    """The report as JSON and its plot beside it (same name, .png); returns the plot's path."""
    from fedge.simulations.privacy_report import plot_dp, plot_time

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot_path = json_path.with_suffix(".png")
    (plot_dp if report["experiment"] == "dp" else plot_time)(report, plot_path)
    return plot_path
