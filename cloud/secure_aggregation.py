"""Server side of secure aggregation and client-level DP for Flower's Message API.

`SecureAggregationGrid` wraps the ServerApp's Grid. A strategy's `start()` (or any round loop) calls
`grid.send_and_receive(train_messages)`; the wrapper runs the four secure-aggregation stages with
those clients instead, and returns one reply per surviving client, each holding the AGGREGATE (the
mean update; in "delta" mode global + mean update) with "num-examples" = 1, and an error reply for
each client that dropped. Any strategy whose train aggregation is a weighted mean (FedAvg, FFA-LoRA's
B sum, FedSVD's sum with a shared A) therefore computes exactly the mean of the survivors' updates,
without ever seeing one of them. Evaluation and query messages pass through, and so do train
messages that `passthrough` selects (by default those whose config says `noop`).

Client weights are uniform under secure aggregation (each client contributes its update once):
weighting by example counts would need the counts in the clear and changes DP's sensitivity.

With `dp` set, the server also enforces the privacy budget: before each round it asks the
accountant whether the round would exceed `dp.max_epsilon`; if so it sends nothing, returns no
replies (the strategy keeps the current global model) and sets `budget_exhausted`; round loops
should stop when they see it. After each round `privacy_log` has epsilon at delta.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedge.peft_methods.dp import DPConfig, PrivacyBudget, PrivacyBudgetExceeded, RoundPrivacy, check_noise_coverage
from fedge.protocol.secagg import (
    SecAggConfig,
    SecAggError,
    SecAggServer,
    VectorLayout,
    flatten_arrays,
    unflatten_arrays,
)
from fedge.protocol.secagg_records import (
    DP_KEY,
    SECAGG_KEY,
    STAGE_MASK,
    UPDATE_DELTA,
    UPDATE_DIRECT,
    advertise_request,
    dp_fields,
    keys_from_reply,
    layout_to_str,
    masked_from_reply,
    share_request,
    shares_from_record,
    shares_record,
    unmask_from_reply,
    unmask_request,
)


@dataclass
class SecureAggregationSettings:
    """How the server runs secure aggregation (and DP) for train rounds.

    threshold: t as a fraction of the sampled clients (< 1) or an absolute count (>= 2). It is the
        fewest clients that must survive each stage and the collusion bound; keep it above half.
    clip_range: the fixed-point range per coordinate; None picks C + 8 noise std under DP, else 1.0.
    update_mode: "delta" (clients' replies are trained weights; the update is reply - global) or
        "direct" (replies are what is summed; then `layout` must name the arrays and shapes).
    secure: False runs plain rounds through the same wrapper (DP still applies), for comparisons.
    simulate_dropout: fraction of sampled clients told to vanish after sharing keys (experiments).
    """

    threshold: float = 0.6
    clip_range: float | None = None
    update_mode: str = UPDATE_DELTA
    layout: VectorLayout | Callable[[list[Message]], VectorLayout] | None = None
    passthrough: Callable[[Message], bool] | None = None
    secure: bool = True
    dp: DPConfig | None = None
    population: int | None = None  # clients sampled from; default: all nodes the grid knows
    timeout: float | None = None
    simulate_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update_mode not in (UPDATE_DELTA, UPDATE_DIRECT):
            raise ValueError(f"update_mode must be 'delta' or 'direct' (got {self.update_mode!r})")
        if self.update_mode == UPDATE_DIRECT and self.layout is None:
            raise ValueError("update_mode 'direct' needs the layout of what clients send")
        if not 0 <= self.simulate_dropout < 1:
            raise ValueError(f"simulate_dropout must be in [0, 1) (got {self.simulate_dropout})")
        if self.threshold <= 0 or (self.threshold >= 1 and self.threshold < 2):
            raise ValueError(f"threshold must be a fraction in (0, 1) or a count >= 2 (got {self.threshold})")

    def threshold_for(self, n: int) -> int:
        t = math.ceil(self.threshold * n) if self.threshold < 1 else int(self.threshold)
        return max(2, t)


@dataclass
class RoundStats:
    round: int
    sampled: int
    survivors: int
    dropped: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    n_clipped: int = 0
    privacy: RoundPrivacy | None = None


class SecureAggregationGrid:
    """A Grid whose train rounds are securely aggregated (see the module docstring)."""

    def __init__(self, grid, settings: SecureAggregationSettings) -> None:
        self._grid = grid
        self.settings = settings
        self.budget = PrivacyBudget(settings.dp) if settings.dp is not None else None
        self.budget_exhausted = False
        self.history: list[RoundStats] = []
        self._rng = np.random.default_rng(settings.seed)
        self._round = 0

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    @property
    def privacy_log(self) -> list[RoundPrivacy]:
        return list(self.budget.rounds) if self.budget else []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type.startswith("train") and \
            SECAGG_KEY not in messages[0].content.config_records
        passthrough = self.settings.passthrough or _is_noop
        if not is_train or passthrough(messages[0]):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        if self.budget_exhausted:
            return []
        sample_rate = self._sample_rate(len(messages))
        if self.budget is not None:
            try:
                self.budget.check_next_round(sample_rate)
            except PrivacyBudgetExceeded:
                self.budget_exhausted = True
                return []
        self._round += 1
        start = time.perf_counter()
        if self.settings.secure:
            replies, stats = self._secure_round(messages, timeout if timeout is not None else self.settings.timeout)
        else:
            replies, stats = self._plain_round(messages, timeout if timeout is not None else self.settings.timeout)
        stats.seconds = time.perf_counter() - start
        if self.budget is not None:
            stats.privacy = self.budget.record_round(sample_rate)
        self.history.append(stats)
        return replies

    # ------------------------------------------------------------------------------------------

    def _sample_rate(self, sampled: int) -> float:
        population = self.settings.population or len(list(self._grid.get_node_ids()))
        return min(1.0, sampled / max(population, 1))

    def _dropouts(self, n: int) -> set[int]:
        k = int(round(self.settings.simulate_dropout * n))
        return set(self._rng.choice(n, size=k, replace=False).tolist()) if k else set()

    def _clip_range(self) -> float:
        if self.settings.clip_range is not None:
            return self.settings.clip_range
        dp = self.settings.dp
        return dp.clip_norm + 8 * dp.client_noise_std if dp is not None else 1.0

    def _exchange(self, template: Message, by_node: dict[int, RecordDict], timeout: float | None) -> dict[int, Message]:
        """Send one content per node; return the non-error replies by node id."""
        out = [Message(content, dst_node_id=node, message_type=template.metadata.message_type,
                       group_id=template.metadata.group_id) for node, content in by_node.items()]
        replies = self._grid.send_and_receive(out, timeout=timeout)
        return {r.metadata.src_node_id: r for r in replies if not r.has_error()}

    def _secure_round(self, messages: list[Message], timeout: float | None) -> tuple[Message, RoundStats]:
        settings, stage_seconds = self.settings, {}
        array_key, sent_record = _single_array_record(messages[0].content)
        sent = {name: np.asarray(a.numpy()) for name, a in sent_record.items()}
        layout = self._layout(messages, sent)
        n = len(messages)
        if n < settings.threshold_for(n) or n < 2:
            raise SecAggError(f"{n} clients sampled, below the threshold {settings.threshold_for(n)}")
        config = SecAggConfig(threshold=settings.threshold_for(n), clip_range=self._clip_range(), max_clients=n,
                              vector_length=layout.length, round_id=self._round)
        server = SecAggServer(config)
        node_of = {i + 1: m.metadata.dst_node_id for i, m in enumerate(messages)}
        id_of = {node: cid for cid, node in node_of.items()}
        message_of = {m.metadata.dst_node_id: m for m in messages}
        template = messages[0]

        t0 = time.perf_counter()
        replies = self._exchange(template, {node_of[c]: RecordDict({SECAGG_KEY: advertise_request(config, c)})
                                            for c in node_of}, timeout)
        roster = server.collect_keys([keys_from_reply(r.content.config_records[SECAGG_KEY]) for r in replies.values()])
        stage_seconds["advertise"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        replies = self._exchange(template, {node_of[a.client_id]: RecordDict({SECAGG_KEY: share_request(roster)})
                                            for a in roster}, timeout)
        inbox = server.route_shares({id_of[node]: shares_from_record(r.content.config_records[SECAGG_KEY])
                                     for node, r in replies.items()})
        stage_seconds["share"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        drop = {sorted(inbox)[i] for i in self._dropouts(len(inbox))}
        contents = {}
        for cid, shares in inbox.items():
            content = _copy_content(message_of[node_of[cid]].content)
            record = shares_record(STAGE_MASK, shares)
            record["layout"] = layout_to_str(layout)
            record["update_mode"] = settings.update_mode
            record["simulate_drop"] = cid in drop
            if settings.dp is not None:
                record.update(dp_fields(settings.dp))
            content[SECAGG_KEY] = record
            contents[node_of[cid]] = content
        replies = self._exchange(template, contents, timeout)
        masked = [masked_from_reply(r.content)[0] for r in replies.values()]
        survivors = server.collect_masked(masked)
        stage_seconds["mask"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        replies = self._exchange(template, {node_of[c]: RecordDict({SECAGG_KEY: unmask_request(survivors)})
                                            for c in survivors}, timeout)
        result = server.unmask([unmask_from_reply(r.content.config_records[SECAGG_KEY]) for r in replies.values()])
        stage_seconds["unmask"] = time.perf_counter() - t0

        mean = self._release(result.total, len(result.survivors))
        arrays = self._new_global(sent, unflatten_arrays(mean, layout))
        survivor_nodes = {node_of[c] for c in result.survivors}
        replies = _aggregate_replies(messages, survivor_nodes, array_key, arrays)
        return replies, RoundStats(self._round, n, len(result.survivors), n - len(result.survivors), 0.0,
                                 stage_seconds, result.n_clipped)

    def _plain_round(self, messages: list[Message], timeout: float | None) -> tuple[Message, RoundStats]:
        """The same round without masking: clients send (DP-transformed) trained weights in the clear."""
        array_key, sent_record = _single_array_record(messages[0].content)
        sent = {name: np.asarray(a.numpy()) for name, a in sent_record.items()}
        drop = self._dropouts(len(messages))
        out = []
        for i, message in enumerate(messages):
            if i in drop:
                continue
            if self.settings.dp is not None:
                message.content[DP_KEY] = ConfigRecord({**dp_fields(self.settings.dp),
                                                        "update_mode": self.settings.update_mode})
            out.append(message)
        t0 = time.perf_counter()
        replies = [r for r in self._grid.send_and_receive(out, timeout=timeout) if not r.has_error()]
        if not replies:
            raise SecAggError("no client replied to the train round")
        total = None
        for r in replies:
            _, trained = _single_array_record(r.content)
            if self.settings.update_mode == UPDATE_DELTA:
                update = {k: np.asarray(trained[k].numpy(), dtype=np.float64) - sent[k] for k in sent}
            else:
                update = {k: np.asarray(a.numpy(), dtype=np.float64) for k, a in trained.items()}
            vector, layout = flatten_arrays(update)
            total = vector if total is None else total + vector
        mean = self._release(total, len(replies))
        arrays = self._new_global(sent, unflatten_arrays(mean, layout))
        stats = RoundStats(self._round, len(messages), len(replies), len(messages) - len(replies), 0.0,
                           {"train": time.perf_counter() - t0})
        answered = {r.metadata.src_node_id for r in replies}
        return _aggregate_replies(messages, answered, array_key, arrays), stats

    def _layout(self, messages: list[Message], sent: dict[str, np.ndarray]) -> VectorLayout:
        for m in messages[1:]:
            _, record = _single_array_record(m.content)
            if {k: tuple(a.shape) for k, a in record.items()} != {k: v.shape for k, v in sent.items()}:
                raise SecAggError("secure aggregation needs every client to get (and send) the same shapes; "
                                  "for heterogeneous ranks pad to the global rank first")
        if self.settings.update_mode == UPDATE_DELTA:
            return flatten_arrays(sent)[1]
        layout = self.settings.layout
        return layout(messages) if callable(layout) else layout

    def _release(self, total: np.ndarray, n_in_sum: int) -> np.ndarray:
        dp = self.settings.dp
        if dp is not None:
            check_noise_coverage(dp, n_in_sum)
            if dp.server_noise_std > 0:
                total = total + np.random.default_rng().normal(0.0, dp.server_noise_std, size=total.shape)
        return total / n_in_sum

    def _new_global(self, sent: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.settings.update_mode == UPDATE_DIRECT:
            return {k: v.astype(np.float32) for k, v in mean.items()}
        return {k: (sent[k].astype(np.float64) + mean[k]).astype(sent[k].dtype) for k in sent}


def _single_array_record(content: RecordDict) -> tuple[str, ArrayRecord]:
    records = list(content.array_records.items())
    if len(records) != 1:
        raise SecAggError(f"a train message must carry exactly one ArrayRecord (found {len(records)})")
    return records[0]


def _copy_content(content: RecordDict) -> RecordDict:
    copy = RecordDict()
    for key, record in content.items():
        if isinstance(record, ConfigRecord):
            copy[key] = ConfigRecord(dict(record))
        else:
            copy[key] = record
    return copy


def _is_noop(message: Message) -> bool:
    config = message.content.config_records.get("config")
    return bool(config is not None and config.get("noop", False))


def _aggregate_replies(messages: list[Message], survivors: set[int], array_key: str,
                       arrays: dict[str, np.ndarray]) -> list[Message]:
    """One reply per surviving client, all carrying the aggregate with weight 1; errors for the rest."""
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    replies = []
    for message in messages:
        if message.metadata.dst_node_id in survivors:
            content = RecordDict({array_key: record, "metrics": MetricRecord({"num-examples": 1})})
            replies.append(Message(content, reply_to=message))
        else:
            replies.append(Message(Error(code=9002, reason="dropped out of the secure-aggregation round"),
                                   reply_to=message))
    return replies
