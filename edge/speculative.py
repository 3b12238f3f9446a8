"""The edge's speculative loop: draft k tokens, have them verified, keep what the target keeps.

The loop talks to any `fedge.speculative.Verifier` (the target in-process, or the cloud over
gRPC). Greedy output equals the target's own greedy output; sampled output follows the target's
distribution exactly, because the verifier applies the Leviathan et al. accept/resample rule with
the draft's q.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedge.cached_sequence import CachedSequence
from fedge.sampling import SamplingParams, sampling_probs
from fedge.speculative import Verifier


class DraftSession:
    """The draft's copy of the sequence; proposes k tokens and their q distributions."""

    def __init__(self, draft: torch.nn.Module, prompt_ids: list[int], params: SamplingParams, seed: int = 0):
        self.session = CachedSequence(draft, prompt_ids)
        self.params = params
        self.generator = torch.Generator().manual_seed(seed + 1)

    def propose(self, k: int) -> tuple[list[int], torch.Tensor | None]:
        """Draft k tokens after the accepted sequence; returns (ids, q) with q (k, V) when sampling."""
        start_len = len(self.session.tokens)
        ids: list[int] = []
        probs = []
        for _ in range(k):
            logits = self.session.logits()[-1]
            if self.params.greedy:
                token = int(logits.argmax())
            else:
                q = sampling_probs(logits, self.params)
                token = int(torch.multinomial(q, 1, generator=self.generator))
                probs.append(q)
            ids.append(token)
            self.session.accept([token])
        self.session.truncate(start_len)  # drafted tokens stay in the cache until the verdict
        return ids, (torch.stack(probs) if probs else None)

    def accept(self, tokens: list[int]) -> None:
        self.session.accept(tokens)


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
    draft: DraftSession,
    verifier: Verifier,
    max_new_tokens: int,
    controller: DraftLengthController | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    on_tokens: Callable[[list[int]], None] | None = None,
) -> GenerationResult:
    """Run rounds of draft -> verify -> accept until `max_new_tokens` or a stop token."""
    controller = controller or DraftLengthController()
    stats = GenerationStats()
    out: list[int] = []
    start = time.perf_counter()
    while len(out) < max_new_tokens:
        k = min(controller.choose(), max_new_tokens - len(out) - 1)
        t0 = time.perf_counter()
        draft_ids, draft_probs = draft.propose(k) if k > 0 else ([], None)
        t1 = time.perf_counter()
        reply = verifier.verify(draft_ids, draft_probs)
        t2 = time.perf_counter()
        new = list(draft_ids[: reply.n_accepted]) + [reply.next_id]
        draft.accept(new)
        stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
        if stop_at is not None:
            new = new[: stop_at + 1]
        out.extend(new)
        if on_tokens:
            on_tokens(new)
        controller.record(k, reply.n_accepted, t1 - t0, t2 - t1)
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
    """The plain one-token-per-forward loop on the same session machinery: the reference output."""
    params = params or SamplingParams()
    session = CachedSequence(model, prompt_ids)
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = session.logits()[-1]
        token = (int(logits.argmax()) if params.greedy
                 else int(torch.multinomial(sampling_probs(logits, params), 1, generator=generator)))
        out.append(token)
        session.accept([token])
        if token in stop_ids:
            break
    return out
