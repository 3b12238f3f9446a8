"""The Flower ServerApp of the cloud coordinator: LoRA-aware strategies, checkpoints, bad-update rejection.

Flower's own strategies (`FedAvg`, `FedProx`, `FedAdam` from `flwr.serverapp.strategy`) are extended
by one class, `LoraFedAvg`, that sits between them and `FedAvg` in the MRO (`LoraFedAdam(FedAdam,
LoraFedAvg)`): FedProx still injects its proximal term, FedAdam still applies its server-side Adam
step to the aggregated adapter, and `LoraFedAvg` replaces the two things that must know about LoRA:

- `configure_train`: samples clients by partition id with a seeded per-round RNG (reproducible and
  resumable; Flower's node ids are random per run), and sends each client the global adapter at the
  client's rank (HetLoRA truncates to the first r_k components);
- `aggregate_train`: checks every reply (crashed, timed out, NaN/Inf, wrong keys or shapes, bad
  weight) and leaves bad ones out with the reason recorded, zero-pads the good updates to the global
  rank and sums them with `self.summation(updates, example_counts)` (plain `weighted_sum`; a masked sum can
  replace it: every method's update is linear in what the clients send), then adds the sum to the
  global adapter. FedSVD/HetLoRA re-factorise (SVD) after the strategy step, in `finalize`.

The round loop (`FederatedRun.execute`) is ours rather than `Strategy.start`, because it checkpoints
after every round and resumes from one, counts bytes, evaluates the global adapter on every
client's held-out text with the full-precision target, and measures the no-op round overhead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedge.cloud.federated_config import FederatedConfig
from fedge.peft_methods.aggregation import (
    StateDict,
    Summation,
    aggregation_error,
    apply_aggregate,
    pad_rank,
    refactorize,
    truncate_rank,
    weighted_sum,
)
from fedge.peft_methods.config import MethodSpec

log = logging.getLogger("fedge.federated")

def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised tensors (what crosses the wire for this record)."""
    return sum(len(array.data) for array in record.values())


def to_record(state: StateDict) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def sample_partitions(seed: int, server_round: int, partitions: list[int], count: int) -> list[int]:
    """The clients of a round: a function of (seed, round) only, so a resumed run picks the same."""
    return sorted(random.Random(f"fedge-sample:{seed}:{server_round}").sample(sorted(partitions), count))


@dataclass
class SentUpdate:
    partition_id: int
    rank: int
    expected: dict[str, tuple[int, ...]]  # key -> shape of what the client must send back


@dataclass
class Rejection:
    partition_id: int
    reason: str


class LoraFedAvg(FedAvg):
    """FedAvg extended with LoRA-aware sampling, per-rank messages, checks and aggregation."""

    def __init__(self, **kwargs) -> None:
        # FedOpt/FedProx call this through the MRO with Flower's own keyword arguments only
        kwargs.setdefault("fraction_evaluate", 0.0)  # the server evaluates the global adapter itself
        super().__init__(**kwargs)
        self.summation: Summation = weighted_sum
        self.sent: dict[int, SentUpdate] = {}
        self.global_state: StateDict = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self.rejections: list[Rejection] = []
        self.accepted: list[int] = []
        self.client_metrics: dict[int, dict] = {}
        self.aggregation_error: float | None = None

    def setup_lora(self, *, method: MethodSpec, global_rank: int, clients_per_round: int, seed: int,
                   node_of_partition: dict[int, int], min_clients: int = 1, round_timeout: float = 600.0,
                   summation: Summation = weighted_sum) -> LoraFedAvg:
        self.method = method
        self.global_rank = global_rank
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.node_of_partition = node_of_partition
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.summation = summation
        self.min_train_nodes = self.min_available_nodes = clients_per_round
        self.fraction_evaluate = 0.0  # the server evaluates the global adapter itself
        return self

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        pids = sample_partitions(self.seed, server_round, list(self.node_of_partition), self.clients_per_round)
        self.sent, self.bytes_down = {}, 0
        config["server-round"] = server_round
        messages = []
        by_rank: dict[int, ArrayRecord] = {}
        for pid in pids:
            rank = self.method.rank_for(pid, self.global_rank)
            if rank not in by_rank:
                by_rank[rank] = arrays if rank == self.global_rank else to_record(
                    truncate_rank(self.global_state, rank))
            record = by_rank[rank]
            expected = {k: tuple(a.shape) for k, a in record.items() if self.method.trains(k)}
            node = self.node_of_partition[pid]
            self.sent[node] = SentUpdate(pid, rank, expected)
            self.bytes_down += record_bytes(record)
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def check_reply(self, msg: Message, sent: SentUpdate) -> tuple[str | None, StateDict, float]:
        """(reason to reject or None, the update, its weight)."""
        if msg.has_error():
            return f"client failed: {msg.error.reason}", {}, 0.0
        content = msg.content
        if self.arrayrecord_key not in content.array_records or "metrics" not in content.metric_records:
            return "reply lacks the update or its metrics", {}, 0.0
        record = content.array_records[self.arrayrecord_key]
        self.bytes_up += record_bytes(record)
        weight = float(content.metric_records["metrics"].get(self.weighted_by_key, 0))
        if not math.isfinite(weight) or weight <= 0:
            return f"bad weight {self.weighted_by_key}={weight}", {}, 0.0
        keys = set(record.keys())
        if keys != set(sent.expected):
            missing, extra = sorted(set(sent.expected) - keys), sorted(keys - set(sent.expected))
            return f"wrong tensors: missing {missing[:2]}, unexpected {extra[:2]}", {}, 0.0
        for key, array in record.items():
            if tuple(array.shape) != sent.expected[key]:
                return f"wrong shape for {key}: {tuple(array.shape)} != {sent.expected[key]}", {}, 0.0
        update = record.to_torch_state_dict()
        for key, tensor in update.items():
            if not torch.isfinite(tensor).all():
                return f"non-finite values (NaN/Inf) in {key}", {}, 0.0
        return None, update, weight

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.rejections, self.accepted, self.bytes_up, self.client_metrics = [], [], 0, {}
        self.aggregation_error = None
        updates, weights, answered = [], [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            sent = self.sent.get(node)
            if sent is None:
                continue  # a late reply from an earlier round
            answered.add(node)
            reason, update, weight = self.check_reply(msg, sent)
            if reason is not None:
                self.rejections.append(Rejection(sent.partition_id, reason))
                continue
            updates.append(pad_rank(update, self.global_rank))
            weights.append(weight)
            self.accepted.append(sent.partition_id)
            self.client_metrics[sent.partition_id] = dict(msg.content.metric_records["metrics"])
        for node, sent in self.sent.items():
            if node not in answered:
                self.rejections.append(Rejection(sent.partition_id, f"no reply within {self.round_timeout:g} s"))
        for rej in self.rejections:
            log.warning("round %d: client %d left out: %s", server_round, rej.partition_id, rej.reason)
        if len(updates) < self.min_clients:
            log.warning("round %d: %d good updates < min %d; global adapter unchanged", server_round,
                        len(updates), self.min_clients)
            return None, None
        summed = self.summation(updates, weights)  # raw weights: num-examples per client
        # linear step only (global + sum); FedSVD/HetLoRA re-factorise after any server optimiser
        new_state, _ = apply_aggregate("fedavg", self.global_state, summed, self.global_rank)
        # measured on the plain (unmasked) updates only: a masked sum hides the individual updates
        self.aggregation_error = (aggregation_error(self.global_state, updates, weights, new_state)
                                  if self.summation is weighted_sum else None)
        total = sum(weights)
        train_loss = sum(w * float(self.client_metrics[p].get("train-loss", 0.0))
                         for w, p in zip(weights, self.accepted, strict=True)) / total
        return to_record(new_state), MetricRecord({"train-loss": train_loss, "clients": len(updates)})

    # strategy state for checkpoints (FedOpt's moments; nothing for FedAvg/FedProx)
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(self, name, None) or {}).items():
                out[f"{name}/{k}"] = np.asarray(v)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            if part and hasattr(self, name):
                setattr(self, name, part)


class LoraFedProx(FedProx, LoraFedAvg):
    """FedProx (proximal term sent to clients) with LoRA-aware aggregation."""


class LoraFedAdam(FedAdam, LoraFedAvg):
    """FedAdam (server-side Adam on the aggregated adapter) with LoRA-aware aggregation."""


def build_strategy(config: FederatedConfig, node_of_partition: dict[int, int],
                   summation: Summation = weighted_sum) -> LoraFedAvg:
    common = dict(method=config.method_spec, global_rank=config.rank, clients_per_round=config.clients_per_round,
                  seed=config.seed, node_of_partition=node_of_partition, min_clients=config.min_clients,
                  round_timeout=config.round_timeout, summation=summation)
    if config.strategy == "fedprox":
        strategy: LoraFedAvg = LoraFedProx(proximal_mu=config.proximal_mu)
    elif config.strategy == "fedadam":
        # eta_l is only informational in Flower's FedAdam; tau keeps tiny LoRA moments stable
        strategy = LoraFedAdam(eta=config.server_lr, eta_l=config.lr, tau=1e-6)
    else:
        strategy = LoraFedAvg()
    return strategy.setup_lora(**common)


def finalize(config: FederatedConfig, state: StateDict, like: StateDict) -> tuple[StateDict, float]:
    """The method's non-linear step after the (linear) strategy aggregation; the adapter keeps the
    dtypes of `like` (FedAdam's numpy arithmetic would otherwise promote it to float64)."""
    state = {k: v.to(like[k].dtype) if k in like else v for k, v in state.items()}
    if config.method in ("fedsvd", "hetlora"):
        return refactorize(state, config.rank)
    return state, 0.0


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(directory: Path, server_round: int, state: StateDict, strategy: LoraFedAvg,
                    payload: dict) -> None:
    """round-NNNN/{adapter,strategy}.safetensors + state.json, then `latest` is switched atomically."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"round-{server_round:04d}"
    tmp = directory / f".tmp-round-{server_round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter.safetensors"))
    save_numpy(strategy.state_arrays() or {"_empty": np.zeros(0)}, str(tmp / "strategy.safetensors"))
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    marker = directory / ".latest.tmp"
    marker.write_text(target.name)
    os.replace(marker, directory / "latest")
    for old in sorted(directory.glob("round-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path) -> tuple[StateDict, dict[str, np.ndarray], dict] | None:
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    marker = directory / "latest"
    if not marker.exists():
        return None
    target = directory / marker.read_text().strip()
    payload = json.loads((target / "state.json").read_text())
    arrays = {k: v for k, v in load_numpy(str(target / "strategy.safetensors")).items() if k != "_empty"}
    return load_file(str(target / "adapter.safetensors")), arrays, payload


# ------------------------------------------------------------------ the run


@dataclass
class FederatedResult:
    records: list[dict] = field(default_factory=list)
    final_state: StateDict = field(default_factory=dict)
    overhead_rounds_s: list[float] = field(default_factory=list)
    resumed_from: int = 0
    model_bytes: int = 0
    discovery_s: float = 0.0


class FederatedRun:
    """One federated run: the ServerApp's body, with its evaluator and checkpoints."""

    def __init__(self, config: FederatedConfig, corpus, on_round: Callable[[dict], None] | None = None,
                 summation: Summation = weighted_sum, grid_wrapper: Callable[[Grid], Grid] | None = None) -> None:
        self.config = config
        self.corpus = corpus
        self.on_round = on_round
        self.summation = summation
        # wraps the grid for training rounds, e.g. fedge.cloud.secure_aggregation.SecureAggregationGrid
        self.grid_wrapper = grid_wrapper
        self.result = FederatedResult()
        self.error: BaseException | None = None
        self.checkpoint = self._load_resume_checkpoint() if config.resume else None

    def _load_resume_checkpoint(self):
        """Checked before any simulation starts: a missing or foreign checkpoint is a clear error."""
        ckpt_dir = Path(self.config.checkpoint_dir) if self.config.checkpoint_dir else None
        loaded = load_checkpoint(ckpt_dir) if ckpt_dir else None
        if loaded is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        payload = loaded[2]
        if payload["identity"] != self.config.identity():
            raise ValueError(f"--resume: checkpoint in {ckpt_dir} is of a different run configuration "
                             f"({payload['config']}); refusing to mix runs")
        return loaded

    def server_app(self) -> ServerApp:
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                self.execute(grid)
            except BaseException as exc:  # run_simulation only logs errors; keep it for the caller
                self.error = exc
                raise

        return app

    def _discover(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id, asked once from every node."""
        expected = len(self.corpus.clients)
        deadline = time.time() + 120
        while len(nodes := list(grid.get_node_ids())) < expected:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {expected} simulated nodes came up")
            time.sleep(0.02)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                            dst_node_id=n) for n in nodes]
        mapping = {}
        for reply in grid.send_and_receive(messages, timeout=self.config.round_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed discovery: {reply.error.reason}")
            pid = int(reply.content.metric_records["metrics"]["partition-id"])
            mapping[pid] = reply.metadata.src_node_id
        if len(mapping) != expected:
            raise RuntimeError(f"discovery found {len(mapping)} of {expected} partitions")
        return mapping

    def _measure_overhead(self, grid: Grid, node_of_partition: dict[int, int], state: StateDict) -> None:
        """No-op rounds: the same messages and payloads as a training round, no work on the clients."""
        cfg = self.config
        record = to_record(state)
        config = cfg.client_config()
        config["noop"] = True
        for i in range(cfg.noop_rounds):
            pids = sample_partitions(cfg.seed + 7919, i, list(node_of_partition), cfg.clients_per_round)
            messages = [Message(RecordDict({"arrays": record, "config": config}), message_type=MessageType.TRAIN,
                                dst_node_id=node_of_partition[p]) for p in pids]
            start = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
            self.result.overhead_rounds_s.append(time.perf_counter() - start)
            failed = [r.error.reason for r in replies if r.has_error()]
            if failed or len(replies) != len(messages):
                raise RuntimeError(f"no-op round failed: {failed or 'missing replies'}")

    def execute(self, grid: Grid) -> None:
        from fedge.peft_methods.adapters import AdaptedModel, eval_windows, mean_token_loss, pad_token_id

        cfg = self.config
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = cfg.pull_interval  # Flower polls replies every 0.1 s by default
        start = time.perf_counter()
        node_of_partition = self._discover(grid)
        self.result.discovery_s = time.perf_counter() - start

        evaluator = AdaptedModel(cfg.model, cfg.adapter_spec)  # the full-precision target
        base = evaluator.model.get_base_model()
        self.result.model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        pad_id = pad_token_id(evaluator.tokenizer)
        eval_clients = [c for c in self.corpus.clients if c.heldout]
        if 0 < cfg.eval_clients < len(eval_clients):  # many virtual clients: a fixed seeded sample
            eval_clients = random.Random(f"fedge-eval:{cfg.seed}").sample(eval_clients, cfg.eval_clients)
        eval_sets = {c.name: eval_windows(c.heldout, evaluator.tokenizer, cfg.eval_examples, cfg.seq_len)
                     for c in eval_clients}

        def evaluate(state: StateDict) -> dict:
            evaluator.set_state(state)
            losses, tokens = {}, {}
            for name, windows in eval_sets.items():
                if windows:
                    losses[name] = mean_token_loss(evaluator.model, windows, pad_id)
                    tokens[name] = sum(len(w) - 1 for w in windows)
            total = sum(tokens.values())
            loss = sum(losses[n] * tokens[n] for n in losses) / total
            worst = max(losses, key=losses.get)
            return {"global_loss": loss, "global_perplexity": math.exp(loss), "client_loss": losses,
                    "worst_client": worst, "worst_client_loss": losses[worst],
                    "worst_client_perplexity": math.exp(losses[worst])}

        strategy = build_strategy(cfg, node_of_partition, self.summation)
        state = evaluator.get_state()
        first_round = 1
        ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        if self.checkpoint is not None:
            state, strategy_arrays, payload = self.checkpoint
            strategy.load_state_arrays(strategy_arrays)
            self.result.records = payload["records"]
            first_round = payload["round"] + 1
            self.result.resumed_from = payload["round"]
            log.warning("resuming after round %d from %s", payload["round"], ckpt_dir)

        self._measure_overhead(grid, node_of_partition, state)
        if self.grid_wrapper is not None:
            grid = self.grid_wrapper(grid)
        if first_round == 1:
            record = {"round": 0, **evaluate(state), "bytes_up": 0, "bytes_down": 0, "clients": [],
                      "rejected": []}
            self._publish(record)

        names = {i: c.name for i, c in enumerate(self.corpus.clients)}
        for server_round in range(first_round, cfg.rounds + 1):
            if getattr(grid, "budget_exhausted", False):
                log.warning("privacy budget exhausted: stopping before round %d", server_round)
                break
            round_start = time.perf_counter()
            arrays = to_record(state)
            messages = strategy.configure_train(server_round, arrays, cfg.client_config(), grid)
            replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            trunc = 0.0
            if new_arrays is not None:
                state, trunc = finalize(cfg, new_arrays.to_torch_state_dict(), state)
            train_s = time.perf_counter() - round_start
            eval_start = time.perf_counter()
            record = {
                "round": server_round,
                **evaluate(state),
                "clients": [names[strategy.sent[n].partition_id] for n in strategy.sent],
                "accepted": [names[p] for p in strategy.accepted],
                "rejected": [{"client": names[r.partition_id], "reason": r.reason} for r in strategy.rejections],
                "personal_loss": {names[p]: m["personal-loss"] for p, m in strategy.client_metrics.items()
                                  if "personal-loss" in m},
                "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
                "bytes_down": strategy.bytes_down,
                "bytes_up": strategy.bytes_up,
                "bytes_up_per_client": strategy.bytes_up / max(1, len(strategy.sent) - len(
                    [r for r in strategy.rejections if r.reason.startswith(("no reply", "client failed"))])),
                "bytes_down_per_client": strategy.bytes_down / max(1, len(strategy.sent)),
                "truncation_error": trunc,
                # ||aggregated update - sum_k p_k (B_k A_k - B_k0 A_k0)|| / ||...||, before any server optimiser
                "aggregation_error": strategy.aggregation_error,
                "train_s": train_s,
                "eval_s": time.perf_counter() - eval_start,
                **_privacy_fields(grid),
            }
            self._publish(record)
            if ckpt_dir is not None:
                save_checkpoint(ckpt_dir, server_round, state, strategy, {
                    "round": server_round, "identity": cfg.identity(), "config": asdict(cfg),
                    "seed": cfg.seed, "records": self.result.records,
                })
        self.result.final_state = state

    def _publish(self, record: dict) -> None:
        self.result.records.append(record)
        if self.on_round is not None:
            self.on_round(record)


def _privacy_fields(grid) -> dict:
    """Epsilon spent and secure-aggregation survivors, when the grid is a secure one."""
    log_ = getattr(grid, "privacy_log", None)
    history = getattr(grid, "history", None)
    out = {}
    if log_:
        out["epsilon"] = log_[-1].epsilon
    if history:
        out["secagg_survivors"] = history[-1].survivors
        out["secagg_dropped"] = history[-1].dropped
    return out


def overhead_s_per_round(times: list[float]) -> float | None:
    """Median no-op round after the first (which also starts the Ray actors)."""
    if not times:
        return None
    return statistics.median(times[1:]) if len(times) > 1 else times[0]
