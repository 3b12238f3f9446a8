"""LoRA trained on an edge draft's frozen packed int4/int8 weights (issue 13): gradients through the
packed layers against the dequantised fp32 weights, and a draft-trained adapter that loads into the fp32
target and into another draft unchanged. CPU only: the packed ops are torch's CPU kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from fedge.kernels.quant import Int4Linear, Int8Linear
from fedge.kernels.quant_autograd import int4_unpack_index
from fedge.peft_methods.config import AdapterSpec
from fedge.peft_methods.quantized_lora import (
    QuantizedLoraLinear,
    draft_lora_config,
    load_adapter_on_draft,
    register_quantized_lora,
)


def _weight(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.2


@pytest.mark.parametrize("shape", [(32, 64), (48, 64), (96, 128), (192, 576), (80, 96)])
def test_int4_unpack_matches_the_packed_op(shape):
    """The direct unpack (used backward) reads the op's own layout, including tail blocks of rows."""
    layer = Int4Linear.from_float(_weight(*shape, seed=3), group_size=32)
    unpacked = layer.unpacked_weight()
    assert unpacked.dtype == torch.float32 and unpacked.shape == shape
    # dequantize() goes through the packed op, whose output is rounded to bf16
    torch.testing.assert_close(unpacked.bfloat16(), layer.dequantize().bfloat16(), rtol=0, atol=0)
    index = int4_unpack_index(*shape)
    assert torch.equal(torch.sort(index.long()).values, torch.arange(shape[0] * shape[1]))


class _TwoLayers(nn.Module):
    """proj_in -> silu -> norm -> proj_out: the gradient reaching proj_in's LoRA passes through proj_out's
    weight. (The frozen norm is also the float parameter peft reads the model's device from.)"""

    def __init__(self, proj_in: nn.Module, proj_out: nn.Module):
        super().__init__()
        self.proj_in, self.proj_out = proj_in, proj_out
        self.norm = nn.LayerNorm(proj_in.out_features)

    def forward(self, x):
        return self.proj_out(self.norm(nn.functional.silu(self.proj_in(x))))


def _float_twin(layer) -> nn.Linear:
    weight = layer.unpacked_weight() if isinstance(layer, Int4Linear) else layer.dequantize()
    twin = nn.Linear(layer.in_features, layer.out_features, bias=False)
    twin.weight.data.copy_(weight)
    return twin


def _lora_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in model.named_parameters() if "lora_" in name})
    return grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("quant", ["int4", "int8", "int8-blocks"])
def test_gradients_through_packed_layers_match_dequantised_fp32(quant, monkeypatch):
    if quant == "int8-blocks":  # the wide-layer path (the tied head): outputs written in ragged blocks
        monkeypatch.setattr(Int8Linear, "OUT_BLOCK", 40)
    make = {"int4": lambda w: Int4Linear.from_float(w, 32)}.get(quant, Int8Linear.from_float)
    packed = _TwoLayers(make(_weight(96, 64, seed=1)), make(_weight(64, 96, seed=2)))
    reference = _TwoLayers(_float_twin(packed.proj_in), _float_twin(packed.proj_out))

    def lora(model, custom: bool):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj_in", "proj_out"])
        torch.manual_seed(0)
        peft_model = get_peft_model(model, register_quantized_lora(config) if custom else config)
        with torch.no_grad():  # a non-zero B, so the gradient wrt A is not trivially zero
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
        return peft_model

    packed_peft, reference_peft = lora(packed, custom=True), lora(reference, custom=False)
    assert isinstance(packed_peft.base_model.model.proj_in, QuantizedLoraLinear)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(11))
    got, want = _lora_grads(packed_peft, x), _lora_grads(reference_peft, x)
    assert got.keys() == want.keys() and len(got) == 5  # input, A and B of both layers
    for name in want:
        assert got[name] is not None and got[name].abs().sum() > 0, name
        assert got[name].shape == want[name].shape, name
        # the packed forward runs in bf16 (relative rounding ~4e-3 per layer); backward is fp32
        assert _relative_error(got[name], want[name]) < 2e-2, (name, _relative_error(got[name], want[name]))


def test_inference_forward_is_the_bare_packed_op():
    layer = Int4Linear.from_float(_weight(64, 64, seed=5), 32)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    bare = torch._weight_int4pack_mm_for_cpu(x.detach().bfloat16(), layer.weight_int4, 32, layer.scales_and_zeros)
    assert torch.equal(out, bare.float())
    assert torch.equal(layer(x).detach(), out)  # the autograd path computes the same forward


def test_wide_int8_output_in_blocks_is_the_whole_packed_op(monkeypatch):
    layer = Int8Linear.from_float(_weight(100, 64, seed=6))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(8))
    whole = torch._weight_int8pack_mm(x.bfloat16(), layer.weight_int8, layer.scales).float()
    monkeypatch.setattr(Int8Linear, "OUT_BLOCK", 32)  # blocks of 32, 32, 32, 4
    blocked = layer(x)
    assert blocked.dtype == torch.float32 and torch.equal(blocked, whole)
    assert torch.equal(layer(x.bfloat16()), whole.bfloat16())  # bf16 out: one packed call


@pytest.fixture(scope="module")
def int4_draft_dir(tmp_path_factory):
    from fedge.edge.draft import DraftSpec, build_draft

    out = tmp_path_factory.mktemp("draft-int4")
    build_draft(DraftSpec(target="tiny-random-llama", quant="int4"), out, progress=False)
    return out


SPEC = AdapterSpec(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))


def _train_on_draft(draft_dir, steps: int = 4):
    from fedge.edge.draft import load_draft

    draft, _, info = load_draft(draft_dir)
    assert info.quant == "int4"
    packed_before = {k: v.clone() for k, v in draft.state_dict().items()}
    torch.manual_seed(SPEC.init_seed)
    model = get_peft_model(draft, draft_lora_config(SPEC))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, packed_before, losses


def test_adapter_trained_on_int4_draft_loads_into_target_and_drafts(int4_draft_dir, tmp_path):
    from fedge.edge.draft import load_draft
    from fedge.models import load_model

    model, packed_before, losses = _train_on_draft(int4_draft_dir)
    assert losses[-1] < losses[0], losses  # the adapter learns through the frozen packed layers
    trained = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    assert len(trained) == 2 * 3 * 4  # A and B, three modules, four layers
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    # (3) frozen: every packed buffer and norm of the draft is bit-identical after training
    after = model.get_base_model().state_dict()
    base_after = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == packed_before.keys()
    for key, value in packed_before.items():
        assert torch.equal(base_after[key], value), key

    model.save_pretrained(str(tmp_path / "adapter"))

    target, _ = load_model("tiny-random-llama")
    target_shapes = {name: mod.weight.shape for name, mod in target.named_modules() if isinstance(mod, nn.Linear)}
    on_target = PeftModel.from_pretrained(target, str(tmp_path / "adapter"))
    on_draft = load_adapter_on_draft(load_draft(int4_draft_dir)[0], tmp_path / "adapter")
    for loaded in (on_target, on_draft):
        state = get_peft_model_state_dict(loaded)
        assert state.keys() == trained.keys()
        for key, value in trained.items():
            assert state[key].shape == value.shape and torch.equal(state[key], value), key
    # the factors have the target's shapes: B A is [out, in] of the fp32 layer it adapts
    for key, value in trained.items():
        if "lora_A" in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = trained[key.replace("lora_A", "lora_B")]
            assert (b @ value).shape == target_shapes[module], module

    # the adapter changes the target's output the same way it changes the draft's (same direction)
    ids = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with on_target.disable_adapter():
            plain = on_target(input_ids=ids).logits
        adapted = on_target(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


def test_draft_lora_refuses_dora_and_merge(int4_draft_dir):
    from fedge.edge.draft import load_draft

    with pytest.raises(ValueError, match="DoRA"):
        draft_lora_config(AdapterSpec(rank=4, peft="dora"))
    model = get_peft_model(copy.deepcopy(load_draft(int4_draft_dir)[0]), draft_lora_config(SPEC))
    with pytest.raises(NotImplementedError, match="side path"):
        model.merge_and_unload()


def test_training_model_on_drafts_has_the_targets_adapter_layout(tmp_path):
    """`load_training_model`: cached per process; a full int4 draft's adapter has the target's keys and
    shapes; a truncated draft's adapter lacks the dropped layers, which `get_state(fill_from=)` completes."""
    from fedge.edge.draft import default_draft_dir
    from fedge.edge.training_model import load_training_model
    from fedge.peft_methods.quantized_lora import QuantizedLoraLinear

    target = load_training_model("tiny-random-llama", SPEC, client_model="target")
    draft = load_training_model("tiny-random-llama", SPEC, client_model="draft", quant="int4")
    assert load_training_model("tiny-random-llama", SPEC, client_model="draft") is draft  # cached
    assert (default_draft_dir("tiny-random-llama", None, "int4") / "draft.json").is_file()
    assert any(isinstance(m, QuantizedLoraLinear) for m in draft.model.modules())
    want = target.get_state()
    got = draft.get_state()
    assert got.keys() == want.keys()
    for key, value in want.items():  # same shapes, and the same seeded init of A
        assert got[key].shape == value.shape and torch.equal(got[key], value), key

    short = load_training_model("tiny-random-llama", SPEC, client_model="draft", keep_layers=1)
    partial = short.get_state()
    assert partial and all(".layers.0." in k for k in partial) and set(partial) < set(want)
    filled = short.get_state(fill_from=want)
    assert filled.keys() == want.keys()
    short.set_state(want)  # a full global adapter loads into the truncated draft (dropped layers ignored)
    with pytest.raises(ValueError, match="client_model"):
        load_training_model("tiny-random-llama", SPEC, client_model="phone")


def test_draft_with_fp32_norms_computes_what_the_bf16_draft_does(int4_draft_dir):
    """Training loads the draft's float parts in fp32 (CPUs without bf16 units emulate bf16 slowly);
    the packed weights are the same, so the logits agree up to bf16 rounding."""
    from fedge.edge.draft import load_draft

    bf16, _, _ = load_draft(int4_draft_dir)
    fp32, _, _ = load_draft(int4_draft_dir, float_dtype=torch.float32)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = bf16(input_ids=ids).logits.float(), fp32(input_ids=ids).logits
    assert _relative_error(b, a) < 3e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_draft_is_read_into_aligned_tensors_equal_to_the_file(int4_draft_dir):
    """load_draft reads the file with plain reads (no mmap'd second copy); the packed ops need 64-byte
    aligned buffers, which tensors handed out over a mapping of the file do not always have."""
    from safetensors.torch import load_file

    from fedge.edge.draft import load_draft, read_safetensors

    file = int4_draft_dir / "draft.safetensors"
    mapped, read = load_file(str(file)), read_safetensors(file)
    assert mapped.keys() == read.keys()
    for key, tensor in mapped.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key
    draft, _, _ = load_draft(int4_draft_dir, float_dtype=torch.float32)
    buffers = dict(draft.named_buffers())
    packed = [k for k in buffers if k.endswith(("weight_int4", "weight_int8"))]
    assert packed and all(buffers[k].data_ptr() % 64 == 0 for k in packed)
    for key in packed:
        assert torch.equal(buffers[key], mapped[key]), key
    assert not any(t.is_meta for t in [*draft.parameters(), *buffers.values()])
