"""Server side of secure aggregation and client-level DP for Flower's Message API.

`SecureAggregationGrid` wraps the ServerApp's Grid. `aggregate_train_round(train_messages)` runs the
four secure-aggregation stages with those clients and returns an `Aggregate`: the (DP-noised) sum of
the survivors' updates, its weight, who is in it and who dropped, and the bytes of the masked
messages that carried it. The LoRA strategy consumes it directly (`LoraFedAvg.aggregate_secure`)
and never sees an individual update.

For stock Flower strategies (`strategy.start(grid=...)`), `send_and_receive(train_messages)` runs the
same round and hands back one reply per surviving client holding the new global arrays (global +
mean update) with "num-examples" = 1, and an error reply per dropped client: any strategy whose
train aggregation is a weighted mean then computes exactly the mean of the survivors' updates.
Evaluation and query messages pass through, and so do train messages that `passthrough` selects
(by default those whose config says `noop`). A device that never answers a stage is dropped at its timeout.

Client weights are uniform under secure aggregation (each client contributes its update once):
weighting by example counts would need the counts in the clear and changes DP's sensitivity.

With `dp` set, the server also enforces the privacy budget: before each round it asks the
accountant whether the round would exceed `dp.max_epsilon`; if so it sends nothing, returns no
aggregate (the strategy keeps the current global model) and sets `budget_exhausted`; round loops
should stop when they see it. After each round `privacy_log` has epsilon at delta. A round is
charged as soon as the unmask stage is sent (from then on the sum can be unmasked), even if the
round fails afterwards; rounds that stop earlier release nothing and are not charged. Since this
server picks the clients, the accountant takes no credit for subsampling (`DPConfig.sampling`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedge.cloud.secagg_replies import aggregate_replies as _aggregate_replies
from fedge.cloud.secagg_replies import copy_content as _copy_content
from fedge.cloud.secagg_replies import is_noop as _is_noop
from fedge.peft_methods.dp import DPConfig, PrivacyBudget, PrivacyBudgetExceeded, RoundPrivacy, check_noise_coverage
from fedge.protocol.secagg import (
    ClientPolicy,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    VectorLayout,
    flatten_arrays,
    unflatten_arrays,
)
from fedge.protocol.secagg_records import (
    DP_KEY,
    MASKED_KEY,
    SECAGG_KEY,
    STAGE_MASK,
    UPDATE_DELTA,
    UPDATE_DIRECT,
    advertise_request,
    consistency_request,
    dp_fields,
    keys_from_reply,
    layout_to_str,
    masked_from_reply,
    share_request,
    shares_from_record,
    shares_record,
    signature_from_reply,
    unmask_from_reply,
    unmask_request,
)


@dataclass
class SecureAggregationSettings:
    """How the server runs secure aggregation (and DP) for train rounds.

    threshold: t as a fraction of the sampled clients (< 1) or an absolute count (>= 2). It is the
        fewest clients that must survive each stage and the collusion bound. It is raised to the
        default client floor (max(3, ceil(2n/3)), `ClientPolicy`) and to DP's noise shares, since
        honest clients refuse anything lower.
    clip_range: the fixed-point range per coordinate; None picks C + 8 noise std under DP, else 1.0.
    update_mode: "delta" (clients' replies are trained weights; the update is reply - global) or
        "direct" (replies are what is summed; then `layout` must name the arrays and shapes).
    secure: False runs plain rounds through the same wrapper (DP still applies), for comparisons.
    simulate_dropout: fraction of sampled clients told to vanish after sharing keys (experiments).
    """

    threshold: float = 2 / 3
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
        noise_shares = self.dp.min_clients if self.dp is not None and self.dp.noise_at == "client" else 1
        return max(t, ClientPolicy().required_threshold(n), noise_shares)


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
    bytes_up: int = 0  # the update payloads that crossed the wire (masked vectors when secure)


@dataclass
class Aggregate:
    """What a securely aggregated train round gives the server: the sum, never the parts.

    total: array name -> sum of the survivors' updates (float64; DP noise included when DP is on);
    weight: how many updates are in the sum (the mean update is total / weight);
    survivors / dropped: node ids in the sum / sampled but left out;
    bytes_up: bytes of the update payloads that crossed the wire (the masked vectors when secure).
    """

    total: dict[str, np.ndarray]
    weight: float
    survivors: list[int]
    dropped: list[int]
    bytes_up: int
    stats: RoundStats


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
        self._uncharged: float | None = None  # this round's sample rate until the budget is charged
        self._charged: RoundPrivacy | None = None
        self.void_aborted_rounds = False  # True: an aborted round returns an empty Aggregate instead of raising

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    @property
    def privacy_log(self) -> list[RoundPrivacy]:
        return list(self.budget.rounds) if self.budget else []

    def aggregate_train_round(self, messages: list[Message], *, timeout: float | None = None) -> Aggregate | None:
        """One train round under secure aggregation (+ DP); None when the privacy budget stops it."""
        if self.budget_exhausted:
            return None
        sample_rate = self._sample_rate(len(messages))
        if self.budget is not None:
            try:
                self.budget.check_next_round(sample_rate)
            except PrivacyBudgetExceeded:
                self.budget_exhausted = True
                return None
        self._round += 1
        start = time.perf_counter()
        timeout = timeout if timeout is not None else self.settings.timeout
        round_fn = self._secure_round if self.settings.secure else self._plain_round
        self._uncharged, self._charged = sample_rate, None
        try:
            aggregate = round_fn(messages, timeout)
        except SecAggError as exc:  # e.g. too few devices left for the threshold
            if not self.void_aborted_rounds:
                raise
            logging.getLogger("fedge.federated").warning("secure aggregation round aborted: %s", exc)
            n, nodes = len(messages), [m.metadata.dst_node_id for m in messages]
            aggregate = Aggregate({}, 0.0, [], nodes, 0, RoundStats(self._round, n, 0, n, 0.0))
        finally:
            self._uncharged = None  # a round that failed before release is not charged
        aggregate.stats.seconds = time.perf_counter() - start
        aggregate.stats.privacy = self._charged
        self.history.append(aggregate.stats)
        return aggregate

    def _charge(self) -> None:
        """Charge this round to the budget once anything derived from the clients' data can be released."""
        if self.budget is not None and self._uncharged is not None:
            self._charged = self.budget.record_round(self._uncharged)
            self._uncharged = None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """The Grid interface, for stock strategies: train rounds come back as aggregate replies."""
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type.startswith("train") and \
            SECAGG_KEY not in messages[0].content.config_records
        passthrough = self.settings.passthrough or _is_noop
        if not is_train or passthrough(messages[0]):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        aggregate = self.aggregate_train_round(messages, timeout=timeout)
        if aggregate is None:
            return []
        array_key, sent_record = _single_array_record(messages[0].content)
        sent = {name: np.asarray(a.numpy()) for name, a in sent_record.items()}
        # the mean in the dtype the clients were sent (what the strategy would have averaged)
        mean = {k: (v / aggregate.weight).astype(sent[k].dtype if k in sent else np.float32)
                for k, v in aggregate.total.items()}
        return _aggregate_replies(messages, set(aggregate.survivors), array_key, self._new_global(sent, mean))

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

    def _secagg_config(self, messages: list[Message], layout: VectorLayout) -> SecAggConfig:
        n = len(messages)
        if n < self.settings.threshold_for(n) or n < 2:
            raise SecAggError(f"{n} clients sampled, below the threshold {self.settings.threshold_for(n)}")
        return SecAggConfig(threshold=self.settings.threshold_for(n), clip_range=self._clip_range(), max_clients=n,
                            vector_length=layout.length, round_id=self._round)

    def _mask_contents(self, messages: list[Message], inbox: dict, node_of: dict[int, int],
                       layout: VectorLayout) -> dict[int, RecordDict]:
        """Stage 3's messages: the train message plus this client's shares, layout and DP settings."""
        message_of = {m.metadata.dst_node_id: m for m in messages}
        drop = {sorted(inbox)[i] for i in self._dropouts(len(inbox))}
        contents = {}
        for cid, shares in inbox.items():
            content = _copy_content(message_of[node_of[cid]].content)
            record = shares_record(STAGE_MASK, shares)
            record["layout"] = layout_to_str(layout)
            record["update_mode"] = self.settings.update_mode
            record["simulate_drop"] = cid in drop
            if self.settings.dp is not None:
                record.update(dp_fields(self.settings.dp))
            content[SECAGG_KEY] = record
            contents[node_of[cid]] = content
        return contents

    def _secure_round(self, messages: list[Message], timeout: float | None) -> Aggregate:
        stage_seconds: dict[str, float] = {}
        _, sent_record = _single_array_record(messages[0].content)
        layout = self._layout(messages, {name: np.asarray(a.numpy()) for name, a in sent_record.items()})
        config = self._secagg_config(messages, layout)
        server = SecAggServer(config)
        node_of = {i + 1: m.metadata.dst_node_id for i, m in enumerate(messages)}
        id_of = {node: cid for cid, node in node_of.items()}
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
        replies = self._exchange(template, self._mask_contents(messages, inbox, node_of, layout), timeout)
        bytes_up = sum(_record_bytes(r.content.array_records[MASKED_KEY]) for r in replies.values())
        survivors = server.collect_masked([masked_from_reply(r.content)[0] for r in replies.values()])
        stage_seconds["mask"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        replies = self._exchange(template, {node_of[c]: RecordDict({SECAGG_KEY: consistency_request(survivors)})
                                            for c in survivors}, timeout)
        signatures = server.collect_signatures([signature_from_reply(r.content.config_records[SECAGG_KEY])
                                                for r in replies.values()])
        stage_seconds["consistency"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        self._charge()  # from here on the sum can be unmasked: the round counts, whatever happens next
        request = unmask_request(survivors, signatures)
        replies = self._exchange(template, {node_of[s.client_id]: RecordDict({SECAGG_KEY: request})
                                            for s in signatures}, timeout)
        result = server.unmask([unmask_from_reply(r.content.config_records[SECAGG_KEY]) for r in replies.values()])
        stage_seconds["unmask"] = time.perf_counter() - t0

        n, kept = len(messages), [node_of[c] for c in result.survivors]
        stats = RoundStats(self._round, n, len(kept), n - len(kept), 0.0, stage_seconds, result.n_clipped,
                           bytes_up=bytes_up)
        return Aggregate(unflatten_arrays(self._release(result.total, len(kept)), _float64(layout)),
                         float(len(kept)), kept,
                         [node for node in id_of if node not in set(kept)], bytes_up, stats)

    def _plain_round(self, messages: list[Message], timeout: float | None) -> Aggregate:
        """The same round without masking: clients send (DP-transformed) trained weights in the clear."""
        _, sent_record = _single_array_record(messages[0].content)
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
        if replies:
            self._charge()  # updates left the clients in the clear
        if not replies:
            raise SecAggError("no client replied to the train round")
        total, bytes_up = None, 0
        for r in replies:
            _, trained = _single_array_record(r.content)
            bytes_up += _record_bytes(trained)
            if self.settings.update_mode == UPDATE_DELTA:
                update = {k: np.asarray(trained[k].numpy(), dtype=np.float64) - sent[k] for k in sent}
            else:
                update = {k: np.asarray(a.numpy(), dtype=np.float64) for k, a in trained.items()}
            vector, layout = flatten_arrays(update)
            total = vector if total is None else total + vector
        answered = [r.metadata.src_node_id for r in replies]
        stats = RoundStats(self._round, len(messages), len(replies), len(messages) - len(replies), 0.0,
                           {"train": time.perf_counter() - t0}, bytes_up=bytes_up)
        return Aggregate(unflatten_arrays(self._release(total, len(replies)), layout), float(len(replies)), answered,
                         [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in set(answered)],
                         bytes_up, stats)

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
        """The sum as released to the server: with the server's share of DP noise when DP asks for it."""
        dp = self.settings.dp
        if dp is not None:
            check_noise_coverage(dp, n_in_sum)
            if dp.server_noise_std > 0:
                total = total + np.random.default_rng().normal(0.0, dp.server_noise_std, size=total.shape)
        return total

    def _new_global(self, sent: dict[str, np.ndarray], mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.settings.update_mode == UPDATE_DIRECT:
            return {k: v.astype(np.float32) for k, v in mean.items()}
        return {k: (sent[k].astype(np.float64) + mean[k]).astype(sent[k].dtype) for k in sent}


def _float64(layout: VectorLayout) -> VectorLayout:
    """The same layout unflattened in float64: the sum keeps full precision until it is divided."""
    return VectorLayout(tuple((name, shape, "float64") for name, shape, _ in layout.entries))


def _record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def _single_array_record(content: RecordDict) -> tuple[str, ArrayRecord]:
    records = list(content.array_records.items())
    if len(records) != 1:
        raise SecAggError(f"a train message must carry exactly one ArrayRecord (found {len(records)})")
    return records[0]
