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

This module is the bottom of the op's chain: the result type, the input checks, the helpers both
backends share and the plain reference. `verify_torch` and `verify_triton` import it and nothing
else of kernels/; the dispatcher `fedge.kernels.verify.verify` sits on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedge.sampling import SamplingParams, sampling_probs


@dataclass
class VerifyResult:
    n_accepted: torch.Tensor  # (B,) int64: draft tokens accepted per session
    next_ids: torch.Tensor  # (B,) int64: the corrected or bonus token per session


def check_verify_inputs(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_lens: torch.Tensor,
    draft_probs: torch.Tensor | None,
) -> None:
    """Raise ValueError/TypeError with a clear message for malformed verification inputs."""
    if target_logits.dim() != 3 or not target_logits.is_floating_point():
        raise TypeError(f"target_logits must be a floating (B, K+1, V) tensor, got "
                        f"{target_logits.dtype} {tuple(target_logits.shape)}")
    batch, width, vocab = target_logits.shape
    if draft_ids.dim() != 2 or draft_ids.is_floating_point() or draft_ids.dtype == torch.bool:
        raise TypeError(f"draft_ids must be an integer (B, K) tensor, got {draft_ids.dtype} "
                        f"{tuple(draft_ids.shape)}")
    if draft_ids.shape[0] != batch or draft_ids.shape[1] + 1 != width:
        raise ValueError(f"target_logits {tuple(target_logits.shape)} must be (B, K+1, V) for draft_ids "
                         f"{tuple(draft_ids.shape)}")
    if draft_lens.shape != (batch,) or draft_lens.is_floating_point():
        raise ValueError(f"draft_lens must be an integer ({batch},) tensor, got {draft_lens.dtype} "
                         f"{tuple(draft_lens.shape)}")
    if batch and (int(draft_lens.min()) < 0 or int(draft_lens.max()) > draft_ids.shape[1]):
        raise ValueError("draft_lens must lie in [0, K]")
    if draft_probs is not None and draft_probs.shape != (batch, width - 1, vocab):
        raise ValueError(f"draft_probs must be (B, K, V) = {(batch, width - 1, vocab)}, got "
                         f"{tuple(draft_probs.shape)}")


def accepted_prefix(ok: torch.Tensor, draft_lens: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of accepted positions per session, positions past the draft excluded."""
    positions = torch.arange(ok.shape[1], device=ok.device)
    ok = ok & (positions[None, :] < draft_lens[:, None])
    return ok.long().cumprod(dim=1).sum(dim=1)


def rand_on(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """torch.rand drawn on the generator's own device (a CPU generator may drive CUDA logits), moved to
    `device`: the acceptance uniforms of both backends."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


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
