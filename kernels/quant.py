"""Weight-only int8 / int4 quantisation for edge drafts, with torch's packed CPU matmul ops.

- int8: symmetric, one scale per output row (`torch._weight_int8pack_mm`); the same layout serves
  as an embedding table, so a tied embedding/head is stored once.
- int4: asymmetric, one scale and zero per group of `group_size` inputs along K
  (`torch._weight_int4pack_mm_for_cpu`). SmolLM2's GGUF is Q4_1 (group 32, min/scale), so int4
  group 32 re-quantises it almost exactly.

Activations run in bf16: torch's packed ops take a fast path only for bf16 on CPU (fp32 activations
are 10-30x slower there), and the output is returned in the input's dtype.
`dequantize()` gives the float weight each module represents, for references and tests.

The packed weights are frozen buffers, but the layers are differentiable wrt their input
(`fedge.kernels.quant_autograd`): LoRA trains on a draft through them. With grad off, or an input that
needs no gradient, the forward is the bare packed op.
"""

from __future__ import annotations

import torch
from torch import nn

from fedge.kernels.quant_autograd import COMPUTE_DTYPE, int4_dequantize, int8_input_grad, packed_linear


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale[:, None]).T, per-output-row scales."""

    OUT_BLOCK = 4096  # outputs per packed call when the result is wanted in another dtype than bf16

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=COMPUTE_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features)
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        module.weight_int8.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        module.scales.copy_(scales.to(COMPUTE_DTYPE))
        return module

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight, under the name peft's quantised-layer code reads a layer's device from."""
        return self.weight_int8

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def packed_matmul(self, flat: torch.Tensor, out_dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
        """flat (bf16) @ W.T in `out_dtype`. A wide layer (the tied head: 49152 outputs) writes blocks
        of outputs into one `out_dtype` buffer, so a chunk of logits never exists in bf16 and fp32 at once."""
        if flat.device.type != "cpu":  # no packed op off the CPU here; the Triton kernel covers CUDA
            return (flat @ (self.weight_int8.to(COMPUTE_DTYPE) * self.scales[:, None]).T).to(out_dtype)
        if out_dtype == flat.dtype or self.out_features <= self.OUT_BLOCK:
            return torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).to(out_dtype)
        out = torch.empty(flat.shape[0], self.out_features, dtype=out_dtype)
        for start in range(0, self.out_features, self.OUT_BLOCK):
            stop = start + self.OUT_BLOCK
            out[:, start:stop] = torch._weight_int8pack_mm(flat, self.weight_int8[start:stop], self.scales[start:stop])
        return out

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out @ W in fp32, for the backward through the frozen weight."""
        return int8_input_grad(grad_out, self.weight_int8, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return packed_linear(x.reshape(-1, shape[-1]), self).reshape(*shape[:-1], self.out_features)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the de-quantised weight: the tied embedding lookup."""
        return (self.weight_int8[ids].to(dtype) * self.scales[ids].to(dtype)[..., None])


class Int4Linear(nn.Module):
    """Asymmetric int4 with a scale and zero per group of inputs, packed for the CPU op."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        packed_shape = torch._convert_weight_to_int4pack_for_cpu(
            torch.zeros(out_features, in_features, dtype=torch.int32), 1).shape
        self.register_buffer("weight_int4", torch.zeros(packed_shape, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=COMPUTE_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Linear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, group_size)
        groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low = groups.amin(-1, keepdim=True)
        high = groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15.0).clamp(min=1e-8)
        codes = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, -1)
        # the op computes (code - 8) * scale + zero, so zero is the value at code 8
        zero = low + 8.0 * scale
        module.weight_int4.copy_(torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
        module.scales_and_zeros.copy_(sz.to(COMPUTE_DTYPE))
        return module

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight, under the name peft's quantised-layer code reads a layer's device from."""
        return self.weight_int4

    def dequantize(self) -> torch.Tensor:
        # the packed layout is the op's own; reading it out through the op keeps one source of truth
        eye = torch.eye(self.in_features, dtype=COMPUTE_DTYPE)
        return torch._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size,
                                                 self.scales_and_zeros).float().T

    def unpacked_weight(self) -> torch.Tensor:
        """The same fp32 weight as `dequantize()`, unpacked directly (O(N K), not a K x K x N matmul)."""
        return int4_dequantize(self.weight_int4, self.scales_and_zeros, self.out_features,
                               self.in_features, self.group_size)

    def packed_matmul(self, flat: torch.Tensor, out_dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
        """flat (bf16) @ W.T, returned in `out_dtype`."""
        return torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                                 self.scales_and_zeros).to(out_dtype)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out @ W in fp32; W is rebuilt for this call and freed after it."""
        return grad_out.float() @ self.unpacked_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return packed_linear(x.reshape(-1, shape[-1]), self).reshape(*shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding that reads its rows from a tied Int8Linear head."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype = COMPUTE_DTYPE):
        super().__init__()
        self.head = [head]  # a list so the head's buffers are not registered twice
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head[0].embed(ids, self.dtype)


def quantize_linear(weight: torch.Tensor, quant: str, group_size: int = 32) -> nn.Module:
    if quant == "int8":
        return Int8Linear.from_float(weight)
    if quant == "int4":
        return Int4Linear.from_float(weight, group_size)
    raise ValueError(f"unknown quantisation {quant!r}; expected int8 or int4")


def empty_quantized_linear(in_features: int, out_features: int, quant: str, group_size: int = 32) -> nn.Module:
    """A module of the right buffer shapes, to load a saved state dict into."""
    if quant == "int8":
        return Int8Linear(in_features, out_features)
    if quant == "int4":
        return Int4Linear(in_features, out_features, group_size)
    raise ValueError(f"unknown quantisation {quant!r}; expected int8 or int4")
