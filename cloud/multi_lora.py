"""Serving many adapter versions over one target: each batch row picks its own LoRA adapter.

The verifier batches sessions of different edges into one forward; sessions opened against
different global-adapter versions (or none) share it. Every LoRA-targeted linear of the target is
wrapped once in a `MultiLoraLinear` that adds `scale * B[a] A[a] x` for its row's adapter `a`
through `fedge.kernels.lora.lora_apply` (SGMV-style on CPU, Triton on CUDA). Base weights stay untouched,
so version "" (no adapter) is the plain target, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fedge.kernels.lora import lora_apply, stack_adapters
from fedge.peft_methods.lora_files import AdapterFileError, read_lora_adapter


class AdapterLoadError(ValueError):
    pass


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scaling: list[float] = []
        self.lora_a = self.lora_b = None  # stacked (n, r, in), (n, out, r)
        self.row_adapter: torch.Tensor | None = None  # (batch,) adapter index per row, -1 for none

    def add(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        self.adapters.append((lora_a.float(), lora_b.float()))
        self.scaling.append(scaling)
        self.lora_a, self.lora_b = stack_adapters(self.adapters, dtype=self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.row_adapter
        if rows is None or self.lora_a is None or bool((rows < 0).all()):
            return out
        ids = rows.reshape(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        scaling = torch.tensor(self.scaling, dtype=torch.float32)
        return lora_apply(x, self.lora_a, self.lora_b, ids, scaling, base=out)


class AdapterBank:
    """Adapter versions loaded onto one target model, addressed by version name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.index: dict[str, int] = {}
        self.wrapped: dict[str, MultiLoraLinear] = {}
        self.target_modules: set[str] | None = None

    def load(self, version: str, adapter_dir: str | Path) -> int:
        """Load a peft LoRA adapter directory as `version`; returns its row index."""
        if version in self.index:
            return self.index[version]
        try:
            lora = read_lora_adapter(adapter_dir)
        except AdapterFileError as exc:
            raise AdapterLoadError(f"adapter {version!r}: {exc}") from exc
        scale, pairs = lora.scale, lora.pairs
        if self.target_modules is None:
            self._wrap(set(pairs))
        if set(pairs) != self.target_modules:
            raise AdapterLoadError(f"adapter {version!r} targets other modules than the adapters already served")
        for name, (tensor_a, tensor_b) in pairs.items():
            module = self.wrapped[name]
            if tensor_a.shape[1] != module.base.in_features or tensor_b.shape[0] != module.base.out_features:
                raise AdapterLoadError(f"adapter {version!r}: {name} has shapes {tuple(tensor_a.shape)}, "
                                       f"{tuple(tensor_b.shape)} that do not fit the target")
            module.add(tensor_a, tensor_b, scale)
        self.index[version] = len(self.index)
        return self.index[version]

    def _wrap(self, names: set[str]) -> None:
        for name in names:
            module = self.model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise AdapterLoadError(f"{name} is not a linear layer of the target")
            parent, child = name.rsplit(".", 1)
            wrapper = MultiLoraLinear(module)
            setattr(self.model.get_submodule(parent), child, wrapper)
            self.wrapped[name] = wrapper
        self.target_modules = names

    def row_index(self, version: str) -> int:
        """-1 for the plain target (version ""), else the loaded version's index."""
        if not version:
            return -1
        if version not in self.index:
            raise KeyError(f"adapter version {version!r} is not loaded")
        return self.index[version]

    @contextmanager
    def rows(self, adapter_per_row: list[int]) -> Iterator[None]:
        """Within the block, batch row i of every forward uses adapter adapter_per_row[i]."""
        ids = torch.tensor(adapter_per_row, dtype=torch.long)
        for module in self.wrapped.values():
            module.row_adapter = ids
        try:
            yield
        finally:
            for module in self.wrapped.values():
                module.row_adapter = None
