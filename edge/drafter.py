"""The edge's drafting: the draft model's copy of the sequence, proposing k tokens and their q.

One class for both paths. In-process (`fedge.edge.local_generate`) the verifier takes q dense, one
(k, V) row per drafted token. Over gRPC (`fedge.edge.client`) only the top-m of q crosses the
network, so the token is drawn from that renormalised top-m and the (ids, probs) sent are exactly
the distribution it was drawn from: sampling stays lossless with a sparse q.

Tokens drafted while the cloud is unreachable are held here as *unverified*: they extend the
draft's sequence, and the next proposals are those tokens (the reconciliation rounds) until the
target keeps or replaces them.
"""

from __future__ import annotations

import torch

from fedge.protocol.codecs import truncate_q
from fedge.sampling import SamplingParams, sampling_probs
from fedge.static_decoder import make_sequence

SparseQ = tuple[list[int], list[float]]  # (token ids, probabilities) of one drafted position


class Drafter:
    """Implements `fedge.speculative.Proposer` with the draft model.

    `q_support` None gives dense q ((k, V) tensor, None when greedy); an int m gives the top-m
    sparse q per drafted token (a list, empty when greedy), as the Verify RPC carries it.
    """

    def __init__(self, draft: torch.nn.Module, prompt_ids: list[int], params: SamplingParams, seed: int = 0,
                 q_support: int | None = None):
        self.sequence = make_sequence(draft, prompt_ids)  # the lean runner where the model allows
        self.params = params
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.q_support = q_support
        self.unverified: list[tuple[int, SparseQ | None]] = []  # drafted offline, awaiting the target
        self._last: tuple[list[int], object] = ([], None)
        self._from_unverified = False

    @property
    def tokens(self) -> list[int]:
        """The accepted sequence followed by the unverified tokens."""
        return self.sequence.tokens

    @property
    def unverified_ids(self) -> list[int]:
        return [t for t, _ in self.unverified]

    def propose(self, k: int) -> tuple[list[int], object]:
        """Draft k tokens after the sequence; while unverified tokens wait, they are the proposal."""
        self._from_unverified = bool(self.unverified)
        if self._from_unverified:
            chunk = self.unverified[:k]
            self._last = ([t for t, _ in chunk], self._pack([q for _, q in chunk if q is not None]))
            return self._last
        start_len = len(self.sequence.tokens)
        ids, qs = self._draft(k)
        self.sequence.rewind(start_len)  # drafted tokens stay in the cache until the verdict
        self._last = (ids, self._pack(qs))
        return self._last

    def accept(self, tokens: list[int]) -> None:
        """The verdict of the last proposal: `tokens` follow the accepted sequence.

        Unverified tokens beyond it survive only if the target kept the whole proposal and its own
        next token is the next unverified one; otherwise they are dropped (rewritten)."""
        if not self.unverified:
            self.sequence.accept(tokens)
            return
        accepted_len = len(self.sequence.tokens) - len(self.unverified)
        ids = self.unverified_ids
        if len(tokens) == len(self._last[0]) + 1 and ids[:len(tokens)] == tokens:
            del self.unverified[:len(tokens)]
            return
        want = self.sequence.tokens[:accepted_len] + list(tokens)
        self.unverified = []
        self._follow(want)

    def draft_unverified(self, n: int = 1) -> list[int]:
        """Draft n tokens on the edge alone (the cloud is away); they wait as unverified."""
        ids, qs = self._draft(n)  # the tokens enter the sequence as drafted
        self._hold(ids, qs)
        return ids

    def hold_last_proposal(self) -> list[int]:
        """The last proposal's verdict is delayed (the round was lost in flight): keep its tokens as
        unverified. Returns the tokens newly held (none if the proposal was unverified already)."""
        if self._from_unverified:
            return []
        ids, q = self._last
        self.sequence.accept(ids)
        self._hold(ids, list(q) if q is not None else [])
        return list(ids)

    def _hold(self, ids: list[int], qs: list) -> None:
        """`ids` (already in the sequence) wait as unverified, with their sparse q (none when greedy)."""
        self.unverified.extend(zip(ids, qs or [None] * len(ids), strict=True))

    def _follow(self, want: list[int]) -> None:
        """Make the sequence `want`, keeping the longest common prefix (and its cache)."""
        have = self.sequence.tokens
        i = 0
        while i < min(len(want), len(have)) and want[i] == have[i]:
            i += 1
        if i < len(have):
            self.sequence.truncate(i)
        if i < len(want):
            self.sequence.accept(want[i:])

    def _draft(self, k: int) -> tuple[list[int], list]:
        """k tokens drawn one by one, each entering the sequence; returns (ids, q per token)."""
        if self.params.greedy:
            return self.sequence.greedy_tokens(k), []  # the argmax comes out of the forward itself
        ids: list[int] = []
        qs: list = []
        for _ in range(k):
            logits = self.sequence.logits()[-1]
            if self.q_support is None:
                q = sampling_probs(logits, self.params)
                token = int(torch.multinomial(q, 1, generator=self.generator))
                qs.append(q)
            else:
                support, probs = truncate_q(sampling_probs(logits, self.params)[None], self.q_support)
                pick = int(torch.multinomial(probs[0], 1, generator=self.generator))
                token = int(support[0, pick])
                qs.append((support[0].tolist(), probs[0].tolist()))
            ids.append(token)
            self.sequence.accept([token])
        return ids, qs

    def _pack(self, qs: list) -> object:
        if self.q_support is not None:
            return qs
        return torch.stack(qs) if qs else None
