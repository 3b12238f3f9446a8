"""A sequence decoded by the lean runner: a preallocated KV cache whose rollback moves a pointer.

`StaticSequence` is a drop-in for `fedge.cached_sequence.CachedSequence`: same `tokens`/`fed`
bookkeeping, same API, and rollback only moves the length pointer (`fed`); positions past it are
overwritten by the next feed and never attended to before then. Nothing is recomputed. Its forward
is `fedge.lean_decoder.LeanDecoder`'s (re-packed weights, few ops, optionally compiled).

`make_sequence` is where callers (the drafter, the target's verifier session) get a sequence: the
lean runner wherever the model is a Llama-architecture one, because it was measured faster than
Hugging Face's cache path for both the int4 draft and the fp32 target (`fedge bench speculative`
prints both); `FEDGE_LEAN=0` gives `CachedSequence`. Outputs are the same either way (tests).

Compilation stays opt-in (`FEDGE_COMPILE=1`): see `compile_enabled`'s measured trade-off in the
README section "Speculative decoding with compressed drafts".
"""

from __future__ import annotations

import os

import torch

from fedge.cached_sequence import CachedSequence
from fedge.lean_decoder import LeanDecoder, compile_enabled, inductor_cache_dir, supports

__all__ = ["WIDTHS", "LeanDecoder", "StaticSequence", "compile_enabled", "inductor_cache_dir", "lean_enabled",
           "make_sequence", "supports"]

# the widths a round feeds (kept for callers that size buffers by it); compiled graphs are dynamic
WIDTHS = (1, 2, 4, 8, 16)


class StaticSequence(CachedSequence):
    """CachedSequence's bookkeeping over a preallocated cache: rollback moves the length pointer."""

    def __init__(self, model: torch.nn.Module, prompt_ids: list[int], max_len: int = 512,
                 decoder: LeanDecoder | None = None):
        if not prompt_ids:
            raise ValueError("a session needs at least one prompt token")
        self.model = model
        self.decoder = decoder or LeanDecoder.for_model(model)
        self.decoder.refresh()  # the model may have changed since the runner re-packed it
        self.tokens = list(prompt_ids)
        self.fed = []
        self.forward_calls = 0
        self._adopted = 0  # positions whose keys/values came from another sequence (`adopt_prefix`)
        self.k_cache, self.v_cache = self.decoder.new_cache(self._bucket(max(max_len, len(prompt_ids) + 64)))

    @staticmethod
    def _bucket(length: int) -> int:
        size = 512
        while size < length:
            size *= 2
        return size

    @property
    def max_len(self) -> int:
        return self.k_cache[0].shape[1]

    def _feed(self, extra: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        pending = self.tokens[len(self.fed):]
        if not pending:
            self._crop(len(self.tokens) - 1)
            pending = self.tokens[-1:]
        feed = pending + list(extra)
        start = len(self.fed)
        self._reserve(start + len(feed))
        out = self.decoder.run(feed, start, self.k_cache, self.v_cache, len(extra) + 1)
        self.forward_calls += 1
        self.fed.extend(feed)
        return out

    def logits(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        return self._feed(extra)[0]

    def greedy_tokens(self, n: int) -> list[int]:
        """n greedy tokens, each accepted as drawn (the argmax comes out of the same forward)."""
        out: list[int] = []
        for _ in range(n):
            token = int(self._feed(())[1])
            out.append(token)
            self.tokens.append(token)
        return out

    def adopt_prefix(self, source: StaticSequence) -> int:
        """Take the keys/values `source` holds for the prefix it shares with this sequence, in place of
        this sequence's own: a draft derived from the target (its first layers, quantised) takes the
        target's prompt prefill, and after each round the target's entries for the accepted tokens,
        exact where its own are approximate. Layer i here is layer i there. Only positions not taken
        before are copied; returns how many."""
        n = 0
        limit = min(len(source.fed), len(self.tokens))
        while n < limit and source.fed[n] == self.tokens[n]:
            n += 1
        low = min(self._adopted, len(self.fed))
        if n <= low or len(self.k_cache) > len(source.k_cache) \
                or self.k_cache[0].shape[::2] != source.k_cache[0].shape[::2]:
            return 0
        self._reserve(n)
        for mine, theirs in zip(self.k_cache + self.v_cache,
                                source.k_cache[:len(self.k_cache)] + source.v_cache[:len(self.v_cache)], strict=True):
            mine[:, low:n] = theirs[:, low:n]
        if n > len(self.fed):
            self.fed = list(self.tokens[:n])
        self._adopted = n
        return n - low

    def _reserve(self, length: int) -> None:
        """Grow the cache (a new, larger bucket) when a sequence outgrows it; rare by design."""
        if length <= self.max_len:
            return
        k_cache, v_cache = self.decoder.new_cache(self._bucket(length))
        for new, old in zip(k_cache + v_cache, self.k_cache + self.v_cache, strict=True):
            new[:, :old.shape[1]] = old
        self.k_cache, self.v_cache = k_cache, v_cache

    def _crop(self, length: int) -> None:
        del self.fed[length:]  # the pointer moves; stale positions are never attended and later overwritten


def lean_enabled() -> bool:
    """The lean runner unless `FEDGE_LEAN=0`."""
    return os.environ.get("FEDGE_LEAN", "1").strip().lower() not in ("0", "false", "no", "off")


def make_sequence(model: torch.nn.Module, prompt_ids: list[int], lean: bool | None = None) -> CachedSequence:
    """The lean runner where the model supports it (unless `FEDGE_LEAN=0` or lean=False), else
    CachedSequence: outputs are identical either way, only speed differs."""
    if lean is None:
        lean = lean_enabled()
    if lean and supports(model):
        return StaticSequence(model, prompt_ids)
    return CachedSequence(model, prompt_ids)
