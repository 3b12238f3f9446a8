"""The Flower ClientApp of an edge device: train LoRA on local data, send only the adapter update.

The same module-level `app` runs on a phone's SuperNode (Flower's deployment engine) and on every
virtual node of `fedge simulate federated`. A device's data never comes from the server: it is named
in the node's own config (`flower-supernode --node-config 'data="jsonl:/data/notes.jsonl"'`, optional
`client="alice"`, or `partition-id`/`num-partitions` to take one partition of a shared source). In a
simulation Flower gives each virtual node its `partition-id`; the source the partitions are cut from
is the simulation's node-level default (`SIMULATION_NODE_CONFIG`, set by `fedge.simulations.federated`).

Message API, three handlers:

- `query`: this node's partition id (or -1) and client name; the server orders its nodes by them once,
  so client sampling and seeds do not depend on Flower's random node ids (reproducible, resumable);
- `train`: load the received global adapter (at this client's rank; FFA-LoRA's frozen A does not
  travel: it is rebuilt here from the run's seed, bit for bit the server's), train it on the local data,
  evaluate the personalised adapter on the local held-out text, and reply with the update of the
  tensors the method trains (`trained - received`, e.g. only lora_B for FFA-LoRA); with `noop` in the
  config it replies with a zero update of the right shape without touching the model (the per-round
  overhead of the message path);
- `evaluate`: the global adapter on the full-precision target, on this device's held-out text (the
  server's global metrics are the token-weighted mean of these: federated evaluation).

Models are loaded once per process (`fedge.edge.training_model`): a simulation's Ray actor keeps
them across messages. On a device Flower runs every message in a new process; there the warm
SuperExec (`fedge.edge.warm_superexec --preload-model`) loads the device's base model once and forks
each message's process from it, so a message only wraps its adapter around the inherited base (the
process logs "training model ...: preloaded base" or "loaded").

Privacy wraps the app, not its handlers: `secagg_mod` (secure aggregation, with DP when the server
asks) and `dp_mod` (DP for plain rounds) pass other messages through.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.edge.secagg_mods import dp_mod, secagg_mod
from fedge.peft_methods.config import AdapterSpec, MethodSpec

# Flower's deployment engine starts a fresh `flwr-clientapp` process for every message, so this module
# imports only what every message needs; torch, transformers and the data readers load in the handlers
# that use them (query, no-op rounds and the secure-aggregation key stages never do).

# a simulation's node-level defaults (JSON), inherited by its Ray actors; a real device's node config wins
SIMULATION_NODE_CONFIG = "FEDGE_SIMULATION_NODE_CONFIG"

# ------------------------------------------------------------- per-process state (reused by Ray actors)

_CORPORA: dict[tuple, object] = {}


def adapter_spec_from(config: ConfigRecord) -> AdapterSpec:
    return AdapterSpec(rank=int(config["global-rank"]), scale=float(config["scale"]),
                       target_modules=tuple(str(config["targets"]).split(",")), peft=str(config["peft"]),
                       init_seed=int(config["seed"]))


def node_settings(context: Context) -> dict:
    """This node's own settings: the simulation's defaults overridden by Flower's node config."""
    settings = json.loads(os.environ.get(SIMULATION_NODE_CONFIG, "{}"))
    settings.update(dict(context.node_config))
    if not settings.get("data"):
        raise ValueError("this node has no local data: start it with --node-config 'data=\"jsonl:/path\"'")
    return settings


def node_identity(context: Context) -> tuple[str, int]:
    """(client name, partition id or -1) from the node config, without reading the data."""
    s = node_settings(context)
    pid = int(s.get("partition-id", -1))
    name = str(s.get("client", ""))
    if not name and pid < 0:
        name = os.path.basename(str(s["data"]).split(":")[-1])
    return name, pid


def local_data(context: Context):
    """(client name, partition id or -1, its ClientData), loaded once per process."""
    from fedge.data import load_corpus

    s = node_settings(context)
    pid = int(s.get("partition-id", -1))
    key = (str(s["data"]), str(s.get("partition", "natural" if pid >= 0 else "iid")),
           int(s.get("num-partitions", 1)) if pid >= 0 else 1, int(s.get("seed", 0)))
    if key not in _CORPORA:
        _CORPORA.clear()
        _CORPORA[key] = load_corpus(key[0], key[1], num_clients=key[2], seed=key[3])
    corpus = _CORPORA[key]
    client = corpus.clients[max(pid, 0)]
    name = node_identity(context)[0] or client.name
    return name, pid, client


def preload_data(node_config: dict) -> str:
    """Read this device's data (as its node config names it) into this process's cache, so that the
    ClientApp processes it forks next find it there (fedge.edge.warm_superexec --preload-node-config)."""
    context = Context(run_id=0, node_id=0, node_config=node_config, state=RecordDict(), run_config={})
    return local_data(context)[0]


def _seed_id(name: str, pid: int) -> int:
    return pid if pid >= 0 else zlib.crc32(name.encode())


def _threads(config: ConfigRecord) -> None:
    import torch

    threads = int(config.get("threads", 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_ANNOUNCED: set[int] = set()  # models whose origin this process has logged


def _training_model(config: ConfigRecord):
    from flwr.common import log

    from fedge.edge.training_model import built_on_preloaded, load_training_model

    _threads(config)
    started = time.perf_counter()
    client_model = str(config.get("client-model", "target"))
    adapted = load_training_model(str(config["model"]), adapter_spec_from(config), client_model=client_model,
                                  quant=str(config.get("draft-quant", "int4")),
                                  keep_layers=int(config.get("draft-layers", 0)) or None)
    if id(adapted) not in _ANNOUNCED:  # once per process (a fork of the warm SuperExec: once per message)
        _ANNOUNCED.add(id(adapted))
        origin = "preloaded base" if built_on_preloaded(adapted) else "loaded"
        log(logging.INFO, "fedge: training model %s (%s): %s, %.2f s", config["model"], client_model, origin,
            time.perf_counter() - started)
    return adapted


def _heldout_loss(model_name: str, spec: AdapterSpec, state, rank: int | None, client, config: ConfigRecord):
    """(mean token loss, tokens) of `state` on the target, on this client's held-out text; None if it has none."""
    from fedge.edge.training_model import served_model
    from fedge.peft_methods.lora_model import eval_windows, mean_token_loss, pad_token_id

    served = served_model(model_name, spec)
    windows = eval_windows(client.heldout, served.tokenizer, int(config["eval-examples"]), int(config["seq-len"]))
    if not windows:
        return None
    served.set_state(state, rank)
    return mean_token_loss(served.model, windows, pad_token_id(served.tokenizer)), sum(len(w) - 1 for w in windows)


def _with_frozen(state, config: ConfigRecord, *models):
    """The received adapter completed with the factors this client rebuilds from the seed (FFA-LoRA's A
    never travels): shapes from the first of `models` (callables) that has every missing key (a
    truncated draft lacks the layers it dropped; the target has them all)."""
    from fedge.peft_methods.aggregation import LORA_A, LORA_B, with_seeded_A

    missing = {k.replace(LORA_B, LORA_A) for k in state if LORA_B in k} - set(state)
    if not missing:
        return state
    rank = int(next(v for k, v in state.items() if LORA_B in k).shape[1])
    shapes: dict = {}
    for model in models:
        adapted = model()
        adapted.use_rank(rank)
        shapes.update({k: tuple(v.shape) for k, v in adapted.get_state(rank).items()})
        if missing <= shapes.keys():
            break
    return with_seeded_A(state, shapes, int(config["seed"]))


def _served(config: ConfigRecord):
    from fedge.edge.training_model import served_model

    return served_model(str(config["model"]), adapter_spec_from(config))


# ------------------------------------------------------------- the ClientApp's handlers


def query(msg: Message, context: Context) -> Message:
    name, pid = node_identity(context)
    if not name:  # a simulated partition: named after its data (e.g. the natural group)
        name = local_data(context)[0]
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "pid": os.getpid()}),
                               "info": ConfigRecord({"client": name})}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    received: ArrayRecord = msg.content["arrays"]
    method = MethodSpec(str(config["method"]))
    if bool(config.get("noop", False)):
        # zero update of the right shape: the message path without any work
        zeros = {k: np.zeros(a.shape, dtype=np.float32) for k, a in received.items() if method.trains(k)}
        reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zeros.items()}),
                            "metrics": MetricRecord({"num-examples": 1})})
        return Message(reply, reply_to=msg)
    import torch

    from fedge.edge.lora_trainer import LocalTrainConfig, train_local
    from fedge.peft_methods.aggregation import adapter_rank, client_delta

    started = time.perf_counter()
    name, pid, client = local_data(context)
    adapted = _training_model(config)
    state = _with_frozen(received.to_torch_state_dict(), config, lambda: adapted, lambda: _served(config))
    rank = adapter_rank(state)
    adapted.set_state(state, rank)
    server_round, seed, sid = int(config["server-round"]), int(config["seed"]), _seed_id(name, pid)
    train_config = LocalTrainConfig(steps=int(config["steps"]), batch_size=int(config["batch-size"]),
                                    seq_len=int(config["seq-len"]), lr=float(config["lr"]),
                                    proximal_mu=float(config.get("proximal-mu", 0.0)))
    torch.manual_seed(seed * 1_000_003 + server_round * 1009 + sid)
    result = train_local(adapted, client.train, rank, method.trains, train_config, seed=(seed, server_round, sid))
    metrics = {"num-examples": len(client.train), "partition-id": pid, "rank": rank,
               "train-loss": result.loss, "train-tokens": result.tokens}
    trained = adapted.get_state(rank, fill_from=state)  # a truncated draft: received values for dropped layers
    # the personalised adapter (just trained) on this client's own held-out text, on the target
    personal = _heldout_loss(adapted.model_name, adapted.spec, trained, rank, client, config)
    if personal is not None:
        metrics["personal-loss"] = personal[0]
    update = client_delta(trained, state, method.trains)
    metrics["train-s"] = time.perf_counter() - started
    return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config: ConfigRecord = msg.content["config"]
    _threads(config)
    _, _, client = local_data(context)
    state = _with_frozen(msg.content["arrays"].to_torch_state_dict(), config, lambda: _served(config))
    loss = _heldout_loss(str(config["model"]), adapter_spec_from(config), state, None, client, config)
    metrics = {"eval-tokens": 0, "eval-loss": 0.0} if loss is None else {"eval-loss": loss[0], "eval-tokens": loss[1]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def client_app(mods=()) -> ClientApp:
    """A ClientApp of these handlers wrapped in `mods` (outermost first)."""
    built = ClientApp(mods=list(mods))
    built.query()(query)
    built.train()(train)
    built.evaluate()(evaluate)
    return built


# the device's app (`[tool.flwr.app.components] clientapp`): secure aggregation and DP when the server asks
app = client_app([secagg_mod, dp_mod])
