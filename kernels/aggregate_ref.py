"""Aggregation of K client updates: per-client L2 clipping, weighted sum, optional Gaussian noise.

    out = sum_k weights[k] * min(1, clip_norm / ||u_k||) * u_k  +  noise_std * N(0, I)

Weights are used as given (pass n_k / sum(n) for FedAvg, 1/K for DP-FedAvg); `noise_std` is the
standard deviation of the noise added to the sum (for DP-FedAvg with weights 1/K that is
z * clip_norm / K). Updates are flat vectors (any shape, flattened) in any float dtype; the sum
is accumulated and returned in float32 on the updates' device.

Two passes over the data, both streaming in chunks: per-client norms, then the clipped weighted
sum with the noise added in the same pass. This module is the bottom of the op's chain: the
input type and checks, the clip coefficients both backends share, and `aggregate_updates_reference`,
the plain chunked loop the others are checked against. `aggregate_torch` (a BLAS matrix-vector
product for a stacked float32 input) and `aggregate_triton` import only this; the dispatcher
`fedge.kernels.aggregate.aggregate_updates` sits on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Updates = torch.Tensor | Sequence[torch.Tensor]
DEFAULT_CHUNK = 1 << 20


def as_rows(updates: Updates) -> list[torch.Tensor]:
    """The K updates as flat vectors (views when possible), checked for a common length and device."""
    if isinstance(updates, torch.Tensor):
        if updates.dim() != 2:
            raise ValueError(f"stacked updates must be (K, N), got {tuple(updates.shape)}")
        rows = list(updates.unbind(0))
    else:
        rows = [u.reshape(-1) for u in updates]
    if not rows:
        raise ValueError("need at least one client update")
    n, device = rows[0].numel(), rows[0].device
    for k, row in enumerate(rows):
        if not row.is_floating_point():
            raise TypeError(f"update {k} must be floating point, got {row.dtype}")
        if row.numel() != n:
            raise ValueError(f"update {k} has {row.numel()} elements, update 0 has {n}")
        if row.device != device:
            raise ValueError(f"update {k} is on {row.device}, update 0 on {device}")
    return rows


def check_aggregate_args(n_clients: int, weights: torch.Tensor, clip_norm: float | None, noise_std: float) -> None:
    """Raise ValueError for weights of the wrong shape, a non-positive clip norm or negative noise."""
    if weights.shape != (n_clients,):
        raise ValueError(f"weights must have shape ({n_clients},), got {tuple(weights.shape)}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")


def as_weights(weights: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
    """The per-client weights as a flat float32 tensor on `device`."""
    return torch.as_tensor(weights, dtype=torch.float32).to(device).reshape(-1)


def clip_coefficients(
    norms: torch.Tensor, weights: torch.Tensor, clip_norm: float | None
) -> torch.Tensor:
    """weights[k] * min(1, clip_norm / norms[k]); raises if an update is not finite."""
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        raise ValueError(f"client updates {bad.nonzero().flatten().tolist()} contain inf or NaN")
    if clip_norm is None:
        return weights.float()
    scale = (clip_norm / norms.float().clamp(min=torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return weights.float() * scale


def update_norms_reference(updates: Updates, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """L2 norm of each client's update, float32 (K,), accumulated chunk by chunk."""
    rows = as_rows(updates)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    for k, row in enumerate(rows):
        for start in range(0, row.numel(), chunk_size):
            chunk = row[start:start + chunk_size].double()
            sums[k] += float(chunk.dot(chunk))
    return sums.sqrt().float().to(rows[0].device)


def aggregate_updates_reference(
    updates: Updates,
    weights: torch.Tensor | Sequence[float],
    clip_norm: float | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Plain chunked loop: norms, then per chunk the clipped weighted sum plus noise."""
    rows = as_rows(updates)
    weights = as_weights(weights, torch.device("cpu"))
    check_aggregate_args(len(rows), weights, clip_norm, noise_std)
    coefs = clip_coefficients(update_norms_reference(rows, chunk_size).cpu(), weights, clip_norm)
    n = rows[0].numel()
    out = torch.empty(n, dtype=torch.float32, device=rows[0].device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        acc = torch.zeros(stop - start, dtype=torch.float32, device=out.device)
        for coef, row in zip(coefs.tolist(), rows, strict=True):
            acc += coef * row[start:stop].float()
        if noise_std > 0:
            acc += noise_std * randn_on(stop - start, generator, out.device)
        out[start:stop] = acc
    return out


def randn_on(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's own device, moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(n, generator=generator, device=gen_device).to(device)
