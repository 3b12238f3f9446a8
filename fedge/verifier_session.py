"""The target's side of speculative decoding: one session per generation, verified in place.

Shared by the cloud (each served session, `fedge.cloud.engine`) and by in-process generation (a
laptop holding both models), so "verify this draft against this session's target cache and advance
it" lives in one place. Only where the target's logits come from differs: in process, the session's
own `CachedSequence` runs a batch-of-one forward (`verify`); in the cloud, one batched forward serves
many sessions' rounds, then each session judges its slice (`judge`) and advances (`advance`).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from fedge.cached_sequence import CachedSequence
from fedge.kernels.verify import verify
from fedge.sampling import SamplingParams
from fedge.speculative import VerifyReply
from fedge.static_decoder import make_sequence


class TargetSequence(Protocol):
    """The target's tokens and KV cache for one generation; `accept` rolls the cache back to the
    longest prefix still valid (the rejected draft tail goes)."""

    tokens: list[int]

    def accept(self, new_tokens: list[int]) -> None: ...


class TargetVerifierSession:
    """Holds the target's KV cache for one generation and verifies each round's draft.

    The cache is kept between rounds and rolled back to the accepted prefix on rejection, so a
    round costs one target forward over k + 1 new positions, never a re-prefill.
    """

    def __init__(self, target: torch.nn.Module, prompt_ids: list[int], params: SamplingParams,
                 seed: int = 0):
        self._init(make_sequence(target, prompt_ids), params, seed, int(target.config.vocab_size))

    @classmethod
    def over(cls, sequence: TargetSequence, params: SamplingParams, seed: int, vocab_size: int
             ) -> TargetVerifierSession:
        """A session over a sequence whose forward runs elsewhere (the cloud's batched forward)."""
        session = cls.__new__(cls)
        session._init(sequence, params, seed, vocab_size)
        return session

    def _init(self, sequence: TargetSequence, params: SamplingParams, seed: int, vocab_size: int) -> None:
        self.sequence = sequence
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size

    @property
    def tokens(self) -> list[int]:
        return self.sequence.tokens

    @property
    def target_calls(self) -> int:
        return self.sequence.forward_calls  # type: ignore[attr-defined]

    def verify(self, draft_ids: list[int], draft_probs: torch.Tensor | None = None) -> VerifyReply:
        """One round in process: the target's forward over the draft, then judge and advance."""
        start = time.perf_counter()
        k = len(draft_ids)
        if any(not 0 <= t < self.vocab_size for t in draft_ids):
            raise ValueError(f"draft token ids must lie in [0, {self.vocab_size})")
        if draft_probs is not None and tuple(draft_probs.shape) != (k, self.vocab_size):
            raise ValueError(f"draft_probs must be ({k}, {self.vocab_size}), got {tuple(draft_probs.shape)}")
        assert isinstance(self.sequence, CachedSequence), "verify() runs the forward in process"  # or its lean subclass
        logits = self.sequence.logits(draft_ids)  # (k + 1, V)
        n, next_id = self.judge(logits, draft_ids, draft_probs)
        self.advance(draft_ids, n, next_id)
        return VerifyReply(n_accepted=n, next_id=next_id, verify_s=time.perf_counter() - start)

    def judge(self, logits: torch.Tensor, draft_ids: list[int], draft_probs: torch.Tensor | None = None
              ) -> tuple[int, int]:
        """Accept or resample against the target's (k + 1, V) logits after this session's tokens;
        returns (accepted draft tokens, the target's next token). Sampling draws from this
        session's own generator, so a session's randomness is its seed alone."""
        k = len(draft_ids)
        result = verify(
            logits.unsqueeze(0),
            torch.tensor([draft_ids], dtype=torch.long).reshape(1, k),
            torch.tensor([k]),
            self.params,
            None if draft_probs is None else draft_probs.unsqueeze(0),
            self.generator,
        )
        return int(result.n_accepted[0]), int(result.next_ids[0])

    def advance(self, draft_ids: list[int], n_accepted: int, next_id: int) -> None:
        """Keep the first `n_accepted` draft tokens and the target's next token; the cache keeps
        the accepted prefix's keys/values and drops the rejected tail."""
        self.sequence.accept(list(draft_ids[:n_accepted]) + [next_id])
