"""The cloud's LoRA-aware Flower strategies: who trains a round, what each client gets, how replies are summed.

Flower's own strategies (`FedAvg`, `FedProx`, `FedAdam` from `flwr.serverapp.strategy`) are extended
by one class, `LoraFedAvg`, that sits between them and `FedAvg` in the MRO (`LoraFedAdam(FedAdam,
LoraFedAvg)`): FedProx still injects its proximal term, FedAdam still applies its server-side Adam
step to the aggregated adapter, and `LoraFedAvg` replaces the two things that must know about LoRA:

- `configure_train`: samples clients by partition id with a seeded per-round RNG (reproducible and
  resumable; Flower's node ids are random per run), and sends each client the global adapter at the
  client's rank (HetLoRA truncates to the first r_k components);
- `aggregate_train`: checks every reply (crashed, timed out, NaN/Inf, wrong keys or shapes, bad
  weight) and leaves bad ones out with the reason recorded, zero-pads the good updates to the global
  rank, takes their example-weighted sum and adds it to the global adapter;
- `aggregate_secure`: the same step when secure aggregation already summed the updates
  (`fedge.cloud.secagg_server.Aggregate`): the strategy never sees an individual update.

FedSVD/HetLoRA re-factorise (SVD) after the strategy step, in `finalize`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedge.cloud.federated_config import FederatedConfig
from fedge.cloud.secagg_server import Aggregate
from fedge.peft_methods.aggregation import (
    StateDict,
    aggregation_error,
    apply_aggregate,
    pad_rank,
    refactorize,
    seeded_lora_A,
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


def down_record(state: StateDict, method: MethodSpec, seed: int) -> ArrayRecord:
    """What the server sends a client: the adapter less the factors it rebuilds from the seed (FFA-LoRA's
    frozen A). Refuses a state whose frozen A is not the seeded one: the clients would train another adapter."""
    kept = {k: v for k, v in state.items() if method.sends_down(k)}
    for key in state.keys() - kept.keys():
        if not torch.equal(state[key], seeded_lora_A(seed, key, tuple(state[key].shape), state[key].dtype)):
            raise ValueError(f"{key} is not the seeded init its clients rebuild ({method.name} freezes it); "
                             "start from AdaptedModel's own init")
    return to_record(kept)


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
        self.sent: dict[int, SentUpdate] = {}
        self.global_state: StateDict = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self.rejections: list[Rejection] = []
        self.accepted: list[int] = []
        self.client_metrics: dict[int, dict] = {}
        self.aggregation_error: float | None = None

    def setup_lora(self, *, method: MethodSpec, global_rank: int, clients_per_round: int, seed: int,
                   node_of_partition: dict[int, int], min_clients: int = 1, round_timeout: float = 600.0) -> LoraFedAvg:
        self.method = method
        self.global_rank = global_rank
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.node_of_partition = node_of_partition
        self.min_clients = min_clients
        self.round_timeout = round_timeout
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
            if rank not in by_rank:  # the adapter at this rank, less what the client rebuilds from the seed
                state = self.global_state if rank == self.global_rank else truncate_rank(self.global_state, rank)
                by_rank[rank] = down_record(state, self.method, self.seed)
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

    def _start_aggregation(self) -> None:
        self.rejections, self.accepted, self.bytes_up, self.client_metrics = [], [], 0, {}
        self.aggregation_error = None

    def _reject_silent(self, server_round: int, answered: set[int]) -> None:
        """Every sampled client that did not answer is left out; log every rejection of the round."""
        for node, sent in self.sent.items():
            if node not in answered:
                self.rejections.append(Rejection(sent.partition_id, f"no reply within {self.round_timeout:g} s"))
        for rej in self.rejections:
            log.warning("round %d: client %d left out: %s", server_round, rej.partition_id, rej.reason)

    def _enough(self, server_round: int, good: int) -> bool:
        if good < self.min_clients:
            log.warning("round %d: %d good updates < min %d; global adapter unchanged", server_round,
                        good, self.min_clients)
            return False
        return True

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._start_aggregation()
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
        self._reject_silent(server_round, answered)
        if not self._enough(server_round, len(updates)):
            return None, None
        summed = weighted_sum(updates, weights)  # raw weights: num-examples per client
        # linear step only (global + sum); FedSVD/HetLoRA re-factorise after any server optimiser
        new_state, _ = apply_aggregate("fedavg", self.global_state, summed, self.global_rank)
        self.aggregation_error = aggregation_error(self.global_state, updates, weights, new_state)
        total = sum(weights)
        train_loss = sum(w * float(self.client_metrics[p].get("train-loss", 0.0))
                         for w, p in zip(weights, self.accepted, strict=True)) / total
        return to_record(new_state), MetricRecord({"train-loss": train_loss, "clients": len(updates)})

    def aggregate_secure(self, server_round: int,
                         aggregate: Aggregate | None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's update when secure aggregation summed it: only the sum, its weight and who is in it.

        The individual updates (their train losses, the aggregation error) stay hidden; bytes up are
        those of the masked messages."""
        self._start_aggregation()
        if aggregate is None:  # the privacy budget stopped the round before anything was sent
            self._reject_silent(server_round, set())
            return None, None
        self.bytes_up = aggregate.bytes_up
        for node in aggregate.dropped:
            self.rejections.append(Rejection(self.sent[node].partition_id,
                                             "client failed: dropped out of the secure-aggregation round"))
        self.accepted = [self.sent[node].partition_id for node in aggregate.survivors]
        self._reject_silent(server_round, set(aggregate.survivors) | set(aggregate.dropped))
        if not self._enough(server_round, len(aggregate.survivors)):
            return None, None
        mean = {k: torch.from_numpy(np.asarray(v / aggregate.weight, dtype=np.float32))
                for k, v in aggregate.total.items()}
        new_state, _ = apply_aggregate("fedavg", self.global_state, pad_rank(mean, self.global_rank),
                                       self.global_rank)
        return to_record(new_state), MetricRecord({"clients": len(aggregate.survivors)})

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


def build_strategy(config: FederatedConfig, node_of_partition: dict[int, int]) -> LoraFedAvg:
    common = dict(method=config.method_spec, global_rank=config.rank, clients_per_round=config.clients_per_round,
                  seed=config.seed, node_of_partition=node_of_partition, min_clients=config.min_clients,
                  round_timeout=config.round_timeout)
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
