"""The memory-lean training loss (issue 13): the head run on chunks of tokens, decoder layers checkpointed.

Both are exact rewrites of transformers' causal-LM loss: same value and same LoRA gradients, on the fp32
target and on an int4 draft, with padding, whatever the chunk size."""

from __future__ import annotations

import pytest
import torch

from fedge.peft_methods.chunked_loss import causal_lm_loss, set_gradient_checkpointing, token_loss_sum
from fedge.peft_methods.config import AdapterSpec
from fedge.peft_methods.lora_model import collate

SPEC = AdapterSpec(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))


def _batch():
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in (23, 17, 9)]  # ragged: padding
    return collate(windows, pad_id=0)


def _adapted(client_model: str, tmp_path):
    from fedge.edge.training_model import load_base
    from fedge.peft_methods.lora_model import AdaptedModel

    if client_model == "target":
        adapted = AdaptedModel("tiny-random-llama", SPEC)
    else:
        from fedge.edge.draft import DraftSpec, build_draft

        build_draft(DraftSpec(target="tiny-random-llama", quant="int4"), tmp_path / "draft", progress=False)
        from fedge.peft_methods.quantized_lora import draft_lora_config

        base = load_base("tiny-random-llama", "draft", "int4", None, tmp_path / "draft")
        adapted = AdaptedModel("tiny-random-llama", SPEC, base_and_tokenizer=base, config_factory=draft_lora_config)
    with torch.no_grad():  # B = 0 at init: give it values, so its gradient path is exercised
        for name, param in adapted.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
            param.requires_grad_("lora_" in name)
    return adapted.model


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("client_model", ["target", "draft"])
def test_chunked_loss_and_gradients_equal_the_models_own(client_model, tmp_path):
    model = _adapted(client_model, tmp_path)
    model.train()
    ids, mask, labels = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=ids, attention_mask=mask,
                                                                labels=labels).loss)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for chunk, checkpointing in [(7, False), (1000, False), (5, True)]:
        set_gradient_checkpointing(model, checkpointing)
        loss, grads = _loss_and_grads(model, lambda c=chunk: causal_lm_loss(model, ids, mask, labels, c))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    set_gradient_checkpointing(model, False)


def test_token_loss_sum_counts_only_labelled_positions():
    from fedge.peft_methods.lora_model import AdaptedModel

    model = AdaptedModel("tiny-random-llama", SPEC).model
    ids, mask, labels = _batch()
    with torch.no_grad():
        total, count = token_loss_sum(model, ids, mask, labels, chunk_tokens=4)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                ignore_index=-100, reduction="sum")
    assert count == int((labels[:, 1:] != -100).sum()) == 22 + 16 + 8
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)


def test_fused_cross_entropy_equals_torchs_and_reuses_its_logits():
    from fedge.peft_methods.chunked_loss import IGNORE_INDEX, SumCrossEntropy

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(37, 301, generator=gen) * 4).requires_grad_(True)
    targets = torch.randint(0, 301, (37,), generator=gen)
    targets[[0, 5, 36]] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 1.5, logits)
    x = logits.detach().clone().requires_grad_(True)
    work = x * 1.0  # the logits the function may overwrite (nothing else keeps them)
    total = SumCrossEntropy.apply(work, targets)
    torch.testing.assert_close(total, ref.detach(), rtol=1e-6, atol=1e-4)
    (total * 1.5).backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(x.grad[[0, 5, 36]], torch.zeros(3, 301))
