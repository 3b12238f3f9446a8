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


@dataclass
class DraftLengthController:
    """Chooses k per round to maximise expected tokens per second from measured costs.

    Cost of a round with k drafts: k * draft_s + verify_fixed_s + k * verify_per_token_s, where
    verify_fixed_s includes the network round trip when the verifier is remote.
    """

    k_max: int = 8
    fixed_k: int | None = None
    acceptance_prior: tuple[float, float] = (3.0, 1.0)  # pseudo-counts (accepted, rejected)
    smoothing: float = 0.8
    # the per-token draft time k is chosen with; None = as measured. A simulation whose phones share
    # a few cores sets each phone's own (uncontended) drafting speed: its drafting budget
    draft_budget_s: float | None = None
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

        def rate(k: int) -> float:
            cost = k * self.draft_s + self.verify_fixed_s + k * self.verify_per_token_s
            return expected_tokens_per_round(a, k) / max(cost, 1e-9)

        return max(range(1, self.k_max + 1), key=rate)

    def record(self, k: int, n_accepted: int, draft_s: float, verify_s: float) -> None:
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


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
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
        controller.record(k, reply.n_accepted, t1 - t0, reply.verify_s)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += reply.n_accepted
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        stats.ks.append(k)
        if stop_at is not None:
            break
    out = out[:max_new_tokens]
    stats.generated = len(out)
    stats.wall_s = time.perf_counter() - start
    return GenerationResult(token_ids=out, stats=stats)


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
