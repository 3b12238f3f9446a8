"""Aggregation: torch dispatch path and Triton kernels against the chunked reference.

Triton kernels run on CPU under TRITON_INTERPRET=1 (compiled on a GPU when one is present and the
variable is not set)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    DEVICE = "cuda"
else:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated: before importing kernels
    DEVICE = "cpu"

pytest.importorskip("triton")

from fedge.kernels.aggregate import aggregate_updates, aggregate_updates_reference, update_norms  # noqa: E402

triton_aggregate = importlib.import_module("fedge.kernels.aggregate_triton")


def _updates(k: int = 5, n: int = 9001, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 1, k)[:, None]  # norms from small to large so some are clipped
    return (torch.randn(k, n, generator=gen) * spread).to(dtype)


def _all_paths(updates, weights, **kwargs):
    dev_updates = updates.to(DEVICE)
    return {
        "dispatch": aggregate_updates(updates, weights, **kwargs),
        "dispatch-list": aggregate_updates(list(updates), weights, **kwargs),
        "triton": triton_aggregate.aggregate_updates_triton(dev_updates, weights, **kwargs),
        "triton-list": triton_aggregate.aggregate_updates_triton(
            [u.reshape(3, -1) for u in dev_updates], weights, **kwargs),  # any shape, flattened
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip_norm", [None, 20.0])
def test_matches_reference(dtype, clip_norm):
    updates = _updates(n=9003, dtype=dtype)  # not a multiple of any block size
    weights = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    expected = aggregate_updates_reference(updates, weights, clip_norm=clip_norm, chunk_size=1000)
    assert expected.dtype == torch.float32 and expected.shape == (9003,)
    for name, result in _all_paths(updates, weights, clip_norm=clip_norm).items():
        torch.testing.assert_close(result.cpu(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_clipping_semantics():
    updates = _updates(k=3, n=4096)
    norms = updates.norm(dim=1)
    clip = float(norms[1])  # client 0 below, client 1 at, client 2 above the bound
    for k in range(3):
        one_hot = torch.zeros(3)
        one_hot[k] = 1.0
        out = aggregate_updates(updates, one_hot, clip_norm=clip)
        expected = updates[k] * min(1.0, clip / float(norms[k]))
        torch.testing.assert_close(out, expected)
    clipped = triton_aggregate.aggregate_updates_triton(updates.to(DEVICE), torch.tensor([0.0, 0.0, 1.0]),
                                                        clip_norm=clip)
    assert abs(float(clipped.norm()) - clip) < 1e-3 * clip
    torch.testing.assert_close(update_norms(updates), norms)
    torch.testing.assert_close(triton_aggregate.update_norms_triton(updates.to(DEVICE)).cpu(), norms)


@pytest.mark.parametrize("path", ["reference", "dispatch", "triton"])
def test_noise_is_gaussian_with_the_given_std_and_seeded(path):
    updates = _updates(k=3, n=20000)
    weights = torch.full((3,), 1 / 3)
    std = 0.7

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if path == "reference":
            return aggregate_updates_reference(updates, weights, 5.0, std, gen, chunk_size=4096)
        if path == "dispatch":
            return aggregate_updates(updates, weights, 5.0, std, gen)
        return triton_aggregate.aggregate_updates_triton(updates.to(DEVICE), weights, 5.0, std,
                                                         torch.Generator(device=DEVICE).manual_seed(seed))

    clean = aggregate_updates_reference(updates, weights, 5.0)
    noise = run(1).cpu() - clean
    n = noise.numel()
    # mean within 5 standard errors, sample std within 5 of its standard errors
    assert abs(float(noise.mean())) < 5 * std / n**0.5
    assert abs(float(noise.std()) - std) < 5 * std / (2 * n) ** 0.5
    inside = float((noise.abs() < std).float().mean())  # 68.27% within one sigma for a Gaussian
    assert abs(inside - 0.6827) < 5 * (0.6827 * 0.3173 / n) ** 0.5
    torch.testing.assert_close(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_bad_inputs_raise_clear_errors():
    updates = _updates(k=3, n=100)
    with pytest.raises(ValueError, match="weights"):
        aggregate_updates(updates, torch.ones(2))
    with pytest.raises(ValueError, match="elements"):
        aggregate_updates([updates[0], updates[1, :50]], torch.ones(2))
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate_updates(updates, torch.ones(3), clip_norm=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        aggregate_updates(updates, torch.ones(3), noise_std=-1.0)
    with pytest.raises(TypeError, match="floating"):
        aggregate_updates(updates.long(), torch.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        aggregate_updates([], torch.ones(0))
    poisoned = updates.clone()
    poisoned[1, 7] = float("nan")
    for fn in (aggregate_updates, aggregate_updates_reference, triton_aggregate.aggregate_updates_triton):
        with pytest.raises(ValueError, match=r"\[1\].*NaN"):
            fn(poisoned, torch.ones(3), clip_norm=1.0)
