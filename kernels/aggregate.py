"""Aggregation of K client updates, the public entry point: clip each, weight, sum, add noise.

    out = sum_k weights[k] * min(1, clip_norm / ||u_k||) * u_k  +  noise_std * N(0, I)

The op's chain, one way only (peft's tuners/lora layout): `aggregate_ref` (the input type, checks,
clip coefficients and the reference; the semantics are in its docstring) <- `aggregate_torch`
(BLAS) and `aggregate_triton` (streaming kernels) <- this dispatcher, which checks the arguments
once and picks Triton on CUDA, torch ops elsewhere. The reference is re-exported for callers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedge.kernels.aggregate_ref import Updates, aggregate_updates_reference, as_rows, as_weights, check_aggregate_args
from fedge.kernels.aggregate_torch import aggregate_updates_torch, update_norms_torch
from fedge.kernels.dispatch import use_triton

__all__ = ["Updates", "aggregate_updates", "aggregate_updates_reference", "update_norms"]


def update_norms(updates: Updates) -> torch.Tensor:
    """L2 norm of each client's update, float32 (K,): Triton on CUDA, torch elsewhere."""
    rows = as_rows(updates)
    if use_triton(rows[0]):
        from fedge.kernels.aggregate_triton import update_norms_triton

        return update_norms_triton(updates)
    return update_norms_torch(updates)


def aggregate_updates(
    updates: Updates,
    weights: torch.Tensor | Sequence[float],
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k weights[k] * min(1, clip_norm / ||u_k||) * u_k + noise_std * N(0, I), float32 (N,).

    `updates`: a (K, N) tensor or K tensors of N elements each (any shapes, flattened; a list is
    never stacked). `norms`: the per-client L2 norms if already known (from `update_norms`).
    Triton on CUDA, torch ops elsewhere.
    """
    rows = as_rows(updates)
    weights = as_weights(weights, rows[0].device)
    check_aggregate_args(len(rows), weights, clip_norm, noise_std)
    if use_triton(rows[0]):
        from fedge.kernels.aggregate_triton import aggregate_updates_triton

        return aggregate_updates_triton(updates, weights, clip_norm, noise_std, generator, norms)
    return aggregate_updates_torch(updates, weights, clip_norm, noise_std, generator, norms)
