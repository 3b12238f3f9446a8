"""Triton weight-only int8 / int4 matmul, dequantising tiles in registers (layouts: fedge.kernels.quant_matmul_ref).

One kernel, two shapes of inner product: for decode (M <= 2 rows) a broadcast multiply and sum
over K, a GEMV that streams the packed weight once; for larger M a `tl.dot` on the dequantised
tile. int4 bytes are split into their low (even k) and high (odd k) nibbles and multiplied with
the even and odd columns of x, so the codes never need re-interleaving. Scales (and zeros) are
gathered per element from [groups, N] strided tables; neighbouring elements share a group, so
these loads hit the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedge.kernels.dispatch import interpreting
from fedge.kernels.quant_matmul_ref import check_int4, check_int8


@triton.jit
def _inner(x, w, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_K) x (BLOCK_N, BLOCK_K) -> (BLOCK_M, BLOCK_N) in float32."""
    if USE_DOT:
        if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong (triton 3.9); fp32 there
            return tl.dot(x.to(tl.float32), tl.trans(w), out_dtype=tl.float32)
        else:
            return tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
    else:
        return tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], 2)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, x_stride, w_ptr, w_stride, s_ptr, s_stride_group, s_stride_n, bias_ptr, out_ptr, out_stride,
    M, N, K, group_size,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_stride
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 8:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = col_ok[:, None] & k_ok[None, :]
            q = tl.load(w_rows + ks[None, :], mask=w_mask, other=0).to(tl.float32)
            scale = tl.load(s_ptr + (ks // group_size)[None, :] * s_stride_group + cols[:, None] * s_stride_n,
                            mask=w_mask, other=0.0).to(tl.float32)
            acc += _inner(x, q * scale, USE_DOT, DOT_FP32)
        else:
            # byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
            js = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            j_ok = js < K // 2
            w_mask = col_ok[:, None] & j_ok[None, :]
            packed = tl.load(w_rows + js[None, :], mask=w_mask, other=0).to(tl.int32)
            group = (2 * js) // group_size
            s_ptrs = s_ptr + group[None, :] * s_stride_group + cols[:, None] * s_stride_n
            scale = tl.load(s_ptrs, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(s_ptrs + 1, mask=w_mask, other=0.0).to(tl.float32)
            w_low = ((packed & 15).to(tl.float32) - 8.0) * scale + zero
            w_high = ((packed >> 4).to(tl.float32) - 8.0) * scale + zero
            x_mask = row_ok[:, None] & j_ok[None, :]
            x_even = tl.load(x_rows + 2 * js[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + 2 * js[None, :] + 1, mask=x_mask, other=0.0)
            acc += _inner(x_even, w_low, USE_DOT, DOT_FP32)
            acc += _inner(x_odd, w_high, USE_DOT, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch(x, w, s_table, s_stride_group, s_stride_n, bias, n, k, group_size, bits, block_n, block_k):
    shape = x.shape
    flat = x.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    m = flat.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*shape[:-1], n)
    use_dot = m > 2  # decode rows take the GEMV form; tl.dot needs 16 rows, so pad the tile
    block_m = max(16, min(64, triton.next_power_of_2(m))) if use_dot else triton.next_power_of_2(m)
    if block_n is None:
        block_n = 64 if use_dot else 32
    if block_k is None:
        block_k = 64 if use_dot else 256
    block_k = min(block_k, max(triton.next_power_of_2(k), 2))
    if use_dot:  # tl.dot needs an inner dimension of at least 16 (int4 splits the tile in two)
        block_k = max(block_k, 32 if bits == 4 else 16)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](
        flat, flat.stride(0), w, w.stride(0), s_table, s_stride_group, s_stride_n,
        bias if bias is not None else out, out, out.stride(0), m, n, k, group_size,
        BITS=bits, HAS_BIAS=bias is not None, USE_DOT=use_dot,
        DOT_FP32=interpreting() or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out.reshape(*shape[:-1], n)


def int8_matmul_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    block_n: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ (int8 [N, K] * scales).T -> [..., N] in x's dtype. Scales [N] or [N, K // group]."""
    group_size = check_int8(x, qweight, scales, bias)
    n, k = qweight.shape
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    scales = scales.reshape(n, -1).contiguous()
    return _launch(x, qweight, scales, 1, scales.stride(0), bias, n, k, group_size, 8, block_n, block_k)


def int4_matmul_triton(
    x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ int4 weight.T -> [..., N] in x's dtype (qweight uint8 [N, K // 2],
    scales_and_zeros [K // group_size, N, 2], w = (q - 8) * scale + zero)."""
    check_int4(x, qweight, scales_and_zeros, group_size, bias)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    table = scales_and_zeros.contiguous()
    return _launch(x, qweight, table, table.stride(0), table.stride(1), bias, n, k, group_size, 4,
                   block_n, block_k)
