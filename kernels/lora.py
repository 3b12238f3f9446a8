"""Multi-LoRA apply, the public entry point: every token with its own adapter, in one call.

    out[t] = base[t] + scaling[a] * B[a] @ (A[a] @ x[t]),   a = adapter_ids[t]   (a = -1: base only)

The op's chain, one way only (peft's tuners/lora layout): `lora_ref` (input checks, the reference,
`stack_adapters`) <- `lora_torch` (segmented matmuls) and `lora_triton` (BGMV kernels) <- this
dispatcher, which picks the Triton kernels on CUDA and the segmented matmuls elsewhere. The
reference and `stack_adapters` are re-exported here so callers need one import.
"""

from __future__ import annotations

import torch

from fedge.kernels.dispatch import use_triton
from fedge.kernels.lora_ref import lora_apply_reference, stack_adapters
from fedge.kernels.lora_torch import lora_apply_segmented

__all__ = ["lora_apply", "lora_apply_reference", "lora_apply_segmented", "stack_adapters"]


def lora_apply(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + scaling[a] * B[a] A[a] x per token (a = adapter_ids, -1 for none); see the module doc.

    x (..., in); lora_a (n_adapters, r, in); lora_b (n_adapters, out, r); adapter_ids (...) integer;
    scaling a float or (n_adapters,); base (..., out) or None. Returns (..., out) in base's dtype
    (x's without base). Triton on CUDA, segmented matmuls elsewhere.
    """
    if use_triton(x, lora_a, lora_b, base):
        from fedge.kernels.lora_triton import lora_apply_triton

        return lora_apply_triton(x, lora_a, lora_b, adapter_ids, scaling, base)
    return lora_apply_segmented(x, lora_a, lora_b, adapter_ids, scaling, base)
