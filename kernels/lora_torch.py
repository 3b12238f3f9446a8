"""Multi-LoRA apply with torch ops: two matmuls per adapter present in the batch (SGMV-like).

The CPU path of `fedge.kernels.lora.lora_apply` (and any device's fallback). Tokens are grouped by
adapter, so the work is one shrink and one expand matmul per distinct adapter rather than a gather
of per-token weights; semantics are those of `fedge.kernels.lora_ref.lora_apply_reference`.
"""

from __future__ import annotations

import torch

from fedge.kernels.lora_ref import check_lora_inputs, scaling_vector


def lora_apply_segmented(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two matmuls per adapter present (SGMV-like), accumulated in float32. Any device."""
    check_lora_inputs(x, lora_a, lora_b, adapter_ids, scaling, base)
    d_out = lora_b.shape[1]
    flat_x = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1).to(x.device)
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)
    out = (torch.zeros(flat_x.shape[0], d_out, dtype=torch.float32, device=x.device) if base is None
           else base.reshape(-1, d_out).float().clone())
    for adapter in ids.unique().tolist():
        if adapter < 0:
            continue
        rows = (ids == adapter).nonzero().squeeze(1)
        tokens = flat_x.index_select(0, rows).float()
        delta = (tokens @ lora_a[adapter].float().T) @ lora_b[adapter].float().T
        out.index_add_(0, rows, delta, alpha=float(scale[adapter]))
    return out.to(base.dtype if base is not None else x.dtype).reshape(*x.shape[:-1], d_out)
