"""The target's side of speculative decoding: one session per generation, verified in place.

Shared by the cloud (each served session) and by in-process generation (a laptop holding both
models), so the accept/rollback bookkeeping lives in one place."""

from __future__ import annotations

import time

import torch

from fedge.cached_sequence import CachedSequence
from fedge.kernels.verify import verify
from fedge.sampling import SamplingParams
from fedge.speculative import VerifyReply


class TargetVerifierSession:
    """Holds the target's KV cache for one generation and verifies each round's draft.

    The cache is kept between rounds and rolled back to the accepted prefix on rejection, so a
    round costs one target forward over k + 1 new positions, never a re-prefill.
    """

    def __init__(self, target: torch.nn.Module, prompt_ids: list[int], params: SamplingParams,
                 seed: int = 0):
        self.session = CachedSequence(target, prompt_ids)
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = target.config.vocab_size

    @property
    def tokens(self) -> list[int]:
        return self.session.tokens

    @property
    def target_calls(self) -> int:
        return self.session.forward_calls

    def verify(self, draft_ids: list[int], draft_probs: torch.Tensor | None = None) -> VerifyReply:
        start = time.perf_counter()
        k = len(draft_ids)
        if any(not 0 <= t < self.vocab_size for t in draft_ids):
            raise ValueError(f"draft token ids must lie in [0, {self.vocab_size})")
        if draft_probs is not None and tuple(draft_probs.shape) != (k, self.vocab_size):
            raise ValueError(f"draft_probs must be ({k}, {self.vocab_size}), got {tuple(draft_probs.shape)}")
        logits = self.session.logits(draft_ids)  # (k + 1, V)
        result = verify(
            logits.unsqueeze(0),
            torch.tensor([draft_ids], dtype=torch.long).reshape(1, k),
            torch.tensor([k]),
            self.params,
            None if draft_probs is None else draft_probs.unsqueeze(0),
            self.generator,
        )
        n, next_id = int(result.n_accepted[0]), int(result.next_ids[0])
        self.session.accept(list(draft_ids[:n]) + [next_id])
        return VerifyReply(n_accepted=n, next_id=next_id, verify_s=time.perf_counter() - start)
