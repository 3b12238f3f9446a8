"""A sequence decoded by one causal LM, whose KV cache rolls back instead of re-prefilling.

`tokens` is the sequence as the caller sees it; the cache covers a prefix of it (`fed`). Feeding
computes only what the cache lacks, and changing `tokens` (accepting, truncating) keeps the longest
cached prefix that is still valid. Both the target (verifying drafts) and the draft (proposing
them) use it; speculative decoding is then bookkeeping on `tokens`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class RollbackSequence:
    """The bookkeeping every rollback sequence shares: `tokens` and the cached prefix `fed` of it.
    A subclass feeds (`logits`) and cuts its cache (`_crop`); everything else is here."""

    tokens: list[int]
    fed: list[int]

    def logits(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        raise NotImplementedError

    def _crop(self, length: int) -> None:
        raise NotImplementedError

    def prefill(self) -> None:
        """Feed the sequence now, all but its last token (which the next `logits` call feeds), so that
        the first round of a generation is timed as a round and not as a prompt's prefill."""
        if len(self.tokens) - len(self.fed) > 1:
            last = self.tokens.pop()
            self.logits()
            self.tokens.append(last)

    def greedy_tokens(self, n: int) -> list[int]:
        """n greedy tokens, each accepted as drawn (the drafter's greedy loop)."""
        out: list[int] = []
        for _ in range(n):
            token = int(self.logits()[-1].argmax())
            out.append(token)
            self.tokens.append(token)  # fed stays a prefix of tokens: nothing to roll back
        return out

    def accept(self, new_tokens: list[int]) -> None:
        """Append tokens to the sequence; the cache keeps whatever prefix still matches."""
        self.tokens.extend(new_tokens)
        self._sync()

    def rewind(self, length: int) -> None:
        """Cut `tokens` back to `length` but keep the cache past it, as `logits(extra)` does: a drafter
        proposes k tokens, rewinds, and the verdict's `accept` keeps the cached drafts it confirms
        (a `truncate` here would drop them and the next forward would compute them again)."""
        if not 0 < length <= len(self.tokens):
            raise ValueError(f"cannot rewind a {len(self.tokens)}-token session to {length}")
        del self.tokens[length:]

    def truncate(self, length: int) -> None:
        """Cut the sequence back to `length` tokens (rejected drafts), rolling the cache back."""
        if not 0 < length <= len(self.tokens):
            raise ValueError(f"cannot truncate a {len(self.tokens)}-token session to {length}")
        del self.tokens[length:]
        self._sync()

    def _sync(self) -> None:
        common = 0
        limit = min(len(self.fed), len(self.tokens))
        while common < limit and self.fed[common] == self.tokens[common]:
            common += 1
        self._crop(common)

    @property
    def cached_len(self) -> int:
        return len(self.fed)


class CachedSequence(RollbackSequence):
    def __init__(self, model: torch.nn.Module, prompt_ids: list[int]):
        if not prompt_ids:
            raise ValueError("a session needs at least one prompt token")
        self.model = model
        self.tokens: list[int] = list(prompt_ids)
        self.fed: list[int] = []  # the tokens whose keys/values are in the cache, in order
        self.cache = DynamicCache(config=model.config)
        self.forward_calls = 0

    def logits(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Feed `tokens` beyond the cache plus `extra`; return next-token logits (float32) for the
        last len(extra) + 1 positions: row i follows tokens + extra[:i].

        `extra` enters the cache but not `tokens`: call `accept` to keep some of it.
        """
        pending = self.tokens[len(self.fed):]
        if not pending:
            # the last token must be fed to get its logits; re-feed it once
            self._crop(len(self.tokens) - 1)
            pending = self.tokens[-1:]
        feed = pending + list(extra)
        ids = torch.tensor([feed], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=len(extra) + 1)
        self.forward_calls += 1
        self.fed.extend(feed)
        return out.logits[0].float()

    def _crop(self, length: int) -> None:
        if length < len(self.fed):
            # a negative argument removes that many positions in every transformers version
            self.cache.crop(length - len(self.fed))
            del self.fed[length:]
