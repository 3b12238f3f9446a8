"""The Flower ClientApp of an edge device: train LoRA on local data, send only the adapter update.

Message API, two handlers:

- `query`: reply with this node's partition id (the server maps node ids to data partitions once,
  so client sampling and seeds do not depend on Flower's random node ids: runs are reproducible and
  resumable);
- `train`: load the received global adapter (at this client's rank), train it on the local
  partition, evaluate the personalised adapter on the local held-out text, and reply with the update
  of the tensors the method trains (`trained - received`, e.g. only lora_B for FFA-LoRA);
  with `noop` in the config it replies with a zero update of the right shape without touching the
  model, to measure the simulation's own per-round overhead.

Privacy is added around the app, not inside it: the Flower mods in `fedge.edge.secagg_mods`
(`secagg_mod`: DP clip + noise and secure-aggregation masking; `dp_mod`: DP for plain rounds) wrap
`train` without changing it.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch  # imported here, not lazily: ArrayRecord.to_torch_state_dict needs torch in the actor
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.edge.lora_trainer import LocalTrainConfig, train_local
from fedge.edge.training_model import load_training_model, served_model
from fedge.peft_methods.aggregation import adapter_rank, client_delta
from fedge.peft_methods.config import AdapterSpec, MethodSpec
from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, mean_token_loss, pad_token_id

# ------------------------------------------------------------- per-process state (reused by Ray actors)

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
    adapted = load_training_model(str(config["model"]), spec, client_model=str(config.get("client-model", "target")),
                                  quant=str(config.get("draft-quant", "int4")),
                                  keep_layers=int(config.get("draft-layers", 0)) or None)
    data_key = (str(config["data"]), str(config["partition"]), int(config["num-clients"]), int(config["seed"]))
    if data_key not in _CORPORA:
        from fedge.data import load_corpus

        _CORPORA.clear()
        _CORPORA[data_key] = load_corpus(data_key[0], data_key[1], num_clients=data_key[2], seed=data_key[3])
    return adapted, _CORPORA[data_key]


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
    trained = adapted.get_state(rank, fill_from=state)  # a truncated draft: received values for dropped layers
    windows = eval_windows(client.heldout, adapted.tokenizer, int(config["eval-examples"]), train_config.seq_len)
    if windows:  # the personalised adapter (just trained) on this client's own held-out text, on the target
        served = served_model(adapted.model_name, adapted.spec)
        served.set_state(trained, rank)
        metrics["personal-loss"] = mean_token_loss(served.model, windows, pad_token_id(served.tokenizer))
    update = client_delta(trained, state, method.trains)
    metrics["train-s"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)

