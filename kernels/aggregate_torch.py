"""Aggregation with torch ops: vector norms, then one BLAS matrix-vector product (or chunked axpys).

The CPU path of `fedge.kernels.aggregate.aggregate_updates`. A stacked float32 (K, N) input is a
single `coefs @ updates`; a list, or a low-precision stack, is summed chunk by chunk so it is
never copied into a float32 stack. Semantics are those of
`fedge.kernels.aggregate_ref.aggregate_updates_reference`.
"""

from __future__ import annotations

import torch

from fedge.kernels.aggregate_ref import DEFAULT_CHUNK, Updates, as_rows, clip_coefficients, randn_on


def update_norms_torch(updates: Updates) -> torch.Tensor:
    """L2 norm of each client's update, float32 (K,). A (K, N) stack is taken as checked (the dispatcher
    `fedge.kernels.aggregate.update_norms` checks it); a list is checked row by row."""
    if isinstance(updates, torch.Tensor):
        return torch.linalg.vector_norm(updates, dim=1, dtype=torch.float32)
    return torch.stack([torch.linalg.vector_norm(row, dtype=torch.float32) for row in as_rows(updates)])


def aggregate_updates_torch(
    updates: Updates,
    weights: torch.Tensor,
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """See `fedge.kernels.aggregate.aggregate_updates` (which checks the arguments and dispatches here)."""
    rows = as_rows(updates)
    device = rows[0].device
    if norms is None:  # needed for clipping, and without clipping still the cheap NaN/inf guard
        norms = update_norms_torch(updates)
    coefs = clip_coefficients(norms.to(device), weights.to(device), clip_norm)
    n = rows[0].numel()
    if isinstance(updates, torch.Tensor) and updates.dtype == torch.float32:
        out = coefs @ updates  # one BLAS matrix-vector product
    else:
        out = torch.zeros(n, dtype=torch.float32, device=device)
        for start in range(0, n, DEFAULT_CHUNK):
            stop = min(start + DEFAULT_CHUNK, n)
            for k, row in enumerate(rows):
                out[start:stop].add_(row[start:stop], alpha=float(coefs[k]))
    if noise_std > 0:
        out += noise_std * randn_on(n, generator, device)
    return out
