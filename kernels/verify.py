"""Speculative verification (Leviathan et al. 2023; Chen et al. 2023), batched over sessions.

Each session b proposes `draft_lens[b]` tokens `draft_ids[b, :draft_lens[b]]` (rows are padded to
the longest draft). The target scored the accepted prefix followed by the draft in one forward,
so `target_logits[b, i]` is the target's next-token distribution after the first i draft tokens,
for i = 0..draft_lens[b] (K + 1 positions; padding positions are ignored).

- Greedy (temperature 0): accept while the draft token is the target's argmax; the next token is
  the target's argmax at the first mismatch, or the bonus argmax after a fully accepted draft.
- Sampling: accept draft token x with probability min(1, p(x) / q(x)); at the first rejection
  sample from norm(max(0, p - q)); after a fully accepted draft sample the bonus from p. The
  output is distributed exactly as the target's own sampling. Temperature, top-k and top-p are
  applied identically to p and q by `sampling_probs`.

`draft_probs` is the draft's full distribution q per position (B, K, V) after the same
processing, or None for a greedy draft (q is then one-hot on the drafted token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedge.sampling import SamplingParams, sampling_probs


@dataclass
class VerifyResult:
    n_accepted: torch.Tensor  # (B,) int64: draft tokens accepted per session
    next_ids: torch.Tensor  # (B,) int64: the corrected or bonus token per session


def verify_reference(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_lens: torch.Tensor,
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Plain-torch verification, one session at a time; the kernels are checked against it."""
    batch, width, _ = target_logits.shape
    if draft_ids.shape[0] != batch or draft_ids.shape[1] + 1 != width:
        raise ValueError(f"target_logits {tuple(target_logits.shape)} must be (B, K+1, V) for draft_ids "
                         f"{tuple(draft_ids.shape)}")
    if int(draft_lens.min()) < 0 or int(draft_lens.max()) > draft_ids.shape[1]:
        raise ValueError("draft_lens must lie in [0, K]")
    n_accepted = torch.zeros(batch, dtype=torch.long)
    next_ids = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        length = int(draft_lens[b])
        p = sampling_probs(target_logits[b, : length + 1], params)
        accepted = 0
        corrected = None
        for i in range(length):
            x = int(draft_ids[b, i])
            if params.greedy:
                ok = int(p[i].argmax()) == x
            else:
                q = draft_probs[b, i].float() if draft_probs is not None else None
                qx = float(q[x]) if q is not None else 1.0
                ratio = float(p[i, x]) / qx if qx > 0 else 0.0
                ok = torch.rand((), generator=generator).item() < min(1.0, ratio)
            if not ok:
                if params.greedy:
                    corrected = int(p[i].argmax())
                else:
                    q = draft_probs[b, i].float() if draft_probs is not None else _one_hot(x, p.shape[-1])
                    residual = (p[i] - q).clamp(min=0)
                    total = residual.sum()
                    # total == 0 only if p == q, where rejection has probability zero; guard anyway
                    dist = residual / total if total > 0 else p[i]
                    corrected = int(torch.multinomial(dist, 1, generator=generator))
                break
            accepted += 1
        if corrected is None:  # every draft token accepted: a bonus token from the target
            bonus = p[accepted]
            corrected = (int(bonus.argmax()) if params.greedy
                         else int(torch.multinomial(bonus, 1, generator=generator)))
        n_accepted[b] = accepted
        next_ids[b] = corrected
    return VerifyResult(n_accepted=n_accepted, next_ids=next_ids)


def _one_hot(index: int, size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[index] = 1.0
    return out


def verify(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_lens: torch.Tensor,
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Dispatcher: the Triton kernel on CUDA, the vectorised torch version elsewhere.

    Top-k / top-p sampling needs a sort over the vocabulary, which the Triton kernel does not fuse:
    it takes the vectorised torch path on every device. Results live on target_logits' device.
    """
    from fedge.kernels.dispatch import use_triton
    from fedge.kernels.verify_torch import verify_torch

    fused = params.greedy or (params.top_k == 0 and params.top_p == 1.0)
    if fused and use_triton(target_logits, draft_probs):
        from fedge.kernels.triton_verify import verify_triton

        return verify_triton(target_logits, draft_ids, draft_lens, params, draft_probs, generator)
    return verify_torch(target_logits, draft_ids, draft_lens, params, draft_probs, generator)
