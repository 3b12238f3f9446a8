"""Aggregation of K client updates: per-client L2 clipping, weighted sum, optional Gaussian noise.

    out = sum_k weights[k] * min(1, clip_norm / ||u_k||) * u_k  +  noise_std * N(0, I)

Weights are used as given (pass n_k / sum(n) for FedAvg, 1/K for DP-FedAvg); `noise_std` is the
standard deviation of the noise added to the sum (for DP-FedAvg with weights 1/K that is
z * clip_norm / K). Updates are flat vectors (any shape, flattened) in any float dtype; the sum
is accumulated and returned in float32 on the updates' device.

Two passes over the data, both streaming in chunks: per-client norms, then the clipped weighted
sum with the noise added in the same pass. `aggregate_updates` dispatches to Triton on CUDA and
to torch ops (a BLAS matrix-vector product for a stacked float32 input) elsewhere;
`aggregate_updates_reference` is the plain chunked loop the others are checked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedge.kernels.dispatch import use_triton

Updates = torch.Tensor | Sequence[torch.Tensor]
DEFAULT_CHUNK = 1 << 20


def _as_rows(updates: Updates) -> list[torch.Tensor]:
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


def _check_args(n_clients: int, weights: torch.Tensor, clip_norm: float | None, noise_std: float) -> None:
    if weights.shape != (n_clients,):
        raise ValueError(f"weights must have shape ({n_clients},), got {tuple(weights.shape)}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")


def _as_weights(weights: torch.Tensor | Sequence[float], device: torch.device) -> torch.Tensor:
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
    rows = _as_rows(updates)
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
    rows = _as_rows(updates)
    weights = _as_weights(weights, torch.device("cpu"))
    _check_args(len(rows), weights, clip_norm, noise_std)
    coefs = clip_coefficients(update_norms_reference(rows, chunk_size).cpu(), weights, clip_norm)
    n = rows[0].numel()
    out = torch.empty(n, dtype=torch.float32, device=rows[0].device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        acc = torch.zeros(stop - start, dtype=torch.float32, device=out.device)
        for coef, row in zip(coefs.tolist(), rows, strict=True):
            acc += coef * row[start:stop].float()
        if noise_std > 0:
            acc += noise_std * _randn(stop - start, generator, out.device)
        out[start:stop] = acc
    return out


def update_norms(updates: Updates) -> torch.Tensor:
    """L2 norm of each client's update, float32 (K,): Triton on CUDA, torch elsewhere."""
    rows = _as_rows(updates)
    if use_triton(rows[0]):
        from fedge.kernels.triton_aggregate import update_norms_triton

        return update_norms_triton(updates)
    if isinstance(updates, torch.Tensor):
        return torch.linalg.vector_norm(updates, dim=1, dtype=torch.float32)
    return torch.stack([torch.linalg.vector_norm(row, dtype=torch.float32) for row in rows])


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
    rows = _as_rows(updates)
    device = rows[0].device
    weights = _as_weights(weights, device)
    _check_args(len(rows), weights, clip_norm, noise_std)
    if use_triton(rows[0]):
        from fedge.kernels.triton_aggregate import aggregate_updates_triton

        return aggregate_updates_triton(updates, weights, clip_norm, noise_std, generator, norms)
    if norms is None:  # needed for clipping, and without clipping still the cheap NaN/inf guard
        norms = update_norms(updates)
    coefs = clip_coefficients(norms.to(device), weights, clip_norm)
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
        out += noise_std * _randn(n, generator, device)
    return out


def _randn(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(n, generator=generator, device=gen_device).to(device)
