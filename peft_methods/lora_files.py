"""Reading a peft LoRA adapter directory as plain (A, B) pairs per target module.

The cloud serves adapters over its target and the edge applies them to its draft, both without a
peft wrapper; this is the one place that knows peft's file layout and key names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


class AdapterFileError(ValueError):
    """An adapter directory that cannot be used; the message says why."""


@dataclass
class LoraFile:
    scale: float  # lora_alpha / r: the update is scale * B @ A
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name in the base model -> (A, B)


def read_lora_adapter(adapter_dir: str | Path) -> LoraFile:
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{adapter_dir} is not a readable peft adapter: {exc}") from exc
    return lora_from_state(config, state, str(adapter_dir))


def lora_from_state(config: dict, state: dict[str, torch.Tensor], adapter_dir: str = "adapter") -> LoraFile:
    """The (A, B) pairs of an adapter already in memory (e.g. verified signed bytes)."""
    if config.get("use_dora"):
        raise AdapterFileError(f"{adapter_dir} is a DoRA adapter; only LoRA applies outside peft")
    pairs = {}
    for key, tensor_a in state.items():
        if ".lora_A." in key:
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            key_b = key.replace(".lora_A.", ".lora_B.")
            if key_b not in state:
                raise AdapterFileError(f"{adapter_dir}: {key} has no lora_B")
            pairs[name] = (tensor_a, state[key_b])
    if not pairs:
        raise AdapterFileError(f"{adapter_dir} holds no LoRA tensors")
    try:
        return LoraFile(scale=float(config["lora_alpha"]) / float(config["r"]), pairs=pairs)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise AdapterFileError(f"{adapter_dir}: adapter_config.json has no usable lora_alpha/r: {exc!r}") from exc
