"""`fedge privacy secagg-time`: what secure aggregation costs a round, on the real adapter.

Secure-aggregation rounds vs plain rounds of the same training (the same clients, the same adapter:
the default model's FFA lora_B), with 0%, 10% and 30% of the sampled clients dropping after
sharing keys (plain rounds simply lose the same clients). Each (dropout, mode) is timed `repeats`
times as one-round runs, plain and secure interleaved and their order alternated, so the load of a
shared machine lands on both alike; the report gives the median and the spread, and the
secure round's stages (advertise, share, mask = train + mask, consistency, unmask) to show where the
overhead goes. Beside it: the cryptography alone, in process, at the same vector length.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from fedge.cloud.federated_config import FederatedConfig
from fedge.models import DEFAULT_MODEL
from fedge.simulations.privacy import simulate_private, train_secure

log = logging.getLogger("fedge.privacy")


@dataclass
class SecAggTimeExperiment:
    """`fedge privacy secagg-time`: secure vs plain rounds at several dropout rates."""

    model: str = DEFAULT_MODEL
    clients: int = 10
    partition: str = "iid"
    repeats: int = 3  # one-round runs per (dropout, mode)
    dropouts: tuple[float, ...] = (0.0, 0.1, 0.3)
    steps: int = 1
    batch_size: int = 1
    seq_len: int = 32
    rank: int = 8
    targets: str = "q_proj,v_proj"
    client_model: str = "target"
    seed: int = 0


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


def _config(experiment: SecAggTimeExperiment) -> FederatedConfig:
    from fedge.data import load_corpus

    config = FederatedConfig(model=experiment.model, data="stdlib", partition=experiment.partition,
                             num_clients=experiment.clients, clients_per_round=experiment.clients, rounds=1,
                             method="ffa", rank=experiment.rank, steps=experiment.steps, targets=experiment.targets,
                             batch_size=experiment.batch_size, seq_len=experiment.seq_len, eval_examples=1,
                             seed=experiment.seed, noop_rounds=0, client_model=experiment.client_model)
    corpus = load_corpus("stdlib", experiment.partition, num_clients=experiment.clients, seed=experiment.seed)
    if len(corpus.clients) != config.num_clients:
        n = len(corpus.clients)
        config = replace(config, num_clients=n, clients_per_round=n)
    return config


def _one_round(grid, config: FederatedConfig, nodes, init, dropout: float, secure: bool):
    _, wrapped = train_secure(grid, config, nodes, init, 1, secure=secure, simulate_dropout=dropout)
    return wrapped.history[-1]


def _summary(dropout: float, secure: bool, stats: list) -> dict:
    times = [s.seconds for s in stats]
    stages = {k: float(np.median([s.stage_seconds.get(k, 0.0) for s in stats])) for k in stats[0].stage_seconds}
    return {"dropout": dropout, "secure": secure, "round_s": float(np.median(times)), "round_s_min": min(times),
            "round_s_max": max(times), "round_s_all": times, "survivors": [s.survivors for s in stats],
            "stage_s_median": stages}


def run_secagg_time(experiment: SecAggTimeExperiment) -> dict:
    from fedge.peft_methods.lora_model import AdaptedModel

    if experiment.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    config = _config(experiment)
    total = len(experiment.dropouts) * experiment.repeats * 2

    def body(grid, nodes):
        init = AdaptedModel(config.model, config.adapter_spec).get_state()
        for secure in (False, True):  # warm-up: actors load the model and data; crypto code paths run once
            _one_round(grid, config, nodes, init, 0.0, secure)
        stats = {(d, s): [] for d in experiment.dropouts for s in (False, True)}
        done = 0
        for repeat in range(experiment.repeats):
            for dropout in experiment.dropouts:
                for secure in ((False, True) if repeat % 2 == 0 else (True, False)):
                    stats[dropout, secure].append(_one_round(grid, config, nodes, init, dropout, secure))
                    done += 1
                    log.warning("secagg-time: %d/%d runs (dropout %.0f%%, %s)", done, total, 100 * dropout,
                                "secure" if secure else "plain")
        rows = [_summary(d, s, v) for (d, s), v in stats.items()]
        vector_length = sum(int(np.prod(a.shape)) for k, a in init.items() if config.method_spec.trains(k))
        return {"rows": rows, "vector_length": vector_length}

    start = time.perf_counter()
    result = simulate_private(config, body)
    for row in result["rows"]:
        plain = next(r for r in result["rows"] if r["dropout"] == row["dropout"] and not r["secure"])
        row["ratio_vs_plain"] = row["round_s"] / plain["round_s"]
        ratios = [a / b for a, b in zip(row["round_s_all"], plain["round_s_all"], strict=True)]
        row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)  # per repeat, side by side
    crypto = [crypto_microbenchmark(result["vector_length"], config.clients_per_round, d)
              for d in experiment.dropouts]
    return {"experiment": "secagg-time", "experiment_settings": asdict(experiment), "config": asdict(config),
            **result, "crypto": crypto, "wall_s": time.perf_counter() - start}
