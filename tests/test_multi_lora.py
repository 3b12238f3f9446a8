"""The verifier's multi-adapter target: each batch row follows its own adapter, exactly as peft would."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedge.cloud.multi_lora import AdapterBank, AdapterLoadError


def _adapter(model, path, rank, seed):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    return peft_model.eval()


def test_rows_with_different_adapters_match_peft(tiny, tmp_path):
    base, tok = tiny
    one = _adapter(base, tmp_path / "v1", rank=4, seed=1)
    two = _adapter(base, tmp_path / "v2", rank=2, seed=2)  # heterogeneous ranks share one batch
    target = copy.deepcopy(base)
    bank = AdapterBank(target)
    assert bank.load("v1", tmp_path / "v1") == 0 and bank.load("v2", tmp_path / "v2") == 1
    ids = torch.tensor([tok("same prompt for all")["input_ids"]] * 3)
    with torch.no_grad():
        with bank.rows([bank.row_index("v1"), bank.row_index(""), bank.row_index("v2")]):
            out = target(ids).logits
        plain = target(ids).logits  # outside the block: the plain target
        torch.testing.assert_close(out[0], one(ids[:1]).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], base(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[2], two(ids[:1]).logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(plain, base(ids).logits, rtol=0, atol=0)
    assert not torch.allclose(out[0], out[2])


def test_bad_adapters_are_refused(tiny, tmp_path):
    base, _ = tiny
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(AdapterLoadError, match="not a readable peft adapter"):
        bank.load("missing", tmp_path / "nope")
    with pytest.raises(KeyError):
        bank.row_index("never-loaded")
