"""`fedge privacy dp`: what leaks from the global adapter, at what epsilon, at what cost.

The experiment runs the project's real federated LoRA path on the default model: Flower's simulation
engine (Ray), the edge ClientApp's train function (local LoRA with peft) wrapped in the privacy mods
(`fedge.edge.secagg_mods.secagg_mod`, `dp_mod`), the cloud's LoRA-aware strategy and the one round
loop (`fedge.cloud.federated_rounds.run_rounds`) through `fedge.cloud.secagg_server.SecureAggregationGrid`.
One ServerApp trains every epsilon back to back from the same init in the same simulation, so the
comparison shares the machine and the actors.

For each epsilon (inf = no DP: no clipping, no noise) the global adapter is trained with secure
aggregation and client-level distributed DP calibrated to spend that epsilon over the rounds, then
attacked: membership inference (loss-threshold, and reference-model: loss minus the base model's
loss, on the documents clients trained on vs documents of the same families that no client saw;
ROC AUC with a 95% interval), canary exposure (a random secret at the top of several of one
client's documents, ranked among random secrets of the same format), and its utility (held-out
perplexity on the non-member documents). Settings are the ones under which a model memorises (few
short documents per client, several local steps, the canary repeated): the signal at epsilon inf
is what an honest-but-curious reader of the released adapter could get.

Secure-aggregation timing (`fedge privacy secagg-time`) is `fedge.simulations.privacy_secagg_time`.
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
from fedge.models import DEFAULT_MODEL
from fedge.simulations.privacy_attacks import (
    PrivacyData,
    auc_halfwidth,
    build_dataset,
    exposure,
    per_window_losses,
    roc_auc,
)

log = logging.getLogger("fedge.privacy")


@dataclass
class DPExperiment:
    """`fedge privacy dp`: the DP budgets to compare and the small federation they are compared on."""

    model: str = DEFAULT_MODEL
    epsilons: tuple[float, ...] = (math.inf, 8.0, 4.0, 1.0)
    delta: float = 1e-3  # below 1/number of clients
    clip: float = 0.01  # client update L2 clip norm C (under DP; see the README for why so small)
    clients: int = 5  # every client takes part in every round (the accountant charges q = 1 anyway)
    rounds: int = 3
    steps: int = 6
    batch_size: int = 4
    seq_len: int = 64
    lr: float = 2e-2
    rank: int = 8
    targets: str = "q_proj,k_proj,v_proj,o_proj"
    # members: short documents, each within one training window with the canary line on top (120 characters
    # are about 33 tokens); their number sets how tight the attack AUC is (95% half-width ~0.06 at chance)
    examples_per_client: int = 32
    nonmembers_per_client: int = 48  # documents of the same families nobody trains on (cheap: scored only)
    doc_chars: int = 120
    canary_repeats: int = 6
    candidates: int = 255  # random secrets the canary is ranked among (max exposure log2(256) = 8 bits)
    client_model: str = "target"  # what clients train on (the int4 draft is ~1.6x slower per step on CPU)
    seed: int = 0


# ------------------------------------------------------------------ secure aggregation around the one round loop


def secure_mods() -> list:
    """The ClientApp mods of private rounds: secure aggregation (with DP), and DP for plain rounds."""
    from fedge.edge.secagg_mods import dp_mod, secagg_mod

    return [secagg_mod, dp_mod]


def secure_grid_wrapper(config: FederatedConfig):
    """A `grid_wrapper` for `run_federated`: train rounds under secure aggregation (+ the config's DP)."""
    from fedge.cloud.federated_rounds import privacy_grid_wrapper

    return privacy_grid_wrapper(replace(config, secagg=True))


def train_secure(grid, config: FederatedConfig, node_of_partition: dict[int, int], init, rounds: int,
                 after_round=None, **overrides):
    """A fresh strategy trained from `init` for `rounds` rounds through the run's secure grid
    (`fedge.cloud.federated_rounds.privacy_grid_wrapper`: secure aggregation and the config's DP),
    with experiment-only `overrides` of its settings (`secure=False`, `simulate_dropout`); returns
    (state, the secure grid)."""
    from fedge.cloud.federated_rounds import run_rounds
    from fedge.cloud.secagg_server import SecureAggregationGrid
    from fedge.cloud.strategies import build_strategy

    secure = secure_grid_wrapper(config)(grid)
    if overrides:
        secure = SecureAggregationGrid(grid, replace(secure.settings, **overrides))
    state = run_rounds(secure, build_strategy(config, node_of_partition), config, init, 1, rounds, after_round)
    return state, secure


def simulate_private(config: FederatedConfig, body):
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
                             num_clients=experiment.clients, clients_per_round=experiment.clients,
                             rounds=experiment.rounds, method="ffa", rank=experiment.rank, steps=experiment.steps,
                             batch_size=experiment.batch_size, seq_len=experiment.seq_len, lr=experiment.lr,
                             eval_examples=1, seed=experiment.seed, noop_rounds=0, targets=experiment.targets,
                             client_model=experiment.client_model)
    corpus = load_corpus(config.data, "natural", num_clients=config.num_clients, seed=config.seed)
    if len(corpus.clients) != config.num_clients:
        n = len(corpus.clients)
        config = replace(config, num_clients=n, clients_per_round=n)
    return config, corpus


def _norm(state: dict, before: dict) -> float:
    return float(np.sqrt(sum(float(((state[k].double() - before[k].double()) ** 2).sum()) for k in state)))


class _Attacks:
    """The evaluator model and the member / non-member documents every epsilon is attacked on."""

    def __init__(self, config: FederatedConfig, corpus, data: PrivacyData) -> None:
        from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, pad_token_id

        self.evaluator = AdaptedModel(config.model, config.adapter_spec)
        self.tok, self.pad_id, self.data = self.evaluator.tokenizer, pad_token_id(self.evaluator.tokenizer), data
        self.init = self.evaluator.get_state()
        trained = [ex for c in corpus.clients for ex in c.train]  # exactly what the clients train on
        # the canary's documents open with a secret line that no non-member has: an attack could tell them
        # apart by that line alone, so they are scored beside the members, not as members
        topped = [ex for ex in trained if ex.text.startswith(data.canary)]
        if not topped:
            raise ValueError("every canary document was held out of training; use another --seed")
        members = [ex for ex in trained if not ex.text.startswith(data.canary)]
        nonmembers = [ex.text for c in corpus.clients for ex in c.heldout] + [t for ts in data.nonmembers.values()
                                                                               for t in ts]
        self.members = eval_windows(members, self.tok, len(members), config.seq_len)
        self.canary_docs = eval_windows(topped, self.tok, len(topped), config.seq_len)
        self.nonmembers = [w for w in (self.tok(t, add_special_tokens=False)["input_ids"][:config.seq_len]
                                       for t in nonmembers) if len(w) >= 2]
        self.canary_copies, self.trained_docs = len(topped), len(trained)
        self.reference = self.losses(self.init)

    def losses(self, state) -> tuple[list[float], list[float], list[float]]:
        """Per-window mean loss of (members, non-members, canary documents) under `state`."""
        self.evaluator.set_state(state)
        windows = self.members + self.nonmembers + self.canary_docs
        out = per_window_losses(self.evaluator.model, windows, self.pad_id)
        m, n = len(self.members), len(self.nonmembers)
        return out[:m], out[m:m + n], out[m + n:]

    def measure(self, state) -> dict:
        member_loss, nonmember_loss, canary_loss = self.losses(state)
        ref_members, ref_nonmembers, ref_canary = self.reference
        heldout_loss = float(np.mean(nonmember_loss))
        auc_loss = roc_auc([-x for x in member_loss], [-x for x in nonmember_loss])
        member_ref = [r - x for x, r in zip(member_loss, ref_members, strict=True)]
        nonmember_ref = [r - x for x, r in zip(nonmember_loss, ref_nonmembers, strict=True)]
        auc_ref = roc_auc(member_ref, nonmember_ref)
        m, n = len(member_loss), len(nonmember_loss)
        # the earlier design: the canary's documents counted as members too (their secret line is a confounder)
        with_canary = roc_auc(member_ref + [r - x for x, r in zip(canary_loss, ref_canary, strict=True)],
                              nonmember_ref)
        return {
            "heldout_loss": heldout_loss, "heldout_perplexity": math.exp(heldout_loss),
            "member_loss": float(np.mean(member_loss)),
            "mia_auc_loss": auc_loss, "mia_auc_loss_ci95": auc_halfwidth(auc_loss, m, n),
            "mia_auc_reference": auc_ref, "mia_auc_reference_ci95": auc_halfwidth(auc_ref, m, n),
            "mia_auc_reference_with_canary_docs": with_canary,
            "mia_scores_reference": {"members": member_ref, "nonmembers": nonmember_ref},
            **{f"canary_{k}": v for k, v in self.canary(state).items()},
        }

    def canary(self, state) -> dict:
        self.evaluator.set_state(state)
        return exposure(self.evaluator.model, self.tok, self.data.canary, self.data.candidates, self.pad_id)


def _dp_run_config(experiment: DPExperiment, eps: float, config: FederatedConfig) -> FederatedConfig:
    """The run config of one epsilon: secure aggregation, and DP unless eps is inf (then no clipping,
    no noise); `FederatedConfig.dp_config` calibrates sigma (q = 1) to spend eps over the rounds, the
    noise coming in shares from at least the secure-aggregation threshold's clients."""
    return replace(config, secagg=True, dp_epsilon=0.0 if math.isinf(eps) else eps, dp_clip=experiment.clip,
                   dp_delta=experiment.delta)


def _dp_row(experiment: DPExperiment, eps: float, grid, config: FederatedConfig, nodes: dict[int, int],
            attacks: _Attacks) -> dict:
    """Train under DP calibrated to `eps` (inf: no DP) with secure aggregation, then attack the adapter."""
    start = time.perf_counter()
    norms, previous = [], [attacks.init]

    def after_round(server_round, state, truncation, metrics) -> None:
        norms.append(_norm(state, previous[0]))
        previous[0] = state
        log.warning("epsilon %s: round %d/%d done", eps, server_round, config.rounds)

    state, secure = train_secure(grid, _dp_run_config(experiment, eps, config), nodes, attacks.init, config.rounds,
                                 after_round)
    dp = secure.settings.dp
    row = {"epsilon": eps, "noise_multiplier": dp.noise_multiplier if dp else 0.0,
           "clip_norm": dp.clip_norm if dp else None, "rounds_run": len(secure.history),
           "epsilon_spent": secure.privacy_log[-1].epsilon if secure.privacy_log else (0.0 if dp else math.inf),
           "global_update_norm_per_round": norms, "survivors": [h.survivors for h in secure.history],
           **attacks.measure(state), "seconds": time.perf_counter() - start}
    log.warning("epsilon %s: %s", eps, {k: round(row[k], 3) for k in ("heldout_perplexity", "mia_auc_loss",
                                                                        "mia_auc_reference", "canary_exposure")})
    return row


def run_dp_experiment(experiment: DPExperiment) -> dict:
    from fedge.peft_methods.dp import RDPAccountant

    data = build_dataset(Path(tempfile.mkdtemp(prefix="fedge-privacy-")), experiment.clients,
                         experiment.examples_per_client, experiment.canary_repeats, experiment.seed,
                         experiment.doc_chars, experiment.nonmembers_per_client, experiment.candidates)
    config, corpus = _dp_config(experiment, data)
    from fedge.cloud.secagg_server import SecureAggregationSettings

    threshold = SecureAggregationSettings(threshold=config.secagg_threshold).threshold_for(config.clients_per_round)

    def body(grid, nodes):
        attacks = _Attacks(config, corpus, data)
        ref_members, ref_nonmembers, _ = attacks.reference
        init = {"heldout_perplexity": math.exp(float(np.mean(ref_nonmembers))),
                # the loss attack on the untrained model: how much harder the members are to begin with
                "mia_auc_loss": roc_auc([-x for x in ref_members], [-x for x in ref_nonmembers]),
                **{f"canary_{k}": v for k, v in attacks.canary(attacks.init).items()}}
        rows = [_dp_row(experiment, eps, grid, config, nodes, attacks) for eps in experiment.epsilons]
        return {"rows": rows, "init": init, "members": len(attacks.members), "nonmembers": len(attacks.nonmembers),
                "canary_copies_trained": attacks.canary_copies, "trained_docs": attacks.trained_docs}

    start = time.perf_counter()
    result = simulate_private(config, body)
    inf_row = next((r for r in result["rows"] if math.isinf(r["epsilon"])), None)
    for row in result["rows"]:
        row["perplexity_cost"] = (row["heldout_perplexity"] / inf_row["heldout_perplexity"] - 1) if inf_row else None
    accountant_check = RDPAccountant(conversion="classic")
    accountant_check.step(1.12, 256 / 60000, 60 * 60000 // 256)
    return {"experiment": "dp", "experiment_settings": asdict(experiment), "config": asdict(config),
            "delta": experiment.delta, "sample_rate": 1.0, "secagg_threshold": threshold,
            "canary_client": data.canary_client, "canary_repeats": experiment.canary_repeats, **result,
            "wall_s": time.perf_counter() - start,
            "accountant_check": {"setting": "TF Privacy MNIST: sigma 1.12, q 256/60000, 60 epochs, delta 1e-5",
                                 "published": 2.92, "ours": accountant_check.epsilon(1e-5)}}


def write_report(report: dict, json_path: Path) -> Path:
    """The report as JSON and its plot beside it (same name, .png); returns the plot's path."""
    from fedge.simulations.privacy_report import plot_dp, plot_time

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    plot_path = json_path.with_suffix(".png")
    (plot_dp if report["experiment"] == "dp" else plot_time)(report, plot_path)
    return plot_path
