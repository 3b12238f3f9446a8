"""Codecs between the wire messages and tensors.

Sparse q: when sampling, the verifier needs the draft's q(x) at each drafted position. Sending the
full (k, V) distribution would cost V floats per token (49k for SmolLM2). Instead the edge samples
from the renormalised top-m of its q, and sends that support (m ids + m probabilities): the
distribution the token was actually drawn from, so the accept/resample rule stays exact.
"""

from __future__ import annotations

import math

import torch

# probabilities sent as float32 must sum to 1 within this tolerance (renormalised server side)
PROB_SUM_TOLERANCE = 1e-3


def truncate_q(q: torch.Tensor, support: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`support` of each row of q (k, V), renormalised: returns (ids (k, m), probs (k, m)).

    Zero-probability entries are dropped from the support (they could never be sampled)."""
    m = min(support, q.shape[-1])
    probs, ids = torch.topk(q.float(), m, dim=-1)
    probs = probs / probs.sum(-1, keepdim=True)
    return ids, probs


def dense_from_sparse(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    """(k, m) ids/probs -> (k, V) dense q, scattering the support."""
    out = torch.zeros(ids.shape[0], vocab)
    return out.scatter_(1, ids.long(), probs.float())


def validate_sparse_q(rows: list[tuple[list[int], list[float]]], draft_ids: list[int], vocab: int,
                      max_support: int) -> torch.Tensor:
    """Check and densify the wire's sparse q; raises ValueError with the reason.

    Each row must have as many ids as probs (1..max_support), ids in the vocabulary and distinct,
    finite non-negative probs summing to 1, and positive mass on the token that was drafted there
    (it was sampled from this q, so q(x) > 0)."""
    if len(rows) != len(draft_ids):
        raise ValueError(f"draft_q has {len(rows)} rows for {len(draft_ids)} draft tokens")
    dense = torch.zeros(len(rows), vocab)
    for i, ((ids, probs), token) in enumerate(zip(rows, draft_ids, strict=True)):
        if len(ids) != len(probs) or not 1 <= len(ids) <= max_support:
            raise ValueError(f"draft_q[{i}]: need 1..{max_support} ids with one prob each, "
                             f"got {len(ids)} ids and {len(probs)} probs")
        if any(not 0 <= t < vocab for t in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"draft_q[{i}]: ids must be distinct and lie in [0, {vocab})")
        if any(not math.isfinite(p) or p < 0 for p in probs):
            raise ValueError(f"draft_q[{i}]: probabilities must be finite and >= 0")
        total = sum(probs)
        if abs(total - 1.0) > PROB_SUM_TOLERANCE:
            raise ValueError(f"draft_q[{i}]: probabilities sum to {total:.6f}, not 1")
        row = dict(zip(ids, probs, strict=True))
        if row.get(token, 0.0) <= 0:
            raise ValueError(f"draft_q[{i}]: the drafted token {token} has no probability mass")
        dense[i, torch.tensor(ids, dtype=torch.long)] = torch.tensor(probs) / total
    return dense
