"""Triton aggregation kernels: per-client sum of squares, then clipped weighted sum plus noise.

`_sum_squares_kernel` (grid clients x chunks) writes partial sums that torch adds up. `_axpy_kernel`
(grid chunks) streams every client's slice of a chunk once, accumulates in float32 registers with
the per-client coefficients (weights times clip factors, computed on the device, no host sync),
adds Philox Gaussian noise and writes the chunk. A stacked (K, N) input is one launch; a list of
K separate tensors is K launches that accumulate into the output, so it is never copied into a stack.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedge.kernels.aggregate_ref import Updates, as_rows, clip_coefficients

BLOCK = 1024
CHUNK_BLOCKS = 8  # a program streams CHUNK_BLOCKS * BLOCK elements


@triton.jit
def _sum_squares_kernel(x_ptr, row_stride, n, partial_ptr, n_chunks,
                        BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    client = tl.program_id(0)
    chunk = tl.program_id(1)
    base = x_ptr + client.to(tl.int64) * row_stride
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(CHUNK_BLOCKS):
        offs = (chunk * CHUNK_BLOCKS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + client * n_chunks + chunk, tl.sum(acc, 0))


@triton.jit
def _axpy_kernel(x_ptr, row_stride, n_clients, coef_ptr, n, out_ptr, noise_std, seed,
                 ACCUMULATE: tl.constexpr, ADD_NOISE: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    chunk = tl.program_id(0)
    for i in range(CHUNK_BLOCKS):
        offs = (chunk * CHUNK_BLOCKS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if ACCUMULATE:
            acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
        else:
            acc = tl.zeros((BLOCK,), tl.float32)
        # advance a 64-bit pointer client by client: k * row_stride could overflow int32
        x_ptrs = x_ptr + offs
        for k in range(n_clients):
            coef = tl.load(coef_ptr + k)
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += coef * x
            x_ptrs += row_stride
        if ADD_NOISE:
            acc += noise_std * tl.randn(seed, offs)
        tl.store(out_ptr + offs, acc, mask=mask)


def _grid(n: int) -> int:
    return triton.cdiv(n, BLOCK * CHUNK_BLOCKS)


def update_norms_triton(updates: Updates) -> torch.Tensor:
    """L2 norm of each client's update, float32 (K,)."""
    if isinstance(updates, torch.Tensor):
        stacks = [updates if updates.stride(-1) == 1 else updates.contiguous()]
    else:
        stacks = [row.contiguous()[None] for row in as_rows(updates)]
    sums = []
    for stack in stacks:
        n_clients, n = stack.shape
        partial = torch.empty(n_clients, _grid(n), device=stack.device, dtype=torch.float32)
        _sum_squares_kernel[(n_clients, _grid(n))](stack, stack.stride(0), n, partial, _grid(n),
                                                   BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS)
        sums.append(partial.sum(1))
    return torch.cat(sums).sqrt()


def aggregate_updates_triton(
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
    if norms is None:
        norms = update_norms_triton(updates)
    coefs = clip_coefficients(norms.to(device), weights.to(device), clip_norm).contiguous()
    n = rows[0].numel()
    seed = 0
    if noise_std > 0:
        seed_device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=seed_device))
    out = torch.empty(n, dtype=torch.float32, device=device)
    if isinstance(updates, torch.Tensor):
        stack = updates if updates.stride(-1) == 1 else updates.contiguous()
        _axpy_kernel[(_grid(n),)](stack, stack.stride(0), stack.shape[0], coefs, n, out, noise_std, seed,
                                  ACCUMULATE=False, ADD_NOISE=noise_std > 0,
                                  BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS)
        return out
    for k, row in enumerate(rows):
        row = row.contiguous()
        _axpy_kernel[(_grid(n),)](row, 0, 1, coefs[k:k + 1], n, out, noise_std, seed,
                                  ACCUMULATE=k > 0, ADD_NOISE=k == 0 and noise_std > 0,
                                  BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS)
    return out
