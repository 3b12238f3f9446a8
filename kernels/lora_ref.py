"""Multi-LoRA apply (BGMV / SGMV style): the operation's inputs, their checks and its reference.

    out[t] = base[t] + scaling[a] * B[a] @ (A[a] @ x[t]),   a = adapter_ids[t]   (a = -1: base only)

Adapters are stacked: A (n_adapters, r, in), B (n_adapters, out, r), as in peft's lora_A / lora_B
weights. Adapters of smaller rank are zero-padded to r (`stack_adapters`), which leaves their
product unchanged; their own alpha / r goes in `scaling`. The cloud verifier serves per-client
adapters over one base model with this.

This module is the bottom of the op's chain (like peft's tuners/lora/layer.py): the backends
(`lora_torch`, `lora_triton`) import it and nothing else of kernels/, and the dispatcher
`fedge.kernels.lora.lora_apply` sits on top. `lora_apply_reference` gathers each token's adapter
weights and multiplies token by token: obviously right, memory hungry, the thing to check against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_lora_inputs(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor,
    base: torch.Tensor | None,
) -> None:
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a must be (n_adapters, r, in) and lora_b (n_adapters, out, r), got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    n_adapters, rank, d_in = lora_a.shape
    if lora_b.shape[0] != n_adapters or lora_b.shape[2] != rank:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
                         f"expected ({n_adapters}, out, {rank})")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, the adapters expect {d_in}")
    if not (x.is_floating_point() and lora_a.is_floating_point() and lora_b.is_floating_point()):
        raise TypeError("x, lora_a and lora_b must be floating point")
    if adapter_ids.shape != x.shape[:-1] or adapter_ids.is_floating_point():
        raise ValueError(f"adapter_ids must be integer with shape {tuple(x.shape[:-1])}, got "
                         f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}")
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n_adapters):
        raise ValueError(f"adapter_ids must lie in [-1, {n_adapters - 1}] (-1: no adapter)")
    if isinstance(scaling, torch.Tensor) and scaling.shape != (n_adapters,):
        raise ValueError(f"scaling must be a float or a ({n_adapters},) tensor, got {tuple(scaling.shape)}")
    if base is not None and base.shape != (*x.shape[:-1], lora_b.shape[1]):
        raise ValueError(f"base must be {(*x.shape[:-1], lora_b.shape[1])}, got {tuple(base.shape)}")


def scaling_vector(scaling: float | torch.Tensor, n_adapters: int, device: torch.device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        return scaling.to(device=device, dtype=torch.float32)
    return torch.full((n_adapters,), float(scaling), device=device)


def lora_apply_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-by-token gather of each adapter's A and B, in float32. Output dtype: base's, else x's."""
    check_lora_inputs(x, lora_a, lora_b, adapter_ids, scaling, base)
    d_out = lora_b.shape[1]
    flat_x = x.reshape(-1, x.shape[-1]).float()
    ids = adapter_ids.reshape(-1).long()
    has_adapter = ids >= 0
    safe_ids = ids.clamp(min=0)
    scale = scaling_vector(scaling, lora_a.shape[0], x.device)[safe_ids]
    shrunk = torch.bmm(lora_a.float()[safe_ids], flat_x[:, :, None])  # (T, r, 1)
    delta = torch.bmm(lora_b.float()[safe_ids], shrunk).squeeze(-1)  # (T, out)
    delta = delta * (scale * has_adapter)[:, None]
    out = delta if base is None else base.reshape(-1, d_out).float() + delta
    return out.to(base.dtype if base is not None else x.dtype).reshape(*x.shape[:-1], d_out)


def stack_adapters(
    adapters: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-adapter (A (r_i, in), B (out, r_i)) into (n, r_max, in) and (n, out, r_max), zero-padded.

    Zero rows of A and zero columns of B add nothing, so heterogeneous ranks share one batch; pass
    each adapter's own alpha / r_i as its `scaling`."""
    if not adapters:
        raise ValueError("need at least one adapter")
    d_in, d_out = adapters[0][0].shape[1], adapters[0][1].shape[0]
    rank = max(a.shape[0] for a, _ in adapters)
    dtype = dtype or adapters[0][0].dtype
    device = adapters[0][0].device
    stacked_a = torch.zeros(len(adapters), rank, d_in, dtype=dtype, device=device)
    stacked_b = torch.zeros(len(adapters), d_out, rank, dtype=dtype, device=device)
    for i, (a, b) in enumerate(adapters):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} must be (r, {d_in}) "
                             f"and ({d_out}, r)")
        stacked_a[i, : a.shape[0]] = a
        stacked_b[i, :, : a.shape[0]] = b
    return stacked_a, stacked_b
