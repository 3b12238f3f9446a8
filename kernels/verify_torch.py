"""Vectorised torch speculative verification: every session in one set of tensor ops, no Python loop.

Same semantics as `fedge.kernels.verify_ref.verify_reference` (see that module's docstring). Greedy results
are identical to the reference; sampling results have the same distribution but consume the random
generator in a different order (all acceptance uniforms first, then one residual draw per session).
Runs on any device; it is the CPU path of `fedge.kernels.verify.verify` and the CUDA fallback for
top-k / top-p sampling, which the Triton kernel does not fuse.
"""

from __future__ import annotations

import torch

from fedge.kernels.verify_ref import VerifyResult, accepted_prefix, check_verify_inputs, rand_on
from fedge.sampling import SamplingParams, sampling_probs


def verify_torch(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_lens: torch.Tensor,
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Batched verification with tensor ops only. Results live on target_logits' device."""
    check_verify_inputs(target_logits, draft_ids, draft_lens, draft_probs)
    device = target_logits.device
    batch, width, vocab = target_logits.shape
    k = width - 1
    draft_ids = draft_ids.to(device=device, dtype=torch.long)
    draft_lens = draft_lens.to(device=device, dtype=torch.long)
    rows = torch.arange(batch, device=device)

    if params.greedy:
        target_ids = target_logits.argmax(dim=-1)  # (B, K+1)
        n_accepted = accepted_prefix(target_ids[:, :k] == draft_ids, draft_lens)
        next_ids = target_ids[rows, n_accepted]
        return VerifyResult(n_accepted=n_accepted, next_ids=next_ids)

    probs = sampling_probs(target_logits, params)  # (B, K+1, V) float32
    if k > 0:
        p_draft = probs[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)
        if draft_probs is not None:
            q_draft = draft_probs.to(device).float().gather(-1, draft_ids[..., None]).squeeze(-1)
        else:
            q_draft = torch.ones_like(p_draft)  # greedy draft: q is one-hot on the drafted token
        ratio = torch.where(q_draft > 0, p_draft / q_draft.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        uniforms = rand_on((batch, k), generator, device)
        n_accepted = accepted_prefix(uniforms < ratio.clamp(max=1.0), draft_lens)
    else:
        n_accepted = torch.zeros(batch, dtype=torch.long, device=device)

    # One distribution per session: the residual at the first rejection, or p for the bonus token.
    p_next = probs[rows, n_accepted]  # (B, V)
    rejected = n_accepted < draft_lens
    if k > 0:
        at = n_accepted.clamp(max=k - 1)
        if draft_probs is not None:
            q_next = draft_probs.to(device)[rows, at].float()
        else:
            q_next = torch.nn.functional.one_hot(draft_ids[rows, at], vocab).float()
        residual = torch.where(rejected[:, None], (p_next - q_next).clamp(min=0), p_next)
        # an all-zero residual means p == q, where rejection has probability zero; fall back to p
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    else:
        residual = p_next
    next_ids = _multinomial(residual, generator)
    return VerifyResult(n_accepted=n_accepted, next_ids=next_ids)


def _multinomial(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, drawn proportional to the row's non-negative weights.

    Inverse CDF with one uniform per row: the first index whose running sum exceeds u * total.
    Zero weights never win (their running sum does not grow). The running sum is float64 so
    rounding does not move small tokens' boundaries; it is far cheaper on CPU than
    torch.multinomial or a Gumbel race over vocabulary-sized rows."""
    cdf = weights.double().cumsum(dim=-1)
    u = rand_on((weights.shape[0], 1), generator, weights.device, torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=weights.shape[-1] - 1)
