"""A Llama layer's weights, re-packed once for the lean decode step (`fedge.lean_decoder`).

Why: at batch one every projection is a separate matmul call with its own dispatch, argument
checks and threading barrier, and for a 135M model those fixed costs are as large as the weight
reads. q/k/v become one matmul and gate/up another (seven calls per layer become four), by
concatenating the output rows:

- int4 packed (`Int4Linear`): the codes are read back out of the packed buffers, concatenated and
  packed again for the wider shape (the packer's tiling is its own, so it is never assumed), and
  the per-group scales/zeros are concatenated along the output dimension;
- int8 packed (`Int8Linear`): rows and per-row scales concatenated;
- float `nn.Linear` (the fp32 target): one or two rows run on the modules' own weights; wider feeds
  (verifies) run on a fused copy in oneDNN's blocked layout: a second copy of the target's weights,
  bought for a ~1.6x faster verify forward (see `DenseProjection`).

Each output row is still the same dot product over the same inputs with the same scales: the
fused matmul gives the separate ones' results (tests check it bitwise for int4/int8). Anything else
(a LoRA side path, a peft wrapper, an unknown module) is called as a module, unfused, so the lean
runner computes whatever the model computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedge.kernels.quant import COMPUTE_DTYPE, Int4Linear, Int8Linear
from fedge.kernels.quant_autograd import int4_codes

Projection = Callable[[torch.Tensor], torch.Tensor]  # (rows, in) -> (rows, out)


@dataclass(frozen=True)
class Int4Projection:
    weight: torch.Tensor  # packed by torch._convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # (in / group, out, 2) bf16
    group_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), self.weight, self.group_size,
                                                 self.scales_and_zeros)


@dataclass(frozen=True)
class Int8Projection:
    weight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bf16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(COMPUTE_DTYPE), self.weight, self.scales)


# a single row runs on the modules' own weights (GEMV is best there: 20 ms a forward against 26 ms
# blocked); two rows were about even (24 against 27 ms) and join the blocked path, so that a compiled
# step has one graph for one row and one for several, with no branch inside
SMALL_ROWS = 1


@dataclass(frozen=True)
class DenseProjection:
    """Float linears (the fp32 target). One row: each original weight through `F.linear` (the GEMV
    path; no copy). More rows (a verify over k + 1 positions): one matmul over a fused copy reordered
    into oneDNN's blocked layout, which small-M GEMMs run far better than the row-major weight (the
    default model at 7 rows, matmuls only: 32 ms a forward against 50 ms with `F.linear`)."""

    parts: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]  # the modules' own (weight, bias)
    blocked: torch.Tensor | None = None  # the fused, reordered copy (None: off the CPU, or not wanted)
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked is None or x.shape[0] <= SMALL_ROWS:
            outs = [F.linear(x, w, b) for w, b in self.parts]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return blocked_linear(x, self.blocked, self.bias, sum(w.shape[0] for w, _ in self.parts))


@torch.library.custom_op("fedge::blocked_linear", mutates_args=())
def blocked_linear(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, out_features: int
                   ) -> torch.Tensor:
    """x @ W.T over a oneDNN-reordered W. An op of its own so that torch.compile calls it as it is
    (inductor lowers the bare mkldnn op only for weights it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")


@blocked_linear.register_fake
def _(x: torch.Tensor, blocked: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _blocked_copy(modules: Sequence[nn.Linear]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The modules' weights concatenated and reordered for oneDNN (fp32 on a CPU with it), else None."""
    weight = modules[0].weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None, None
    with torch.no_grad():
        fused = torch.cat([m.weight for m in modules]).contiguous()
        biases = [m.bias for m in modules]
        bias = None if biases[0] is None else torch.cat(biases).contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(fused, None), bias


@dataclass(frozen=True)
class ModuleProjection:
    """Modules called as they are (their outputs concatenated): the lean runner's catch-all."""

    modules: tuple[nn.Module, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _on_cpu(modules: Sequence[nn.Module]) -> bool:
    return all(t.device.type == "cpu" for m in modules for t in m.buffers())


def fuse_projections(modules: Sequence[nn.Module], blocked: bool = True) -> Projection:
    """One projection computing `cat([m(x) for m in modules], -1)` with as few matmuls as the
    modules' kind allows; `blocked=False`: float linears get no reordered copy (no extra memory)."""
    kinds = {type(m) for m in modules}
    if kinds == {Int4Linear} and len({m.group_size for m in modules}) == 1 and _on_cpu(modules):
        if len(modules) == 1:
            m = modules[0]
            return Int4Projection(m.weight_int4, m.scales_and_zeros, m.group_size)
        codes = torch.cat([int4_codes(m.weight_int4, m.out_features, m.in_features) for m in modules])
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scales = torch.cat([m.scales_and_zeros for m in modules], dim=1).contiguous()
        return Int4Projection(packed, scales, modules[0].group_size)
    if kinds == {Int8Linear} and _on_cpu(modules):
        if len(modules) == 1:
            return Int8Projection(modules[0].weight_int8, modules[0].scales)
        return Int8Projection(torch.cat([m.weight_int8 for m in modules]).contiguous(),
                              torch.cat([m.scales for m in modules]).contiguous())
    if kinds == {nn.Linear} and len({(m.weight.dtype, m.weight.device, m.bias is None) for m in modules}) == 1:
        parts = tuple((m.weight, m.bias) for m in modules)
        return DenseProjection(parts, *_blocked_copy(modules)) if blocked else DenseProjection(parts)
    return ModuleProjection(tuple(modules))


@dataclass(frozen=True)
class Norm:
    """Llama's RMSNorm as one `F.rms_norm` call: in fp32 (the target) bitwise what the module computes;
    in bf16 (a draft) it rounds once where the module rounds twice."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def norm_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Llama RMSNorm as a `Norm`; any other norm is called as a module."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if type(module).__name__.endswith("RMSNorm") and weight is not None and eps is not None \
            and not getattr(module, "with_scale", False) and weight.dim() == 1:
        return Norm(weight, float(eps))
    return module


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the lean step reads it."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Projection  # (rows, hidden) -> (rows, (n_heads + 2 n_kv) head_dim)
    o: Projection
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Projection  # (rows, hidden) -> (rows, 2 intermediate)
    down: Projection
    sources: tuple  # `layer_signature` when built: notices a replaced module or an in-place weight change


def _layer_modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return (layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
            layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def layer_signature(layer: nn.Module) -> tuple:
    """The layer's modules and the version counters of their tensors: a fused copy is stale as soon as
    a module is replaced (an adapter wrapped it) or a weight changed in place (an adapter merged)."""
    return module_signature(_layer_modules(layer))


def module_signature(modules: Sequence[nn.Module]) -> tuple:
    """Each module with its tensors' version counters, storage and dtype (`model.to(...)` swaps storage)."""
    return tuple((m, tuple((t._version, t.data_ptr(), t.dtype) for t in (*m.parameters(), *m.buffers())))
                 for m in modules)


def layer_weights(layer: nn.Module, blocked: bool = True) -> LayerWeights:
    """Re-pack one Llama decoder layer (see the module docstring); its MLP is SiLU-gated (`supports`)."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=norm_of(layer.input_layernorm),
        qkv=fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj], blocked),
        o=fuse_projections([attn.o_proj], blocked),
        post_norm=norm_of(layer.post_attention_layernorm),
        gate_up=fuse_projections([mlp.gate_proj, mlp.up_proj], blocked),
        down=fuse_projections([mlp.down_proj], blocked),
        sources=layer_signature(layer),
    )


def still_current(layer: nn.Module, weights: LayerWeights) -> bool:
    return layer_signature(layer) == weights.sources


def head_projection(model: nn.Module, blocked: bool = True) -> Projection:
    return fuse_projections([model.lm_head], blocked)
