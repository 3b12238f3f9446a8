"""Multi-LoRA apply: the segmented torch path and the Triton kernels against the per-token reference,
and the reference against peft's own LoRA layer. Triton runs under TRITON_INTERPRET=1 on CPU."""

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

from fedge.kernels.lora import lora_apply, lora_apply_reference, lora_apply_segmented, stack_adapters  # noqa: E402

triton_lora = importlib.import_module("fedge.kernels.lora_triton")


def _case(tokens=19, d_in=96, d_out=80, rank=8, n_adapters=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    a = (torch.randn(n_adapters, rank, d_in, generator=gen) / d_in**0.5).to(dtype)
    b = torch.randn(n_adapters, d_out, rank, generator=gen).to(dtype)
    ids = torch.randint(-1, n_adapters, (tokens,), generator=gen)
    ids[:3] = torch.tensor([-1, 0, n_adapters - 1])
    base = torch.randn(tokens, d_out, generator=gen).to(dtype)
    scaling = torch.linspace(0.5, 2.0, n_adapters)
    return x, a, b, ids, scaling, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_matches_reference(dtype, with_base):
    x, a, b, ids, scaling, base = _case(dtype=dtype)
    base = base if with_base else None
    expected = lora_apply_reference(x, a, b, ids, scaling, base)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    dev = [t.to(DEVICE) if t is not None else None for t in (x, a, b, ids, scaling, base)]
    results = {
        "segmented": lora_apply_segmented(x, a, b, ids, scaling, base),
        "dispatch": lora_apply(x, a, b, ids, scaling, base),
        "triton": triton_lora.lora_apply_triton(*dev),
        # tiles smaller than the features exercise the loops and the output-block grid
        "triton-small-tiles": triton_lora.lora_apply_triton(*dev, block_in=32, block_out=16),
    }
    for name, result in results.items():
        assert result.dtype == dtype and result.shape == expected.shape, name
        torch.testing.assert_close(result.cpu(), expected, **tol, msg=name)
    # tokens without an adapter get exactly the base (or zero)
    no_adapter = ids == -1
    assert torch.equal(results["triton"].cpu()[no_adapter],
                       base[no_adapter] if with_base else torch.zeros_like(expected[no_adapter]))


def test_reference_equals_one_adapter_at_a_time():
    x, a, b, ids, scaling, base = _case(tokens=8)
    out = lora_apply_reference(x, a, b, ids, scaling, base)
    for t in range(8):
        k = int(ids[t])
        expected = base[t] + (scaling[k] * (b[k] @ (a[k] @ x[t])) if k >= 0 else 0)
        torch.testing.assert_close(out[t], expected)


def test_leading_dims_and_float_scaling():
    x, a, b, ids, _, base = _case(tokens=12)
    x3, ids3, base3 = x.reshape(3, 4, -1), ids.reshape(3, 4), base.reshape(3, 4, -1)
    expected = lora_apply_reference(x, a, b, ids, 0.5, base).reshape(3, 4, -1)
    result = triton_lora.lora_apply_triton(x3.to(DEVICE), a.to(DEVICE), b.to(DEVICE), ids3.to(DEVICE), 0.5,
                                           base3.to(DEVICE))
    torch.testing.assert_close(result.cpu(), expected)
    torch.testing.assert_close(lora_apply(x3, a, b, ids3, 0.5, base3), expected)


def test_heterogeneous_ranks_via_padding():
    gen = torch.Generator().manual_seed(3)
    adapters = [(torch.randn(r, 32, generator=gen), torch.randn(24, r, generator=gen)) for r in (2, 8, 5)]
    stacked_a, stacked_b = stack_adapters(adapters)
    assert stacked_a.shape == (3, 8, 32) and stacked_b.shape == (3, 24, 8)
    x = torch.randn(6, 32, generator=gen)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    scaling = torch.tensor([16 / 2, 16 / 8, 16 / 5])  # alpha / r per adapter
    out = triton_lora.lora_apply_triton(x.to(DEVICE), stacked_a.to(DEVICE), stacked_b.to(DEVICE),
                                        ids.to(DEVICE), scaling.to(DEVICE)).cpu()
    for t, k in enumerate(ids.tolist()):
        a, b = adapters[k]
        torch.testing.assert_close(out[t], scaling[k] * (b @ (a @ x[t])), rtol=1e-4, atol=1e-4)


def test_matches_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    lora_model = peft.get_peft_model(model, config)
    layer = lora_model.base_model.model[0]
    x = torch.randn(5, 40)
    with torch.no_grad():
        expected = layer(x)
        base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        a = layer.lora_A["default"].weight[None]
        b = layer.lora_B["default"].weight[None]
        scaling = layer.scaling["default"]
        ids = torch.zeros(5, dtype=torch.long)
        torch.testing.assert_close(lora_apply_reference(x, a, b, ids, scaling, base), expected)
        torch.testing.assert_close(
            triton_lora.lora_apply_triton(x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), ids.to(DEVICE), scaling,
                                          base.to(DEVICE)).cpu(), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x, a, b, ids, scaling, base = _case()
    for fn in (lora_apply, triton_lora.lora_apply_triton):
        with pytest.raises(ValueError, match="features"):
            fn(x[:, :10], a, b, ids, scaling, base)
        with pytest.raises(ValueError, match="lora_b"):
            fn(x, a, b[:, :, :3], ids, scaling, base)
        with pytest.raises(ValueError, match="adapter_ids"):
            fn(x, a, b, ids + 10, scaling, base)
        with pytest.raises(ValueError, match="adapter_ids"):
            fn(x, a, b, ids.float(), scaling, base)
        with pytest.raises(ValueError, match="scaling"):
            fn(x, a, b, ids, scaling[:2], base)
        with pytest.raises(ValueError, match="base"):
            fn(x, a, b, ids, scaling, base[:, :5])
