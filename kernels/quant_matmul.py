"""Weight-only int8 / int4 matmul, the public entry points: Triton on CUDA, the reference elsewhere.

The op's chain, one way only (peft's tuners/lora layout): `quant_matmul_ref` (layouts, checks,
quantisers, the dequantising references; the layouts are in its docstring) <- `quant_matmul_triton`
(kernels that dequantise tiles in registers) <- these dispatchers. On CPU the packed torch ops in
`fedge.kernels.quant` are the fast path, so the reference is the fallback here. The references are
re-exported so callers need one import.
"""

from __future__ import annotations

import torch

from fedge.kernels.dispatch import use_triton
from fedge.kernels.quant_matmul_ref import int4_matmul_reference, int8_matmul_reference

__all__ = ["int4_matmul", "int4_matmul_reference", "int8_matmul", "int8_matmul_reference"]


def int8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int8 matmul: Triton on CUDA, the dequantising reference elsewhere."""
    if use_triton(x, qweight, scales, bias):
        from fedge.kernels.quant_matmul_triton import int8_matmul_triton

        return int8_matmul_triton(x, qweight, scales, bias)
    return int8_matmul_reference(x, qweight, scales, bias)


def int4_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight-only int4 matmul: Triton on CUDA, the dequantising reference elsewhere."""
    if use_triton(x, qweight, scales_and_zeros, bias):
        from fedge.kernels.quant_matmul_triton import int4_matmul_triton

        return int4_matmul_triton(x, qweight, scales_and_zeros, group_size, bias)
    return int4_matmul_reference(x, qweight, scales_and_zeros, group_size, bias)
