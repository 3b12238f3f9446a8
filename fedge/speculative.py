"""Speculative decoding, the algorithm: draft k tokens, one target forward, accept or resample, adapt k.

    draft_ids, q = proposer.propose(k)          # the small model, k cheap forwards
    reply = verifier.verify(draft_ids, q)       # the target, one forward over k + 1 positions
    new = draft_ids[:reply.n_accepted] + [reply.next_id]

`speculative_generate` is the one loop. It runs in-process (`fedge.edge.local_generate`: the
target's `fedge.verifier_session.TargetVerifierSession` in the same process) and on the edge
(`fedge.edge.client`: the cloud's session behind the Verify RPC), so both paths share one set of
rules; neither side's transport leaks in here. Greedy output equals the target's own greedy output;
sampled output follows the target's distribution exactly, because the verifier applies the
Leviathan et al. accept/resample rule with the draft's q.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedge.cached_sequence import CachedSequence
from fedge.sampling import SamplingParams, sampling_probs


@dataclass(frozen=True)
class VerifyReply:
    n_accepted: int  # how many of the draft tokens the target kept
    next_id: int  # the target's own token after them (correction or bonus)
    verify_s: float = 0.0  # time the verifier spent, for the edge's choice of k
    cloud_s: float | None = None  # of verify_s, the remote verifier's own time (the rest is the network)


class Verifier(Protocol):
    """The target's side of a round, wherever the target runs. Only token ids and scalars cross.

    A verifier may also have `max_draft_len` (int): the loop never drafts more per round."""

    def verify(self, draft_ids: list[int], draft_q: Any = None) -> VerifyReply:
        """Score `draft_ids` after the session's accepted tokens; `draft_q` is the draft's
        distribution per position when sampling (as the proposer gave it), None when greedy."""
        ...


class Proposer(Protocol):
    """The draft's side of a round (`fedge.edge.drafter.Drafter`)."""

    def propose(self, k: int) -> tuple[list[int], Any]:
        """k draft tokens after the accepted sequence and the q each was drawn from."""
        ...

    def accept(self, tokens: list[int]) -> None:
        """The round's verdict: these tokens follow the accepted sequence."""
        ...


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """E[tokens per round] = (1 - a^(k+1)) / (1 - a) for per-token acceptance a."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


@dataclass(frozen=True)
class CostCurve:
    """The verifier's forward time (seconds) against the positions in one batched forward, as the
    cloud measured it (`fedge.cloud.cost_curve`); linear between points, extrapolated past the ends."""

    positions: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.positions) < 2 or len(self.positions) != len(self.seconds) \
                or list(self.positions) != sorted(set(self.positions)) or min(self.seconds) < 0:
            raise ValueError("a cost curve needs >= 2 increasing positions with non-negative times")

    def __call__(self, n: float) -> float:
        p, s = self.positions, self.seconds
        i = 1
        while i < len(p) - 1 and n > p[i]:
            i += 1
        slope = (s[i] - s[i - 1]) / (p[i] - p[i - 1])
        return max(0.0, s[i - 1] + slope * (n - p[i - 1]))


def cloud_cost_per_token(curve: CostCurve, load: float, a: float, k: int) -> float:
    """Cloud seconds per generated token: this session's share of a forward over `load` sessions'
    k + 1 positions each, divided by the tokens a round yields."""
    load = max(load, 1.0)
    return curve(load * (k + 1)) / load / expected_tokens_per_round(a, k)


@dataclass
class DraftLengthController:
    """Chooses k per round to maximise expected tokens per second from measured costs.

    Cost of a round with k drafts: k * draft_s + verify_fixed_s + k * verify_per_token_s, where
    verify_fixed_s includes the network round trip when the verifier is remote.

    Load-aware (vLLM's dynamic speculation as the anchor): given the verifier's `cost_curve` and its
    current `load` (sessions per forward), a round's latency is k * draft_s + rtt_s + curve(load (k + 1)),
    and k is the one with the least cloud cost per token (`cloud_cost_per_token`) among those whose
    latency per token is within `latency_slack` of the best: the phone stays near its fastest, the
    cloud pays as little as it can for it. Heavier load makes wide verifies dearer, so k shrinks.
    """

    k_max: int = 8
    fixed_k: int | None = None
    acceptance_prior: tuple[float, float] = (3.0, 1.0)  # pseudo-counts (accepted, rejected)
    smoothing: float = 0.8
    # the per-token draft time k is chosen with; None = as measured. A simulation whose phones share
    # a few cores sets each phone's own (uncontended) drafting speed: its drafting budget
    draft_budget_s: float | None = None
    cost_curve: CostCurve | None = None
    load: float = 1.0
    rtt_s: float | None = None  # None: learned from rounds (wall time of a verify minus the verifier's own)
    latency_slack: float = 1.1
    accepted: float = field(default=0.0, init=False)
    rejected: float = field(default=0.0, init=False)
    draft_s: float = field(default=0.0, init=False)
    verify_fixed_s: float = field(default=0.0, init=False)
    verify_per_token_s: float = field(default=0.0, init=False)

    @property
    def acceptance(self) -> float:
        a0, r0 = self.acceptance_prior
        return (self.accepted + a0) / (self.accepted + self.rejected + a0 + r0)

    def choose(self) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        if self.draft_s == 0.0:
            return min(4, self.k_max)  # nothing measured yet
        a = min(self.acceptance, 0.999)
        if self.cost_curve is not None:
            return self.choose_for_load(a)

        def rate(k: int) -> float:
            cost = k * self.draft_s + self.verify_fixed_s + k * self.verify_per_token_s
            return expected_tokens_per_round(a, k) / max(cost, 1e-9)

        return max(range(1, self.k_max + 1), key=rate)

    def choose_for_load(self, a: float) -> int:
        """The argmin of cloud cost per token over k whose latency per token is near the best."""
        curve, rtt = self.cost_curve, self.rtt_s or 0.0
        assert curve is not None
        ks = range(1, self.k_max + 1)
        latency = {k: (k * self.draft_s + rtt + curve(max(self.load, 1.0) * (k + 1)))
                   / expected_tokens_per_round(a, k) for k in ks}
        best = min(latency.values())
        near = [k for k in ks if latency[k] <= best * self.latency_slack]
        return min(near, key=lambda k: (cloud_cost_per_token(curve, self.load, a, k), k))

    def record(self, k: int, n_accepted: int, draft_s: float, verify_s: float,
               round_trip_s: float | None = None, cloud_s: float | None = None) -> None:
        # acceptance: each round is n_accepted successes then one failure unless all k were kept
        self.accepted = self.smoothing * self.accepted + n_accepted
        self.rejected = self.smoothing * self.rejected + (1 if n_accepted < k else 0)
        per_draft = draft_s / max(k, 1)
        # a rough split of verify time: 20% grows with k (the forward's extra positions)
        per_token = 0.2 * verify_s / (k + 1)
        fixed = verify_s - per_token * k
        if self.draft_s == 0.0:
            self.draft_s, self.verify_fixed_s, self.verify_per_token_s = per_draft, fixed, per_token
        else:
            s = self.smoothing
            self.draft_s = s * self.draft_s + (1 - s) * per_draft
            self.verify_fixed_s = s * self.verify_fixed_s + (1 - s) * fixed
            self.verify_per_token_s = s * self.verify_per_token_s + (1 - s) * per_token
        if self.draft_budget_s is not None:
            self.draft_s = self.draft_budget_s
        if round_trip_s is not None:
            rtt = max(0.0, round_trip_s - (verify_s if cloud_s is None else cloud_s))
            self.rtt_s = rtt if self.rtt_s is None else self.smoothing * self.rtt_s + (1 - self.smoothing) * rtt


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # rounds that ended in a rejection (n_accepted < k): a = accepted / (accepted + rejected)
    generated: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    ks: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats


def speculative_generate(
    proposer: Proposer,
    verifier: Verifier,
    max_new_tokens: int,
    controller: DraftLengthController | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    on_tokens: Callable[[list[int]], None] | None = None,
    stats: GenerationStats | None = None,
) -> GenerationResult:
    """Run rounds of draft -> verify -> accept until `max_new_tokens` or a stop token.

    `stats`, if given, is filled in place (a caller that may be interrupted keeps what was counted)."""
    controller = controller or DraftLengthController()
    stats = stats if stats is not None else GenerationStats()
    out: list[int] = []
    start = time.perf_counter()
    while len(out) < max_new_tokens:
        k = min(controller.choose(), max_new_tokens - len(out) - 1)
        limit = getattr(verifier, "max_draft_len", None)
        k = max(0, k if limit is None else min(k, limit))
        t0 = time.perf_counter()
        draft_ids, draft_q = proposer.propose(k)
        t1 = time.perf_counter()
        reply = verifier.verify(draft_ids, draft_q)
        t2 = time.perf_counter()
        new = list(draft_ids[: reply.n_accepted]) + [reply.next_id]
        proposer.accept(new)
        stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
        if stop_at is not None:
            new = new[: stop_at + 1]
        out.extend(new)
        if on_tokens:
            on_tokens(new)
        _observe_cloud(controller, verifier)
        controller.record(k, reply.n_accepted, t1 - t0, reply.verify_s, t2 - t1, reply.cloud_s)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += reply.n_accepted
        stats.rejected += int(reply.n_accepted < k)
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.ks.append(k)
        if stop_at is not None:
            break
    out = out[:max_new_tokens]
    stats.generated = len(out)
    stats.wall_s = time.perf_counter() - start
    return GenerationResult(token_ids=out, stats=stats)


def _observe_cloud(controller: DraftLengthController, verifier: Verifier) -> None:
    """A verifier that knows its cost curve and load (`cost_curve`, `load`) hands them to the controller."""
    curve = getattr(verifier, "cost_curve", None)
    if isinstance(curve, CostCurve):
        controller.cost_curve = curve
        controller.load = float(getattr(verifier, "load", 1.0) or 1.0)


def autoregressive_generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
                            params: SamplingParams | None = None, seed: int = 0,
                            stop_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The plain one-token-per-forward loop on the same cache machinery: the reference output."""
    params = params or SamplingParams()
    sequence = CachedSequence(model, prompt_ids)
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = sequence.logits()[-1]
        token = (int(logits.argmax()) if params.greedy
                 else int(torch.multinomial(sampling_probs(logits, params), 1, generator=generator)))
        out.append(token)
        sequence.accept([token])
        if token in stop_ids:
            break
    return out
