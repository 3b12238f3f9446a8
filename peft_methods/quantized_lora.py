"""peft LoRA on the edge draft's packed int4/int8 linears: a phone trains the adapter on the draft it holds.

peft wraps only layer types it knows (nn.Linear, Conv, bnb/GPTQ/HQQ/... quantised linears); its
documented hook for others is `LoraConfig._register_custom_module({base type: LoRA layer type})`.
`QuantizedLoraLinear` is peft's own `lora.Linear` (same forward, dropout, scaling, state-dict keys)
that reads in/out features from the packed layer instead of a float `.weight`. The packed weights stay
frozen and packed; gradients reach the LoRA factors of every layer through
`fedge.kernels.quant_autograd`. The LoRA factors are fp32 with the target's shapes (a draft keeps every
linear's in/out features), so the adapter saved from a draft loads into the fp32 target, and into any
draft, unchanged.

Why no merge: folding B A into the packed weights would re-quantise them off the grid the draft was
derived on; a served draft adds the adapter as an exact side path instead
(`fedge.edge.draft.merge_adapter_into_draft`). DoRA needs the float weight's column norms every step,
so it is refused here rather than computed from a transient dequantisation.

The custom-module registration lives on the config object only (peft does not save it), so loading
a saved adapter onto a draft goes through `load_adapter_on_draft`, which registers it again.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from fedge.kernels.quant import Int4Linear, Int8Linear
from fedge.peft_methods.config import AdapterSpec, lora_config

QUANTIZED_LINEAR_TYPES: tuple[type[nn.Module], ...] = (Int8Linear, Int4Linear)


class QuantizedLoraLinear(LoraLinear):
    """peft's LoRA `Linear` around a frozen packed `Int8Linear`/`Int4Linear` (plain LoRA only)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}  # DoRA and the other variants need the float base weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "a LoRA adapter is not merged into packed int4/int8 weights (that would re-quantise them); "
            "serve it as a side path with fedge.edge.draft.merge_adapter_into_draft")

    def unmerge(self) -> None:
        raise NotImplementedError("packed int4/int8 layers are never merged, so there is nothing to unmerge")


def register_quantized_lora(config: LoraConfig) -> LoraConfig:
    """Let `config` wrap the draft's packed linears with `QuantizedLoraLinear` (returns `config`)."""
    if config.use_dora:
        raise ValueError("DoRA is not supported on packed int4/int8 draft layers; use plain LoRA")
    config._register_custom_module(dict.fromkeys(QUANTIZED_LINEAR_TYPES, QuantizedLoraLinear))
    return config


def draft_lora_config(spec: AdapterSpec, rank: int | None = None) -> LoraConfig:
    """The federation's `lora_config(spec, rank)`, able to target a quantised draft's layers."""
    return register_quantized_lora(lora_config(spec, rank))


def load_adapter_on_draft(draft: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                          is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained` for a quantised draft: the saved config plus the custom-module mapping."""
    config = register_quantized_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(draft, str(adapter_dir), adapter_name=adapter_name,
                                     is_trainable=is_trainable, config=config)
