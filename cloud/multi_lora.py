"""Serving many adapter versions over one target: each batch row picks its own LoRA adapter.

The verifier batches sessions of different edges into one forward; sessions opened against
different global-adapter versions (or none) share it. Every LoRA-targeted linear of the target is
wrapped once in a `MultiLoraLinear` that adds `scale * B[a] A[a] x` for its row's adapter `a`
through `fedge.kernels.lora.lora_apply` (SGMV-style on CPU, Triton on CUDA). Base weights stay untouched,
so version "" (no adapter) is the plain target, bit for bit. An adapter is loaded only from bytes
whose signature verified (`load` checks a directory itself; `load_verified` takes a registry
snapshot's verified bytes), and only after every shape is checked, so a bad one changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from torch import nn

from fedge.kernels.lora import lora_apply, stack_adapters
from fedge.peft_methods.lora_files import AdapterFileError, lora_from_state
from fedge.protocol.signing import (
    AdapterMetadata,
    AdapterSignatureError,
    load_public_key,
    parse_adapter_blobs,
    read_verified_files,
)


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


def _zero_pair(base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, base.in_features), torch.zeros(base.out_features, 1)


class AdapterBank:
    """Adapter versions loaded onto one target model, addressed by version name."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.index: dict[str, int] = {}
        self.wrapped: dict[str, MultiLoraLinear] = {}

    def load(self, version: str, adapter_dir: str | Path, trusted: Ed25519PublicKey | str | Path) -> int:
        """Load a signed peft LoRA adapter directory as `version`; returns its row index. Refused
        (AdapterLoadError) unless its signature verifies under `trusted` and it was signed as `version`."""
        if version in self.index:
            return self.index[version]
        key = load_public_key(trusted) if isinstance(trusted, (str, Path)) else trusted
        if key is None:
            raise AdapterLoadError(f"adapter {version!r}: no trusted public key given: unsigned adapters are refused")
        try:
            blobs, signed = read_verified_files(adapter_dir, key)
            AdapterMetadata.from_signed(signed, version)
        except (AdapterSignatureError, OSError) as exc:
            raise AdapterLoadError(f"adapter {version!r}: {exc}") from exc
        return self.load_verified(version, blobs)

    def load_verified(self, version: str, blobs: dict[str, bytes]) -> int:
        """Load adapter bytes that were already verified (a registry snapshot's) as `version`."""
        if version in self.index:
            return self.index[version]
        try:
            state, config = parse_adapter_blobs(blobs)
            lora = lora_from_state(config, state, f"adapter {version!r}")
        except (AdapterFileError, AdapterSignatureError) as exc:
            raise AdapterLoadError(f"adapter {version!r}: {exc}") from exc
        scale, pairs = lora.scale, lora.pairs
        for name, (tensor_a, tensor_b) in pairs.items():  # every check before anything changes
            base = self.wrapped[name].base if name in self.wrapped else self._linear(name)
            if tensor_a.dim() != 2 or tensor_b.dim() != 2 or tensor_a.shape[0] != tensor_b.shape[1] \
                    or tensor_a.shape[1] != base.in_features or tensor_b.shape[0] != base.out_features:
                raise AdapterLoadError(f"adapter {version!r}: {name} has shapes {tuple(tensor_a.shape)}, "
                                       f"{tuple(tensor_b.shape)} that do not fit the target")
        # versions may target different modules: a module a version leaves alone gets a zero update
        for name in sorted(set(pairs) - set(self.wrapped)):
            wrapper = self._wrap(name)
            for _ in range(len(self.index)):
                wrapper.add(*_zero_pair(wrapper.base), 1.0)
        for name, wrapper in self.wrapped.items():
            tensor_a, tensor_b = pairs.get(name) or _zero_pair(wrapper.base)
            wrapper.add(tensor_a, tensor_b, scale if name in pairs else 1.0)
        self.index[version] = len(self.index)
        return self.index[version]

    def _linear(self, name: str) -> nn.Linear:
        module = None
        if "." in name and not any(name.startswith(w + ".") for w in self.wrapped):
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                pass
        if not isinstance(module, nn.Linear):
            raise AdapterLoadError(f"{name[:120]} is not a linear layer of the target")
        return module

    def _wrap(self, name: str) -> MultiLoraLinear:
        module = self._linear(name)
        parent, child = name.rsplit(".", 1)
        wrapper = MultiLoraLinear(module)
        setattr(self.model.get_submodule(parent), child, wrapper)
        self.wrapped[name] = wrapper
        return wrapper

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
