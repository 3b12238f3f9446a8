"""Weight-only int8 / int4 matmul: layouts, input checks, quantisers and references.

Weights are [N, K] (out, in), quantised along K.

- int8: `qweight` int8 [N, K]; `scales` [N] (one per output row, `fedge.kernels.quant.Int8Linear`'s
  layout) or [N, K // group_size] (group-wise). w = q * scale.
- int4: `qweight` uint8 [N, K // 2], two codes per byte along K, the even k in the low nibble;
  codes in [0, 15]. `scales_and_zeros` [K // group_size, N, 2] float, exactly the layout of
  `fedge.kernels.quant.Int4Linear.scales_and_zeros` and torch's `_weight_int4pack_mm_for_cpu`:
  w = (q - 8) * scale + zero. Symmetric int4 is zero = 0.

Activations x are [..., K] in any float dtype; outputs are [..., N] in x's dtype, accumulated in
float32. The references dequantise and call one matmul.

This module is the bottom of the op's chain: layouts, checks, quantisers and references, importing
nothing else of kernels/. `quant_matmul_triton` imports it; the dispatchers `int8_matmul` /
`int4_matmul` in `fedge.kernels.quant_matmul` sit on top (on CPU the packed torch ops in
`fedge.kernels.quant` are the fast path).
"""

from __future__ import annotations

import torch


def _check_x(x: torch.Tensor, k: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight has K = {k}")


def check_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Validate int8 operands; returns the group size (K for per-row scales)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"int8 qweight must be an int8 [N, K] tensor, got {qweight.dtype} "
                        f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    _check_x(x, k)
    if scales.dim() == 1 and scales.shape[0] == n:
        group_size = k
    elif scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] > 0 and k % scales.shape[1] == 0:
        group_size = k // scales.shape[1]
    else:
        raise ValueError(f"int8 scales must be [{n}] or [{n}, K // group_size] with K = {k}, got "
                         f"{tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return group_size


def check_int4(
    x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> None:
    """Validate int4 operands (packed uint8 codes, [K // group_size, N, 2] scales and zeros)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"int4 qweight must be a uint8 [N, K // 2] tensor, got {qweight.dtype} "
                        f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    _check_x(x, k)
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size must be even and divide K = {k}, got {group_size}")
    if scales_and_zeros.shape != (k // group_size, n, 2):
        raise ValueError(f"scales_and_zeros must be [K // group_size, N, 2] = {(k // group_size, n, 2)}, "
                         f"got {tuple(scales_and_zeros.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")


# ---- quantisers and layouts ------------------------------------------------------------------


def quantize_int8(
    weight: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (qweight int8 [N, K], scales [N] per row, or [N, K // group_size])."""
    n, k = weight.shape
    group = k if group_size is None else group_size
    if k % group:
        raise ValueError(f"K = {k} is not a multiple of group_size {group}")
    groups = weight.detach().float().reshape(n, k // group, group)
    scales = groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127.0
    scales = scales.to(scale_dtype).float()  # quantise against the scale that will be stored
    qweight = torch.round(groups / scales).clamp(-127, 127).to(torch.int8).reshape(n, k)
    scales = scales.squeeze(-1).to(scale_dtype)
    return qweight, scales.squeeze(1) if group_size is None else scales


def quantize_int4(
    weight: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 (min/scale per group): (qweight uint8 [N, K // 2], scales_and_zeros [K/g, N, 2])."""
    n, k = weight.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"group_size must be even and divide K = {k}, got {group_size}")
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15.0).clamp(min=1e-8).to(scale_dtype).float()
    zero = (low + 8.0 * scale).to(scale_dtype).float()  # the value of code 8
    codes = torch.round((groups - zero) / scale + 8.0).clamp(0, 15).to(torch.uint8).reshape(n, k)
    scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
    return pack_int4(codes), scales_and_zeros.contiguous().to(scale_dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] -> uint8 [N, K // 2], even k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("K must be even to pack int4 codes")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 codes [N, K]."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(*qweight.shape[:-1], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] weight an int8 layout represents."""
    n, k = qweight.shape
    scales = scales.float().reshape(n, -1)
    group = k // scales.shape[1]
    return (qweight.float().reshape(n, -1, group) * scales[..., None]).reshape(n, k)


def dequantize_int4(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 [N, K] weight an int4 layout represents."""
    codes = unpack_int4(qweight).float()
    n, k = codes.shape
    scale = scales_and_zeros[..., 0].float().T[..., None]  # [N, K // g, 1]
    zero = scales_and_zeros[..., 1].float().T[..., None]
    return ((codes.reshape(n, -1, group_size) - 8.0) * scale + zero).reshape(n, k)


def int4_to_cpu_pack(qweight: torch.Tensor) -> torch.Tensor:
    """This int4 layout re-packed for torch's `_weight_int4pack_mm_for_cpu` (same scales_and_zeros)."""
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight).to(torch.int32).cpu(), 1)


# ---- references --------------------------------------------------------------------------------


def int8_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantize(qweight, scales).T (+ bias), float32 math, output in x's dtype."""
    check_int8(x, qweight, scales, bias)
    out = x.float() @ dequantize_int8(qweight, scales).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int4_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dequantize(qweight, scales_and_zeros).T (+ bias), float32 math, output in x's dtype."""
    check_int4(x, qweight, scales_and_zeros, group_size, bias)
    out = x.float() @ dequantize_int4(qweight, scales_and_zeros, group_size).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
