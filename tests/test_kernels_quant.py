"""Weight-only int8 / int4 matmul: Triton kernels against the dequantising references, the layouts
against torch's packed CPU ops and fedge.kernels.quant. Triton runs under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    DEVICE = "cuda"
else:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated: before importing kernels
    DEVICE = "cpu"

pytest.importorskip("triton")

from fedge.kernels.quant_matmul import int4_matmul, int8_matmul  # noqa: E402
from fedge.kernels.quant_matmul_ref import (  # noqa: E402
    dequantize_int4,
    dequantize_int8,
    int4_matmul_reference,
    int4_to_cpu_pack,
    int8_matmul_reference,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

triton_quant = importlib.import_module("fedge.kernels.quant_matmul_triton")


def _weight(n=40, k=192, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tol(dtype):
    # tf32 tensor cores on a GPU, bf16 rounding of the output on any device
    if dtype == torch.float32:
        return {"rtol": 2e-3, "atol": 2e-3} if DEVICE == "cuda" else {"rtol": 1e-5, "atol": 1e-4}
    return {"rtol": 2e-2, "atol": 5e-2}


def _dev(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


@pytest.mark.parametrize("m", [1, 2, 5, 33])  # GEMV rows, and the tl.dot path with a ragged tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 64])  # per-row scales (fedge.kernels.quant) and group-wise
def test_int8_matches_reference(m, dtype, group_size):
    qweight, scales = quantize_int8(_weight(), group_size)
    bias = torch.randn(40)
    for b in (None, bias):
        x = _x(m, 192, dtype)
        expected = int8_matmul_reference(x, qweight, scales, b)
        result = triton_quant.int8_matmul_triton(*_dev(x, qweight, scales, b))
        assert result.dtype == dtype and result.shape == (m, 40)
        torch.testing.assert_close(result.cpu(), expected, **_tol(dtype))
    # small tiles: several K iterations and column blocks, ragged in both
    result = triton_quant.int8_matmul_triton(*_dev(x, qweight, scales, None), block_n=16, block_k=32)
    torch.testing.assert_close(result.cpu(), int8_matmul_reference(x, qweight, scales), **_tol(dtype))


@pytest.mark.parametrize("m", [1, 2, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_reference(m, dtype):
    qweight, scales_and_zeros = quantize_int4(_weight(), 32)
    x = _x(m, 192, dtype)
    bias = torch.randn(40)
    for b in (None, bias):
        expected = int4_matmul_reference(x, qweight, scales_and_zeros, 32, b)
        result = triton_quant.int4_matmul_triton(*_dev(x, qweight, scales_and_zeros), 32, *_dev(b))
        assert result.dtype == dtype and result.shape == (m, 40)
        torch.testing.assert_close(result.cpu(), expected, **_tol(dtype))
    result = triton_quant.int4_matmul_triton(*_dev(x, qweight, scales_and_zeros), 32, block_n=16, block_k=32)
    torch.testing.assert_close(result.cpu(), int4_matmul_reference(x, qweight, scales_and_zeros, 32),
                               **_tol(dtype))


def test_leading_dims_and_dispatch():
    qweight, scales_and_zeros = quantize_int4(_weight(), 32)
    x = _x(6, 192, torch.float32).reshape(2, 3, 192)
    expected = int4_matmul_reference(x.reshape(6, 192), qweight, scales_and_zeros, 32).reshape(2, 3, 40)
    torch.testing.assert_close(int4_matmul(x, qweight, scales_and_zeros, 32), expected)
    result = triton_quant.int4_matmul_triton(*_dev(x, qweight, scales_and_zeros), 32)
    torch.testing.assert_close(result.cpu(), expected, **_tol(torch.float32))
    q8, s8 = quantize_int8(_weight())
    torch.testing.assert_close(int8_matmul(x, q8, s8), x @ dequantize_int8(q8, s8).T)


def test_quantisers_and_packing():
    w = _weight()
    codes = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(torch.tensor([[3, 12]])).item() == 3 | (12 << 4)  # even k in the low nibble
    qweight, scales_and_zeros = quantize_int4(w, 32)
    step = scales_and_zeros[..., 0].float().T.repeat_interleave(32, dim=1)  # per-element scale
    assert bool(((dequantize_int4(qweight, scales_and_zeros, 32) - w).abs() <= 0.5 * step + 1e-2).all())
    for group in (None, 64):
        q8, s8 = quantize_int8(w, group)
        scale = s8.float().reshape(40, -1).repeat_interleave(192 // s8.reshape(40, -1).shape[1], dim=1)
        assert bool(((dequantize_int8(q8, s8) - w).abs() <= 0.5 * scale + 1e-3).all())


def test_int4_layout_matches_torch_cpu_op_and_kernels_quant():
    """The same scales_and_zeros (fedge.kernels.quant.Int4Linear's buffer) drive torch's packed CPU op and ours."""
    w = _weight(n=64, k=128)
    qweight, scales_and_zeros = quantize_int4(w, 32)
    x = _x(3, 128, torch.bfloat16)
    cpu_op = torch._weight_int4pack_mm_for_cpu(x, int4_to_cpu_pack(qweight), 32, scales_and_zeros)
    torch.testing.assert_close(cpu_op, int4_matmul_reference(x, qweight, scales_and_zeros, 32), **_tol(x.dtype))
    result = triton_quant.int4_matmul_triton(*_dev(x, qweight, scales_and_zeros), 32)
    torch.testing.assert_close(result.cpu(), cpu_op, **_tol(x.dtype))


def test_bad_inputs_raise_clear_errors():
    q8, s8 = quantize_int8(_weight(), 64)
    q4, sz = quantize_int4(_weight(), 32)
    x = _x(2, 192, torch.float32)
    for fn in (int8_matmul, triton_quant.int8_matmul_triton):
        with pytest.raises(ValueError, match="features"):
            fn(x[:, :100], q8, s8)
        with pytest.raises(ValueError, match="scales"):
            fn(x, q8, s8[:, :2].T)
        with pytest.raises(TypeError, match="int8"):
            fn(x, q8.float(), s8)
        with pytest.raises(TypeError, match="floating"):
            fn(x.long(), q8, s8)
    for fn in (int4_matmul, triton_quant.int4_matmul_triton):
        with pytest.raises(ValueError, match="group_size"):
            fn(x, q4, sz, 33)
        with pytest.raises(ValueError, match="scales_and_zeros"):
            fn(x, q4, sz[:, :5], 32)
        with pytest.raises(TypeError, match="uint8"):
            fn(x, q4.to(torch.int8), sz, 32)
        with pytest.raises(ValueError, match="bias"):
            fn(x, q4, sz, 32, torch.zeros(3))
