"""The federated round loop of the cloud coordinator, and the run the ServerApp executes.

One loop, `run_rounds`: configure (the strategy samples clients and sends each the global adapter at
its rank) -> one exchange with the clients (plain, or secure aggregation when the grid is a
`SecureAggregationGrid`) -> aggregate -> the method's non-linear step (`finalize`). `fedge simulate
federated`, the privacy experiments and the demo all train through it.

The loop is ours rather than Flower's `Strategy.start`, because a `FederatedRun` checkpoints after
every round and resumes from one, counts bytes, measures the no-op round overhead first, and
evaluates the global adapter by federated evaluation (each device on its own held-out text, on the
full-precision target) plus an optional held-out set the server owns: the server holds no client data.
The ServerApp itself is `fedge.cloud.server_app.app` (deployment and simulation alike).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedge.cloud.checkpoints import load_resume_checkpoint, save_checkpoint
from fedge.cloud.federated_config import FederatedConfig
from fedge.cloud.secagg_server import SecureAggregationGrid
from fedge.cloud.strategies import LoraFedAvg, build_strategy, down_record, finalize, sample_partitions, to_record
from fedge.peft_methods.aggregation import StateDict

log = logging.getLogger("fedge.federated")

# (round, new global adapter, its truncation error, the strategy's train metrics or None)
AfterRound = Callable[[int, StateDict, float, MetricRecord | None], None]


def train_round(grid: Grid, strategy: LoraFedAvg, config: FederatedConfig, state: StateDict,
                server_round: int) -> tuple[StateDict, float, MetricRecord | None]:
    """One training round; returns the new global adapter (unchanged if the round failed)."""
    messages = strategy.configure_train(server_round, to_record(state), config.client_config(), grid)
    if isinstance(grid, SecureAggregationGrid):
        aggregate = grid.aggregate_train_round(list(messages), timeout=config.round_timeout)
        new_arrays, metrics = strategy.aggregate_secure(server_round, aggregate)
    else:
        replies = grid.send_and_receive(messages, timeout=config.round_timeout)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    if new_arrays is None:
        return state, 0.0, metrics
    new_state, truncation = finalize(config, new_arrays.to_torch_state_dict(), state)
    return new_state, truncation, metrics


def trained_layout(config: FederatedConfig):
    """The layout of what clients send under secure aggregation (the method's trained tensors), read
    from a round's train message."""
    from fedge.protocol.secagg import VectorLayout

    trains = config.method_spec.trains

    def layout(messages) -> VectorLayout:
        record = next(iter(messages[0].content.array_records.values()))
        return VectorLayout(tuple((k, tuple(a.shape), "float32") for k, a in sorted(record.items()) if trains(k)))

    return layout


def privacy_grid_wrapper(config: FederatedConfig) -> Callable[[Grid], Grid] | None:
    """The run's `secagg` / `dp_*` options as a grid wrapper: train rounds through `SecureAggregationGrid`
    (a masked sum under secure aggregation, plain rounds with the server adding the DP noise otherwise);
    None for neither. Under secure aggregation the DP noise comes in shares from the threshold's clients."""
    if not (config.secagg or config.dp_enabled):
        return None
    from dataclasses import replace

    from fedge.cloud.secagg_server import SecureAggregationSettings
    from fedge.protocol.secagg_records import UPDATE_DIRECT

    settings = SecureAggregationSettings(threshold=config.secagg_threshold, update_mode=UPDATE_DIRECT,
                                         layout=trained_layout(config), secure=config.secagg,
                                         population=config.num_clients, seed=config.seed)
    settings = replace(settings, dp=config.dp_config(settings.threshold_for(config.clients_per_round)))
    return lambda grid: SecureAggregationGrid(grid, settings)


def run_rounds(grid: Grid, strategy: LoraFedAvg, config: FederatedConfig, state: StateDict, first: int,
               last: int, after_round: AfterRound | None = None) -> StateDict:
    """Rounds `first`..`last` (stopping early if a secure grid's privacy budget is spent)."""
    for server_round in range(first, last + 1):
        if getattr(grid, "budget_exhausted", False):
            log.warning("privacy budget exhausted: stopping before round %d", server_round)
            break
        state, truncation, metrics = train_round(grid, strategy, config, state, server_round)
        if after_round is not None:
            after_round(server_round, state, truncation, metrics)
    return state


@dataclass
class Roster:
    """The nodes of a run in a stable order (partition id, else client name): index -> node id, name."""

    node_of_partition: dict[int, int]
    names: dict[int, str]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The connected nodes once there are at least `minimum` of them."""
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} of the {minimum} nodes needed connected within {timeout:g} s")
        time.sleep(0.05)
    return nodes


def discover_nodes(grid: Grid, minimum: int, wait_s: float, timeout: float) -> Roster:
    """Ask every connected node (at least `minimum`) once for its partition id and client name; a node
    that does not answer is left out (with a warning) as long as `minimum` did."""
    nodes = wait_for_nodes(grid, minimum, wait_s)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                        dst_node_id=n) for n in nodes]
    found = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d left out: discovery failed: %s", node, reply.error.reason)
            continue
        info = reply.content.config_records.get("info")
        pid = int(reply.content.metric_records["metrics"]["partition-id"])
        found.append((pid, str(info["client"]) if info else str(pid), node))
    if len(found) < minimum:
        raise RuntimeError(f"discovery: {len(found)} of the {minimum} nodes needed answered")
    if all(pid >= 0 for pid, _, _ in found):  # simulated partitions: Flower's partition ids
        found.sort()
    else:  # devices: by the client name in their node config, then node id
        found.sort(key=lambda f: (f[1], f[2]))
    return Roster({i: node for i, (_, _, node) in enumerate(found)}, {i: name for i, (_, name, _) in enumerate(found)})


def discover_partitions(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """partition id -> node id, asked once from every node."""
    return discover_nodes(grid, expected, 120.0, timeout).node_of_partition


def measure_overhead(grid: Grid, config: FederatedConfig, node_of_partition: dict[int, int],
                     state: StateDict) -> list[float]:
    """No-op rounds: the same messages and payloads as a training round, no work on the clients."""
    record = down_record(state, config.method_spec, config.seed)
    client_config = config.client_config()
    client_config["noop"] = True
    seconds = []
    for i in range(config.noop_rounds):
        pids = sample_partitions(config.seed + 7919, i, list(node_of_partition), config.clients_per_round)
        messages = [Message(RecordDict({"arrays": record, "config": client_config}), message_type=MessageType.TRAIN,
                            dst_node_id=node_of_partition[p]) for p in pids]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        seconds.append(time.perf_counter() - start)
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(messages):
            raise RuntimeError(f"no-op round failed: {failed or 'missing replies'}")
    return seconds


def overhead_s_per_round(times: list[float]) -> float | None:
    """Median no-op round after the first (which also starts the Ray actors)."""
    if not times:
        return None
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def federated_evaluate(grid: Grid, config: FederatedConfig, roster: Roster, state: StateDict) -> dict:
    """The global adapter on every (or a seeded sample of) device's own held-out text, on the target:
    the token-weighted mean of the devices' losses, each device's, and the worst."""
    alive = set(grid.get_node_ids())  # a device that left the federation is not waited for
    pids = sorted(p for p, node in roster.node_of_partition.items() if node in alive)
    if 0 < config.eval_clients < len(pids):  # many clients: a fixed seeded sample
        pids = sorted(random.Random(f"fedge-eval:{config.seed}").sample(pids, config.eval_clients))
    record, client_config = down_record(state, config.method_spec, config.seed), config.client_config()
    messages = [Message(RecordDict({"arrays": record, "config": client_config}), message_type=MessageType.EVALUATE,
                        dst_node_id=roster.node_of_partition[p]) for p in pids]
    name_of = {roster.node_of_partition[p]: roster.names[p] for p in pids}
    losses, tokens = {}, {}
    for reply in grid.send_and_receive(messages, timeout=config.round_timeout):
        name = name_of.get(reply.metadata.src_node_id)
        if name is None or reply.has_error():
            log.warning("evaluation: no result from %s: %s", name, reply.error.reason if reply.has_error() else "")
            continue
        metrics = reply.content.metric_records["metrics"]
        if int(metrics["eval-tokens"]) > 0:
            losses[name], tokens[name] = float(metrics["eval-loss"]), int(metrics["eval-tokens"])
    if not losses:
        nan = float("nan")
        return {"global_loss": nan, "global_perplexity": nan, "client_loss": {}, "worst_client": None,
                "worst_client_loss": nan, "worst_client_perplexity": nan}
    loss = sum(losses[n] * tokens[n] for n in losses) / sum(tokens.values())
    worst = max(losses, key=losses.get)
    return {"global_loss": loss, "global_perplexity": math.exp(loss), "client_loss": losses,
            "worst_client": worst, "worst_client_loss": losses[worst],
            "worst_client_perplexity": math.exp(losses[worst])}


class ServerModel:
    """The server's own copy of the target with the run's adapter: the seeded initial adapter, the
    model size, saving adapters, and (optionally) the loss on a held-out set the server itself owns."""

    def __init__(self, config: FederatedConfig) -> None:
        from fedge.peft_methods.lora_model import AdaptedModel, eval_windows, pad_token_id

        self.adapted = AdaptedModel(config.model, config.adapter_spec)
        base = self.adapted.model.get_base_model()
        self.model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        self.pad_id = pad_token_id(self.adapted.tokenizer)
        self.windows = []
        if config.server_eval_data:
            from fedge.data import read_source

            self.windows = eval_windows(read_source(config.server_eval_data), self.adapted.tokenizer,
                                        max(1, config.eval_examples), config.seq_len)

    def __call__(self, state: StateDict) -> dict:
        """Loss on the server's held-out set ({} without one)."""
        from fedge.peft_methods.lora_model import mean_token_loss

        if not self.windows:
            return {}
        self.adapted.set_state(state)
        loss = mean_token_loss(self.adapted.model, self.windows, self.pad_id)
        return {"server_loss": loss, "server_perplexity": math.exp(loss)}


def round_record(strategy: LoraFedAvg, names: dict[int, str], metrics: MetricRecord | None) -> dict:
    """What a round sent, received, accepted and rejected (the strategy's view of the round)."""
    failed = [r for r in strategy.rejections if r.reason.startswith(("no reply", "client failed"))]
    return {
        "clients": [names[strategy.sent[n].partition_id] for n in strategy.sent],
        "accepted": [names[p] for p in strategy.accepted],
        "rejected": [{"client": names[r.partition_id], "reason": r.reason} for r in strategy.rejections],
        "personal_loss": {names[p]: m["personal-loss"] for p, m in strategy.client_metrics.items()
                          if "personal-loss" in m},
        "train_loss": float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None,
        "bytes_down": strategy.bytes_down,
        "bytes_up": strategy.bytes_up,
        "bytes_up_per_client": strategy.bytes_up / max(1, len(strategy.sent) - len(failed)),
        "bytes_down_per_client": strategy.bytes_down / max(1, len(strategy.sent)),
        # ||aggregated update - sum_k p_k (B_k A_k - B_k0 A_k0)|| / ||...||, before any server optimiser
        "aggregation_error": strategy.aggregation_error,
    }


def privacy_fields(grid: Grid) -> dict:
    """Epsilon spent so far (with the noise multiplier, delta and clip behind it) and the round's
    secure-aggregation survivors, when the grid is a secure one."""
    if not isinstance(grid, SecureAggregationGrid):
        return {}
    out = {}
    if grid.privacy_log:
        last = grid.privacy_log[-1]
        out.update(epsilon=last.epsilon, dp_delta=last.delta, noise_multiplier=last.noise_multiplier,
                   dp_sample_rate=last.sample_rate, dp_clip=grid.settings.dp.clip_norm,
                   dp_noise_at=grid.settings.dp.noise_at)
    if grid.history:
        out["secagg_survivors"] = grid.history[-1].survivors
        out["secagg_dropped"] = grid.history[-1].dropped
        out["secure"] = grid.settings.secure
    return out


@dataclass
class FederatedResult:
    records: list[dict] = field(default_factory=list)
    final_state: StateDict = field(default_factory=dict)
    overhead_rounds_s: list[float] = field(default_factory=list)
    resumed_from: int = 0
    model_bytes: int = 0
    discovery_s: float = 0.0


# (the server's model, the adapter, the round it is from): e.g. fedge.cloud.server_app.Publisher
Publish = Callable[["ServerModel", StateDict, int], None]


class FederatedRun:
    """One federated run: the ServerApp's body, with federated evaluation, checkpoints and publishing.

    It needs no client data: devices train and evaluate on their own."""

    def __init__(self, config: FederatedConfig, on_round: Callable[[dict], None] | None = None,
                 grid_wrapper: Callable[[Grid], Grid] | None = None, publish: Publish | None = None) -> None:
        self.config = config
        self.on_round = on_round
        # wraps the grid for training rounds, e.g. fedge.cloud.secagg_server.SecureAggregationGrid
        self.grid_wrapper = grid_wrapper
        self.publish = publish
        self.result = FederatedResult()
        self.checkpoint = load_resume_checkpoint(config) if config.resume else None

    def execute(self, grid: Grid) -> None:
        cfg = self.config
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = cfg.pull_interval  # Flower polls replies every 0.1 s by default
        start = time.perf_counter()
        # the first message a node gets also starts its runtime (a Ray actor, a ClientApp process): be patient
        roster = discover_nodes(grid, cfg.min_nodes or cfg.num_clients, cfg.wait_nodes_s,
                                max(cfg.round_timeout, cfg.wait_nodes_s))
        self.result.discovery_s = time.perf_counter() - start
        server = ServerModel(cfg)
        self.result.model_bytes = server.model_bytes
        strategy = build_strategy(cfg, roster.node_of_partition)
        state, first_round = self._initial_state(server, strategy)
        self.result.overhead_rounds_s = measure_overhead(grid, cfg, roster.node_of_partition, state)
        if self.grid_wrapper is not None:
            grid = self.grid_wrapper(grid)

        def evaluate(state: StateDict) -> dict:
            return {**federated_evaluate(grid, cfg, roster, state), **server(state)}

        if first_round == 1:
            self._record({"round": 0, **evaluate(state), "bytes_up": 0, "bytes_down": 0, "clients": [],
                          "rejected": [], "noop_rounds_s": self.result.overhead_rounds_s})
        round_start = time.perf_counter()

        def after_round(server_round: int, state: StateDict, truncation: float, metrics) -> None:
            nonlocal round_start
            train_s = time.perf_counter() - round_start
            eval_start = time.perf_counter()
            record = round_record(strategy, roster.names, metrics)
            self._record({"round": server_round, **evaluate(state), **record, "truncation_error": truncation,
                          "train_s": train_s, "eval_s": time.perf_counter() - eval_start, **privacy_fields(grid)})
            self._checkpoint(server_round, state, strategy)
            if self.publish is not None and cfg.publish_every == "round" and record["accepted"]:
                self.publish(server, state, server_round)
            round_start = time.perf_counter()

        self.result.final_state = run_rounds(grid, strategy, cfg, state, first_round, cfg.rounds, after_round)
        if self.publish is not None and cfg.publish_every == "end":
            self.publish(server, self.result.final_state, self.result.records[-1]["round"])

    def _initial_state(self, server: ServerModel, strategy: LoraFedAvg) -> tuple[StateDict, int]:
        """The adapter to start from and the first round: the seeded init, or the resumed checkpoint."""
        if self.checkpoint is None:
            return server.adapted.get_state(), 1
        state, strategy_arrays, payload = self.checkpoint
        strategy.load_state_arrays(strategy_arrays)
        self.result.records = payload["records"]
        self.result.resumed_from = payload["round"]
        log.warning("resuming after round %d from %s", payload["round"], self.config.checkpoint_dir)
        return state, payload["round"] + 1

    def _checkpoint(self, server_round: int, state: StateDict, strategy: LoraFedAvg) -> None:
        cfg = self.config
        if cfg.checkpoint_dir:
            save_checkpoint(Path(cfg.checkpoint_dir), server_round, state, strategy, {
                "round": server_round, "identity": cfg.identity(), "config": asdict(cfg),
                "seed": cfg.seed, "records": self.result.records,
            })

    def _record(self, record: dict) -> None:
        self.result.records.append(record)
        if self.on_round is not None:
            self.on_round(record)
