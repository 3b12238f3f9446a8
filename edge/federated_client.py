"""The Flower ClientApp of an edge device: train LoRA on local data, send only the adapter update.

Message API, three handlers:

- `query`: reply with this node's partition id (the server maps node ids to data partitions once,
  so client sampling and seeds do not depend on Flower's random node ids: runs are reproducible and
  resumable);
- `train`: load the received global adapter (at this client's rank), train it on the local
  partition, evaluate the personalised adapter on the local held-out text, and reply with the update
  of the tensors the method trains (`trained - received`, e.g. only lora_B for FFA-LoRA), passed
  through the update pipeline;
- `train` with `noop`: reply with a zero update of the right shape without touching the model, to
  measure the simulation's own per-round overhead.

Update pipeline (the hook for privacy): `UPDATE_TRANSFORMS` maps a name to a factory
`factory(arg: str) -> transform`, and `transform(update, ctx) -> update` runs on the client's update
(a dict of peft-key -> tensor, already a delta) in the order given by the `transforms` config entry,
e.g. `"clip:1.0,noise:0.8,mask"`. A name with a dot (`pkg.module:factory`) is imported, so a
transform registers itself wherever it lives. DP clip + noise and secure-aggregation masking plug in
here; masking must come last, and for HetLoRA a `pad` transform (zero-pad to the global rank) must
precede it so that every client's masked tensors have the same shape.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch  # imported here, not lazily: ArrayRecord.to_torch_state_dict needs torch in the actor
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.edge.lora_trainer import LocalTrainConfig, train_local
from fedge.peft_methods.adapters import AdaptedModel, eval_windows, mean_token_loss, pad_token_id
from fedge.peft_methods.aggregation import StateDict, adapter_rank, client_delta, pad_rank
from fedge.peft_methods.config import AdapterSpec, MethodSpec


@dataclass
class UpdateContext:
    """What an update transform may know about the update it transforms."""

    partition_id: int
    server_round: int
    seed: int
    num_examples: int
    global_rank: int
    config: dict = field(default_factory=dict)


UpdateTransform = Callable[[StateDict, UpdateContext], StateDict]
UPDATE_TRANSFORMS: dict[str, Callable[[str], UpdateTransform]] = {}


def register_update_transform(name: str, factory: Callable[[str], UpdateTransform]) -> None:
    UPDATE_TRANSFORMS[name] = factory


def _pad_transform(arg: str) -> UpdateTransform:
    return lambda update, ctx: pad_rank(update, ctx.global_rank)


register_update_transform("pad", _pad_transform)


def build_update_pipeline(spec: str) -> list[UpdateTransform]:
    """`"name[:arg],..."` -> transforms; `pkg.module:factory[:arg]` imports the factory."""
    pipeline = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, arg = item.partition(":")
        if "." in name:
            factory_name, _, arg = arg.partition(":")
            factory = getattr(importlib.import_module(name), factory_name)
        elif name in UPDATE_TRANSFORMS:
            factory = UPDATE_TRANSFORMS[name]
        else:
            raise ValueError(f"unknown update transform {name!r}; known: {sorted(UPDATE_TRANSFORMS)}")
        pipeline.append(factory(arg))
    return pipeline


# ------------------------------------------------------------- per-process state (reused by Ray actors)

_MODELS: dict[tuple, AdaptedModel] = {}
_CORPORA: dict[tuple, object] = {}


def adapter_spec_from(config: ConfigRecord) -> AdapterSpec:
    return AdapterSpec(rank=int(config["global-rank"]), scale=float(config["scale"]),
                       target_modules=tuple(str(config["targets"]).split(",")), peft=str(config["peft"]),
                       init_seed=int(config["seed"]))


def _runtime(config: ConfigRecord) -> tuple[AdaptedModel, object]:
    threads = int(config.get("threads", 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    spec = adapter_spec_from(config)
    model_key = (str(config["model"]), spec)
    if model_key not in _MODELS:
        _MODELS.clear()  # one base model per actor process
        _MODELS[model_key] = AdaptedModel(str(config["model"]), spec)
    data_key = (str(config["data"]), str(config["partition"]), int(config["num-clients"]), int(config["seed"]))
    if data_key not in _CORPORA:
        from fedge.data import load_corpus

        _CORPORA.clear()
        _CORPORA[data_key] = load_corpus(data_key[0], data_key[1], num_clients=data_key[2], seed=data_key[3])
    return _MODELS[model_key], _CORPORA[data_key]


def _faults(config: ConfigRecord, server_round: int) -> dict[int, str]:
    """Deliberate misbehaviour per partition, to exercise the server's checks: "3:nan,5:crash@2"
    (KIND in nan, inf, shape, crash, slow, hang; "@R" limits it to round R)."""
    out = {}
    for item in filter(None, str(config.get("faults", "")).split(",")):
        pid, _, kind = item.partition(":")
        kind, _, only_round = kind.partition("@")
        if not only_round or int(only_round) == server_round:
            out[int(pid)] = kind
    return out


def _inject_fault(kind: str, update: StateDict, timeout: float) -> StateDict:
    if kind == "crash":
        raise RuntimeError("injected client crash")
    if kind == "slow":  # past the round timeout: the server must go on without this client
        time.sleep(timeout + 2.0)
        return update
    if kind == "hang":  # a client that never answers (tests kill the run meanwhile)
        time.sleep(3600)
    key = sorted(update)[0]
    bad = dict(update)
    if kind == "nan":
        bad[key] = update[key].clone().fill_(float("nan"))
    elif kind == "inf":
        bad[key] = update[key].clone().fill_(float("inf"))
    elif kind == "shape":
        bad[key] = torch.zeros(update[key].shape[0] + 1, *update[key].shape[1:])
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return bad


# ------------------------------------------------------------- the ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "pid": os.getpid()})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    received: ArrayRecord = msg.content["arrays"]
    pid = int(context.node_config["partition-id"])
    method = MethodSpec(str(config["method"]))
    if bool(config.get("noop", False)):
        # zero update of the right shape: the message path without any work
        zeros = {k: np.zeros(a.shape, dtype=np.float32) for k, a in received.items() if method.trains(k)}
        reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zeros.items()}),
                            "metrics": MetricRecord({"num-examples": 1, "partition-id": pid})})
        return Message(reply, reply_to=msg)
    started = time.perf_counter()
    adapted, corpus = _runtime(config)
    client = corpus.clients[pid]
    state = received.to_torch_state_dict()
    rank = adapter_rank(state)
    adapted.set_state(state, rank)
    server_round = int(config["server-round"])
    seed = int(config["seed"])
    train_config = LocalTrainConfig(steps=int(config["steps"]), batch_size=int(config["batch-size"]),
                                    seq_len=int(config["seq-len"]), lr=float(config["lr"]),
                                    proximal_mu=float(config.get("proximal-mu", 0.0)))
    torch.manual_seed(seed * 1_000_003 + server_round * 1009 + pid)
    result = train_local(adapted, client.train, rank, method.trains, train_config,
                         seed=(seed, server_round, pid))
    metrics = {"num-examples": len(client.train), "partition-id": pid, "rank": rank,
               "train-loss": result.loss, "train-tokens": result.tokens}
    windows = eval_windows(client.heldout, adapted.tokenizer, int(config["eval-examples"]), train_config.seq_len)
    if windows:  # the personalised adapter (just trained) on this client's own held-out text
        metrics["personal-loss"] = mean_token_loss(adapted.model, windows, pad_token_id(adapted.tokenizer))
    update = client_delta(adapted.get_state(rank), state, method.trains)
    ctx = UpdateContext(partition_id=pid, server_round=server_round, seed=seed,
                        num_examples=len(client.train), global_rank=int(config["global-rank"]),
                        config=dict(config))
    for transform in build_update_pipeline(str(config.get("transforms", ""))):
        update = transform(update, ctx)
    fault = _faults(config, server_round).get(pid)
    if fault:
        update = _inject_fault(fault, update, float(config.get("round-timeout", 0.0)))
    metrics["train-s"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)

