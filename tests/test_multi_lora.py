"""The verifier's multi-adapter target: each batch row follows its own adapter, exactly as peft would."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedge.cloud.multi_lora import AdapterBank, AdapterLoadError
from fedge.protocol.signing import generate_signing_key, sign_adapter_dir

KEY = generate_signing_key()


def _adapter(model, path, rank, seed, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                  target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    sign_adapter_dir(path, KEY, {"version": path.name, "sequence": 1, "base_model": "tiny-random-llama",
                                 "base_model_fingerprint": "-"})
    return peft_model.eval()


def test_rows_with_different_adapters_match_peft(tiny, tmp_path):
    base, tok = tiny
    one = _adapter(base, tmp_path / "v1", rank=4, seed=1)
    two = _adapter(base, tmp_path / "v2", rank=2, seed=2)  # heterogeneous ranks share one batch
    target = copy.deepcopy(base)
    bank = AdapterBank(target)
    pub = KEY.public_key()
    assert bank.load("v1", tmp_path / "v1", pub) == 0 and bank.load("v2", tmp_path / "v2", pub) == 1
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
    with pytest.raises(AdapterLoadError, match="not a directory"):
        bank.load("missing", tmp_path / "nope", KEY.public_key())
    _adapter(base, tmp_path / "v1", rank=4, seed=1)
    with pytest.raises(AdapterLoadError, match="invalid"):  # signed, but not by the key the bank trusts
        bank.load("v1", tmp_path / "v1", generate_signing_key().public_key())
    with pytest.raises(AdapterLoadError, match="relabelled"):  # signed as v1, loaded as v2
        bank.load("v2", tmp_path / "v1", KEY.public_key())
    assert not bank.wrapped and not bank.index  # a refused adapter changes nothing
    with pytest.raises(KeyError):
        bank.row_index("never-loaded")


def test_versions_targeting_different_modules_share_the_bank(tiny, tmp_path):
    base, tok = tiny
    one = _adapter(base, tmp_path / "v1", rank=4, seed=1, targets=("q_proj",))
    two = _adapter(base, tmp_path / "v2", rank=2, seed=2, targets=("v_proj", "o_proj"))
    target = copy.deepcopy(base)
    bank = AdapterBank(target)
    bank.load("v1", tmp_path / "v1", KEY.public_key())
    bank.load("v2", tmp_path / "v2", KEY.public_key())
    ids = torch.tensor([tok("different modules")["input_ids"]] * 2)
    with torch.no_grad(), bank.rows([bank.row_index("v1"), bank.row_index("v2")]):
        out = target(ids).logits
    torch.testing.assert_close(out[0], one(ids[:1]).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], two(ids[:1]).logits[0], rtol=1e-4, atol=1e-4)
