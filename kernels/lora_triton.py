"""Triton multi-LoRA (BGMV): a shrink kernel v[t] = scaling[a] * A[a] x[t] (rank-sized, float32) and an
expand kernel out[t] = base[t] + B[a] v[t], one program per token (and output block).

Tokens without an adapter (id -1) load nothing: their masks are empty, so they cost one store of
zeros (shrink) and a copy of base (expand). Tokens that share an adapter read the same A and B
tiles, which stay in L2 across programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedge.kernels.lora_ref import check_lora_inputs, scaling_vector


@triton.jit
def _shrink_kernel(x_ptr, x_stride, a_ptr, a_stride_adapter, a_stride_rank, ids_ptr, scale_ptr,
                   v_ptr, rank, d_in,
                   RANK: tl.constexpr, BLOCK_IN: tl.constexpr):
    token = tl.program_id(0)
    adapter = tl.load(ids_ptr + token)
    active = adapter >= 0
    adapter = tl.maximum(adapter, 0).to(tl.int64)
    # an inactive token gets empty masks through zero bounds (cheaper than branching)
    rank_bound = tl.where(active, rank, 0)
    in_bound = tl.where(active, d_in, 0)
    ranks = tl.arange(0, RANK)
    rank_ok = ranks < rank_bound
    acc = tl.zeros((RANK,), tl.float32)
    for start in range(0, d_in, BLOCK_IN):
        cols = start + tl.arange(0, BLOCK_IN)
        col_ok = cols < in_bound
        x = tl.load(x_ptr + token.to(tl.int64) * x_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + adapter * a_stride_adapter + ranks[:, None] * a_stride_rank + cols[None, :],
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], 1)
    scale = tl.load(scale_ptr + adapter)
    acc = tl.where(active, acc * scale, 0.0)
    tl.store(v_ptr + token * RANK + ranks, acc)


@triton.jit
def _expand_kernel(v_ptr, b_ptr, b_stride_adapter, b_stride_out, ids_ptr, base_ptr, base_stride,
                   out_ptr, out_stride, rank, d_out,
                   HAS_BASE: tl.constexpr, RANK: tl.constexpr, BLOCK_OUT: tl.constexpr):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row_ok = rows < d_out
    adapter = tl.load(ids_ptr + token)
    active = adapter >= 0
    adapter = tl.maximum(adapter, 0).to(tl.int64)
    ranks = tl.arange(0, RANK)
    v = tl.load(v_ptr + token * RANK + ranks)
    rank_bound = tl.where(active, rank, 0)  # an inactive token loads no B
    b = tl.load(b_ptr + adapter * b_stride_adapter + rows[:, None] * b_stride_out + ranks[None, :],
                mask=row_ok[:, None] & (ranks < rank_bound)[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(b * v[None, :], 1)
    if HAS_BASE:
        acc += tl.load(base_ptr + token.to(tl.int64) * base_stride + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * out_stride + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def lora_apply_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
    base: torch.Tensor | None = None,
    block_in: int = 256,
    block_out: int = 128,
) -> torch.Tensor:
    """See `fedge.kernels.lora.lora_apply`."""
    check_lora_inputs(x, lora_a, lora_b, adapter_ids, scaling, base)
    n_adapters, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    device = x.device
    flat_x = x.reshape(-1, d_in).contiguous()
    tokens = flat_x.shape[0]
    ids = adapter_ids.reshape(-1).to(device=device, dtype=torch.int32).contiguous()
    scale = scaling_vector(scaling, n_adapters, device).contiguous()
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    out_dtype = base.dtype if base is not None else x.dtype
    out = torch.empty(tokens, d_out, dtype=out_dtype, device=device)
    if tokens == 0:
        return out.reshape(*x.shape[:-1], d_out)
    rank_tile = triton.next_power_of_2(max(rank, 1))
    shrunk = torch.empty(tokens, rank_tile, dtype=torch.float32, device=device)
    _shrink_kernel[(tokens,)](
        flat_x, flat_x.stride(0), lora_a, lora_a.stride(0), lora_a.stride(1), ids, scale, shrunk, rank, d_in,
        RANK=rank_tile, BLOCK_IN=min(block_in, triton.next_power_of_2(d_in)),
    )
    flat_base = base.reshape(-1, d_out).contiguous() if base is not None else out
    block_out = min(block_out, triton.next_power_of_2(d_out))
    _expand_kernel[(tokens, triton.cdiv(d_out, block_out))](
        shrunk, lora_b, lora_b.stride(0), lora_b.stride(1), ids, flat_base, flat_base.stride(0),
        out, out.stride(0), rank, d_out,
        HAS_BASE=base is not None, RANK=rank_tile, BLOCK_OUT=block_out,
    )
    return out.reshape(*x.shape[:-1], d_out)
