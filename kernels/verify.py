"""Speculative verification, the public entry point: accept or resample each session's draft.

The op's chain, one way only (peft's tuners/lora layout): `verify_ref` (VerifyResult, input checks,
the reference and the helpers both backends share; the semantics are in its docstring) <-
`verify_torch` (vectorised, any device) and `verify_triton` (streaming kernels, CUDA) <- this
dispatcher. `VerifyResult` and `verify_reference` are re-exported so callers need one import.
"""

from __future__ import annotations

import torch

from fedge.kernels.dispatch import use_triton
from fedge.kernels.verify_ref import VerifyResult, verify_reference
from fedge.kernels.verify_torch import verify_torch
from fedge.sampling import SamplingParams

__all__ = ["VerifyResult", "verify", "verify_reference"]


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
    fused = params.greedy or (params.top_k == 0 and params.top_p == 1.0)
    if fused and use_triton(target_logits, draft_probs):
        from fedge.kernels.verify_triton import verify_triton

        return verify_triton(target_logits, draft_ids, draft_lens, params, draft_probs, generator)
    return verify_torch(target_logits, draft_ids, draft_lens, params, draft_probs, generator)
