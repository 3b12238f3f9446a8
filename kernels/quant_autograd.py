"""Backward through frozen packed int4/int8 weights, so LoRA can train on an edge draft (QLoRA-style).

torch's packed CPU ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) have no derivative.
A LoRA adapter on the draft needs none wrt the frozen weights, but it needs the gradient wrt each
layer's input (it flows into the LoRA factors of this and every earlier layer):
grad_input = grad_output @ W. `PackedLinearFunction` runs the packed op forward and asks the layer
for that product backward; the layer rebuilds W transiently (fp32, a bounded block of rows at a
time) and frees it, so no float copy of the draft is ever kept.

Why fp32 and not bf16 for the backward matmul: CPUs without bf16 units (AVX512 without
AVX512_BF16, most phones) run bf16 GEMMs emulated, slower than fp32, and fp32 keeps the gradient of
a bf16 forward as exact as the weights allow.

The int4 packed layout is the op's own and differs by ISA and by shape (blocks of 64 rows with the
pair (d, d+32) in one byte on AVX512, other tilings elsewhere), so it is never decoded by hand here:
`int4_unpack_index` asks the packer itself where each (row, col) code lands, once per shape.
"""

from __future__ import annotations

import torch

# what the packed CPU ops take activations in (their fast path; fp32 inputs are 10-30x slower)
COMPUTE_DTYPE = torch.bfloat16

# (out_features, in_features) -> for each code of the row-major [N, K] matrix, its nibble position
# in the packed buffer read as [byte0.lo, byte0.hi, byte1.lo, ...]. int32: 4 bytes per weight per
# distinct shape (a handful of shapes per model).
_INT4_UNPACK_INDEX: dict[tuple[int, int], torch.Tensor] = {}


class PackedLinearFunction(torch.autograd.Function):
    """y = layer.packed_matmul(x) in x's dtype; dy/dx through `layer.input_grad`, in x's dtype; no
    gradient for the packed weight. The bf16 cast of x happens inside, so the gradient never passes
    through bf16 (autograd would round it at every layer) and no bf16 copy of it is made."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, layer) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, flat.dtype
        return layer.packed_matmul(flat.to(COMPUTE_DTYPE), flat.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return ctx.layer.input_grad(grad_out).to(ctx.dtype), None


def packed_linear(flat: torch.Tensor, layer) -> torch.Tensor:
    """The packed matmul of a 2-D input (bf16 inside), output in the input's dtype, differentiable wrt
    `flat` only when autograd will need it."""
    if torch.is_grad_enabled() and flat.requires_grad:
        return PackedLinearFunction.apply(flat, layer)
    return layer.packed_matmul(flat.to(COMPUTE_DTYPE), flat.dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    out = torch.empty(2 * flat.numel(), dtype=torch.uint8)
    torch.bitwise_and(flat, 0xF, out=out[0::2])
    torch.bitwise_right_shift(flat, 4, out=out[1::2])
    return out


def int4_unpack_index(out_features: int, in_features: int) -> torch.Tensor:
    """Where each code of an [out, in] matrix sits among the packed buffer's nibbles (cached per shape)."""
    key = (out_features, in_features)
    if key not in _INT4_UNPACK_INDEX:
        count = out_features * in_features
        position = torch.arange(count, dtype=torch.int64).reshape(out_features, in_features)
        source = torch.zeros(count, dtype=torch.int64)  # nibble j holds code number source[j]
        shift = 0
        while (count - 1) >> shift:
            digit = ((position >> shift) & 0xF).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(digit, 1)
            source |= _nibbles(packed).to(torch.int64) << shift
            shift += 4
        index = torch.empty(count, dtype=torch.int32)
        index[source] = torch.arange(count, dtype=torch.int32)
        _INT4_UNPACK_INDEX[key] = index
    return _INT4_UNPACK_INDEX[key]


def int4_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [out, in] uint8 codes (0..15) of a buffer packed by `_convert_weight_to_int4pack_for_cpu`."""
    index = int4_unpack_index(out_features, in_features)
    return _nibbles(packed).index_select(0, index).reshape(out_features, in_features)


def int4_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int,
                    in_features: int, group_size: int) -> torch.Tensor:
    """The fp32 [out, in] weight: (code - 8) * scale + zero per group, as the packed op computes it.

    Written as code * scale + (zero - 8 scale) into one preallocated fp32 buffer: a conversion and two
    in-place passes, the only fp32 tensor of the weight's size (this runs once per layer per backward).
    """
    groups = in_features // group_size
    codes = int4_codes(packed, out_features, in_features).view(out_features, groups, group_size)
    scale = scales_and_zeros[..., 0].float().T.unsqueeze(-1)  # [out, in/group, 1]
    offset = scales_and_zeros[..., 1].float().T.unsqueeze(-1) - 8.0 * scale
    weight = torch.empty(out_features, groups, group_size, dtype=torch.float32)
    weight.copy_(codes)
    return weight.mul_(scale).add_(offset).view(out_features, in_features)


def int8_input_grad(grad_out: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor,
                    rows_per_block: int = 2048) -> torch.Tensor:
    """grad_out @ (w_int8 * scales[:, None]) in fp32, a block of output rows at a time.

    The scale is per output row, so it folds into that block's columns of grad_out; only an fp32
    copy of one block of int8 rows and of grad_out's matching columns exist at a time (the tied head
    of the default model is 49152 x 576: 113 MB if whole; a block of 2048 rows is 4.7 MB, and
    grad_out's block at 128 tokens 1 MB).
    """
    grad_in = torch.zeros(grad_out.shape[0], weight_int8.shape[1], dtype=torch.float32)
    for start in range(0, weight_int8.shape[0], rows_per_block):
        stop = start + rows_per_block
        scaled = grad_out[:, start:stop].float() * scales[start:stop].float()
        grad_in.addmm_(scaled, weight_int8[start:stop].float())
    return grad_in
